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


#: Token axes besides the image's: MMDiT's context (caption) tokens and the joint sequence of both.
OTHER_TOKEN_AXES = ("context", "joint")


def token_axis(first_input: tuple[Dim, ...]) -> str:
    """The token axis a node runs on, from its first input's dims: that tensor's second axis where it is a
    token tensor [features, token axis, batch] of another token axis than the image's, else `tokens`."""
    dims = first_input
    return dims[1] if len(dims) == 3 and dims[1] in OTHER_TOKEN_AXES and dims[2] == "batch" else "tokens"


def on_axis(dims: tuple[Dim, ...], axis: str) -> tuple[Dim, ...]:
    """A layer's declared dims with the image token axis (`tokens`) replaced by the node's: layers
    declare their own tensors over `tokens`, meaning the token axis of the stream they run on."""
    return tuple(axis if d == "tokens" else d for d in dims)


def layer_internals(layer: LayerDeclaration, node: str, first_input: tuple[Dim, ...],
                    attrs: Any) -> dict[str, tuple[str, tuple[Dim, ...], str]]:
    """The tensors a node's layer declares, by its name for each: (graph tensor name, dims, kept or
    scratch). Scratch on another token axis than the image's is its own tensor (`purpose@axis`)."""
    axis = token_axis(first_input)
    found = {name: (kept_name(node, name), on_axis(dims, axis), "kept") for name, dims in layer.KEEPS.items()}
    for purpose, declared in layer.scratch_of(attrs).items():
        dims = on_axis(declared, axis)
        found[purpose] = (scratch_name(purpose if dims == declared else f"{purpose}@{axis}"), dims, "scratch")
    return found


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
        first = graph.tensors[next(iter(node.inputs.values()))].dims
        for name, (tensor, dims, role) in layer_internals(layer, node.name, first, node.attrs).items():
            if role == "kept":
                graph.tensor(tensor, dims, "kept", block=node.block)
            elif tensor not in scratch:
                scratch[tensor] = dims
                graph.tensor(tensor, dims, "scratch")
            elif scratch[tensor] != dims:
                raise ValueError(f"{layer.__name__}: scratch {name!r} as {dims}, elsewhere as {scratch[tensor]}")
            internals[name] = tensor
        nodes.append(replace(node, internals=internals))
    graph.nodes = nodes
