"""Class labels as the inputs of a text-conditioned model (a `model.caption`: PixArt-alpha), so that the
class-labelled data ditc trains on (digits, image folders, `.npz` files) drives every family the same way.

The caption table: label c (0 <= c < CAPTION_CLASSES) stands for the caption of `caption.length` tokens of
`caption.width` features drawn from a standard normal with numpy's `default_rng([CAPTION_SEED, c])`, its
first 1 + (c mod length) tokens kept by the mask and the rest padded; label CAPTION_CLASSES, the null class
that label dropout and classifier-free guidance use, is the empty caption: zeros, its first token kept
(T5's encoding of "" is one end-of-text token). SD3's pooled text vector of label c is `pooled_width` features
from `default_rng([CAPTION_SEED, c, 1])`, the null label's zeros. PixArt 1024's size conditioning gets the
image size in pixels (8 x the latent's side, the VAE's factor) and aspect ratio 1. The table is fixed, computed on the
host when needed, and the same for every backend and run.
"""
from __future__ import annotations

import numpy as np

from dit_compiler.compiler.naming import TRACE

#: Labels a caption model can be given (ImageNet's count); label CAPTION_CLASSES is the empty caption.
CAPTION_CLASSES = 1000
CAPTION_SEED = 24
#: Latent side -> image side (the Stable Diffusion VAE's downsampling).
VAE_FACTOR = 8


def label_classes(model) -> int:
    """The labels 0..n-1 a model (`ModelSpec`) is trained and sampled on: its classes, or the caption
    table's rows for a caption model; label n is the null class."""
    return CAPTION_CLASSES if model.caption is not None else model.num_classes


def caption(c: int, length: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Label c's caption [length, width] and mask [length] (see the module docstring)."""
    mask = np.zeros(length, dtype=np.float32)
    if c == CAPTION_CLASSES:
        mask[0] = 1.0
        return np.zeros((length, width), dtype=np.float32), mask
    mask[:1 + c % length] = 1.0
    return np.random.default_rng([CAPTION_SEED, c]).standard_normal((length, width), dtype=np.float32), mask


def pooled(c: int, width: int) -> np.ndarray:
    """Label c's pooled text vector [width] (SD3's; see the module docstring)."""
    if c == CAPTION_CLASSES:
        return np.zeros(width, dtype=np.float32)
    return np.random.default_rng([CAPTION_SEED, c, 1]).standard_normal(width, dtype=np.float32)


def label_inputs(graph, y: np.ndarray) -> tuple[np.ndarray, ...]:
    """The graph's inputs after the latent and the timesteps, for labels y [N] (the null class included):
    the labels themselves, or the captions, their mask, pooled vectors and size conditioning of the caption
    table."""
    return inputs_for(graph.inputs[2:], graph.spec.model, y)


def inputs_for(names: list[str], m, y: np.ndarray) -> tuple[np.ndarray, ...]:
    """`label_inputs` for a model (`ModelSpec`) whose graph inputs after the timesteps are `names`."""
    if list(names) == [TRACE.y]:
        return (y,)
    rows = {int(c): caption(int(c), m.caption.length, m.caption.width) for c in np.unique(y)}
    values = {TRACE.caption: np.stack([rows[int(c)][0] for c in y]),
              TRACE.caption_mask: np.stack([rows[int(c)][1] for c in y]),
              TRACE.resolution: np.full((len(y), 2), VAE_FACTOR * m.input_size, dtype=np.float32),
              TRACE.aspect_ratio: np.ones(len(y), dtype=np.float32)}
    if TRACE.pooled in names:
        values[TRACE.pooled] = np.stack([pooled(int(c), m.caption.pooled_width) for c in y])
    return tuple(values[name] for name in names)
