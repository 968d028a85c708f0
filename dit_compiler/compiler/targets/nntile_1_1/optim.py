"""AdamW on NNTile tensors, composed of NNTile 1.1.0's element-wise kernels."""
from __future__ import annotations

import math
from collections.abc import Iterable
from types import ModuleType

from dit_compiler.compiler.targets.nntile_1_1 import kernels as nt
from dit_compiler.compiler.targets.nntile_1_1.alloc import Allocator
from dit_compiler.compiler.targets.nntile_1_1.layers import Moments
from dit_compiler.compiler.targets.nntile_1_1.runtime import swapping


class AdamW:
    """torch.optim.AdamW's update in five vectorised passes, about twice as fast here as NNTile 1.1.0's
    fused step (which calls `hypot` per element; 115 ms against 235 ms on 33.5M parameters, 2 workers):
        m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
        p = p (1 - lr wd) - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
    The last line runs as one `addcdiv` with both sides multiplied by sqrt(1 - b2^t). The gradient is
    the scratch: squared in place, then overwritten with sqrt(v), then released; the next backward
    writes it again. The moments are torch's `exp_avg` and `exp_avg_sq` as they are.

    With ditc's kernels (`native`, see `layers`) the update is one task a tile doing all of it in one pass
    (gradient read, moments and parameter updated in place): a fifth of the tasks; DiT-S/2's update took
    53 ms of CPU time against 137 ms (2 workers, a loaded machine), under 2% of its training step.

    Out-of-core, the moments are handed to StarPU as `wont_use` after each update: they are not needed
    before the next step's update of the same layer. That halved the disk reads of a step and its time
    (a 231M-parameter DiT under 1.5 GiB: 3.5 GiB read a step against 6.2, 13 s against 28 s)."""

    def __init__(self, params: list[Moments], alloc: Allocator, lr: float, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, native: ModuleType | None = None):
        self.params, self.lr, self.weight_decay, self.native = params, lr, weight_decay, native
        self.betas, self.eps, self.num_iter = betas, eps, 0
        self.moments = {id(p): (alloc.new(p.value.shape, p.value.basetile_shape),
                                alloc.new(p.value.shape, p.value.basetile_shape)) for p in params}

    def step(self) -> None:
        """Update every parameter, once backward has made all their gradients."""
        self.begin_step()
        self.update(self.params)

    def begin_step(self) -> None:
        """Start a training step (the bias corrections move on); then `update` every parameter once, each
        as soon as its gradient is complete."""
        self.num_iter += 1

    def update(self, params: Iterable[Moments]) -> None:
        (b1, b2), t = self.betas, self.num_iter
        keep = 0.0 if t == 1 else 1.0  # the first step writes the moments
        root = math.sqrt(1.0 - b2 ** t)
        step_size = self.lr / (1.0 - b1 ** t) * root
        for p in params:
            (m, v), g = self.moments[id(p)], p.grad
            if self.native:
                self.native.adamw_async(g, m, v, p.value, b1, b2, t == 1, 1.0 - self.lr * self.weight_decay, step_size,
                                        self.eps * root)
            else:
                if self.weight_decay:
                    nt.scal_inplace_async(1.0 - self.lr * self.weight_decay, p.value)
                nt.add_async(1.0 - b1, g, b1 * keep, m)
                nt.prod_async(g, g)
                nt.add_async(1.0 - b2, g, b2 * keep, v)
                nt.sqrt_async(v, g)
                nt.addcdiv_async(-step_size, self.eps * root, m, g, p.value)
            g.invalidate_submit()
            if swapping():  # written to disk now, in idle time: clean, they are the first StarPU evicts
                m.wont_use()
                v.wont_use()

    def unregister(self) -> None:
        for m, v in self.moments.values():
            m.unregister()
            v.unregister()
        self.moments.clear()


class EMA:
    """An exponential moving average of the parameters (DiT's `update_ema`): shadow = decay * shadow +
    (1 - decay) * p after each step, one NNTile task per tile; starts as a copy of the parameters."""

    def __init__(self, params: list[Moments], alloc: Allocator):
        self.params = params
        self.shadow = [alloc.new(p.value.shape, p.value.basetile_shape) for p in params]
        for p, e in zip(params, self.shadow):
            nt.copy_async(p.value, e)

    def update(self, decay: float) -> None:
        for p, e in zip(self.params, self.shadow):
            nt.add_async(1.0 - decay, p.value, decay, e)

    def unregister(self) -> None:
        for e in self.shadow:
            e.unregister()
        self.shadow.clear()
