"""The diffusion process of DiT's `create_diffusion`: linear betas, float64 tables, respacing.

DiT always builds a `SpacedDiffusion`: the kept timesteps of the 1000-step process get new betas
(`1 - abar_i / abar_prev_kept`) and the model is always called with the ORIGINAL timestep of a kept
step (`timestep_map`). Training uses every step, so its map is the identity.
"""
from __future__ import annotations

import numpy as np

NUM_TIMESTEPS = 1000


def linear_betas(num_timesteps: int = NUM_TIMESTEPS) -> np.ndarray:
    """Ho et al.'s linear schedule 1e-4..0.02, stretched to any step count as DiT does."""
    scale = 1000 / num_timesteps
    return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)


def space_timesteps(num_timesteps: int, section_counts: str | int | list[int]) -> list[int]:
    """The original timesteps a respaced process keeps (DiT's `space_timesteps`, sorted).

    `section_counts` is a step count, a comma-separated list of counts per equal section
    (`"10,15,20"`), or `"ddimN"`: the integer stride of the DDIM paper giving exactly N steps.
    """
    if isinstance(section_counts, str) and section_counts.startswith("ddim"):
        wanted = int(section_counts[len("ddim"):])
        for stride in range(1, num_timesteps):
            if len(range(0, num_timesteps, stride)) == wanted:
                return list(range(0, num_timesteps, stride))
        raise ValueError(f"cannot take exactly {wanted} of {num_timesteps} steps with an integer stride")
    if isinstance(section_counts, int):
        counts = [section_counts]
    elif isinstance(section_counts, str):
        counts = [int(c) for c in section_counts.split(",")]
    else:
        counts = list(section_counts)
    size_per, extra = divmod(num_timesteps, len(counts))
    start, kept = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < count or count < 1:
            raise ValueError(f"cannot take {count} steps from a section of {size}")
        stride = (size - 1) / (count - 1) if count > 1 else 1
        position = 0.0
        for _ in range(count):
            kept.append(start + round(position))
            position += stride
        start += size
    return sorted(set(kept))


class Diffusion:
    """The float64 tables of a (possibly respaced) Gaussian diffusion, indexed by kept step."""

    def __init__(self, betas: np.ndarray, timestep_map: np.ndarray):
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or not ((betas > 0) & (betas <= 1)).all():
            raise ValueError("betas must be a 1-D array in (0, 1]")
        self.betas = betas
        self.timestep_map = np.asarray(timestep_map, dtype=np.int64)
        self.num_timesteps = len(betas)
        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
        # Posterior q(x_{t-1} | x_t, x_0); its variance is 0 at t = 0, so the log takes entry 1 there.
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_log_variance_clipped = (
            np.log(np.append(self.posterior_variance[1], self.posterior_variance[1:]))
            if self.num_timesteps > 1 else np.array([]))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        self.log_betas = np.log(betas)

    def at(self, table: np.ndarray, t: np.ndarray, ndim: int = 4) -> np.ndarray:
        """`table[t]` shaped to broadcast over a [N, C, H, W] batch (DiT's `_extract_into_tensor`)."""
        return table[np.asarray(t)].reshape((-1,) + (1,) * (ndim - 1))

    def q_sample(self, x_start: np.ndarray, t: np.ndarray, noise: np.ndarray) -> np.ndarray:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise, in float64."""
        return (self.at(self.sqrt_alphas_cumprod, t, x_start.ndim) * x_start
                + self.at(self.sqrt_one_minus_alphas_cumprod, t, x_start.ndim) * noise)

    def q_posterior_mean(self, x_start: np.ndarray, x_t: np.ndarray, t: np.ndarray) -> np.ndarray:
        return self.at(self.posterior_mean_coef1, t) * x_start + self.at(self.posterior_mean_coef2, t) * x_t

    def predict_xstart(self, x_t: np.ndarray, t: np.ndarray, eps: np.ndarray) -> np.ndarray:
        return self.at(self.sqrt_recip_alphas_cumprod, t) * x_t - self.at(self.sqrt_recipm1_alphas_cumprod, t) * eps

    def predict_eps(self, x_t: np.ndarray, t: np.ndarray, pred_xstart: np.ndarray) -> np.ndarray:
        return ((self.at(self.sqrt_recip_alphas_cumprod, t) * x_t - pred_xstart)
                / self.at(self.sqrt_recipm1_alphas_cumprod, t))

    def learned_log_variance(self, v: np.ndarray, t: np.ndarray) -> np.ndarray:
        """LEARNED_RANGE: v in [-1, 1] interpolates log beta_t (1) and the clipped log posterior variance (-1)."""
        frac = (v + 1) / 2
        return frac * self.at(self.log_betas, t) + (1 - frac) * self.at(self.posterior_log_variance_clipped, t)

    def fixed_log_variance(self, t: np.ndarray, small: bool) -> np.ndarray:
        """FIXED_SMALL (the posterior variance) or FIXED_LARGE (betas, entry 0 the posterior's entry 1)."""
        if small:
            return self.at(self.posterior_log_variance_clipped, t)
        return self.at(np.log(np.append(self.posterior_variance[1], self.betas[1:])), t)


def create_diffusion(steps: int | str | None = None, num_timesteps: int = NUM_TIMESTEPS) -> Diffusion:
    """DiT's `create_diffusion(timestep_respacing)`: `None` keeps every step (training), `250` respaces."""
    base = Diffusion(linear_betas(num_timesteps), np.arange(num_timesteps))
    kept = space_timesteps(num_timesteps, steps if steps is not None else num_timesteps)
    abar_prev, betas = 1.0, []
    for i in kept:
        betas.append(1 - base.alphas_cumprod[i] / abar_prev)
        abar_prev = base.alphas_cumprod[i]
    return Diffusion(np.array(betas), np.array(kept))
