"""What the checks share: seeded weights and inputs, the error metric."""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from dit_compiler.compiler.graph.ir import Graph
from dit_compiler.compiler.naming import TRACE


def rel_error(actual, expected) -> float:
    """Norm-wise relative error ||a - b|| / ||b|| (NNTile's layer tests use the same metric)."""
    a = np.asarray(actual, dtype=np.float64).ravel()
    b = np.asarray(expected, dtype=np.float64).ravel()
    denominator = np.linalg.norm(b)
    return float(np.linalg.norm(a - b) / denominator) if denominator > 0 else float(np.linalg.norm(a))


def group_error(pairs: list[tuple[np.ndarray, np.ndarray]]) -> float:
    """Relative error of several tensors taken as one vector."""
    if not pairs:
        return float("nan")
    return rel_error(np.concatenate([np.ravel(a) for a, _ in pairs]), np.concatenate([np.ravel(b) for _, b in pairs]))


@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int) -> None:
    """Give every trainable weight a random value (DiT zero-initialises adaLN and the output layer, so its
    default output is exactly zero and proves nothing): those of `random_weights`."""
    params = dict(module.named_parameters())
    shapes = {name: tuple(p.shape) for name, p in params.items() if p.requires_grad}
    for name, value in random_weights(shapes, seed):
        params[name].copy_(value)


def random_weights(shapes: Mapping[str, tuple[int, ...]], seed: int) -> Iterator[tuple[str, torch.Tensor]]:
    """Seeded random weights by state_dict key, one at a time (a process that must not hold a second copy
    of a large model loads them as they come): matrices std 1/sqrt(fan_in), vectors std 0.5, drawn in
    key order, so the same shapes and seed give the same values whatever holds them."""
    generator = torch.Generator().manual_seed(seed)
    for name in sorted(shapes):
        shape = shapes[name]
        std = 1.0 / np.sqrt(np.prod(shape[1:])) if len(shape) > 1 else 0.5
        yield name, torch.randn(shape, generator=generator) * std


@dataclass(frozen=True)
class Inputs:
    x: torch.Tensor          # latent [N, C, H, W]
    t: torch.Tensor          # timesteps [N], float
    y: torch.Tensor          # labels [N], int64, the null class included
    grad_out: torch.Tensor   # output gradient [N, C_out, H, W]
    #: The other graph inputs by graph name, batch first: captions [N, L, W], their mask [N, L] (1 keep,
    #: 0 drop), PixArt's resolution [N, 2] and aspect ratio [N].
    context: dict[str, torch.Tensor] = field(default_factory=dict)

    def args(self, graph: Graph) -> tuple[torch.Tensor, ...]:
        """The graph's inputs in its order: the torch reference's (and the NNTile model's) forward arguments."""
        values = {TRACE.x: self.x, TRACE.t: self.t, TRACE.y: self.y} | self.context
        return tuple(values[name] for name in graph.inputs)


def make_inputs(graph: Graph, seed: int) -> Inputs:
    """Seeded random inputs at the graph's batch and image shape: a caption mask keeps the first token
    and each other one with probability 1/2 (an item with every token dropped is not a caption)."""
    g = torch.Generator().manual_seed(seed + 1)
    x_shape = graph.tensors[graph.inputs[0]].shape
    out_shape = graph.tensors[graph.outputs[0]].shape
    n = x_shape[0]
    classes = graph.axes["classes"].size if "classes" in graph.axes else 1
    inputs = Inputs(
        x=torch.randn(x_shape, generator=g),
        t=torch.randint(0, 1000, (n,), generator=g).float(),
        y=torch.randint(0, classes, (n,), generator=g),
        grad_out=torch.randn(out_shape, generator=g),
    )
    for name in graph.inputs[3 if TRACE.y in graph.inputs else 2:]:
        shape = graph.tensors[name].shape[::-1]   # batch first
        if name == TRACE.caption_mask:
            value = (torch.rand(shape, generator=g) < 0.5).float()
            value[:, 0] = 1.0
        elif name == TRACE.resolution:
            value = torch.randint(256, 2048, shape, generator=g).float()
        elif name == TRACE.aspect_ratio:
            value = 0.5 + 1.5 * torch.rand(shape, generator=g)
        else:
            value = torch.randn(shape, generator=g)
        inputs.context[name] = value
    return inputs
