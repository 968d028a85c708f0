"""The fixed 2-D sin-cos positional table, defined once: the NNTile runtime calls it, and the torch
emitter copies its two functions' source into every standalone torch reference (`SOURCE`)."""
from __future__ import annotations

import inspect

import numpy as np


def sincos_pos_embed(embed_dim: int, grid_size: int, scale: float = 1.0) -> np.ndarray:
    """Fixed 2-D sin-cos positional table [tokens, embed_dim] (MAE's `get_2d_sincos_pos_embed`); positions
    divided by `scale` (diffusers' `interpolation_scale`)."""
    pos = np.arange(grid_size, dtype=np.float32) / scale
    grid = np.stack(np.meshgrid(pos, pos), axis=0)  # w goes first
    emb_h = _sincos_1d(embed_dim // 2, grid[0].reshape(-1))
    emb_w = _sincos_1d(embed_dim // 2, grid[1].reshape(-1))
    return np.concatenate([emb_h, emb_w], axis=1)


def _sincos_1d(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    omega = 1.0 / 10000 ** (np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0))
    out = np.einsum("m,d->md", pos, omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def pos_scale(model) -> int:
    """The positional table's `scale` for a model (`ModelSpec`): diffusers' PixArt divides the positions by
    its `interpolation_scale`, max(sample_size // 64, 1) (2 for the 1024 model); DiT by 1."""
    return max(model.input_size // 64, 1) if model.conditioning == "adaln_single" else 1


#: The functions' source, for the torch reference (which imports only torch and numpy).
SOURCE = inspect.getsource(sincos_pos_embed) + "\n\n" + inspect.getsource(_sincos_1d)
