"""Passes over a lowered graph: which tensors take a gradient, and the target layers' own tensors."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any, Protocol

from dit_compiler.compiler.graph.ir import Dim, Graph
from dit_compiler.compiler.graph.ops import OPS


def mark_gradients(graph: Graph) -> None:
    """A tensor takes a gradient when it is a parameter, the latent input (whose gradient `ditc verify`
    checks), or the output of an op with such an input. Timestep features and labels take none."""
    flows = {t.name for t in graph.params} | {graph.inputs[0]}
    for node in graph.nodes:
        if flows.intersection(node.input_names):
            flows.update(node.output_names)
    graph.tensors = {name: replace(t, grad=name in flows) for name, t in graph.tensors.items()}


class LayerDeclaration(Protocol):
    """What a target's layer class says about the tensors it needs besides its ports: kept from its
    forward to its backward (`KEEPS`), and scratch used within one pass and shared with every other
    layer that names the same purpose (`SCRATCH`); each as dims (axis names or fixed sizes)."""

    KEEPS: Mapping[str, tuple[Dim, ...]]
    SCRATCH: Mapping[str, tuple[Dim, ...]]

    def scratch_of(self, attrs: Any) -> Mapping[str, tuple[Dim, ...]]:
        """The scratch of a node with these attributes (SCRATCH, and what an option adds)."""


def kept_name(node: str, internal: str) -> str:
    return f"{node}.{internal}"


def scratch_name(purpose: str) -> str:
    return f"scratch.{purpose}"


def attach_internals(graph: Graph, layers: Mapping[str, LayerDeclaration]) -> None:
    """Give every device node the graph tensors its target layer declares (`node.internals`), so that
    shapes, tiles and memory of everything a layer allocates are the graph's. `layers` maps an op
    kind's `layer` name to the target's class."""
    scratch: dict[str, tuple[Dim, ...]] = {}
    nodes = []
    for node in graph.nodes:
        kind = OPS[node.op]
        if kind.host:
            nodes.append(node)
            continue
        layer = layers[kind.layer]
        internals = {}
        for name, dims in layer.KEEPS.items():
            internals[name] = graph.tensor(kept_name(node.name, name), dims, "kept", block=node.block)
        for purpose, dims in layer.scratch_of(node.attrs).items():
            tensor = scratch_name(purpose)
            if purpose not in scratch:
                scratch[purpose] = dims
                graph.tensor(tensor, dims, "scratch")
            elif scratch[purpose] != dims:
                raise ValueError(f"{layer.__name__}: scratch {purpose!r} as {dims}, elsewhere as {scratch[purpose]}")
            internals[purpose] = tensor
        nodes.append(replace(node, internals=internals))
    graph.nodes = nodes
