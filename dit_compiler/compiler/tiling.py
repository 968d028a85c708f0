"""Tile sizes: the size of every tiled axis and the `auto` rule.

Tiling is per axis, not per tensor: every tensor dimension names an axis, and every tensor that has
that axis uses its one tile size. This makes NNTile's rules hold by construction (element-wise ops
see identical tiles, slice ops see the big tensor's tiles less the broadcast axis, gemm sees matching
tiles on contracted and batch axes); `Graph.lint` checks them again op by op.

The `auto` rule (documented in the README): an axis is split into the fewest tiles `n >= n_min`
whose size `ceil(size / n)` is at most the axis' cap, preferring an `n` that divides the axis evenly
when one exists with at most twice the tiles. Caps keep a tile of the largest tensors (the MLP
activations `[mlp, tokens, batch]`, the attention scores `[tokens, tokens, batch, heads]`) within
about 4 MiB of fp32, the size at which NNTile's CPU kernels reached torch's GEMM speed on DiT-S/2
layers. The hidden axis is a GEMM contraction: whole up to its cap, since splitting it makes every
GEMM accumulate partial products (on DiT-S/2 at batch 8, 116 against 127 GFLOP/s on 2 workers for the
MLP's first GEMM). All heads share one tile, so attention's GEMMs are few and large (a DiT-S/2 step
about 7% faster than with two head tiles, in paired profiles). The batch tile takes as many images as
keep a token tensor's tile within TOKEN_TILE_BUDGET, so small models run few large tasks (NNTile's
per-task cost dominates them). Only when the token tensors would be a single tile is an axis split in
two, so that both CPU workers of a 2-core machine have work: the batch, or with one image the hidden
axis and the heads (by a divisor of their count); `n_min = 2` on the MLP axis does the same for the MLP.
"""
from __future__ import annotations

import math

from dit_compiler.compiler.spec.model import TILE_AXES, ModelSpec, TilingSpec

#: (cap, n_min) of the `auto` rule per axis; an axis without an entry stays whole. The batch axis's cap
#: is not fixed: as many images as keep a token tensor's tile within TOKEN_TILE_BUDGET.
AUTO_RULE: dict[str, tuple[int, int]] = {
    "tokens": (128, 1),
    "hidden": (512, 1),
    "mlp": (1024, 2),
}
#: Elements of a token tensor's tile (hidden x tokens x batch tiles) the batch tile grows to: 1 MiB of
#: fp32. DiT-S/2 at batch 8 gets [384, 128, 4] as before; a small model gets whole batches, so its
#: step is a few large tasks instead of many small ones (specs/digits.yaml: 2 batch tiles, not 16).
TOKEN_TILE_BUDGET = 2**18


def out_channels(model: ModelSpec) -> int:
    """Output channels: noise and variance when sigma is learned."""
    return model.in_channels * 2 if model.learn_sigma else model.in_channels


def axis_sizes(model: ModelSpec, batch: int) -> dict[str, int]:
    """The size of every tiled axis the model has, compiled at `batch` (`context` and `caption` only
    where it reads a context or a caption)."""
    grid = model.input_size // model.patch_size
    optional = {"context": model.context_tokens, "caption": model.caption.width if model.caption else 0}
    return {
        "batch": batch,
        "tokens": grid * grid + 2 * (model.conditioning == "in_context"),   # in_context: + t and y tokens
        "hidden": model.hidden_size,
        "mlp": model.mlp_size,
        "heads": model.num_heads,
        "patch_dim": model.in_channels * model.patch_size ** 2,
        "out_dim": out_channels(model) * model.patch_size ** 2,
        "frequency": model.frequency_embedding_size,
    } | {axis: size for axis, size in optional.items() if size}


def auto_tile(axis: str, size: int, split: bool = False) -> int:
    """The tile size `auto` picks for `axis` of length `size`; `split` asks for at least two tiles."""
    if axis == "heads":
        # All heads in one tile, or the largest proper divisor of the head count when split.
        return max([d for d in range(1, size) if size % d == 0] or [size]) if split else size
    if axis not in AUTO_RULE:
        return size
    cap, n_min = AUTO_RULE[axis]
    return _split(size, cap, max(n_min, 2 if split else 1))


def _split(size: int, cap: int, n_min: int = 1) -> int:
    """The tile of the fewest tiles `n >= n_min` of at most `cap`, preferring (up to 2n) one dividing `size`."""
    n = max(n_min, math.ceil(size / cap))
    n = min(n, size)
    for even in range(n, min(2 * n, size) + 1):
        if size % even == 0:
            return size // even
    return math.ceil(size / n)


def resolve_tiles(model: ModelSpec, batch: int, tiling: TilingSpec) -> dict[str, int]:
    """Integer tile size of every axis; `auto` replaced by the rule above."""
    sizes = axis_sizes(model, batch)
    tiles = {}
    for axis in sizes:
        value = getattr(tiling, axis)
        tiles[axis] = auto_tile(axis, sizes[axis]) if value == "auto" else int(value)
    if tiling.batch == "auto":
        tiles["batch"] = _split(batch, max(1, TOKEN_TILE_BUDGET // (tiles["hidden"] * tiles["tokens"])))
    if math.prod(math.ceil(sizes[a] / tiles[a]) for a in ("hidden", "tokens", "batch")) < 2:
        # One tile per token tensor leaves a worker idle: split the batch (no GEMM then accumulates
        # partial products), or with one image the hidden axis and the heads.
        if tiling.batch == "auto" and batch > 1:
            tiles["batch"] = _split(batch, batch, 2)
        else:
            for axis in ("hidden", "heads"):
                if getattr(tiling, axis) == "auto":
                    tiles[axis] = auto_tile(axis, sizes[axis], split=True)
    return tiles


def tile_problems(model: ModelSpec, batch: int, tiling: TilingSpec) -> list[tuple[str, object, str]]:
    """Tile sizes NNTile cannot run, as (axis, bad value, what is allowed). Assumes a valid model."""
    sizes = axis_sizes(model, batch)
    problems = []
    for axis in TILE_AXES:
        value = getattr(tiling, axis)
        if value == "auto":
            continue
        if axis not in sizes:
            problems.append((axis, value, f"auto: the model has no {axis} axis (it has one with a model.caption"
                                          + ", or conditioning cross_attention" * (axis == "context") + ")"))
        elif not 1 <= value <= sizes[axis]:
            problems.append((axis, value, f"an integer from 1 to the axis size {sizes[axis]}, or auto"))
        elif axis == "heads" and sizes[axis] % value:
            divisors = [d for d in range(1, sizes[axis] + 1) if sizes[axis] % d == 0]
            problems.append((axis, value, f"a divisor of num_heads={sizes[axis]}: {divisors}, or auto"))
    return problems
