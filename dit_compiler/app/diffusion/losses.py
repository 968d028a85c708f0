"""DiT's `training_losses` and its gradient with respect to the model output, on the host.

The loss is element-wise in the model output (a mean per image), so the host computes it and its
gradient in float64 from the output the backend returns; the backend then runs backward from that
gradient. With learned sigma (output channels 2C) the loss is

    mse + vb,  mse = mean((noise - eps)^2),
    vb = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) in bits for t > 0, the discretised Gaussian
         decoder NLL of x_0 in bits for t = 0,

where p's mean comes from `eps` with its gradient stopped (DiT's frozen-mean trick) and p's log variance
from the other C channels (LEARNED_RANGE). So the `eps` channels get the MSE gradient only and the
variance channels the VB gradient only. Without learned sigma the loss is the MSE alone.
The gradient returned is that of the batch mean of the loss (DiT trains on `loss.mean()`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dit_compiler.app.diffusion.schedule import Diffusion

_LN2 = np.log(2.0)
_SQRT_2_OVER_PI = np.sqrt(2.0 / np.pi)
_BIN = 1.0 / 255.0   # half a uint8 bin in [-1, 1]
_FLOOR = 1e-12       # DiT's clamp before each log


@dataclass(frozen=True)
class LossTerms:
    loss: np.ndarray         # [N] float64, mse + vb
    mse: np.ndarray          # [N]
    vb: np.ndarray | None    # [N], None without learned sigma
    grad: np.ndarray         # d mean(loss) / d model_output, float32, the output's shape

    @property
    def mean(self) -> float:
        return float(self.loss.mean())


def _mean_flat(a: np.ndarray) -> np.ndarray:
    return a.reshape(a.shape[0], -1).mean(axis=1)


def _approx_cdf(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DiT's tanh approximation of the standard normal CDF, and its derivative."""
    u = _SQRT_2_OVER_PI * (x + 0.044715 * x ** 3)
    th = np.tanh(u)
    return 0.5 * (1.0 + th), 0.5 * (1.0 - th ** 2) * _SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * x ** 2)


def _clamped_log(p: np.ndarray, dp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """log(max(p, 1e-12)) and its derivative given dp (zero where the clamp holds, as torch's clamp)."""
    kept = p >= _FLOOR
    safe = np.maximum(p, _FLOOR)
    return np.log(safe), np.where(kept, dp / safe, 0.0)


def discretized_gaussian_nll(x: np.ndarray, means: np.ndarray, log_scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """-log P(x) of a Gaussian discretised to uint8 bins of [-1, 1] (nats), and d/d log_scales.

    The edge bins extend to -inf and +inf (`x < -0.999`, `x > 0.999`), as in DiT's `diffusion_utils`.
    """
    centered = x - means
    inv_stdv = np.exp(-log_scales)
    plus_in = inv_stdv * (centered + _BIN)
    min_in = inv_stdv * (centered - _BIN)
    cdf_plus, dcdf_plus = _approx_cdf(plus_in)
    cdf_min, dcdf_min = _approx_cdf(min_in)
    # d(plus_in)/d(log_scales) = -plus_in, likewise for min_in.
    dplus = -dcdf_plus * plus_in
    dmin = -dcdf_min * min_in
    log_plus, g_plus = _clamped_log(cdf_plus, dplus)
    log_one_minus_min, g_one_minus_min = _clamped_log(1.0 - cdf_min, -dmin)
    log_delta, g_delta = _clamped_log(cdf_plus - cdf_min, dplus - dmin)
    low, high = x < -0.999, x > 0.999
    log_probs = np.where(low, log_plus, np.where(high, log_one_minus_min, log_delta))
    grad = np.where(low, g_plus, np.where(high, g_one_minus_min, g_delta))
    return -log_probs, -grad


def _vb_terms(d: Diffusion, x_start: np.ndarray, x_t: np.ndarray, t: np.ndarray, eps: np.ndarray,
              v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The VB term per image (bits) with the mean frozen at `eps`, and its gradient with respect to v."""
    per_image = x_start[0].size
    true_mean = d.q_posterior_mean(x_start, x_t, t)
    true_log_var = d.at(d.posterior_log_variance_clipped, t)
    log_var = d.learned_log_variance(v, t)
    mean = d.q_posterior_mean(d.predict_xstart(x_t, t, eps), x_t, t)

    ratio = np.exp(true_log_var - log_var)
    sq = (true_mean - mean) ** 2 * np.exp(-log_var)
    kl = 0.5 * (-1.0 + log_var - true_log_var + ratio + sq)
    dkl = 0.5 * (1.0 - ratio - sq)                                   # d kl / d log_var
    nll, dnll = discretized_gaussian_nll(x_start, mean, 0.5 * log_var)
    first = (np.asarray(t) == 0)
    vb = np.where(first, _mean_flat(nll), _mean_flat(kl)) / _LN2
    dvb_dlog_var = np.where(first.reshape(-1, 1, 1, 1), 0.5 * dnll, dkl) / (per_image * _LN2)
    dlog_var_dv = (d.at(d.log_betas, t) - d.at(d.posterior_log_variance_clipped, t)) / 2
    return vb, dvb_dlog_var * dlog_var_dv


def training_losses(d: Diffusion, x_start: np.ndarray, x_t: np.ndarray, t: np.ndarray, noise: np.ndarray,
                    model_output: np.ndarray) -> LossTerms:
    """DiT's `training_losses` (loss type MSE, epsilon prediction) for a model output computed at x_t.

    `t` indexes `d`'s steps (training uses the full process, where that is the model's timestep).
    Learned sigma is read from the output: 2C channels learn the variance range, C do not.
    """
    x0, xt, target, out = (np.asarray(a, dtype=np.float64) for a in (x_start, x_t, noise, model_output))
    n, c = x0.shape[:2]
    if out.shape[0] != n or out.shape[2:] != x0.shape[2:] or out.shape[1] not in (c, 2 * c):
        raise ValueError(f"model output {out.shape} does not fit images {x0.shape}")
    eps = out[:, :c]
    grad = np.empty_like(out)
    mse = _mean_flat((target - eps) ** 2)
    grad[:, :c] = 2.0 * (eps - target) / (x0[0].size * n)
    vb = None
    if out.shape[1] == 2 * c:
        vb, dvb_dv = _vb_terms(d, x0, xt, t, eps, out[:, c:])
        grad[:, c:] = dvb_dv / n
    loss = mse + vb if vb is not None else mse
    return LossTerms(loss=loss, mse=mse, vb=vb, grad=grad.astype(np.float32))
