"""Cost model: multiply-accumulates, tiles (tasks) and bytes, per node and in total.

MACs follow the DiT paper's Table 4 count: every linear (the patch projection included) costs
`rows * in * out`, attention costs its four projections plus `2 * T^2 * d` per image. Element-wise
ops, norms and host ops count as zero MACs (they are bandwidth-bound; their cost shows in `bytes`).
"""
from __future__ import annotations

from dataclasses import dataclass

from dit_compiler.graph.ir import Graph, Node

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
    activation_bytes: int
    gradient_bytes: int
    optimizer_bytes: int
    tasks: int


def node_cost(graph: Graph, node: Node) -> NodeCost:
    t = graph.tensors
    outs = [t[n] for n in node.outputs]
    macs = 0
    if node.op == "linear":
        macs = outs[0].numel * t[node.inputs[1]].shape[1]
    elif node.op == "attention":
        d, tokens, batch = t[node.inputs[0]].shape
        macs = batch * (4 * tokens * d * d + 2 * tokens * tokens * d)
    tiles = 0 if node.host else sum(o.ntiles for o in outs)
    return NodeCost(macs, tiles, sum(o.numel * DTYPE_BYTES[o.dtype] for o in outs))


def totals(graph: Graph) -> Totals:
    params = graph.params
    n_params = sum(p.numel for p in params)
    param_bytes = sum(p.numel * DTYPE_BYTES[p.dtype] for p in params)
    acts = [x for x in graph.tensors.values() if x.role == "activation"]
    act_bytes = sum(a.numel * DTYPE_BYTES[a.dtype] for a in acts)
    costs = [node_cost(graph, n) for n in graph.nodes]
    return Totals(
        forward_macs=sum(c.macs for c in costs),
        params=n_params,
        param_bytes=param_bytes,
        activation_bytes=act_bytes,
        gradient_bytes=param_bytes + act_bytes,
        optimizer_bytes=OPTIMIZER_STATES * param_bytes,
        tasks=sum(c.tiles for c in costs),
    )


def gflops(macs: int) -> float:
    """The paper's 'GFlops' are forward MACs in units of 1e9."""
    return macs / 1e9
