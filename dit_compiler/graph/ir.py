"""The operation graph: the single source of truth between the spec and every emitter and runner.

Tensors use NNTile's feature-first layout: a token tensor is `[hidden, tokens, batch]`, the same
memory as torch's `[batch, tokens, hidden]`. Every dimension names an axis (see `dit_compiler.tiling`),
so a tensor's tile shape is the tile of each of its axes.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from dit_compiler.spec.model import Spec

Role = Literal["input", "param", "const", "activation"]

#: The closed set of op kinds. Host ops run in numpy on the host: NNTile has no op for them and no
#: gradient flows through them into a parameter (patchify's input gradient is a host permutation).
OP_KINDS: dict[str, str] = {
    "patchify": "host: image [N, C, H, W] -> patch vectors [patch_dim, tokens, batch], (c, p, q) order",
    "timestep_sinusoid": "host: timesteps [batch] -> [cos, sin] features [frequency, batch]",
    "unpatchify": "host: patch outputs [out_dim, tokens, batch] -> image [N, C_out, H, W]",
    "linear": "y = W x + b over the first axis; W keeps torch's [out, in] shape",
    "add_const_slice": "y = x + table broadcast over one axis (the fixed positional table)",
    "embedding": "y[:, n] = table[:, label[n]]",
    "act": "element-wise activation (silu or gelutanh)",
    "add": "y = a + b",
    "layer_norm": "normalise over the hidden axis, no affine parameters",
    "modulate": "y = x * (1 + scale) + shift, shift and scale broadcast over tokens",
    "gated_residual": "y = x + gate * h, gate broadcast over tokens",
    "attention": "multi-head self-attention with q, k, v and output projections",
}

HOST_OPS = frozenset({"patchify", "timestep_sinusoid", "unpatchify"})


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
    """Where a graph parameter lives in the torch reference's state_dict.

    `rows` slices the torch tensor's first axis (adaLN chunks, fused qkv). `layout` says how the rows
    become the graph tensor: `same` (shape unchanged), `transpose` (2-D transpose), `heads_in`
    ([H*hd, D] -> [H, hd, D]), `heads_out` ([D, H*hd] -> [D, H, hd]),
    `conv` ([d, C, p, p] -> [d, C*p*p]).
    """

    key: str
    rows: tuple[int, int] | None = None
    layout: str = "same"


@dataclass(frozen=True)
class Tensor:
    name: str
    dims: tuple[str, ...]
    shape: tuple[int, ...]
    tile: tuple[int, ...]
    role: Role
    dtype: str = "fp32"
    source: ParamSource | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def ntiles(self) -> int:
        return math.prod(math.ceil(s / t) for s, t in zip(self.shape, self.tile))


@dataclass(frozen=True)
class Node:
    """One op. `component` is the verify-table row it belongs to; `scope` the torch module path."""

    name: str
    op: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    component: str
    scope: str
    attrs: dict[str, Any] = field(default_factory=dict)

    @property
    def host(self) -> bool:
        return self.op in HOST_OPS


@dataclass
class Graph:
    spec: Spec
    axes: dict[str, Axis]
    tensors: dict[str, Tensor] = field(default_factory=dict)
    nodes: list[Node] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    #: Graph-level facts the emitters need that are not tensor shapes (eps values, frequency shift).
    attrs: dict[str, Any] = field(default_factory=dict)

    # -- construction -------------------------------------------------------------------------
    def tensor(self, name: str, dims: tuple[str, ...], role: Role, dtype: str = "fp32",
               source: ParamSource | None = None) -> str:
        if name in self.tensors:
            raise ValueError(f"tensor {name!r} defined twice")
        shape = tuple(self.axes[d].size for d in dims)
        tile = tuple(self.axes[d].tile for d in dims)
        self.tensors[name] = Tensor(name, dims, shape, tile, role, dtype, source)
        return name

    def add(self, node: Node) -> Node:
        self.nodes.append(node)
        return node

    # -- queries ------------------------------------------------------------------------------
    @property
    def params(self) -> list[Tensor]:
        return [t for t in self.tensors.values() if t.role == "param"]

    def components(self) -> list[str]:
        """Verify-table rows in first-appearance order."""
        return list(dict.fromkeys(n.component for n in self.nodes))

    # -- checks -------------------------------------------------------------------------------
    def lint(self) -> None:
        """Check graph invariants and NNTile's tiling rules op by op; raise ValueError on a breach."""
        from dit_compiler.graph.rules import check_node

        defined = set(self.inputs) | {t.name for t in self.tensors.values() if t.role in ("param", "const")}
        for node in self.nodes:
            for name in node.inputs:
                if name not in self.tensors:
                    raise ValueError(f"{node.name}: unknown input {name!r}")
                if name not in defined:
                    raise ValueError(f"{node.name}: input {name!r} used before it is produced")
            for name in node.outputs:
                if name in defined:
                    raise ValueError(f"{node.name}: output {name!r} produced twice")
                defined.add(name)
            if node.op not in OP_KINDS:
                raise ValueError(f"{node.name}: unknown op kind {node.op!r}")
            check_node(self, node)
        for name in self.outputs:
            if name not in defined:
                raise ValueError(f"graph output {name!r} is never produced")

    # -- serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "spec": self.spec.to_dict(),
            "axes": {a.name: {"size": a.size, "tile": a.tile, "tiles": a.ntiles} for a in self.axes.values()},
            "attrs": self.attrs,
            "inputs": self.inputs,
            "outputs": self.outputs,
            "tensors": [_tensor_dict(t) for t in self.tensors.values()],
            "nodes": [asdict(n) | {"host": n.host} for n in self.nodes],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=False) + "\n"


def _tensor_dict(t: Tensor) -> dict:
    d = asdict(t)
    if t.source is None:
        del d["source"]
    return d
