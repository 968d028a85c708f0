"""What every runner shares: loading generated modules, seeded weights and inputs, the error metric."""
from __future__ import annotations

import importlib.util
import sys
import types
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dit_compiler.errors import UsageError
from dit_compiler.compiler.graph.ir import Graph


def load_module(path: str | Path, name: str | None = None) -> types.ModuleType:
    """Import a generated file under a unique module name (several builds can live in one process)."""
    path = Path(path).resolve()
    name = name or f"ditc_generated_{abs(hash(str(path)))}_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except (SyntaxError, ImportError, OSError) as error:   # a build file edited into something Python cannot run
        del sys.modules[name]
        where = f", line {error.lineno}" if isinstance(error, SyntaxError) and error.lineno else ""
        why = str(getattr(error, "msg", None) or error)
        raise UsageError(f"{path}: cannot be imported ({type(error).__name__}{where}: {why})"
                         + ("" if "rebuild it" in why else "; rebuild it with `ditc build`")) from None
    return module


def import_diffusers() -> types.ModuleType:
    """diffusers, able to save and load weights: every use of diffusers in ditc (and its tests) imports it here.

    diffusers 0.32 saves and loads safetensors files through `safetensors.torch` without importing that
    submodule; it works only where something else imported it first (accelerate or transformers, which
    NNTile imports). Without them `save_pretrained` and `from_pretrained` fail with "module 'safetensors'
    has no attribute 'torch'", so it is imported here, before diffusers is used."""
    import safetensors.torch  # noqa: F401  (see the docstring: diffusers needs it imported)

    import diffusers

    return diffusers


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


def make_inputs(graph: Graph, seed: int) -> Inputs:
    """Seeded random inputs at the graph's batch and image shape."""
    g = torch.Generator().manual_seed(seed + 1)
    x_shape = graph.tensors[graph.inputs[0]].shape
    out_shape = graph.tensors[graph.outputs[0]].shape
    n = x_shape[0]
    return Inputs(
        x=torch.randn(x_shape, generator=g),
        t=torch.randint(0, 1000, (n,), generator=g).float(),
        y=torch.randint(0, graph.axes["classes"].size, (n,), generator=g),
        grad_out=torch.randn(out_shape, generator=g),
    )
