"""NNTile's tiling rules as checks on a node's ports, composed per op kind in `dit_compiler.compiler.graph.ops`.

- element-wise ops: identical shapes and tiles;
- slice (broadcast) ops: the small tensor's tiles equal the big one's with the broadcast axis removed;
- fiber ops: the small tensor is one axis of the big one, with its tiles;
- gemm (linear): matching tiles on the contracted axis and on the batch axes;
- attention: the head dimension is whole and the head tile divides the head count.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dit_compiler.compiler.graph.ir import Graph, Node, Tensor

Rule = Callable[["Graph", "Node"], None]


def _tensor(graph: Graph, node: Node, port: str) -> Tensor:
    ports = node.inputs | node.outputs
    return graph.tensors[ports[port]]


def _fail(node: Node, message: str) -> ValueError:
    return ValueError(f"{node.name} ({node.op}): {message}")


def _show(t: Tensor) -> str:
    return f"{t.name} {t.shape}/{t.tile}"


def same(*ports: str) -> Rule:
    """Element-wise: every named port has the first one's shape and tiles."""
    def rule(graph: Graph, node: Node) -> None:
        first = _tensor(graph, node, ports[0])
        for port in ports[1:]:
            other = _tensor(graph, node, port)
            if (other.shape, other.tile) != (first.shape, first.tile):
                raise _fail(node, f"element-wise: {_show(first)} vs {_show(other)}")
    return rule


def slice_of(small_port: str, big_port: str, axis_dim: str | int) -> Rule:
    """The small tensor is the big one with its `axis_dim` axis (a name, or a position: a token tensor's
    axis 1 is its token axis, the image's or the context's) removed, tiles included."""
    def rule(graph: Graph, node: Node) -> None:
        small, big = _tensor(graph, node, small_port), _tensor(graph, node, big_port)
        axis = axis_dim if isinstance(axis_dim, int) else big.dims.index(axis_dim)
        shape, tile = big.shape[:axis] + big.shape[axis + 1:], big.tile[:axis] + big.tile[axis + 1:]
        if (small.shape, small.tile) != (shape, tile):
            raise _fail(node, f"{_show(small)} is not a slice of {_show(big)} along its {axis_dim} axis")
    return rule


def fiber_of(small_port: str, big_port: str, axis_dim: str, optional: bool = False) -> Rule:
    """The small tensor is the big one's `axis_dim` axis alone, tiles included (a per-feature weight);
    `optional`: no rule where the node leaves the small port out."""
    def rule(graph: Graph, node: Node) -> None:
        if optional and small_port not in node.inputs:
            return
        small, big = _tensor(graph, node, small_port), _tensor(graph, node, big_port)
        axis = big.dims.index(axis_dim)
        if (small.shape, small.tile) != ((big.shape[axis],), (big.tile[axis],)):
            raise _fail(node, f"{_show(small)} is not the {axis_dim} fiber of {_show(big)}")
    return rule


def gemm(x_port: str, w_port: str, y_port: str, b_port: str | None = None) -> Rule:
    """y = W x over the first axis of x: W's second axis contracts with it, the other axes of x are
    batch axes of y; a bias is a vector over y's first axis."""
    def rule(graph: Graph, node: Node) -> None:
        x, w, y = (_tensor(graph, node, p) for p in (x_port, w_port, y_port))
        if w.shape[1] != x.shape[0] or w.tile[1] != x.tile[0]:
            raise _fail(node, f"contracted axis {_show(w)} vs {_show(x)}")
        if y.shape != (w.shape[0],) + x.shape[1:] or y.tile != (w.tile[0],) + x.tile[1:]:
            raise _fail(node, f"output {_show(y)} does not match {_show(w)} and {_show(x)}")
        if b_port is not None and b_port in node.inputs:
            b = _tensor(graph, node, b_port)
            if (b.shape, b.tile) != (y.shape[:1], y.tile[:1]):
                raise _fail(node, f"bias {_show(b)} vs output {_show(y)}")
    return rule


def rows_of(small_port: str, big_port: str) -> Rule:
    """The small tensor [k, m*N] holds m pieces of k rows for each of the big one's N columns [D, N], which
    fit from the node's offset (copy_intersection moves them, so the tiles may differ)."""
    def rule(graph: Graph, node: Node) -> None:
        small, big = _tensor(graph, node, small_port), _tensor(graph, node, big_port)
        pieces, ragged = divmod(small.shape[1], big.shape[1]) if len(small.shape) == len(big.shape) == 2 else (0, 1)
        if ragged or not 0 <= node.attrs.offset <= big.shape[0] - pieces * small.shape[0]:
            raise _fail(node, f"{_show(small)} at row {node.attrs.offset} is not pieces of rows of {_show(big)}")
    return rule


def embedding(labels_port: str, table_port: str, y_port: str) -> Rule:
    """y[:, n] = table[:, labels[n]]: the class axis is one tile, the feature tile divides y's."""
    def rule(graph: Graph, node: Node) -> None:
        labels, table, y = (_tensor(graph, node, p) for p in (labels_port, table_port, y_port))
        if y.shape != (table.shape[0],) + labels.shape or y.tile[0] % table.tile[0]:
            raise _fail(node, f"{_show(y)} vs table {_show(table)}")
        if table.tile[1] != table.shape[1]:
            raise _fail(node, f"the class axis of {table.name} must be one tile")
    return rule


def heads(weight_port: str, x_port: str) -> Rule:
    """Attention: q/k/v weights [heads, head_dim, hidden]; the head dimension is whole, the head tile
    divides the head count, the hidden tile is the input's."""
    def rule(graph: Graph, node: Node) -> None:
        w, x = _tensor(graph, node, weight_port), _tensor(graph, node, x_port)
        n_heads, head_dim = w.shape[0], w.shape[1]
        if w.tile[1] != head_dim:
            raise _fail(node, "the head dimension must be one tile")
        if n_heads % w.tile[0]:
            raise _fail(node, f"head tile {w.tile[0]} does not divide {n_heads} heads")
        if w.tile[2] != x.tile[0]:
            raise _fail(node, f"hidden tiles of {w.name} and {x.name} differ")
    return rule


def _same_axes(a: Tensor, b: Tensor, axes: tuple[int, ...]) -> bool:
    return all((a.shape[k], a.tile[k]) == (b.shape[k], b.tile[k]) for k in axes)


def streams(x_port: str, c_port: str) -> Rule:
    """Two token streams [hidden, tokens, batch] attended jointly: the same hidden and batch axes, tiles
    included; their token axes are their own."""
    def rule(graph: Graph, node: Node) -> None:
        x, c = _tensor(graph, node, x_port), _tensor(graph, node, c_port)
        if not _same_axes(x, c, (0, 2)):
            raise _fail(node, f"streams {_show(x)} and {_show(c)} differ on the hidden or batch axis")
    return rule


def joined(x_port: str, c_port: str, y_port: str) -> Rule:
    """y is the two streams' tokens joined: x's hidden and batch axes, x's tokens then c's."""
    def rule(graph: Graph, node: Node) -> None:
        x, c, y = (_tensor(graph, node, p) for p in (x_port, c_port, y_port))
        if not _same_axes(x, y, (0, 2)) or y.shape[1] != x.shape[1] + c.shape[1]:
            raise _fail(node, f"{_show(y)} is not {_show(x)} joined with {_show(c)} along the tokens")
    return rule


def token_range(x_port: str, y_port: str) -> Rule:
    """y is a token range of x starting at the node's `start`: the same hidden and batch axes, tiles included."""
    def rule(graph: Graph, node: Node) -> None:
        x, y = _tensor(graph, node, x_port), _tensor(graph, node, y_port)
        if not _same_axes(x, y, (0, 2)) or not 0 <= node.attrs.start <= x.shape[1] - y.shape[1]:
            raise _fail(node, f"{_show(y)} is not tokens {node.attrs.start}.. of {_show(x)}")
    return rule


def mask_of(mask_port: str, context_port: str) -> Rule:
    """A key mask [context, batch]: the context's token and batch axes, tiles included (absent: no rule)."""
    def rule(graph: Graph, node: Node) -> None:
        if mask_port not in node.inputs:
            return
        mask, context = _tensor(graph, node, mask_port), _tensor(graph, node, context_port)
        if (mask.shape, mask.tile) != (context.shape[1:], context.tile[1:]):
            raise _fail(node, f"mask {_show(mask)} is not the token and batch axes of {_show(context)}")
    return rule


def token_concat(x_port: str, vector_ports: tuple[str, ...], y_port: str) -> Rule:
    """y [f, tokens, batch] is x [f, n, batch] (optional) then one token per vector [f, batch]: the
    feature and batch axes match, tiles included; the token axes may tile differently."""
    def rule(graph: Graph, node: Node) -> None:
        y = _tensor(graph, node, y_port)
        edges = (y.shape[0], y.shape[2]), (y.tile[0], y.tile[2])
        n = 0
        if x_port in node.inputs:
            x = _tensor(graph, node, x_port)
            n = x.shape[1]
            if ((x.shape[0], x.shape[2]), (x.tile[0], x.tile[2])) != edges:
                raise _fail(node, f"{_show(x)} and {_show(y)} differ outside the token axis")
        for port in vector_ports:
            v = _tensor(graph, node, port)
            if (v.shape, v.tile) != edges:
                raise _fail(node, f"{_show(v)} is not a token of {_show(y)}")
        if y.shape[1] != n + len(vector_ports):
            raise _fail(node, f"{_show(y)} does not hold {n} + {len(vector_ports)} tokens")
    return rule


def token_prefix(x_port: str, y_port: str) -> Rule:
    """y [f, n, batch] is the first n tokens of x [f, tokens, batch]: other axes match, tiles included."""
    def rule(graph: Graph, node: Node) -> None:
        x, y = _tensor(graph, node, x_port), _tensor(graph, node, y_port)
        if (x.shape[0], x.shape[2], x.tile[0], x.tile[2]) != (y.shape[0], y.shape[2], y.tile[0], y.tile[2]) \
                or y.shape[1] > x.shape[1]:
            raise _fail(node, f"{_show(y)} is not a token prefix of {_show(x)}")
    return rule


def host(graph: Graph, node: Node) -> None:
    """Host ops run in numpy on whole arrays: no tiling rule applies."""


def all_of(*rules: Rule) -> Rule:
    def rule(graph: Graph, node: Node) -> None:
        for r in rules:
            r(graph, node)
    return rule
