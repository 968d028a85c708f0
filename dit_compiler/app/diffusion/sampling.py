"""DiT's samplers on the host: DDPM (`p_sample_loop`) and DDIM (`ddim_sample_loop`) over a respaced
process, and classifier-free guidance as DiT's `forward_with_cfg`.

The model is any function `(x [N,C,H,W] float32, t [N] float32, y [N] int64) -> [N, C_out, H, W]`,
called with the ORIGINAL timestep of each kept step. Every random draw (the initial noise and one
noise tensor per step, drawn even where it is unused so that DDPM and DDIM consume the generator
alike) comes from the numpy Generator passed in: two backends given the same seed see identical noise.
The state between steps is float64; the model sees it cast to float32.
"""
from __future__ import annotations

from typing import Callable, Literal

import numpy as np

from dit_compiler.app.diffusion.schedule import Diffusion

ModelFn = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]
Sampler = Literal["ddpm", "ddim"]
CfgChannels = Literal["dit", "all"]


def guided(model: ModelFn, scale: float, null_class: int, channels: CfgChannels) -> ModelFn:
    """Classifier-free guidance: the conditional and null-class halves in one batch of 2N, then
    `uncond + scale * (cond - uncond)` on the guided channels; the other channels are the conditional
    half's. `dit` guides `out[:, :3]` exactly as DiT's `forward_with_cfg` (for 4-channel latents, three
    of the four epsilon channels; for fewer than 3 image channels this reaches variance channels too,
    as DiT's code would); `all` guides every epsilon channel, as diffusers' `DiTPipeline`.
    Scale 1 is no guidance: the model itself, at batch N.
    """
    if scale == 1.0:
        return model

    def forward_with_cfg(x: np.ndarray, t: np.ndarray, y: np.ndarray) -> np.ndarray:
        n = len(x)
        labels = np.concatenate([y, np.full(n, null_class, dtype=np.int64)])
        out = np.asarray(model(np.concatenate([x, x]), np.concatenate([t, t]), labels), dtype=np.float64)
        cond, uncond = out[:n], out[n:]
        k = 3 if channels == "dit" else x.shape[1]
        result = cond.copy()
        result[:, :k] = uncond[:, :k] + scale * (cond[:, :k] - uncond[:, :k])
        return result

    return forward_with_cfg


def sample_loop(d: Diffusion, model: ModelFn, labels: np.ndarray, shape: tuple[int, ...], rng: np.random.Generator,
                *, sampler: Sampler = "ddpm", eta: float = 0.0, clip_denoised: bool = False,
                sigma_small: bool = False, progress: Callable[[], None] | None = None) -> np.ndarray:
    """Denoise `rng`'s noise of `shape` through every step of `d`, from the last to 0 (float64 result).

    DDPM samples from the learned-range variance when the output has 2C channels, else DiT's fixed
    variance (FIXED_LARGE, or the posterior variance with `sigma_small`); DDIM uses `eta`. DiT's
    `sample.py` does not clip the x_0 prediction (`clip_denoised=False`).
    """
    labels = np.asarray(labels, dtype=np.int64)
    n, c = shape[:2]
    x = rng.standard_normal(shape)
    for i in reversed(range(d.num_timesteps)):
        t = np.full(n, i)
        out = np.asarray(model(x.astype(np.float32), d.timestep_map[t].astype(np.float32), labels), dtype=np.float64)
        noise = rng.standard_normal(shape)
        learned = out.shape[1] == 2 * c
        pred_xstart = d.predict_xstart(x, t, out[:, :c])
        if clip_denoised:
            pred_xstart = np.clip(pred_xstart, -1, 1)
        nonzero = float(i != 0)
        if sampler == "ddpm":
            log_var = d.learned_log_variance(out[:, c:], t) if learned else d.fixed_log_variance(t, sigma_small)
            x = d.q_posterior_mean(pred_xstart, x, t) + nonzero * np.exp(0.5 * log_var) * noise
        elif sampler == "ddim":
            eps = d.predict_eps(x, t, pred_xstart)
            abar, abar_prev = d.at(d.alphas_cumprod, t), d.at(d.alphas_cumprod_prev, t)
            sigma = eta * np.sqrt((1 - abar_prev) / (1 - abar)) * np.sqrt(1 - abar / abar_prev)
            x = (pred_xstart * np.sqrt(abar_prev) + np.sqrt(1 - abar_prev - sigma ** 2) * eps
                 + nonzero * sigma * noise)
        else:
            raise ValueError(f"unknown sampler {sampler!r}")
        if progress is not None:
            progress()
    return x
