"""The torch code the op kinds run in the generated reference (`torch_reference.py`).

The emitter copies the functions a model uses into its reference by their source, so the reference
imports only torch, numpy and math; tests import them from here to hold each against torch's own
(`rms_norm` against `torch.nn.RMSNorm`). Tensors are batch-first: a token tensor is [N, T, D].
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def tap(trace: dict | None, name: str, value: torch.Tensor) -> torch.Tensor:
    """Record an intermediate under its graph name (and keep its gradient) when `ditc verify` traces."""
    if trace is not None:
        if value.requires_grad:
            value.retain_grad()
        trace[name] = value
    return value


class Group(nn.Module):
    """A module path of the checkpoint layout that holds only other modules (`attn` of `attn.qkv`)."""

    def __init__(self, **children: nn.Module) -> None:
        super().__init__()
        for name, child in children.items():
            self.add_module(name, child)


def patch_tokens(proj: nn.Conv2d, image: torch.Tensor) -> torch.Tensor:
    """Patchify and project in one: a Conv2d with stride p, [N, C, H, W] -> [N, T, D]."""
    return proj(image).flatten(2).transpose(1, 2)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: int, shift: int) -> torch.Tensor:
    """Sinusoidal timestep features [N, dim], cos first; shift 0 is DiT's, 1 diffusers'."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
                      / (half - shift))
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def label_embedding(table: nn.Embedding, y: torch.Tensor, null_class: int, prob: float,
                    training: bool) -> torch.Tensor:
    """The class table's rows; in training a label drops to the null row with probability `prob`."""
    if training and prob > 0:
        drop = torch.rand(y.shape[0], device=y.device) < prob
        y = torch.where(drop, null_class, y)
    return table(y)


def layer_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm over the last axis without affine parameters (`nn.LayerNorm(elementwise_affine=False)`)."""
    return F.layer_norm(x, x.shape[-1:], eps=eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight over the last axis (`nn.RMSNorm`)."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def gated_residual(x: torch.Tensor, h: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    return x + gate.unsqueeze(1) * h


def add_rows(x: torch.Tensor, h: torch.Tensor, offset: int, width: int) -> torch.Tensor:
    """x [N, width] + h placed at features offset.. and zero elsewhere: a concatenation of pieces added
    to x, each feature added to once (so the sum is exact). h is [N, k], or [m*N, k]: m pieces of each
    item, piece j of item n at row j*N + n, side by side."""
    n = x.shape[0]
    h = h.reshape(-1, n, h.shape[-1]).transpose(0, 1).reshape(n, -1)
    return x + F.pad(h, (offset, width - offset - h.shape[1]))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, mask: torch.Tensor | None = None,
              mask_bias: float = -10000.0, q_norm: nn.Module | None = None,
              k_norm: nn.Module | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(head_dim)) v per head; q and the result are [N, T, D], k and v [N, L, D] (L = T
    in self-attention). A key mask [N, L] (1 keep, 0 padded) adds mask_bias (1 - mask) to the scores, as
    diffusers' Attention does with its encoder attention mask; q_norm and k_norm (QK norm) normalise each
    head's queries and keys over head_dim, as diffusers' Attention(qk_norm=...) does."""
    n, tokens, hidden = q.shape
    q, k, v = (z.reshape(n, z.shape[1], heads, hidden // heads).transpose(1, 2) for z in (q, k, v))
    if q_norm is not None:
        q, k = q_norm(q), k_norm(k)
    bias = None if mask is None else (mask_bias * (1 - mask))[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)           # [N, H, T, hd]
    return out.transpose(1, 2).reshape(n, tokens, hidden)


def joint_attention(x: torch.Tensor, c: torch.Tensor, image: tuple[nn.Module, ...],
                    context: tuple[nn.Module | None, ...], heads: int,
                    norms: tuple[nn.RMSNorm, ...] | None = None) -> torch.Tensor:
    """MMDiT's joint attention (diffusers' JointAttnProcessor2_0): one attention over the image tokens x
    [N, T, D] followed by the context tokens c [N, L, D], each stream projected by its own q, k, v and
    output Linears (`image`, `context`: q, k, v, out). The result is [N, T + L, D], both streams' outputs,
    or [N, T, D] where the context has no output projection (the last block: context_pre_only). `norms`:
    QK norm (SD3.5), the RMSNorms of each head's q and k over head_dim: image q, k, context q, k."""
    parts = [[own(x), added(c)] for own, added in zip(image[:3], context[:3])]
    if norms is not None:
        for z, stream in ((0, 0), (1, 0), (0, 1), (1, 1)):
            norm = norms[2 * stream + z]
            parts[z][stream] = rms_norm(parts[z][stream].unflatten(-1, (heads, -1)), norm.weight,
                                        norm.eps).flatten(-2)
    q, k, v = (torch.cat(pair, dim=1) for pair in parts)
    out = attention(q, k, v, heads=heads)
    tokens = x.shape[1]
    y = image[3](out[:, :tokens])
    return y if context[3] is None else torch.cat([y, context[3](out[:, tokens:])], dim=1)


def unpatchify(x: torch.Tensor, patch_size: int, channels: int) -> torch.Tensor:
    """[N, T, p*p*C] -> [N, C, H, W]."""
    grid = math.isqrt(x.shape[1])
    x = x.reshape(x.shape[0], grid, grid, patch_size, patch_size, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(x.shape[0], channels, grid * patch_size, grid * patch_size)
