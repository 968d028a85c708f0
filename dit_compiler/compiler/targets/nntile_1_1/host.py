"""Host-side ops (numpy, on whole arrays): where NNTile has no op and no parameter gradient flows.

Patches and the output image are permutations of the latent; the timestep features are computed with
the very torch ops the torch reference uses, so both sides feed their first linear the same bits.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Geometry:
    """The model's host-side facts, from the graph's axes."""

    patch_size: int
    grid: int             # patches per side
    in_channels: int
    out_channels: int
    hidden: int
    frequency: int        # sinusoidal timestep features
    frequency_shift: int  # 0 as DiT, 1 as diffusers
    max_period: int


def patchify(x: np.ndarray, g: Geometry) -> np.ndarray:
    """[N, C, H, W] -> [N, T, C*p*p], the patch vector in (c, p, q) order (the conv weight's)."""
    n, c, p = x.shape[0], x.shape[1], g.patch_size
    x = np.asarray(x, dtype=np.float32).reshape(n, c, g.grid, p, g.grid, p).transpose(0, 2, 4, 1, 3, 5)
    return x.reshape(n, g.grid * g.grid, c * p * p)


def patchify_grad(d_patches: np.ndarray, g: Geometry) -> np.ndarray:
    """The inverse permutation of `patchify`: gradient of the patches -> gradient of the image."""
    n, p = d_patches.shape[0], g.patch_size
    x = d_patches.reshape(n, g.grid, g.grid, g.in_channels, p, p).transpose(0, 3, 1, 4, 2, 5)
    return x.reshape(n, g.in_channels, g.grid * p, g.grid * p)


def unpatchify(x: np.ndarray, g: Geometry) -> np.ndarray:
    """[N, T, p*p*C] -> [N, C, H, W] (DiT's einsum nhwpqc->nchpwq)."""
    n, p, c = x.shape[0], g.patch_size, g.out_channels
    x = x.reshape(n, g.grid, g.grid, p, p, c).transpose(0, 5, 1, 3, 2, 4)
    return x.reshape(n, c, g.grid * p, g.grid * p)


def unpatchify_grad(d_out: np.ndarray, g: Geometry) -> np.ndarray:
    """The inverse permutation of `unpatchify`."""
    n, p, c = d_out.shape[0], g.patch_size, g.out_channels
    x = np.asarray(d_out, dtype=np.float32).reshape(n, c, g.grid, p, g.grid, p).transpose(0, 2, 4, 3, 5, 1)
    return x.reshape(n, g.grid * g.grid, p * p * c)


def timestep_features(t: np.ndarray, g: Geometry) -> np.ndarray:
    """[N] -> [N, frequency] features [cos, sin]: the torch reference's `timestep_embedding`, op for op
    in float32 (numpy's float32 `exp` differs from torch's in the last bit of some frequencies, and
    timesteps up to 999 magnify that to 1e-5 of the features)."""
    import torch

    half = g.frequency // 2
    freqs = torch.exp(-math.log(g.max_period) * torch.arange(half, dtype=torch.float32) / (half - g.frequency_shift))
    args = torch.from_numpy(np.asarray(t, dtype=np.float32))[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1).numpy()


# -- parameter layouts: torch rows <-> graph tensor (see `dit_compiler.compiler.graph.ir.ParamSource`) --------
def to_graph_layout(value: np.ndarray, layout: str, shape: tuple[int, ...]) -> np.ndarray:
    if layout == "transpose":
        value = value.T
    value = value.reshape(shape)  # same, conv ([d, C, p, p] -> [d, C*p*p]), heads_in, heads_out
    return np.asfortranarray(value, dtype=np.float32)


def from_graph_layout(value: np.ndarray, layout: str, torch_shape: tuple[int, ...]) -> np.ndarray:
    if layout == "transpose":
        value = value.T
    return np.ascontiguousarray(value).reshape(torch_shape)
