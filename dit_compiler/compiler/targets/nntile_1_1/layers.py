"""The layers of the NNTile 1.1 target: one class per device op kind (`dit_compiler.compiler.graph.ops`, whose
`layer` names the class), composed of NNTile 1.1.0's tensor kernels.

A layer's ports are its op kind's ports, set as attributes (`self.x`, `self.w`, ...): a `Moments` for a
value with a gradient, a plain NNTile tensor for labels and constants. Each class declares

- `BACKWARD_READS`: the ports whose values its backward reads (the memory plan keeps those);
- `KEEPS`: tensors of its own kept from forward to backward, and `SCRATCH`: tensors used within one
  pass and shared with every layer naming the same purpose; both as dims (axis names or fixed sizes).
  `attach_internals` makes them graph tensors, so their shapes, tiles and bytes are the graph's, and the
  model hands them to the layer as attributes of the same names.

Backward writes each input gradient: it overwrites a gradient it writes first (`overwrites`, from the
memory plan; a write StarPU orders after the layer's own reads) and accumulates into the others, so no
gradient is zeroed ahead of backward. Parameter gradients are always overwritten: each parameter has
one reader (the memory plan refuses a shared one).

`native` is ditc's own kernel extension (`native.kernels()`), or None for NNTile's kernels only: the
attention softmax and GELU-tanh run ditc's vectorised codelets where it is given.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any, ClassVar

from dit_compiler.compiler.targets.nntile_1_1 import kernels as nt
from dit_compiler.compiler.targets.nntile_1_1.alloc import Allocator

TOKENS = ("hidden", "tokens", "batch")
STATS = ("tokens", "batch")


#: Layer classes by name (an op kind's `layer`), each registered where it is defined (`@layer`).
LAYERS: dict[str, type[Layer]] = {}


def layer(cls: type[Layer]) -> type[Layer]:
    """Register a layer class under its name."""
    LAYERS[cls.__name__] = cls
    return cls


@dataclass
class Moments:
    """A value and, where a gradient flows into it, its gradient."""

    value: Any
    grad: Any = None

    def unregister(self) -> None:
        for tensor in (self.value, self.grad):
            if tensor is not None:
                tensor.unregister()


class Layer:
    BACKWARD_READS: ClassVar[frozenset[str]] = frozenset()
    KEEPS: ClassVar[Mapping[str, tuple]] = {}
    SCRATCH: ClassVar[Mapping[str, tuple]] = {}

    def __init__(self, ports: Mapping[str, Any], internals: Mapping[str, Any], attrs: Any, alloc: Allocator,
                 native: ModuleType | None = None):
        for name, tensor in (ports | internals).items():
            setattr(self, name, tensor)
        self.attrs, self.alloc, self.native = attrs, alloc, native
        self.overwrites: tuple[Moments, ...] = ()
        self.kept = tuple(internals[name] for name in self.KEEPS)

    @classmethod
    def scratch_of(cls, attrs: Any) -> Mapping[str, tuple]:
        """The scratch of a layer with these attributes: SCRATCH (a subclass adds an option's)."""
        return cls.SCRATCH

    def beta(self, x: Moments) -> float:
        """0.0 where this layer writes x's gradient first (overwrite), else 1.0 (accumulate)."""
        return 0.0 if any(x is t for t in self.overwrites) else 1.0

    def forward_async(self) -> None:
        raise NotImplementedError

    def backward_async(self) -> None:
        raise NotImplementedError

    # -- shared steps -----------------------------------------------------------------------------
    def inverse_rms(self, src, dst, tmp=None) -> None:
        """dst [tokens, batch] = 1 / sqrt(mean(src^2) + eps) over axis 0 (uses `tmp`, src-shaped scratch: by
        default the `tokens` one)."""
        tmp = self.tokens if tmp is None else tmp
        nt.copy_async(src, tmp)
        nt.prod_async(src, tmp)
        self.mean_of(1.0, tmp, dst)
        nt.add_scalar_async(self.attrs.eps, 1.0, dst)
        nt.pow_async(1.0, -0.5, dst)

    def rms_forward(self, x, weight, y, r, tmp) -> None:
        """RMSNorm over axis 0 (any other axes): y = x * r * weight, r = 1 / sqrt(mean(x^2) + eps) kept in
        `r`, weight a fiber of axis 0; `tmp` x-shaped scratch. NNTile 1.1.0 has no RMSNorm: the mean
        square is a GEMM with ones (as LayerNormNoAffine's means), the weight a fiber product."""
        self.inverse_rms(x, r, tmp)
        nt.prod_fiber3_async(weight, 1.0, x, y, 0)
        nt.prod_slice_async(r, 1.0, y, 0)
        tmp.invalidate_submit()

    def rms_backward(self, x, dy, r, weight: Moments, dx, beta: float, tmp, stat) -> None:
        """The gradients of `rms_forward`: with dy' = weight * dy, dx (+)= r dy' - r^3 x mean(dy' x) (beta 0:
        written), and weight.grad = the sum over the other axes of dy * x * r (written). `tmp` is x-shaped
        scratch, `stat` r-shaped; dx may be dy's tensor where beta is 0 (written after dy's last read)."""
        nt.copy_async(x, tmp)
        nt.prod_slice_async(r, 1.0, tmp, 0)                                   # x * r
        nt.sumprod_fiber_async(1.0, dy, tmp, 0.0, weight.grad, 0)             # dweight
        nt.prod_fiber3_async(weight.value, 1.0, dy, tmp, 0)                   # dy' = weight * dy
        nt.sumprod_slice_async(-1.0 / x.shape[0], tmp, x, 0.0, stat, 0)       # -mean(dy' x)
        for _ in range(3):
            nt.prod_async(r, stat)                                            # -r^3 mean(dy' x)
        nt.prod_slice_async(r, 1.0, tmp, 0)
        nt.add_async(1.0, tmp, beta, dx)                                      # (+)= r dy'
        nt.copy_async(x, tmp)
        nt.prod_slice_async(stat, 1.0, tmp, 0)
        nt.add_async(1.0, tmp, 1.0, dx)                                       # += -r^3 x mean(dy' x)
        tmp.invalidate_submit()
        stat.invalidate_submit()

    def mean_of(self, alpha: float, src, dst) -> None:
        """dst [tokens, batch] = alpha * the mean of src over axis 0 (hidden), a GEMM with ones."""
        ones = self.alloc.ones(src.shape[:1], src.basetile_shape[:1])
        nt.gemm_async(alpha / src.shape[0], nt.trans, ones, nt.notrans, src, 0.0, dst, 1, 0)

    def ones_over(self, tensor, first_axis: int):
        """The shared ones over `tensor`'s axes from `first_axis` on (its batch axes for a bias GEMM)."""
        return self.alloc.ones(tensor.shape[first_axis:], tensor.basetile_shape[first_axis:])

    def sum_tokens(self, src, dst: Moments, other=None) -> None:
        """dst.grad [hidden, batch] (+)= the sum over tokens (axis 1) of src, or of src * other, as a GEMM
        with ones (uses the `tokens` scratch)."""
        if other is not None:
            nt.copy_async(other, self.tokens)
            nt.prod_async(src, self.tokens)
            src = self.tokens
        nt.gemm_async(1.0, nt.notrans, src, nt.notrans, self.ones_over(src, 1), self.beta(dst), dst.grad, 1, 1)
        if other is not None:
            self.tokens.invalidate_submit()

    def add_scaled(self, dy, scale, x: Moments) -> None:
        """x.grad (+)= dy * scale, scale [hidden, batch] broadcast over tokens (axis 1)."""
        if self.beta(x) == 0.0:
            nt.copy_async(dy, x.grad)
            nt.prod_slice_async(scale, 1.0, x.grad, 1)
            return
        nt.copy_async(dy, self.tokens)
        nt.prod_slice_async(scale, 1.0, self.tokens, 1)
        nt.add_async(1.0, self.tokens, 1.0, x.grad)
        self.tokens.invalidate_submit()


@layer
class Linear(Layer):
    """y = W x + b over axis 0. The bias add is the rank-1 GEMM `b ones^T` and the bias gradient `dY ones`:
    NNTile's add_fiber and sum_fiber on the feature axis stride through memory (on DiT-S/2's MLP output
    4.1 ms and 6.8 ms, against 0.9 ms and 1.3 ms for the GEMMs; a DiT-S/2 batch 8 training step about
    5% faster in interleaved A/B runs)."""

    x: Moments
    w: Moments
    b: Moments
    y: Moments
    BACKWARD_READS = frozenset({"x", "w"})

    def __init__(self, ports: Mapping[str, Any], *args: Any, **kwargs: Any):
        super().__init__({"b": None} | dict(ports), *args, **kwargs)   # no bias: model.mlp.bias false

    def forward_async(self) -> None:
        nt.gemm_async(1.0, nt.notrans, self.w.value, nt.notrans, self.x.value, 0.0, self.y.value, 1, 0)
        if self.b is not None:
            nt.gemm_async(1.0, nt.notrans, self.b.value, nt.notrans, self.ones_over(self.y.value, 1), 1.0,
                         self.y.value, 0, 0)

    def backward_async(self) -> None:
        dy, batch_axes = self.y.grad, self.x.value.ndim - 1
        nt.gemm_async(1.0, nt.notrans, dy, nt.trans, self.x.value, 0.0, self.w.grad, batch_axes, 0)
        if self.b is not None:
            nt.gemm_async(1.0, nt.notrans, dy, nt.notrans, self.ones_over(dy, 1), 0.0, self.b.grad, batch_axes, 0)
        if self.x.grad is not None:
            nt.gemm_async(1.0, nt.trans, self.w.value, nt.notrans, dy, self.beta(self.x), self.x.grad, 1, 0)


@layer
class AddConstSlice(Layer):
    """y = x + table, the constant table broadcast over the batch (the last axis)."""

    x: Moments
    table: Any
    y: Moments

    def forward_async(self) -> None:
        nt.add_slice3_async(1.0, self.table, 1.0, self.x.value, self.y.value, self.x.value.ndim - 1)

    def backward_async(self) -> None:
        nt.add_async(1.0, self.y.grad, self.beta(self.x), self.x.grad)


@layer
class AddFiber(Layer):
    """y = x + b, b a [hidden] fiber over axis 0 broadcast over the others: a rank-1 GEMM `b ones^T` (as
    Linear's bias), its gradient `dY ones`."""

    x: Moments
    b: Moments
    y: Moments

    def forward_async(self) -> None:
        nt.copy_async(self.x.value, self.y.value)
        nt.gemm_async(1.0, nt.notrans, self.b.value, nt.notrans, self.ones_over(self.y.value, 1), 1.0, self.y.value,
                      0, 0)

    def backward_async(self) -> None:
        dy = self.y.grad
        nt.gemm_async(1.0, nt.notrans, dy, nt.notrans, self.ones_over(dy, 1), 0.0, self.b.grad, dy.ndim - 1, 0)
        if self.x.grad is not None:
            nt.add_async(1.0, dy, self.beta(self.x), self.x.grad)


@layer
class AddRows(Layer):
    """y = x with h added to rows offset.. of axis 0: h [k, m*N] holds m pieces of each of the N columns
    (piece j of column n at column j*N + n), laid side by side from row offset. Each piece is copied into
    a cleared [hidden, batch] scratch with NNTile's copy_intersection (any tiling on either side), which
    is then added; backward copies the rows of dy back into h's gradient, which this layer writes first
    (h, a linear's output, has this one reader)."""

    x: Moments
    h: Moments
    y: Moments
    SCRATCH = {"rows": ("hidden", "batch")}

    def _pieces(self):
        k, columns = self.h.value.shape
        n = self.x.value.shape[1]
        return [[self.attrs.offset + j * k, -j * n] for j in range(columns // n)]

    def forward_async(self) -> None:
        nt.clear_async(self.rows)
        for offset in self._pieces():
            nt.copy_intersection_async(self.h.value, offset, self.rows, [0, 0])
        nt.add_async(1.0, self.x.value, 0.0, self.y.value)
        nt.add_async(1.0, self.rows, 1.0, self.y.value)
        self.rows.invalidate_submit()

    def backward_async(self) -> None:
        if self.beta(self.h) != 0.0:
            raise RuntimeError("AddRows writes h's gradient: h must have no other reader")
        nt.clear_async(self.h.grad)   # copy_intersection writes tiles in part: they must hold data first
        for offset in self._pieces():
            nt.copy_intersection_async(self.y.grad, [0, 0], self.h.grad, offset)
        if self.x.grad is not None:
            nt.add_async(1.0, self.y.grad, self.beta(self.x), self.x.grad)


@layer
class Embedding(Layer):
    """y[:, n] = table[:, labels[n]]."""

    labels: Any
    table: Moments
    y: Moments
    BACKWARD_READS = frozenset({"labels"})

    def forward_async(self) -> None:
        nt.clear_async(self.y.value)
        nt.embedding_async(self.labels, self.table.value, self.y.value, 0)

    def backward_async(self) -> None:
        nt.clear_async(self.table.grad)  # NNTile's kernel accumulates; the table has this one reader
        nt.embedding_backward_async(self.labels, self.y.grad, self.table.grad, 0, redux=0)


@layer
class Act(Layer):
    """y = fn(x), element-wise: gelutanh or silu. GELU-tanh runs ditc's kernels where `native` is given."""

    x: Moments
    y: Moments
    BACKWARD_READS = frozenset({"x"})

    def forward_async(self) -> None:
        if self.attrs.fn == "gelutanh" and self.native:
            self.native.gelutanh_async(self.x.value, self.y.value)
        elif self.attrs.fn == "gelutanh":  # in place: one exp per element against two (11 vs 17 ms on DiT-S/2's MLP)
            nt.copy_async(self.x.value, self.y.value)
            nt.gelutanh_inplace_async(self.y.value)
        elif self.attrs.fn == "gelu":
            nt.copy_async(self.x.value, self.y.value)
            nt.gelu_async(self.y.value)
        else:
            nt.silu_forward_async(self.x.value, self.y.value)

    def backward_async(self) -> None:
        if self.attrs.fn == "gelutanh" and self.native:
            self.native.gelutanh_backward_async(self.x.value, self.y.grad, self.beta(self.x), self.x.grad)
            return
        if self.beta(self.x) == 0.0:  # NNTile's kernels accumulate: zero first, once dy is ready
            nt.scal_async(0.0, self.y.grad, self.x.grad)
        backward = {"gelutanh": nt.gelutanh_backward_async, "gelu": nt.gelu_backward_async,
                    "silu": nt.silu_backward_async}[self.attrs.fn]
        backward(self.x.value, self.y.grad, self.x.grad)


@layer
class Add(Layer):
    """y = a + b."""

    a: Moments
    b: Moments
    y: Moments

    def forward_async(self) -> None:
        nt.add_async(1.0, self.a.value, 0.0, self.y.value)
        nt.add_async(1.0, self.b.value, 1.0, self.y.value)

    def backward_async(self) -> None:
        nt.add_async(1.0, self.y.grad, self.beta(self.a), self.a.grad)
        nt.add_async(1.0, self.y.grad, self.beta(self.b), self.b.grad)


@layer
class LayerNormNoAffine(Layer):
    """y = (x - mean) / sqrt(var + eps) over axis 0 (hidden), no gamma or beta. Means are GEMMs with a
    ones vector; forward 3.0 ms against 5.6 ms with NNTile's slice reductions (DiT-S/2 batch 8)."""

    x: Moments
    y: Moments
    BACKWARD_READS = frozenset({"y"})
    KEEPS = {"inv_std": STATS}
    SCRATCH = {"stat": STATS, "tokens": TOKENS}

    def forward_async(self) -> None:
        x, y = self.x.value, self.y.value
        self.mean_of(1.0, x, self.stat)
        nt.add_slice3_async(-1.0, self.stat, 1.0, x, y, 0)
        self.inverse_rms(y, self.inv_std)   # 1 / sqrt(var + eps)
        nt.prod_slice_async(self.inv_std, 1.0, y, 0)
        self.tokens.invalidate_submit()
        self.stat.invalidate_submit()

    def backward_async(self) -> None:
        # dx (+)= inv_std * (dy - mean(dy) - y * mean(dy * y)), y the normalised output
        y, dy, tmp, mean = self.y.value, self.y.grad, self.tokens, self.stat
        nt.copy_async(y, tmp)
        nt.prod_async(dy, tmp)
        self.mean_of(-1.0, tmp, mean)
        nt.copy_async(y, tmp)
        nt.prod_slice_async(mean, 1.0, tmp, 0)
        nt.add_async(1.0, dy, 1.0, tmp)
        self.mean_of(-1.0, dy, mean)
        ones = self.alloc.ones(y.shape[:1], y.basetile_shape[:1])
        nt.gemm_async(1.0, nt.notrans, ones, nt.notrans, mean, 1.0, tmp, 0, 0)
        nt.prod_slice_async(self.inv_std, 1.0, tmp, 0)
        nt.add_async(1.0, tmp, self.beta(self.x), self.x.grad)
        tmp.invalidate_submit()
        mean.invalidate_submit()


@layer
class RMSNorm(Layer):
    """y = x * r * weight, r = 1 / sqrt(mean(x^2) + eps) over axis 0 (hidden), weight a [hidden] fiber
    (`rms_forward`, `rms_backward`)."""

    x: Moments
    weight: Moments
    y: Moments
    BACKWARD_READS = frozenset({"x"})
    KEEPS = {"inv_rms": STATS}
    SCRATCH = {"stat": STATS, "tokens": TOKENS}

    def forward_async(self) -> None:
        self.rms_forward(self.x.value, self.weight.value, self.y.value, self.inv_rms, self.tokens)

    def backward_async(self) -> None:
        self.rms_backward(self.x.value, self.y.grad, self.inv_rms, self.weight, self.x.grad, self.beta(self.x),
                          self.tokens, self.stat)


@layer
class Modulate(Layer):
    """y = x * (1 + scale) + shift, with shift and scale [hidden, batch] broadcast over tokens (axis 1)."""

    x: Moments
    shift: Moments
    scale: Moments
    y: Moments
    BACKWARD_READS = frozenset({"x"})
    KEEPS = {"scale1": ("hidden", "batch")}   # 1 + scale
    SCRATCH = {"tokens": TOKENS}

    def forward_async(self) -> None:
        nt.copy_async(self.scale.value, self.scale1)
        nt.add_scalar_async(1.0, 1.0, self.scale1)
        nt.copy_async(self.x.value, self.y.value)
        nt.prod_slice_async(self.scale1, 1.0, self.y.value, 1)
        # + shift over the tokens: a rank-1 GEMM per batch item (0.47 ms against add_slice's 0.98)
        nt.gemm_async(1.0, nt.notrans, self.shift.value, nt.notrans, self.ones_over(self.y.value, 1), 1.0,
                     self.y.value, 0, 1)

    def backward_async(self) -> None:
        self.sum_tokens(self.y.grad, self.shift)
        self.sum_tokens(self.y.grad, self.scale, self.x.value)
        self.add_scaled(self.y.grad, self.scale1, self.x)


@layer
class GatedResidual(Layer):
    """y = x + gate * h, with gate [hidden, batch] broadcast over tokens (axis 1)."""

    x: Moments
    h: Moments
    gate: Moments
    y: Moments
    BACKWARD_READS = frozenset({"h", "gate"})
    SCRATCH = {"tokens": TOKENS}

    def forward_async(self) -> None:
        nt.copy_async(self.h.value, self.y.value)
        nt.prod_slice_async(self.gate.value, 1.0, self.y.value, 1)
        nt.add_async(1.0, self.x.value, 1.0, self.y.value)

    def backward_async(self) -> None:
        nt.add_async(1.0, self.y.grad, self.beta(self.x), self.x.grad)
        self.sum_tokens(self.y.grad, self.gate, self.h.value)
        self.add_scaled(self.y.grad, self.gate.value, self.h)


#: Attention's layouts: per head [head_dim, tokens, batch, heads] (heads batched in its GEMMs), head-major
#: [heads, head_dim, tokens, batch] (the projections' output), scores [keys, queries, batch, heads].
SPLIT = ("head_dim", "tokens", "batch", "heads")
MERGED = ("heads", "head_dim", "tokens", "batch")
SCORES = ("tokens", "tokens", "batch", "heads")
#: Cross-attention's keys and values run over the context axis.
CONTEXT_SPLIT = ("head_dim", "context", "batch", "heads")
CONTEXT_MERGED = ("heads", "head_dim", "context", "batch")
CONTEXT_SCORES = ("context", "tokens", "batch", "heads")
#: QK norm's statistics: one per head and token.
HEAD_STATS = ("tokens", "batch", "heads")
CONTEXT_HEAD_STATS = ("context", "batch", "heads")
QK_NORM_PORTS = ("q_norm_w", "q_norm_b", "k_norm_w", "k_norm_b")
BIAS_PORTS = ("b_q", "b_k", "b_v", "b_o")


class _Attend(Layer):
    """The attention core shared by self-, cross- and joint attention: softmax(K^T Q / sqrt(d)) V, heads batched,
    from per-head q, k, v to the head-major output, and its backward."""

    def scores(self, q, k, probs) -> None:
        """probs = K^T Q / sqrt(d), the scores before the softmax."""
        nt.gemm_async(1.0 / math.sqrt(q.shape[0]), nt.trans, k, nt.notrans, q, 0.0, probs, 1, 2)

    def softmax_values(self, probs, maxsumexp, v, split, out_merged) -> None:
        """probs = softmax(probs) over the keys, out_merged = V probs (head-major). The softmax runs ditc's
        kernels where `native` is given (`maxsumexp` is then unused)."""
        if self.native:  # one task per query tile, on all its key tiles: each column in one pass
            self.native.softmax_async(probs)
        else:
            nt.clear_async(maxsumexp)
            nt.maxsumexp_async(probs, maxsumexp, 0)
            nt.softmax_inplace_async(maxsumexp, 1.0, probs, 0)
        maxsumexp.invalidate_submit()
        nt.gemm_async(1.0, nt.notrans, v, nt.notrans, probs, 0.0, split, 1, 2)
        nt.transpose_async(1.0, split, out_merged, 3)
        split.invalidate_submit()

    def attend_backward(self, merged, q, k, v, probs, out_merged, d_out, sumprod_merged, sumprod, d_scores,
                        d_q, d_k, d_v) -> None:
        """d_q, d_k, d_v (per head) from `merged`, the gradient of the head-major output."""
        scale = 1.0 / math.sqrt(q.shape[0])
        nt.transpose_async(1.0, merged, d_out, 1)
        # softmax backward needs sum_keys(P * dP) = O . dO per query (dP = V^T dO, O = V P): a sum over
        # head_dim, not over the keys (1.8 ms against 6.9 ms on DiT-S/2's scores)
        nt.sumprod_slice_async(1.0, merged, out_merged, 0.0, sumprod_merged, 1)
        nt.transpose_async(1.0, sumprod_merged, sumprod, 1)
        sumprod_merged.invalidate_submit()
        nt.gemm_async(1.0, nt.trans, v, nt.notrans, d_out, 0.0, d_scores, 1, 2)
        nt.gemm_async(1.0, nt.notrans, d_out, nt.trans, probs, 0.0, d_v, 1, 2)
        d_out.invalidate_submit()
        # softmax backward: dS = P * (dP - sum(P * dP))
        if self.native:
            self.native.softmax_backward_async(probs, sumprod, d_scores)
        else:
            nt.add_slice_async(-1.0, sumprod, 1.0, d_scores, 0)
            nt.prod_async(probs, d_scores)
        sumprod.invalidate_submit()
        nt.gemm_async(scale, nt.notrans, q, nt.trans, d_scores, 0.0, d_k, 1, 2)
        nt.gemm_async(scale, nt.notrans, k, nt.notrans, d_scores, 0.0, d_q, 1, 2)
        d_scores.invalidate_submit()

    def project_in(self, x, w: Moments, b: Moments | None, merged) -> None:
        """merged [heads, head_dim, tokens, batch] = w x (+ b, where there is a bias)."""
        nt.gemm_async(1.0, nt.notrans, w.value, nt.notrans, x, 0.0, merged, 1, 0)
        if b is not None:
            nt.gemm_async(1.0, nt.notrans, b.value, nt.notrans, self.ones_over(merged, 2), 1.0, merged, 0, 0)

    def project_in_backward(self, merged, x: Moments, w: Moments, b: Moments, x_beta: float) -> None:
        """The gradients of `project_in` from its output's gradient `merged`."""
        nt.gemm_async(1.0, nt.notrans, merged, nt.notrans, self.ones_over(merged, 2), 0.0, b.grad, 2, 0)
        nt.gemm_async(1.0, nt.notrans, merged, nt.trans, x.value, 0.0, w.grad, 2, 0)
        nt.gemm_async(1.0, nt.trans, w.value, nt.notrans, merged, x_beta, x.grad, 2, 0)

    def project_out(self, merged, w: Moments, b: Moments | None, y) -> None:
        """y [hidden, tokens, batch] = w merged (+ b), merged head-major."""
        nt.gemm_async(1.0, nt.notrans, w.value, nt.notrans, merged, 0.0, y, 2, 0)
        if b is not None:
            nt.gemm_async(1.0, nt.notrans, b.value, nt.notrans, self.ones_over(y, 1), 1.0, y, 0, 0)

    def project_out_backward(self, dy, merged, w: Moments, b: Moments | None, d_merged) -> None:
        """The weight and bias gradients of `project_out`, and d_merged = w^T dy."""
        if b is not None:
            nt.gemm_async(1.0, nt.notrans, dy, nt.notrans, self.ones_over(dy, 1), 0.0, b.grad, 2, 0)
        nt.gemm_async(1.0, nt.notrans, dy, nt.trans, merged, 0.0, w.grad, 2, 0)
        nt.gemm_async(1.0, nt.trans, w.value, nt.notrans, dy, 0.0, d_merged, 1, 0)


@layer
class Attention(_Attend):
    """Multi-head self-attention, y = W_o softmax(K^T Q / sqrt(d)) V + b_o, heads batched.

    The projections come out head-major and a transpose rotates them into the per-head layout. Kept for
    backward: Q, K, V, the probabilities and the head-major output; every gradient is scratch shared
    by all blocks. The softmax and its backward run ditc's kernels where `native` is given (the
    `attn_maxsumexp` scratch is then unused). `CrossAttention` changes where keys and values come from
    (`kv`) and the tensors over their token axis.

    QK norm (`attrs.qk_norm`): Q and K are kept as projected; forward normalises them over head_dim into
    scratch (what the scores read), backward normalises them again (cheaper than keeping two more
    tensors per block) and takes the gradients back through the norm."""

    x: Moments
    w_q: Moments
    w_k: Moments
    w_v: Moments
    b_q: Moments
    b_k: Moments
    b_v: Moments
    w_o: Moments
    b_o: Moments
    q_norm_w: Moments
    q_norm_b: Moments
    k_norm_w: Moments
    k_norm_b: Moments
    y: Moments
    BACKWARD_READS = frozenset({"x"})
    KEEPS = {"q": SPLIT, "k": SPLIT, "v": SPLIT, "probs": SCORES, "out_merged": MERGED}
    SCRATCH = {"attn_merged": MERGED, "attn_split": SPLIT, "attn_maxsumexp": (2, "tokens", "batch", "heads"),
               "attn_sumprod": ("tokens", "batch", "heads"), "attn_sumprod_merged": ("heads", "tokens", "batch"),
               "attn_scores": SCORES, "attn_dq": SPLIT, "attn_dk": SPLIT, "attn_dv": SPLIT}
    #: QK norm's, per side: normalised and weighted (what the scores read), normalised, two statistics.
    QK_SCRATCH = {"attn_qn": SPLIT, "attn_qhat": SPLIT, "attn_qstat": HEAD_STATS, "attn_qmean": HEAD_STATS,
                  "attn_kn": SPLIT, "attn_khat": SPLIT, "attn_kstat": HEAD_STATS, "attn_kmean": HEAD_STATS}
    #: Ports a node may leave out: the biases (model.attention.bias false), QK norm's.
    OPTIONAL: tuple[str, ...] = BIAS_PORTS + QK_NORM_PORTS

    def __init__(self, ports: Mapping[str, Any], *args: Any, **kwargs: Any):
        super().__init__(dict.fromkeys(self.OPTIONAL) | dict(ports), *args, **kwargs)

    @classmethod
    def scratch_of(cls, attrs: Any) -> Mapping[str, tuple]:
        return cls.SCRATCH | (cls.QK_SCRATCH if attrs.qk_norm != "none" else {})

    # -- what cross-attention changes ---------------------------------------------------------------
    @property
    def kv(self) -> Moments:
        """Where keys and values come from."""
        return self.x

    def kv_scratch(self) -> tuple[Any, Any, Any, Any]:
        """The head-major projection, the scores' gradient, dK and dV over the keys' token axis."""
        return self.attn_merged, self.attn_scores, self.attn_dk, self.attn_dv

    def add_mask(self) -> None:
        """Self-attention masks nothing."""

    def k_norm_scratch(self) -> tuple[Any, Any, Any, Any]:
        """QK norm's scratch of the keys (normalised and weighted, normalised, two statistics)."""
        return self.attn_kn, self.attn_khat, self.attn_kstat, self.attn_kmean

    # -- QK norm ------------------------------------------------------------------------------------
    def qk_sides(self) -> list[tuple]:
        """Per side (queries, keys): the projection, its norm's scratch, weight and bias."""
        return [(self.q, (self.attn_qn, self.attn_qhat, self.attn_qstat, self.attn_qmean), self.q_norm_w,
                 self.q_norm_b), (self.k, self.k_norm_scratch(), self.k_norm_w, self.k_norm_b)]

    def normalize(self, raw, scratch: tuple, w: Moments, b: Moments | None) -> None:
        """hat = raw normalised over head_dim (axis 0): (raw - mean) r for layer_norm, raw r for rms_norm,
        r = 1 / sqrt(mean of the square + eps) kept in `stat`; out = hat * w (+ b)."""
        out, hat, stat, mean = scratch
        centred = raw
        if self.attrs.qk_norm == "layer_norm":
            self.mean_of(1.0, raw, mean)
            nt.add_slice3_async(-1.0, mean, 1.0, raw, hat, 0)
            centred = hat
        nt.copy_async(centred, out)
        nt.prod_async(centred, out)                         # out holds the squares for a moment
        self.mean_of(1.0, out, stat)
        nt.add_scalar_async(self.attrs.qk_eps, 1.0, stat)
        nt.pow_async(1.0, -0.5, stat)
        if centred is raw:
            nt.copy_async(raw, hat)
        nt.prod_slice_async(stat, 1.0, hat, 0)
        nt.prod_fiber3_async(w.value, 1.0, hat, out, 0)
        if b is not None:
            nt.add_fiber_async(1.0, b.value, 1.0, out, 0, 0)

    def normalize_backward(self, grad, scratch: tuple, w: Moments, b: Moments | None) -> None:
        """`grad` (of out) becomes the gradient of raw, in place: with g = w grad,
        r (g - mean(g) - hat mean(g hat)) for layer_norm, r (g - hat mean(g hat)) for rms_norm; writes
        the weight's and the bias's gradients. Uses `hat` and `mean` as scratch."""
        _, hat, stat, mean = scratch
        nt.sumprod_fiber_async(1.0, grad, hat, 0.0, w.grad, 0)
        if b is not None:
            nt.sum_fiber_async(1.0, grad, 0.0, b.grad, 0, 0)
        nt.prod_fiber_async(w.value, 1.0, grad, 0)
        nt.sumprod_slice_async(-1.0 / grad.shape[0], grad, hat, 0.0, mean, 0)
        nt.prod_slice_async(mean, 1.0, hat, 0)                # hat = -hat mean(g hat)
        if self.attrs.qk_norm == "layer_norm":
            self.mean_of(-1.0, grad, mean)
            nt.add_slice_async(1.0, mean, 1.0, grad, 0)
        nt.add_async(1.0, hat, 1.0, grad)
        nt.prod_slice_async(stat, 1.0, grad, 0)

    def scores_reads(self) -> tuple[Any, Any]:
        """The queries and keys the scores read: normalised ones with QK norm (normalising them first)."""
        if self.attrs.qk_norm == "none":
            return self.q, self.k
        for raw, scratch, w, b in self.qk_sides():
            self.normalize(raw, scratch, w, b)
        return self.attn_qn, self.k_norm_scratch()[0]

    def release_qk_scratch(self) -> None:
        if self.attrs.qk_norm != "none":
            for _, scratch, _, _ in self.qk_sides():
                for tensor in scratch:
                    tensor.invalidate_submit()

    # -- the computation ----------------------------------------------------------------------------
    def project(self, w: Moments, b: Moments, source, merged, out) -> None:
        """out [head_dim, n, batch, heads] = the per-head layout of W source + b (via head-major `merged`)."""
        self.project_in(source, w, b, merged)
        nt.transpose_async(1.0, merged, out, 1)

    def forward_async(self) -> None:
        kv_merged = self.kv_scratch()[0]
        self.project(self.w_q, self.b_q, self.x.value, self.attn_merged, self.q)
        self.project(self.w_k, self.b_k, self.kv.value, kv_merged, self.k)
        self.project(self.w_v, self.b_v, self.kv.value, kv_merged, self.v)
        for scratch in {id(t): t for t in (self.attn_merged, kv_merged)}.values():
            scratch.invalidate_submit()
        q, k = self.scores_reads()
        self.scores(q, k, self.probs)
        self.release_qk_scratch()
        self.add_mask()
        self.softmax_values(self.probs, self.attn_maxsumexp, self.v, self.attn_split, self.out_merged)
        self.project_out(self.out_merged, self.w_o, self.b_o, self.y.value)

    def backward_async(self) -> None:
        merged = self.attn_merged
        q, k = self.scores_reads()
        kv_merged, d_scores, d_k, d_v = self.kv_scratch()
        d_q = self.attn_dq
        self.project_out_backward(self.y.grad, self.out_merged, self.w_o, self.b_o, merged)
        self.attend_backward(merged, q, k, self.v, self.probs, self.out_merged, self.attn_split,
                             self.attn_sumprod_merged, self.attn_sumprod, d_scores, d_q, d_k, d_v)
        if self.attrs.qk_norm != "none":
            for d_part, (_, scratch, w, b) in zip((d_q, d_k), self.qk_sides()):
                self.normalize_backward(d_part, scratch, w, b)
            self.release_qk_scratch()
        betas: dict[int, float] = {}   # each source's gradient: its first write may overwrite, later ones add
        for w, b, d_part, source, head_major in ((self.w_q, self.b_q, d_q, self.x, merged),
                                                 (self.w_k, self.b_k, d_k, self.kv, kv_merged),
                                                 (self.w_v, self.b_v, d_v, self.kv, kv_merged)):
            nt.transpose_async(1.0, d_part, head_major, 3)
            d_part.invalidate_submit()
            if b is not None:
                nt.gemm_async(1.0, nt.notrans, head_major, nt.notrans, self.ones_over(head_major, 2), 0.0, b.grad, 2,
                              0)
            nt.gemm_async(1.0, nt.notrans, head_major, nt.trans, source.value, 0.0, w.grad, 2, 0)
            if source.grad is not None:
                beta = betas.setdefault(id(source), self.beta(source))
                nt.gemm_async(1.0, nt.trans, w.value, nt.notrans, head_major, beta, source.grad, 2, 0)
                betas[id(source)] = 1.0
        for scratch in {id(t): t for t in (merged, kv_merged)}.values():
            scratch.invalidate_submit()


def _offset(ndim: int, axis: int, start: int) -> list[int]:
    return [start if k == axis else 0 for k in range(ndim)]


def put_tokens(part, start: int, whole, axis: int) -> None:
    """whole's tokens start.. on `axis` = part (whole's other tokens keep their values). `copy_intersection`
    copies between any tilings, so a stream's token axis and the joint one keep their own tiles."""
    nt.copy_intersection_async(part, _offset(part.ndim, axis, start), whole, [0] * whole.ndim)


def take_tokens(whole, start: int, part, axis: int) -> None:
    """part = whole's tokens start.. on `axis`."""
    nt.clear_async(part)  # copy_intersection reads the tiles it writes: give them a value
    nt.copy_intersection_async(whole, [0] * whole.ndim, part, _offset(part.ndim, axis, start))


#: Joint attention's layouts: those of attention over the joint sequence (image tokens, then context tokens).
JOINT_SPLIT = ("head_dim", "joint", "batch", "heads")
JOINT_MERGED = ("heads", "head_dim", "joint", "batch")
JOINT_SCORES = ("joint", "joint", "batch", "heads")


class _JointAttention(_Attend):
    """MMDiT's joint attention (diffusers' JointAttnProcessor2_0): each stream's q, k, v projected
    head-major, copied into one joint sequence (image tokens, then context tokens: `copy_intersection`,
    so the two token axes keep their own tiles and the joint axis its own), one attention over it, the
    joint output copied back apart and projected by each stream's output projection. The context's own
    output projection is absent in the last block (`context_pre_only`): its queries are computed and
    dropped, as diffusers does.

    QK norm (optional weights `n_q`, `n_k`, `n_aq`, `n_ak`: SD3.5's RMSNorm of each head over head_dim):
    q and k are normalised per stream in the per-head layout, before they join; backward recomputes the
    projection and the RMS (scratch only: nothing more is kept from forward)."""

    BACKWARD_READS = frozenset({"x", "c"})
    KEEPS = {"q": JOINT_SPLIT, "k": JOINT_SPLIT, "v": JOINT_SPLIT, "probs": JOINT_SCORES, "out_merged": JOINT_MERGED}
    SCRATCH = {"attn_merged": MERGED, "context_merged": CONTEXT_MERGED, "joint_merged": JOINT_MERGED,
               "joint_split": JOINT_SPLIT, "joint_maxsumexp": (2, "joint", "batch", "heads"),
               "joint_sumprod": ("joint", "batch", "heads"), "joint_sumprod_merged": ("heads", "joint", "batch"),
               "joint_scores": JOINT_SCORES, "joint_dq": JOINT_SPLIT, "joint_dk": JOINT_SPLIT, "joint_dv": JOINT_SPLIT,
               # QK norm, per stream: the raw projection, the normalised one (backward: its gradient), scratch
               # of their shape, the inverse RMS and a statistic (unused, so never allocated, without QK norm)
               **{f"qk_{part}{suffix}": (("head_dim", axis, "batch", "heads") if part in ("raw", "norm", "tmp")
                                         else (axis, "batch", "heads"))
                  for part in ("raw", "norm", "tmp", "rms", "stat")
                  for suffix, axis in (("", "tokens"), ("_context", "context"))}}
    QK = ("n_q", "n_k", "n_aq", "n_ak")

    def __init__(self, ports: Mapping[str, Any], *args: Any, **kwargs: Any):
        super().__init__(dict.fromkeys(self.QK) | dict(ports), *args, **kwargs)

    def qk_norms(self, z: int) -> tuple[Moments, Moments] | None:
        """The QK norm weights of projection z (0 q, 1 k) of each stream, or None (v, or no QK norm)."""
        if z == 2 or self.n_q is None:
            return None
        return (self.n_q, self.n_aq) if z == 0 else (self.n_k, self.n_ak)

    def qk_scratch(self) -> tuple[tuple[Any, ...], ...]:
        """Each stream's QK norm scratch: raw, normalised, tmp, inverse RMS, statistic."""
        return tuple(tuple(getattr(self, f"qk_{part}{suffix}") for part in ("raw", "norm", "tmp", "rms", "stat"))
                     for suffix in ("", "_context"))

    def project_split(self, x: Moments, params: tuple[Moments, ...], z: int, merged, raw) -> None:
        """raw [head_dim, n, batch, heads] = projection z of x, per head (through head-major `merged`)."""
        self.project_in(x.value, params[z], params[3 + z], merged)
        nt.transpose_async(1.0, merged, raw, 1)
        merged.invalidate_submit()

    def streams(self) -> tuple[tuple[Moments, Any, int, tuple[Moments, ...]], ...]:
        """(input, its head-major scratch, its first token in the joint sequence, q/k/v weights and biases)."""
        return ((self.x, self.attn_merged, 0, (self.w_q, self.w_k, self.w_v, self.b_q, self.b_k, self.b_v)),
                (self.c, self.context_merged, self.x.value.shape[1],
                 (self.w_aq, self.w_ak, self.w_av, self.b_aq, self.b_ak, self.b_av)))

    @staticmethod
    def to_joint(part, start: int, joint) -> None:
        """Copy a stream's head-major [heads, head_dim, tokens, batch] into the joint sequence at `start`."""
        put_tokens(part, start, joint, 2)

    @staticmethod
    def from_joint(joint, start: int, part) -> None:
        take_tokens(joint, start, part, 2)

    def outputs(self) -> tuple[tuple[Any, Moments, Moments, int, Any], ...]:
        """(head-major scratch, output weight, bias, first token in the joint sequence, the stream's own
        output scratch, None where y is that stream's output) of each stream with an output projection."""
        raise NotImplementedError

    def forward_async(self) -> None:
        joint = self.joint_merged
        for z, out in enumerate((self.q, self.k, self.v)):
            norms = self.qk_norms(z)
            if norms is not None:   # each stream normalised per head, then joined in the per-head layout
                nt.clear_async(out)
                for (x, merged, start, params), n, (raw, normed, tmp, r, _) in zip(self.streams(), norms,
                                                                                  self.qk_scratch()):
                    self.project_split(x, params, z, merged, raw)
                    self.rms_forward(raw, n.value, normed, r, tmp)
                    put_tokens(normed, start, out, 1)
                    for scratch in (raw, normed, r):
                        scratch.invalidate_submit()
                continue
            nt.clear_async(joint)
            for x, merged, start, params in self.streams():
                self.project_in(x.value, params[z], params[3 + z], merged)
                self.to_joint(merged, start, joint)
                merged.invalidate_submit()
            nt.transpose_async(1.0, joint, out, 1)
        joint.invalidate_submit()
        self.scores(self.q, self.k, self.probs)
        self.softmax_values(self.probs, self.joint_maxsumexp, self.v, self.joint_split, self.out_merged)
        y = self.y.value
        outputs = self.outputs()
        if len(outputs) > 1:
            nt.clear_async(y)
        for merged, w, b, start, own in outputs:
            self.from_joint(self.out_merged, start, merged)
            if own is None:
                self.project_out(merged, w, b, y)
            else:   # projected into the stream's own scratch, then copied into its tokens of y
                self.project_out(merged, w, b, own)
                put_tokens(own, start, y, 1)
                own.invalidate_submit()
            merged.invalidate_submit()

    def backward_async(self) -> None:
        joint = self.joint_merged
        # the gradient of the head-major joint output, stream by stream (the context's is zero without its
        # output projection)
        nt.clear_async(joint)
        for merged, w, b, start, own in self.outputs():
            self.from_joint(self.out_merged, start, merged)
            dy = self.y.grad
            if own is not None:
                take_tokens(self.y.grad, start, own, 1)
                dy = own
            self.project_out_backward(dy, merged, w, b, merged)
            if own is not None:
                own.invalidate_submit()
            self.to_joint(merged, start, joint)
        d_q, d_k, d_v = self.joint_dq, self.joint_dk, self.joint_dv
        self.attend_backward(joint, self.q, self.k, self.v, self.probs, self.out_merged, self.joint_split,
                             self.joint_sumprod_merged, self.joint_sumprod, self.joint_scores, d_q, d_k, d_v)
        betas = [self.beta(x) for x, *_ in self.streams()]
        for z, d_part in enumerate((d_q, d_k, d_v)):
            norms = self.qk_norms(z)
            if norms is None:
                nt.transpose_async(1.0, d_part, joint, 3)
            for s, (x, merged, start, params) in enumerate(self.streams()):
                if norms is None:
                    self.from_joint(joint, start, merged)
                else:   # the norm's backward on the recomputed projection, then to head-major
                    raw, normed, tmp, r, stat = self.qk_scratch()[s]
                    take_tokens(d_part, start, normed, 1)
                    self.project_split(x, params, z, merged, raw)
                    self.inverse_rms(raw, r, tmp)
                    self.rms_backward(raw, normed, r, norms[s], normed, 0.0, tmp, stat)
                    nt.transpose_async(1.0, normed, merged, 3)
                    for scratch in (raw, normed, r):
                        scratch.invalidate_submit()
                self.project_in_backward(merged, x, params[z], params[3 + z], betas[s])
                betas[s] = 1.0
            d_part.invalidate_submit()
        for tensor in (joint, self.attn_merged, self.context_merged):
            tensor.invalidate_submit()


@layer
class JointAttention(_JointAttention):
    """Joint attention of every MMDiT block but the last: y [hidden, joint, batch] holds the image
    stream's output, then the context stream's."""

    x: Moments
    c: Moments
    w_q: Moments
    w_k: Moments
    w_v: Moments
    b_q: Moments
    b_k: Moments
    b_v: Moments
    w_o: Moments
    b_o: Moments
    w_aq: Moments
    w_ak: Moments
    w_av: Moments
    b_aq: Moments
    b_ak: Moments
    b_av: Moments
    w_ao: Moments
    b_ao: Moments
    n_q: Moments
    n_k: Moments
    n_aq: Moments
    n_ak: Moments
    y: Moments
    SCRATCH = _JointAttention.SCRATCH | {"tokens": TOKENS, "context_tokens": ("hidden", "context", "batch")}

    def outputs(self) -> tuple[tuple[Any, Moments, Moments, int, Any], ...]:
        return ((self.attn_merged, self.w_o, self.b_o, 0, self.tokens),
                (self.context_merged, self.w_ao, self.b_ao, self.x.value.shape[1], self.context_tokens))


@layer
class JointAttentionPre(_JointAttention):
    """Joint attention of the last MMDiT block (context_pre_only): y [hidden, tokens, batch] is the image
    stream's output."""

    x: Moments
    c: Moments
    w_q: Moments
    w_k: Moments
    w_v: Moments
    b_q: Moments
    b_k: Moments
    b_v: Moments
    w_o: Moments
    b_o: Moments
    w_aq: Moments
    w_ak: Moments
    w_av: Moments
    b_aq: Moments
    b_ak: Moments
    b_av: Moments
    n_q: Moments
    n_k: Moments
    n_aq: Moments
    n_ak: Moments
    y: Moments

    def outputs(self) -> tuple[tuple[Any, Moments, Moments, int, Any], ...]:
        return ((self.attn_merged, self.w_o, self.b_o, 0, None),)


class _Tokens(Layer):
    """Token ranges of the joint sequence [hidden, joint, batch] and a stream's tokens."""

    @staticmethod
    def put(part, start: int, whole) -> None:
        put_tokens(part, start, whole, 1)

    @staticmethod
    def take(whole, start: int, part) -> None:
        take_tokens(whole, start, part, 1)

    def add_range(self, d_part, start: int, x: Moments, scratch) -> None:
        """x.grad[:, start:start + length] (+)= d_part, x.grad's other tokens zero where this layer writes it
        first. Accumulating goes through `scratch` (NNTile has no accumulating copy into a sub-range)."""
        target = x.grad if self.beta(x) == 0.0 else scratch
        nt.clear_async(target)
        self.put(d_part, start, target)
        if target is scratch:
            nt.add_async(1.0, scratch, 1.0, x.grad)
            scratch.invalidate_submit()

    def take_range(self, whole, start: int, x: Moments, scratch) -> None:
        """x.grad (+)= whole[:, start:start + length]."""
        if self.beta(x) == 0.0:
            self.take(whole, start, x.grad)
            return
        self.take(whole, start, scratch)
        nt.add_async(1.0, scratch, 1.0, x.grad)
        scratch.invalidate_submit()


@layer
class TokenSlice(_Tokens):
    """y = x[:, start:start + length], a stream's tokens of the joint sequence."""

    x: Moments
    y: Moments
    SCRATCH = {"joint_tokens": ("hidden", "joint", "batch")}

    def forward_async(self) -> None:
        self.take(self.x.value, self.attrs.start, self.y.value)

    def backward_async(self) -> None:
        self.add_range(self.y.grad, self.attrs.start, self.x, self.joint_tokens)


@layer
class TokenJoin(_Tokens):
    """y = a's tokens followed by b's: the joint sequence of MMDiT's two streams."""

    a: Moments
    b: Moments
    y: Moments
    SCRATCH = {"tokens": TOKENS, "context_tokens": ("hidden", "context", "batch")}

    def forward_async(self) -> None:
        nt.clear_async(self.y.value)
        self.put(self.a.value, 0, self.y.value)
        self.put(self.b.value, self.a.value.shape[1], self.y.value)

    def backward_async(self) -> None:
        self.take_range(self.y.grad, 0, self.a, self.tokens)
        self.take_range(self.y.grad, self.a.value.shape[1], self.b, self.context_tokens)


@layer
class CrossAttention(Attention):
    """Multi-head attention of the tokens x (queries) to a context (keys and values) with its own token
    axis, `context`, and tiles. An optional key mask [context, batch] (1 keep, 0 padded) adds
    `mask_bias` (1 - mask) to the scores before the softmax, as diffusers' Attention adds its
    `(1 - mask) * -10000.0` attention bias; a padded key then gets a probability of exactly 0 (exp
    underflows) unless every key of a caption is padded."""

    x: Moments
    context: Moments
    mask: Any
    w_q: Moments
    w_k: Moments
    w_v: Moments
    b_q: Moments
    b_k: Moments
    b_v: Moments
    w_o: Moments
    b_o: Moments
    q_norm_w: Moments
    q_norm_b: Moments
    k_norm_w: Moments
    k_norm_b: Moments
    y: Moments
    BACKWARD_READS = frozenset({"x", "context"})
    KEEPS = {"q": SPLIT, "k": CONTEXT_SPLIT, "v": CONTEXT_SPLIT, "probs": CONTEXT_SCORES, "out_merged": MERGED}
    SCRATCH = {"attn_merged": MERGED, "xattn_merged": CONTEXT_MERGED, "attn_split": SPLIT,
               "attn_maxsumexp": (2, "tokens", "batch", "heads"), "attn_sumprod": ("tokens", "batch", "heads"),
               "attn_sumprod_merged": ("heads", "tokens", "batch"), "xattn_scores": CONTEXT_SCORES,
               "attn_dq": SPLIT, "xattn_dk": CONTEXT_SPLIT, "xattn_dv": CONTEXT_SPLIT,
               "xattn_mask": ("context", "batch"), "xattn_bias": ("context", "tokens", "batch")}
    QK_SCRATCH = {"attn_qn": SPLIT, "attn_qhat": SPLIT, "attn_qstat": HEAD_STATS, "attn_qmean": HEAD_STATS,
                  "xattn_kn": CONTEXT_SPLIT, "xattn_khat": CONTEXT_SPLIT, "xattn_kstat": CONTEXT_HEAD_STATS,
                  "xattn_kmean": CONTEXT_HEAD_STATS}
    OPTIONAL = ("mask",) + BIAS_PORTS + QK_NORM_PORTS

    def k_norm_scratch(self) -> tuple[Any, Any, Any, Any]:
        return self.xattn_kn, self.xattn_khat, self.xattn_kstat, self.xattn_kmean

    @property
    def kv(self) -> Moments:
        return self.context

    def kv_scratch(self) -> tuple[Any, Any, Any, Any]:
        return self.xattn_merged, self.xattn_scores, self.xattn_dk, self.xattn_dv

    def add_mask(self) -> None:
        if self.mask is None:
            return
        bias, mask = self.attrs.mask_bias, getattr(self.mask, "value", self.mask)
        nt.copy_async(mask, self.xattn_mask)
        nt.add_scalar_async(bias, -bias, self.xattn_mask)                  # bias (1 - mask)
        nt.clear_async(self.xattn_bias)
        nt.add_slice_async(1.0, self.xattn_mask, 1.0, self.xattn_bias, 1)  # over the queries
        nt.add_slice_async(1.0, self.xattn_bias, 1.0, self.probs, 3)      # and the heads
        self.xattn_mask.invalidate_submit()
        self.xattn_bias.invalidate_submit()


#: The one-token slot AppendTokens moves a vector through (NNTile 1.1.0 cannot view [f, batch] as
#: [f, 1, batch]: a broadcast over the axis of size 1 copies it, a sum over it copies it back).
SLOT = ("hidden", 1, "batch")


@layer
class AppendTokens(Layer):
    """y = [x, a, b] along the token axis (axis 1), with NNTile's copy_intersection (any tiles of either
    token axis); without x, y = [a, b]. x's gradient is written, not added: lowering gives x one reader.
    copy_intersection reads a destination tile it fills in part (StarPU refuses to read one never
    written), so each destination is cleared first."""

    x: Moments
    a: Moments
    b: Moments
    y: Moments
    SCRATCH = {"token_slot": SLOT}

    def __init__(self, ports: Mapping[str, Any], *args: Any, **kwargs: Any):
        super().__init__({"x": None} | dict(ports), *args, **kwargs)

    def first(self) -> int:
        """The token at which a sits."""
        return 0 if self.x is None else self.x.value.shape[1]

    def forward_async(self) -> None:
        origin = [0, 0, 0]
        nt.clear_async(self.y.value)
        if self.x is not None:
            nt.copy_intersection_async(self.x.value, origin, self.y.value, origin)
        for j, vector in enumerate((self.a, self.b)):
            nt.clear_async(self.token_slot)
            nt.add_slice_async(1.0, vector.value, 1.0, self.token_slot, 1)
            nt.copy_intersection_async(self.token_slot, [0, self.first() + j, 0], self.y.value, origin)
        self.token_slot.invalidate_submit()

    def backward_async(self) -> None:
        origin = [0, 0, 0]
        if self.x is not None:
            if self.beta(self.x) != 0.0:
                raise RuntimeError("AppendTokens writes its x's gradient first: x must have no other reader")
            nt.clear_async(self.x.grad)
            nt.copy_intersection_async(self.y.grad, origin, self.x.grad, origin)
        for j, vector in enumerate((self.a, self.b)):
            nt.clear_async(self.token_slot)
            nt.copy_intersection_async(self.y.grad, origin, self.token_slot, [0, self.first() + j, 0])
            nt.sum_slice_async(1.0, self.token_slot, self.beta(vector), vector.grad, 1)
        self.token_slot.invalidate_submit()


@layer
class TakeTokens(Layer):
    """y = the first tokens of x (as many as y has), by copy_intersection; x's gradient is y's, then
    zeros (written, not added: lowering gives x one reader)."""

    x: Moments
    y: Moments

    def forward_async(self) -> None:
        nt.clear_async(self.y.value)   # copy_intersection reads a tile it fills in part (see AppendTokens)
        nt.copy_intersection_async(self.x.value, [0, 0, 0], self.y.value, [0, 0, 0])

    def backward_async(self) -> None:
        if self.beta(self.x) != 0.0:
            raise RuntimeError("TakeTokens writes its x's gradient first: x must have no other reader")
        nt.clear_async(self.x.grad)
        nt.copy_intersection_async(self.y.grad, [0, 0, 0], self.x.grad, [0, 0, 0])
