"""Rectified flow as SiT and SD3 train it, on the host in numpy: training draws, the velocity loss and its
gradient, and the Euler and Heun samplers of diffusers' `FlowMatchEulerDiscreteScheduler` and
`FlowMatchHeunDiscreteScheduler` (0.32.2).

The path from data to noise is straight: x_s = (1 - s) x0 + s noise for s in [0, 1], whose velocity
d x_s / d s = noise - x0 is the model's target. The model is called with t = 1000 s (diffusers'
`num_train_timesteps`), a float. The noise level s is drawn uniform or logit-normal (s = sigmoid(n),
n ~ N(mean, std^2)), then shifted: s' = k s / (1 + (k - 1) s) (k > 1 spends more steps at high noise).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import numpy as np

from dit_compiler.app.diffusion.losses import LossTerms
from dit_compiler.app.diffusion.schedule import NUM_TIMESTEPS

ModelFn = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]
FlowSampler = Literal["euler", "heun"]


def shift_sigmas(s, shift: float):
    """SD3's timestep shift k s / (1 + (k - 1) s), in the dtype of `s`."""
    return shift * s / (1 + (shift - 1) * s)


def flow_sigmas(steps: int, shift: float = 1.0) -> np.ndarray:
    """The noise levels of `steps` sampling steps and a final 0, float32, as diffusers'
    `FlowMatchEulerDiscreteScheduler(shift=shift).set_timesteps(steps)` makes them: a linspace from the
    largest to the smallest of its 1000 shifted training levels, shifted again (diffusers applies the
    shift to the whole linspace, whose end is already shifted)."""
    n = NUM_TIMESTEPS
    sigma_max = float(shift_sigmas(np.float32(1.0), shift).astype(np.float32))
    sigma_min = float(shift_sigmas(np.float32(1.0) / np.float32(n), shift).astype(np.float32))
    sigmas = shift_sigmas(np.linspace(sigma_max * n, sigma_min * n, steps) / n, shift).astype(np.float32)
    return np.append(sigmas, np.float32(0.0))


@dataclass(frozen=True)
class RectifiedFlow:
    """The objective of `diffusion: {objective: rectified_flow, ...}`."""

    timestep_sampling: Literal["uniform", "logit_normal"] = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float = 1.0

    def draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """Noise levels s of `n` training images, float64 in [0, 1)."""
        if self.timestep_sampling == "uniform":
            s = rng.random(n)
        else:
            s = 1.0 / (1.0 + np.exp(-rng.normal(self.logit_mean, self.logit_std, n)))
        return shift_sigmas(s, self.shift)

    def noised(self, x0: np.ndarray, s: np.ndarray, noise: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """x_s and the model's timesteps 1000 s."""
        level = np.asarray(s, dtype=np.float64).reshape((-1,) + (1,) * (x0.ndim - 1))
        return (1.0 - level) * x0 + level * noise, NUM_TIMESTEPS * np.asarray(s, dtype=np.float64)

    def losses(self, x0: np.ndarray, x_t: np.ndarray, s: np.ndarray, noise: np.ndarray,
               model_output: np.ndarray) -> LossTerms:
        """mean((v - (noise - x0))^2) per image, and the gradient of its batch mean w.r.t. the output."""
        x0, target, out = (np.asarray(a, dtype=np.float64) for a in (x0, noise, model_output))
        if out.shape != x0.shape:
            raise ValueError(f"model output {out.shape} does not fit images {x0.shape} (rectified flow predicts a "
                             "velocity of the image's shape: learn_sigma must be false)")
        diff = out - (target - x0)
        mse = (diff ** 2).reshape(len(out), -1).mean(axis=1)
        grad = 2.0 * diff / diff.size
        return LossTerms(loss=mse, mse=mse, vb=None, grad=grad.astype(np.float32))

    def sample(self, model: ModelFn, labels: np.ndarray, shape: tuple[int, ...], rng: np.random.Generator, *,
               sampler: FlowSampler = "euler", steps: int = 50,
               progress: Callable[[], None] | None = None) -> np.ndarray:
        """Integrate dx/ds = v from `rng`'s noise at s = 1 to s = 0 over `flow_sigmas(steps, shift)`
        (float64 state; the model sees it as float32 with t = 1000 s in float32). Euler: one model call
        a step; Heun: a second call at the step's end averaged with the first, except on the last step to
        s = 0, which is Euler's (diffusers' Heun: 2 steps - 1 calls)."""
        if sampler not in ("euler", "heun"):
            raise ValueError(f"unknown flow sampler {sampler!r}")
        labels = np.asarray(labels, dtype=np.int64)
        n = shape[0]
        sigmas = flow_sigmas(steps, self.shift)
        times = sigmas * np.float32(NUM_TIMESTEPS)

        def velocity(x: np.ndarray, i: int) -> np.ndarray:
            t = np.full(n, times[i], dtype=np.float32)
            return np.asarray(model(x.astype(np.float32), t, labels), dtype=np.float64)

        x = rng.standard_normal(shape)
        for i in range(steps):
            ds = float(sigmas[i + 1]) - float(sigmas[i])
            v = velocity(x, i)
            if sampler == "heun" and sigmas[i + 1] > 0:
                v = 0.5 * (v + velocity(x + ds * v, i + 1))
            x = x + ds * v
            if progress is not None:
                progress()
        return x
