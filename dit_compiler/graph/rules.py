"""NNTile's tiling rules, checked op by op on the graph (`Graph.lint`).

- element-wise ops: identical shapes and tiles;
- slice (broadcast) ops: the small tensor's tiles equal the big one's with the broadcast axis removed;
- gemm (linear): matching tiles on the contracted axis and on the batch axes;
- attention: the head dimension is whole and the head tile divides the head count.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dit_compiler.graph.ir import Graph, Node, Tensor


def _same(node: Node, a: Tensor, b: Tensor, what: str) -> None:
    if a.shape != b.shape or a.tile != b.tile:
        raise ValueError(f"{node.name} ({node.op}): {what}: {a.name} {a.shape}/{a.tile} "
                         f"vs {b.name} {b.shape}/{b.tile}")


def _slice_of(node: Node, small: Tensor, big: Tensor, axis: int) -> None:
    shape = big.shape[:axis] + big.shape[axis + 1:]
    tile = big.tile[:axis] + big.tile[axis + 1:]
    if small.shape != shape or small.tile != tile:
        raise ValueError(f"{node.name} ({node.op}): {small.name} {small.shape}/{small.tile} is not a slice "
                         f"of {big.name} {big.shape}/{big.tile} along axis {axis}")


def check_node(graph: Graph, node: Node) -> None:
    t = [graph.tensors[n] for n in node.inputs]
    out = [graph.tensors[n] for n in node.outputs]
    if node.op in ("act", "layer_norm"):
        _same(node, t[0], out[0], "element-wise")
    elif node.op == "add":
        _same(node, t[0], t[1], "element-wise")
        _same(node, t[0], out[0], "element-wise")
    elif node.op in ("modulate", "gated_residual"):
        x = t[0]
        _same(node, x, out[0], "element-wise")
        broadcast = x.dims.index("tokens")
        for small in (t[1], t[2]) if node.op == "modulate" else (t[2],):
            _slice_of(node, small, x, broadcast)
        if node.op == "gated_residual":
            _same(node, x, t[1], "element-wise")
    elif node.op == "add_const_slice":
        _same(node, t[0], out[0], "element-wise")
        _slice_of(node, t[1], t[0], node.attrs["axis"])
    elif node.op == "linear":
        x, w, y = t[0], t[1], out[0]
        if w.shape[1] != x.shape[0] or w.tile[1] != x.tile[0]:
            raise ValueError(f"{node.name} (linear): contracted axis {w.name} {w.shape}/{w.tile} "
                             f"vs {x.name} {x.shape}/{x.tile}")
        if y.shape != (w.shape[0],) + x.shape[1:] or y.tile != (w.tile[0],) + x.tile[1:]:
            raise ValueError(f"{node.name} (linear): output {y.name} {y.shape}/{y.tile} does not match "
                             f"{w.name} {w.shape}/{w.tile} and {x.name} {x.shape}/{x.tile}")
        if len(t) > 2 and (t[2].shape, t[2].tile) != (y.shape[:1], y.tile[:1]):
            raise ValueError(f"{node.name} (linear): bias {t[2].name} {t[2].shape}/{t[2].tile} "
                             f"vs output {y.name} {y.shape}/{y.tile}")
    elif node.op == "embedding":
        labels, table, y = t[0], t[1], out[0]
        if y.shape != (table.shape[0],) + labels.shape or y.tile[0] % table.tile[0]:
            raise ValueError(f"{node.name} (embedding): {y.name} {y.shape}/{y.tile} vs table {table.shape}/{table.tile}")
        if table.tile[1] != table.shape[1]:
            raise ValueError(f"{node.name} (embedding): the class axis of {table.name} must be one tile")
    elif node.op == "attention":
        x, y = t[0], out[0]
        _same(node, x, y, "input and output")
        w_q = t[1]
        heads, head_dim = w_q.shape[0], w_q.shape[1]
        if w_q.tile[1] != head_dim:
            raise ValueError(f"{node.name} (attention): the head dimension must be one tile")
        if heads % w_q.tile[0]:
            raise ValueError(f"{node.name} (attention): head tile {w_q.tile[0]} does not divide {heads} heads")
        if w_q.tile[2] != x.tile[0]:
            raise ValueError(f"{node.name} (attention): hidden tiles of {w_q.name} and {x.name} differ")
