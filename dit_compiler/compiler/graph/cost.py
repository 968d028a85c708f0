"""Cost model: multiply-accumulates, tiles (tasks) and bytes, per node and in total.

MACs follow the DiT paper's Table 4 count (each op kind's `macs`, see `dit_compiler.compiler.graph.ops`):
every linear (the patch projection included) costs `rows * in * out`, attention its four projections
plus `2 * T^2 * d` per image. Element-wise ops, norms and host ops count as zero MACs (they are
bandwidth-bound; their cost shows in `bytes`). Memory counts every graph tensor, the target layers'
kept and scratch tensors included (`attach_internals` puts them in the graph).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from dit_compiler.compiler.graph.ir import Graph, Node
from dit_compiler.compiler.graph.ops import OPS

DTYPE_BYTES = {"fp32": 4, "int64": 8}
#: AdamW keeps two moments per parameter.
OPTIMIZER_STATES = 2


@dataclass(frozen=True)
class NodeCost:
    macs: int
    tiles: int          # tiles of the node's outputs: a lower bound on its NNTile tasks
    out_bytes: int


@dataclass(frozen=True)
class Totals:
    forward_macs: int
    params: int
    param_bytes: int
    activation_bytes: int       # graph activations and the layers' kept tensors
    kept_bytes: int             # of which the layers' own (attention's q, k, v, probabilities, ...)
    scratch_bytes: int          # shared by all layers, within one pass
    gradient_bytes: int         # of parameters and of the activations that take a gradient
    optimizer_bytes: int
    tasks: int


def nbytes(graph: Graph, name: str) -> int:
    t = graph.tensors[name]
    return t.numel * DTYPE_BYTES[t.dtype]


def node_cost(graph: Graph, node: Node) -> NodeCost:
    outs = node.output_names
    tiles = 0 if node.host else sum(graph.tensors[o].ntiles for o in outs)
    return NodeCost(OPS[node.op].macs(graph, node), tiles, sum(nbytes(graph, o) for o in outs))


def totals(graph: Graph) -> Totals:
    def total(roles: tuple[str, ...], grad_only: bool = False) -> int:
        return sum(nbytes(graph, t.name) for t in graph.tensors.values()
                   if t.role in roles and (t.grad or not grad_only))

    params = graph.params
    param_bytes = total(("param",))
    costs = [node_cost(graph, n) for n in graph.nodes]
    return Totals(
        forward_macs=sum(c.macs for c in costs),
        params=sum(p.numel for p in params),
        param_bytes=param_bytes,
        activation_bytes=total(("activation", "kept")),
        kept_bytes=total(("kept",)),
        scratch_bytes=total(("scratch",)),
        gradient_bytes=param_bytes + total(("activation",), grad_only=True),
        optimizer_bytes=OPTIMIZER_STATES * param_bytes,
        tasks=sum(c.tiles for c in costs),
    )


def gflops(macs: int) -> float:
    """The paper's 'GFlops' are forward MACs in units of 1e9."""
    return macs / 1e9


def largest_tile_gemm(graph: Graph) -> tuple[int, int, int]:
    """(m, n, k) of one tile GEMM of the linear op with the most MACs, as a tiled runtime runs it: `m` the
    output feature tile, `k` the input feature tile, `n` the product of the input's other tiles (DiT-S/2 at
    batch 8: the MLP's first layer, 768 x 512 x 384). The shape `ditc bench` times each side's BLAS on."""
    node = max((n for n in graph.nodes if n.op == "linear"), key=lambda n: OPS[n.op].macs(graph, n))
    w, x = graph.tensors[node.inputs["w"]], graph.tensors[node.inputs["x"]]
    return w.tile[0], math.prod(x.tile[1:]), w.tile[1]
