"""The operation graph: the single source of truth between the spec and every emitter and runner.

Tensors use NNTile's feature-first layout: a token tensor is `[hidden, tokens, batch]`, the same
memory as torch's `[batch, tokens, hidden]`. Every dimension names an axis (see `dit_compiler.compiler.tiling`)
or is a fixed whole size, so a tensor's shape and tile shape follow from its dims.

Nodes bind tensors to their op kind's named ports (`dit_compiler.compiler.graph.ops` defines every kind once).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Mapping

from dit_compiler.compiler.graph.ops import OPS
from dit_compiler.compiler.spec.model import Spec

#: input, param and const tensors exist before the graph runs; activations are the values ops produce;
#: `kept` tensors are a layer's own values kept from forward to backward (attention's probabilities),
#: `scratch` tensors are shared by all layers and live within one pass. The last two come from the
#: target's layer declarations (`attach_internals`), so the graph accounts for every byte.
Role = Literal["input", "param", "const", "activation", "kept", "scratch"]
Dim = str | int


@dataclass(frozen=True)
class Axis:
    name: str
    size: int
    tile: int

    @property
    def ntiles(self) -> int:
        return math.ceil(self.size / self.tile)


@dataclass(frozen=True)
class ParamSource:
    """Where a graph parameter lives in the torch reference's state_dict, and that tensor's shape.

    `rows` slices the torch tensor's first axis (adaLN chunks, fused qkv). `layout` says how the rows
    become the graph tensor: `same` (shape unchanged), `transpose` (2-D transpose), `heads_in`
    ([H*hd, ...] -> [H, hd, ...]), `heads_out` ([D, H*hd] -> [D, H, hd]), `conv` ([d, C, p, p] -> [d, C*p*p]),
    `table` ([1, T, D] -> [D, T], a constant table), `crop` (a constant table's centred crop, as SD3's
    positional table of pos_embed_max_size^2 rows; a persistent buffer where saved). `saved`: whether state_dict holds it (a constant
    may be a non-persistent buffer).
    """

    key: str
    torch_shape: tuple[int, ...]   # the whole torch tensor's
    rows: tuple[int, int] | None = None
    layout: str = "same"
    saved: bool = True


@dataclass(frozen=True)
class Tensor:
    name: str
    dims: tuple[Dim, ...]
    shape: tuple[int, ...]
    tile: tuple[int, ...]
    role: Role
    dtype: str = "fp32"
    source: ParamSource | None = None
    #: Whether a gradient flows into this tensor in backward (it depends on a parameter or on the latent).
    grad: bool = False
    #: The block this tensor belongs to, if any.
    block: int | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def ntiles(self) -> int:
        return math.prod(math.ceil(s / t) for s, t in zip(self.shape, self.tile))


@dataclass(frozen=True)
class Node:
    """One op: its kind's ports bound to tensor names. `component` is the verify-table row it belongs
    to, `scope` the torch module path, `block` the DiT block it is part of. `internals` names the
    graph tensors its target layer keeps or borrows (see `attach_internals`)."""

    name: str
    op: str
    inputs: Mapping[str, str]
    outputs: Mapping[str, str]
    component: str
    scope: str
    block: int | None = None
    attrs: Any = None
    internals: Mapping[str, str] = field(default_factory=dict)

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(self.inputs.values())

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(self.outputs.values())

    @property
    def host(self) -> bool:
        return OPS[self.op].host


@dataclass
class Graph:
    spec: Spec
    axes: dict[str, Axis]
    tensors: dict[str, Tensor] = field(default_factory=dict)
    nodes: list[Node] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)

    # -- construction -------------------------------------------------------------------------
    def tensor(self, name: str, dims: tuple[Dim, ...], role: Role, dtype: str = "fp32",
               source: ParamSource | None = None, block: int | None = None) -> str:
        if name in self.tensors:
            raise ValueError(f"tensor {name!r} defined twice")
        shape = tuple(d if isinstance(d, int) else self.axes[d].size for d in dims)
        tile = tuple(d if isinstance(d, int) else self.axes[d].tile for d in dims)
        self.tensors[name] = Tensor(name, dims, shape, tile, role, dtype, source, block=block)
        return name

    def add(self, node: Node) -> Node:
        self.nodes.append(node)
        return node

    # -- queries ------------------------------------------------------------------------------
    @property
    def params(self) -> list[Tensor]:
        return [t for t in self.tensors.values() if t.role == "param"]

    @property
    def depth(self) -> int:
        """The number of blocks (the nodes' block indices)."""
        return 1 + max((n.block for n in self.nodes if n.block is not None), default=-1)

    def first(self, op: str) -> Node:
        """The first node of op kind `op` (where a model fact lives in its attributes: the patch size)."""
        return next(n for n in self.nodes if n.op == op)

    @property
    def device_nodes(self) -> list[Node]:
        return [n for n in self.nodes if not n.host]

    def components(self) -> list[str]:
        """Verify-table rows in first-appearance order."""
        return list(dict.fromkeys(n.component for n in self.nodes))

    # -- checks -------------------------------------------------------------------------------
    def lint(self) -> None:
        """Check graph invariants and every node's op-kind rule (ports, attributes, NNTile's tiling
        rules); raise ValueError on a breach."""
        defined = set(self.inputs) | {t.name for t in self.tensors.values() if t.role in ("param", "const")}
        for node in self.nodes:
            kind = OPS.get(node.op)
            if kind is None:
                raise ValueError(f"{node.name}: unknown op kind {node.op!r}; known: {', '.join(OPS)}")
            if not callable(kind.rule):
                raise ValueError(f"{node.name}: op kind {node.op!r} has no tiling rule")
            if tuple(node.inputs) != kind.ports_of(node) or tuple(node.outputs) != kind.outputs:
                raise ValueError(f"{node.name} ({node.op}): ports {tuple(node.inputs)} -> {tuple(node.outputs)}, "
                                 f"the kind declares {kind.inputs} -> {kind.outputs}")
            if not isinstance(node.attrs, kind.attrs):
                raise ValueError(f"{node.name} ({node.op}): attributes {node.attrs!r} are not {kind.attrs.__name__}")
            for name in node.input_names:
                if name not in self.tensors:
                    raise ValueError(f"{node.name}: unknown input {name!r}")
                if name not in defined:
                    raise ValueError(f"{node.name}: input {name!r} used before it is produced")
            for name in node.output_names:
                if name in defined:
                    raise ValueError(f"{node.name}: output {name!r} produced twice")
                defined.add(name)
            kind.rule(self, node)
        for name in self.outputs:
            if name not in defined:
                raise ValueError(f"graph output {name!r} is never produced")

    # -- serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "spec": self.spec.compiled_dict(),
            "axes": {a.name: {"size": a.size, "tile": a.tile, "tiles": a.ntiles} for a in self.axes.values()},
            "inputs": self.inputs,
            "outputs": self.outputs,
            "tensors": [_tensor_dict(t) for t in self.tensors.values()],
            "nodes": [_node_dict(n) for n in self.nodes],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=False) + "\n"


def _tensor_dict(t: Tensor) -> dict:
    d = {key: value for key, value in asdict(t).items() if not (key in ("source", "block") and value is None)}
    if t.source is not None and t.source.saved:
        del d["source"]["saved"]
    return d


def _node_dict(n: Node) -> dict:
    d = {"name": n.name, "op": n.op, "inputs": dict(n.inputs), "outputs": dict(n.outputs),
         "component": n.component, "scope": n.scope, "host": n.host}
    if n.block is not None:
        d["block"] = n.block
    if n.attrs is not None:
        d["attrs"] = asdict(n.attrs)
    if n.internals:
        d["internals"] = dict(n.internals)
    return d
