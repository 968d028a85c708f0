"""A spec's training objective (its `diffusion:` section) behind one interface, for `ditc train` and
`ditc sample`: what a training step draws, the model's input and the loss; and the objective's samplers.

Per training step the loop draws `draw(rng, global_batch)` (timesteps or noise levels), then the noise,
from one seeded generator; `noised` gives the model's input and timesteps, `losses` the loss and its
gradient with respect to the output. DDPM's draws are those `ditc train` always made, in that order.
"""
from __future__ import annotations

from typing import Callable, Protocol

import numpy as np

from dit_compiler.app.diffusion.flow import ModelFn, RectifiedFlow
from dit_compiler.app.diffusion.losses import LossTerms, training_losses
from dit_compiler.app.diffusion.sampling import sample_loop
from dit_compiler.app.diffusion.schedule import NUM_TIMESTEPS, create_diffusion
from dit_compiler.compiler.spec.model import DiffusionSpec


class Objective(Protocol):
    def draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """Per-image timesteps (DDPM) or noise levels (flow) of `n` training images."""

    def noised(self, x0: np.ndarray, times: np.ndarray, noise: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The model's input x_t and its timesteps, float64."""

    def losses(self, x0: np.ndarray, x_t: np.ndarray, times: np.ndarray, noise: np.ndarray,
               model_output: np.ndarray) -> LossTerms: ...

    def sample(self, model: ModelFn, labels: np.ndarray, shape: tuple[int, ...], rng: np.random.Generator, *,
               sampler: str, steps: int, progress: Callable[[], None] | None = None, **options) -> np.ndarray:
        """Samples from `rng`'s noise, float64."""


class DDPM:
    """facebookresearch/DiT's objective: timesteps uniform over the 1000-step linear-beta process, epsilon
    (and with learned sigma the variance) predicted; samplers DDPM and DDIM over a respaced process."""

    def __init__(self) -> None:
        self.diffusion = create_diffusion()

    def draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return rng.integers(0, NUM_TIMESTEPS, n)

    def noised(self, x0: np.ndarray, times: np.ndarray, noise: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.diffusion.q_sample(x0, times, noise), np.asarray(times, dtype=np.float64)

    def losses(self, x0: np.ndarray, x_t: np.ndarray, times: np.ndarray, noise: np.ndarray,
               model_output: np.ndarray) -> LossTerms:
        return training_losses(self.diffusion, x0, x_t, times, noise, model_output)

    def sample(self, model: ModelFn, labels: np.ndarray, shape: tuple[int, ...], rng: np.random.Generator, *,
               sampler: str = "ddpm", steps: int = 250, progress: Callable[[], None] | None = None,
               **options) -> np.ndarray:
        """`options`: `eta`, `clip_denoised`, `sigma_small` of `sample_loop`."""
        return sample_loop(create_diffusion(steps), model, labels, shape, rng, sampler=sampler, progress=progress,
                           **options)


def objective_of(spec: DiffusionSpec) -> Objective:
    """The objective a spec's `diffusion:` section names."""
    if spec.flow:
        return RectifiedFlow(spec.timestep_sampling, spec.logit_mean, spec.logit_std, spec.shift)
    return DDPM()
