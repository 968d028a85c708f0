"""The host diffusion against an independent torch transcription of facebookresearch/DiT's formulas.

`Dit` below rebuilds DiT's `GaussianDiffusion` tables, `p_mean_variance`, `_vb_terms_bpd`,
`training_losses`, `p_sample` and `ddim_sample` in torch float64, formula by formula; the host code
(numpy) must give the same loss values, and its gradient must equal torch autograd of the transcription.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dit_compiler.app.diffusion import create_diffusion, guided, sample_loop, space_timesteps, training_losses
from dit_compiler.app.diffusion.schedule import linear_betas


class Dit:
    """DiT's diffusion formulas in torch float64, for a respaced process (kept steps `kept`)."""

    def __init__(self, kept: list[int]):
        base = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
        abar_base = np.cumprod(1.0 - base)
        last, betas = 1.0, []
        for i in kept:
            betas.append(1 - abar_base[i] / last)
            last = abar_base[i]
        b = torch.tensor(betas, dtype=torch.float64)
        self.kept = torch.tensor(kept)
        self.betas = b
        self.abar = torch.cumprod(1 - b, 0)
        self.abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.abar[:-1]])
        self.post_var = b * (1 - self.abar_prev) / (1 - self.abar)
        self.post_logvar = torch.log(torch.cat([self.post_var[1:2], self.post_var[1:]]))
        self.coef1 = b * torch.sqrt(self.abar_prev) / (1 - self.abar)
        self.coef2 = (1 - self.abar_prev) * torch.sqrt(1 - b) / (1 - self.abar)

    @staticmethod
    def ex(table, t):
        return table[t].view(-1, 1, 1, 1)

    def q_sample(self, x0, t, noise):
        return torch.sqrt(self.ex(self.abar, t)) * x0 + torch.sqrt(1 - self.ex(self.abar, t)) * noise

    def p_mean_variance(self, out, x, t, clip=False, sigma_small=False):
        c = x.shape[1]
        if out.shape[1] == 2 * c:
            out, v = torch.split(out, c, dim=1)
            frac = (v + 1) / 2
            logvar = frac * self.ex(torch.log(self.betas), t) + (1 - frac) * self.ex(self.post_logvar, t)
        elif sigma_small:
            logvar = self.ex(self.post_logvar, t) + torch.zeros_like(x)
        else:
            large = torch.log(torch.cat([self.post_var[1:2], self.betas[1:]]))
            logvar = self.ex(large, t) + torch.zeros_like(x)
        x0 = torch.sqrt(1 / self.ex(self.abar, t)) * x - torch.sqrt(1 / self.ex(self.abar, t) - 1) * out
        if clip:
            x0 = x0.clamp(-1, 1)
        mean = self.ex(self.coef1, t) * x0 + self.ex(self.coef2, t) * x
        return mean, logvar, x0

    @staticmethod
    def normal_kl(m1, lv1, m2, lv2):
        return 0.5 * (-1.0 + lv2 - lv1 + torch.exp(lv1 - lv2) + (m1 - m2) ** 2 * torch.exp(-lv2))

    @staticmethod
    def cdf(x):
        return 0.5 * (1.0 + torch.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * torch.pow(x, 3))))

    def disc_loglik(self, x, means, log_scales):
        centered = x - means
        inv = torch.exp(-log_scales)
        cdf_plus = self.cdf(inv * (centered + 1.0 / 255.0))
        cdf_min = self.cdf(inv * (centered - 1.0 / 255.0))
        log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
        log_one_minus = torch.log((1.0 - cdf_min).clamp(min=1e-12))
        delta = cdf_plus - cdf_min
        return torch.where(x < -0.999, log_cdf_plus,
                           torch.where(x > 0.999, log_one_minus, torch.log(delta.clamp(min=1e-12))))

    def training_losses(self, out, x0, t, noise):
        xt = self.q_sample(x0, t, noise)
        c = x0.shape[1]
        terms = {}
        eps = out[:, :c]
        if out.shape[1] == 2 * c:
            frozen = torch.cat([eps.detach(), out[:, c:]], dim=1)
            true_mean = self.ex(self.coef1, t) * x0 + self.ex(self.coef2, t) * xt
            true_logvar = self.ex(self.post_logvar, t)
            mean, logvar, _ = self.p_mean_variance(frozen, xt, t)
            kl = self.normal_kl(true_mean, true_logvar, mean, logvar).mean(dim=(1, 2, 3)) / np.log(2.0)
            nll = -self.disc_loglik(x0, mean, 0.5 * logvar).mean(dim=(1, 2, 3)) / np.log(2.0)
            terms["vb"] = torch.where(t == 0, nll, kl)
        terms["mse"] = ((noise - eps) ** 2).mean(dim=(1, 2, 3))
        terms["loss"] = terms["mse"] + terms.get("vb", 0)
        return terms


def batch(c: int, learn: bool, seed: int = 0, n: int = 6):
    """Images with values at -1 and 1 (the decoder's edge bins), timesteps including 0 and 999."""
    rng = np.random.default_rng(seed)
    x0 = np.clip(rng.uniform(-1.3, 1.3, (n, c, 4, 4)), -1, 1)
    t = np.array([0, 0, 1, 500, 998, 999][:n])
    noise = rng.standard_normal(x0.shape)
    out = rng.standard_normal((n, 2 * c if learn else c, 4, 4)) * 0.7
    return x0, t, noise, out


def test_linear_schedule_is_dits():
    betas = linear_betas()
    assert betas.dtype == np.float64 and betas[0] == 1e-4 and betas[-1] == 0.02 and len(betas) == 1000
    d = create_diffusion()
    assert d.num_timesteps == 1000 and (d.timestep_map == np.arange(1000)).all()
    np.testing.assert_allclose(d.betas, betas, rtol=1e-12)


def test_respacing_keeps_dits_steps_and_cumulative_alphas():
    assert space_timesteps(1000, "250")[:4] == [0, 4, 8, 12] and space_timesteps(1000, 250)[-1] == 999
    assert len(space_timesteps(1000, 250)) == 250
    sections = space_timesteps(300, "10,15,20")        # DiT's docstring example
    assert len(sections) == 45 and sections[:2] == [0, 11] and sections[-1] == 299
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    base, spaced = create_diffusion(), create_diffusion(250)
    np.testing.assert_allclose(spaced.alphas_cumprod, base.alphas_cumprod[spaced.timestep_map], rtol=1e-12)
    with pytest.raises(ValueError):
        space_timesteps(100, 101)


def test_q_sample_matches_dit():
    x0, t, noise, _ = batch(2, True)
    expected = Dit(list(range(1000))).q_sample(*(torch.from_numpy(a) for a in (x0, t, noise)))
    np.testing.assert_allclose(create_diffusion().q_sample(x0, t, noise), expected.numpy(), rtol=1e-12)


@pytest.mark.parametrize("learn", [True, False], ids=["learn-sigma", "mse-only"])
@pytest.mark.parametrize("c", [1, 3])
def test_training_losses_and_gradient_match_dit(learn, c):
    x0, t, noise, out = batch(c, learn)
    d = create_diffusion()
    terms = training_losses(d, x0, d.q_sample(x0, t, noise), t, noise, out)

    out_t = torch.from_numpy(out).requires_grad_(True)
    ref = Dit(list(range(1000))).training_losses(out_t, *(torch.from_numpy(a) for a in (x0, t, noise)))
    np.testing.assert_allclose(terms.loss, ref["loss"].detach().numpy(), rtol=1e-10)
    np.testing.assert_allclose(terms.mse, ref["mse"].detach().numpy(), rtol=1e-10)
    if learn:
        np.testing.assert_allclose(terms.vb, ref["vb"].detach().numpy(), rtol=1e-10)
        assert (terms.vb > 0).all()
    else:
        assert terms.vb is None
    ref["loss"].mean().backward()
    assert terms.grad.dtype == np.float32 and terms.grad.shape == out.shape
    np.testing.assert_allclose(terms.grad, out_t.grad.numpy(), rtol=1e-5, atol=1e-9)
    if learn:   # the VB term reaches the variance channels, with a nonzero gradient at t = 0 too
        assert np.abs(terms.grad[:2, c:]).min() > 0


def test_decoder_gradient_in_far_tails():
    """Outputs whose variance collapses (v = +-1 at large |x0 - mean|) hit DiT's 1e-12 clamps."""
    x0, t, noise, out = batch(1, True, seed=3)
    out[:, 1:] = np.where(out[:, 1:] > 0, 1.0, -1.0)
    out[:, :1] *= 40
    t[:] = 0
    d = create_diffusion()
    terms = training_losses(d, x0, d.q_sample(x0, t, noise), t, noise, out)
    out_t = torch.from_numpy(out).requires_grad_(True)
    ref = Dit(list(range(1000))).training_losses(out_t, *(torch.from_numpy(a) for a in (x0, t, noise)))
    ref["loss"].mean().backward()
    np.testing.assert_allclose(terms.loss, ref["loss"].detach().numpy(), rtol=1e-10)
    np.testing.assert_allclose(terms.grad, out_t.grad.numpy(), rtol=1e-5, atol=1e-9)


def toy_model(learn: bool, seen: list | None = None):
    """A deterministic stand-in for a network: smooth in x, t and y."""
    def model(x, t, y):
        if seen is not None:
            seen.append((x.shape[0], t.copy(), y.copy()))
        scale = (1 + t / 1000)[:, None, None, None] * (1 + 0.1 * y)[:, None, None, None]
        eps = np.tanh(0.3 * x * scale)
        return np.concatenate([eps, np.tanh(x - 0.2)], axis=1) if learn else eps
    return model


@pytest.mark.parametrize("sampler,learn,eta,clip", [
    ("ddpm", True, 0.0, False), ("ddpm", False, 0.0, True), ("ddim", True, 0.0, False), ("ddim", False, 0.5, True)])
def test_sample_loop_matches_dit_steps(sampler, learn, eta, clip):
    """20 respaced steps: the model sees the original timesteps; every step equals DiT's formula."""
    d = create_diffusion(20)
    labels = np.array([0, 3, 1])
    shape = (3, 2, 4, 4)
    seen: list = []
    got = sample_loop(d, toy_model(learn, seen), labels, shape, np.random.default_rng(7), sampler=sampler,
                      eta=eta, clip_denoised=clip)
    assert [s[1][0] for s in seen] == list(d.timestep_map[::-1].astype(np.float32))
    assert all((s[2] == labels).all() for s in seen)

    ref, rng, model = Dit(space_timesteps(1000, 20)), np.random.default_rng(7), toy_model(learn)
    x = torch.from_numpy(rng.standard_normal(shape))
    for i in reversed(range(20)):
        t = torch.full((3,), i)
        out = torch.from_numpy(model(x.float().numpy(), ref.kept[t].float().numpy(), labels)).double()
        noise = torch.from_numpy(rng.standard_normal(shape))
        mean, logvar, x0 = ref.p_mean_variance(out, x, t, clip=clip)
        nonzero = float(i != 0)
        if sampler == "ddpm":
            x = mean + nonzero * torch.exp(0.5 * logvar) * noise
        else:
            eps = (torch.sqrt(1 / ref.ex(ref.abar, t)) * x - x0) / torch.sqrt(1 / ref.ex(ref.abar, t) - 1)
            ab, abp = ref.ex(ref.abar, t), ref.ex(ref.abar_prev, t)
            sigma = eta * torch.sqrt((1 - abp) / (1 - ab)) * torch.sqrt(1 - ab / abp)
            x = x0 * torch.sqrt(abp) + torch.sqrt(1 - abp - sigma ** 2) * eps + nonzero * sigma * noise
    np.testing.assert_allclose(got, x.numpy(), rtol=1e-9, atol=1e-12)


def test_ddim_without_eta_is_deterministic_given_the_start_noise():
    d = create_diffusion(10)
    a = sample_loop(d, toy_model(True), np.zeros(2), (2, 1, 4, 4), np.random.default_rng(1), sampler="ddim")
    b = sample_loop(d, toy_model(True), np.zeros(2), (2, 1, 4, 4), np.random.default_rng(1), sampler="ddim")
    np.testing.assert_array_equal(a, b)


def test_guidance_is_forward_with_cfg():
    seen: list = []
    model = toy_model(True, seen)
    x = np.random.default_rng(0).standard_normal((2, 4, 4, 4)).astype(np.float32)
    t, y = np.array([5.0, 9.0], dtype=np.float32), np.array([1, 2])
    assert guided(model, 1.0, 10, "dit") is model            # scale 1: no doubled batch
    full = model(np.concatenate([x, x]), np.concatenate([t, t]), np.array([1, 2, 10, 10]))
    cond, uncond = full[:2], full[2:]
    seen.clear()
    dit = guided(model, 3.0, 10, "dit")(x, t, y)
    assert seen[0][0] == 4 and list(seen[0][2]) == [1, 2, 10, 10]
    np.testing.assert_allclose(dit[:, :3], uncond[:, :3] + 3.0 * (cond[:, :3] - uncond[:, :3]), rtol=1e-6)
    np.testing.assert_array_equal(dit[:, 3:], cond[:, 3:])   # channel 3 and the variance: the cond half's
    every = guided(model, 3.0, 10, "all")(x, t, y)
    np.testing.assert_allclose(every[:, :4], uncond[:, :4] + 3.0 * (cond[:, :4] - uncond[:, :4]), rtol=1e-6)
    np.testing.assert_array_equal(every[:, 4:], cond[:, 4:])
