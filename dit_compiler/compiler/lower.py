"""Lowering: resolved spec -> operation graph. The only place that knows the models' structure: the
design of `model.conditioning` (a module of `dit_compiler.compiler.designs` each) builds the graph."""
from __future__ import annotations

from dit_compiler.compiler.designs.adaln import AdaLN
from dit_compiler.compiler.designs.adaln_single import AdaLNSingle
from dit_compiler.compiler.designs.adaln_zero import AdaLNZero
from dit_compiler.compiler.designs.base import Lowering
from dit_compiler.compiler.designs.cross_attention import CrossAttention
from dit_compiler.compiler.designs.in_context import InContext
from dit_compiler.compiler.designs.joint import Joint
from dit_compiler.compiler.graph.ir import Graph
from dit_compiler.compiler.graph.passes import mark_gradients
from dit_compiler.compiler.spec.model import Spec

#: The lowering of each `model.conditioning` value (validation refuses the others, spec.designs).
DESIGNS: dict[str, type[Lowering]] = {
    "adaln_zero": AdaLNZero,
    "adaln": AdaLN,
    "in_context": InContext,
    "cross_attention": CrossAttention,
    "adaln_single": AdaLNSingle,
    "joint": Joint,
}


def groups(spec: Spec) -> dict[str, tuple[str, ...]]:
    """`ditc verify`'s rows made of several components of the blocks (a node's `component` names its own
    row), as the spec's design groups them (adaln_zero: its adaLN-Zero machinery)."""
    return DESIGNS[spec.model.conditioning].GROUPS


def lower(spec: Spec, lowering: type[Lowering] | None = None) -> Graph:
    """Build the operation graph of `spec` (target-independent; see `dit_compiler.compiler.build.graph_of`)
    with its design's lowering, or `lowering`."""
    graph = (lowering or DESIGNS[spec.model.conditioning])(spec).lower()
    mark_gradients(graph)
    graph.lint()
    return graph
