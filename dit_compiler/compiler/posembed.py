"""The fixed 2-D sin-cos positional table, defined once: the NNTile runtime calls it, and the torch
emitter copies these functions' source into every standalone torch reference (`SOURCE`)."""
from __future__ import annotations

import inspect

import numpy as np


def sincos_pos_embed(embed_dim: int, grid_size: int, scale: float = 1.0,
                     max_size: int | None = None) -> np.ndarray:
    """Fixed 2-D sin-cos positional table [tokens, embed_dim] (MAE's `get_2d_sincos_pos_embed`); positions
    divided by `scale` (diffusers' `interpolation_scale`). With `max_size` (SD3's pos_embed_max_size),
    diffusers' PatchEmbed table: max_size x max_size positions scaled by grid_size / max_size, of which a
    model of grid_size patches adds the centred crop (`crop_pos_embed`)."""
    size = max_size or grid_size
    pos = np.arange(size, dtype=np.float32) / np.float32(size / grid_size) / scale   # exact for size == grid
    grid = np.stack(np.meshgrid(pos, pos), axis=0)  # w goes first
    emb_h = _sincos_1d(embed_dim // 2, grid[0].reshape(-1))
    emb_w = _sincos_1d(embed_dim // 2, grid[1].reshape(-1))
    return np.concatenate([emb_h, emb_w], axis=1)


def crop_pos_embed(table, grid_size: int):
    """The centred grid_size x grid_size crop of a square positional table [..., max_size^2, D] (numpy or
    torch; diffusers' `PatchEmbed.cropped_pos_embed`)."""
    size = round(table.shape[-2] ** 0.5)
    top = (size - grid_size) // 2
    square = table.reshape(*table.shape[:-2], size, size, table.shape[-1])
    crop = square[..., top:top + grid_size, top:top + grid_size, :]
    return crop.reshape(*table.shape[:-2], grid_size * grid_size, table.shape[-1])


def _sincos_1d(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    omega = 1.0 / 10000 ** (np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0))
    out = np.einsum("m,d->md", pos, omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def pos_scale(model) -> int:
    """The positional table's `scale` for a model (`ModelSpec`): diffusers' PixArt divides the positions by
    its `interpolation_scale`, max(sample_size // 64, 1) (2 for the 1024 model); DiT by 1."""
    return max(model.input_size // 64, 1) if model.conditioning == "adaln_single" else 1


#: The functions' source, for the torch reference (which imports only torch and numpy).
SOURCE = "\n\n".join(inspect.getsource(f) for f in (sincos_pos_embed, crop_pos_embed, _sincos_1d))
