"""Rectified flow (the spec's `diffusion:` section): validation, the velocity loss, the draws, the Euler and
Heun samplers against diffusers' FlowMatch schedulers on the same model and noise, and training and
sampling a flow model end to end, on torch and (marked nntile) on NNTile."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler

from conftest import needs_nntile
from dit_compiler.compiler.build import TORCH_FILE, compile_spec, write_build
from dit_compiler.cli import main
from dit_compiler.app.diffusion import guided
from dit_compiler.app.diffusion.flow import RectifiedFlow, flow_sigmas
from dit_compiler.app.diffusion.objective import DDPM, objective_of
from dit_compiler.app.backend import load_into, open_backend
from dit_compiler.checks.common import group_error, randomize_, rel_error
from dit_compiler.compiler.build import load_module
from dit_compiler.app.sample import FixedBatch, SampleConfig, generate
from dit_compiler.app.train import TrainConfig, checkpoints, train
from dit_compiler.app.weights import load_checkpoint
from dit_compiler.compiler.spec import SpecError, load_spec
from dit_compiler.compiler.spec.model import DiffusionSpec
from train_helpers import tiny_spec

TINY_FLOW = """\
name: tiny-flow
model: {input_size: 8, in_channels: 1, patch_size: 2, hidden_size: 32, depth: 1, num_heads: 2, num_classes: 10,
        learn_sigma: false}
batch: 8
diffusion: {objective: rectified_flow, timestep_sampling: logit_normal, logit_mean: 0.2, logit_std: 0.9, shift: 2.5}
"""
MODEL = "model: {input_size: 8, in_channels: 1, patch_size: 2, hidden_size: 32, depth: 1, num_heads: 2, num_classes: 10"


def _problems(tmp_path, text: str) -> list[str]:
    path = tmp_path / "s.yaml"
    path.write_text(text)
    with pytest.raises(SpecError) as caught:
        load_spec(path)
    return [f"{d.line}:{d.column} {d.key_path}: {d.message}" for d in caught.value.diagnostics]


def test_a_flow_spec_resolves_its_samplers_defaults(tmp_path):
    spec = tiny_spec(tmp_path, TINY_FLOW)
    assert spec.diffusion.flow and spec.diffusion.shift == 2.5 and spec.diffusion.timestep_sampling == "logit_normal"
    assert (spec.sample.sampler, spec.sample.steps) == ("euler", 50)
    ddpm = tiny_spec(tmp_path / "d")
    assert ddpm.diffusion.objective == "ddpm" and (ddpm.sample.sampler, ddpm.sample.steps) == ("ddpm", 250)
    no_section = tiny_spec(tmp_path / "x", TINY_FLOW.split("diffusion:")[0])
    assert spec.compiled_dict() == no_section.compiled_dict()   # a run setting, not the compiled model


def test_flow_mistakes_are_named_at_their_key(tmp_path):
    assert _problems(tmp_path, f"{MODEL}}}\ndiffusion: {{objective: rectified_flow}}\n") == [
        "2:24 diffusion.objective: rectified_flow needs model.learn_sigma: false (its default is true)"]
    assert _problems(tmp_path, f"{MODEL}, learn_sigma: true}}\ndiffusion:\n  objective: rectified_flow\n") == [
        "1:126 model.learn_sigma: rectified_flow predicts a velocity, which has no variance to learn"]
    found = _problems(tmp_path, f"{MODEL}, learn_sigma: false}}\ndiffusion:\n  objective: rectified_flow\n"
                                "  logit_std: 2\n  shfit: 3\nsample: {sampler: ddim}\n")
    assert found == ["4:14 diffusion.logit_std: the logit-normal's setting; timestep_sampling here is uniform",
                     "5:3 diffusion.shfit: unknown key; did you mean 'shift'?",
                     "6:19 sample.sampler: not a sampler of the objective rectified_flow"]
    assert _problems(tmp_path, f"{MODEL}}}\ndiffusion: {{shift: 3}}\nsample: {{sampler: euler}}\n") == [
        "2:20 diffusion.shift: rectified flow's setting; the objective here is ddpm",
        "3:19 sample.sampler: not a sampler of the objective ddpm"]
    assert _problems(tmp_path, f"{MODEL}, learn_sigma: false}}\ndiffusion: {{objective: flow, shift: 0}}\n") == [
        "2:24 diffusion.objective: not one of the allowed values", "2:37 diffusion.shift: too small"]


def test_the_velocity_loss_and_its_gradient():
    rng = np.random.default_rng(0)
    x0, noise, out = rng.standard_normal((3, 2, 4, 4, 4))
    flow = RectifiedFlow(shift=3.0)
    s = flow.draw(rng, 2)
    x_t, t = flow.noised(x0, s, noise)
    np.testing.assert_allclose(x_t, (1 - s[:, None, None, None]) * x0 + s[:, None, None, None] * noise)
    np.testing.assert_allclose(t, 1000 * s)
    terms = flow.losses(x0, x_t, s, noise, out)
    v = torch.tensor(out, requires_grad=True)
    loss = ((v - torch.tensor(noise - x0)) ** 2).mean(dim=(1, 2, 3))
    loss.mean().backward()
    np.testing.assert_allclose(terms.loss, loss.detach().numpy(), rtol=1e-12)
    np.testing.assert_allclose(terms.grad, v.grad.numpy(), rtol=1e-6)
    assert terms.vb is None
    with pytest.raises(ValueError, match="learn_sigma must be false"):
        flow.losses(x0, x_t, s, noise, np.concatenate([out, out], axis=1))


def test_draws_are_shifted_uniform_or_logit_normal():
    uniform, logit = RectifiedFlow(shift=3.0), RectifiedFlow("logit_normal", 0.5, 0.7, shift=1.0)
    u = np.random.default_rng(1).random(5)
    np.testing.assert_allclose(uniform.draw(np.random.default_rng(1), 5), 3 * u / (1 + 2 * u))
    n = np.random.default_rng(2).normal(0.5, 0.7, 5)
    np.testing.assert_allclose(logit.draw(np.random.default_rng(2), 5), 1 / (1 + np.exp(-n)))
    many = logit.draw(np.random.default_rng(3), 200_000)
    assert np.median(np.log(many / (1 - many))) == pytest.approx(0.5, abs=0.01)
    assert isinstance(objective_of(DiffusionSpec()), DDPM)


@pytest.mark.parametrize("steps, shift", [(1, 1.0), (7, 1.0), (50, 1.0), (28, 3.0), (10, 0.5)])
def test_the_sigmas_are_diffusers(steps, shift):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(steps)
    np.testing.assert_array_equal(flow_sigmas(steps, shift), scheduler.sigmas.numpy())


@pytest.fixture(scope="module")
def flow_model(tmp_path_factory):
    """The tiny flow spec's build and random weights (every one: DiT's zero init outputs zero)."""
    folder = tmp_path_factory.mktemp("flow")
    spec = tiny_spec(folder, TINY_FLOW)
    build = compile_spec(spec)
    build_dir = write_build(build, folder)
    module = load_module(build_dir / TORCH_FILE).Model()
    randomize_(module, seed=5)
    return build.graph, build_dir, {k: v.numpy() for k, v in module.state_dict().items()}


def diffusers_trajectory(scheduler, model, noise: np.ndarray, labels: np.ndarray, steps: int, cfg: float,
                         null_class: int) -> tuple[list[np.ndarray], list[float]]:
    """diffusers' sampling loop (as its SD3 pipeline runs it) over `model(x, t, y)` on numpy: the latents
    each model call sees, the final latents last, and the timesteps it passed."""
    scheduler.set_timesteps(steps)
    latents = torch.from_numpy(noise).float()
    seen, times = [], []
    for t in scheduler.timesteps:
        seen.append(latents.numpy().astype(np.float64))
        times.append(float(t))
        x, y = latents.numpy(), labels
        if cfg != 1:
            x, y = np.concatenate([x, x]), np.concatenate([labels, np.full(len(labels), null_class)])
        out = torch.from_numpy(np.asarray(model(x, np.full(len(x), t.item(), np.float32), y)))
        if cfg != 1:
            cond, uncond = out.chunk(2)
            out = uncond + cfg * (cond - uncond)
        latents = scheduler.step(out, t, latents).prev_sample
    seen.append(latents.numpy().astype(np.float64))
    return seen, times


def ditc_trajectory(backend, graph, labels: np.ndarray, sampler: str, steps: int, cfg: float, seed: int):
    """ditc's sampler over the backend: what each guided model call sees, then the samples, and the
    timesteps passed; with the initial noise drawn from the seed."""
    seen, times = [], []
    model = guided(FixedBatch(backend.predict, backend.batch), cfg, graph.spec.model.num_classes, "all")

    def recorded(x, t, y):
        seen.append(x.astype(np.float64))
        times.append(float(t[0]))
        return model(x, t, y)

    shape = (len(labels), 1, 8, 8)
    final = objective_of(graph.spec.diffusion).sample(recorded, labels, shape, np.random.default_rng(seed),
                                                      sampler=sampler, steps=steps)
    return seen + [final], times


def _trajectory_error(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    assert len(a) == len(b)
    return max(rel_error(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("sampler, scheduler, steps, cfg", [
    ("euler", FlowMatchEulerDiscreteScheduler, 20, 1.0), ("euler", FlowMatchEulerDiscreteScheduler, 50, 3.0),
    ("heun", FlowMatchHeunDiscreteScheduler, 10, 2.0)])
def test_sampling_follows_diffusers_flow_schedulers_on_torch(flow_model, sampler, scheduler, steps, cfg):
    """The same model and noise: every latent of the trajectory within 1e-5 of diffusers' scheduler loop."""
    graph, build_dir, weights = flow_model
    labels = np.array([0, 3, 7, 9, 1], dtype=np.int64)
    backend = open_backend("torch", build_dir, graph, inference=True)
    load_into(backend, weights, "random")
    mine, my_times = ditc_trajectory(backend, graph, labels, sampler, steps, cfg, seed=4)
    noise = np.random.default_rng(4).standard_normal(mine[0].shape)
    theirs, their_times = diffusers_trajectory(scheduler(shift=2.5), FixedBatch(backend.predict, backend.batch),
                                               noise, labels, steps, cfg, graph.spec.model.num_classes)
    assert my_times == their_times and len(mine) == (steps if sampler == "euler" else 2 * steps - 1) + 1
    assert _trajectory_error(mine, theirs) <= 1e-5
    assert rel_error(mine[-1], mine[0]) > 0.1   # the model moved the samples


def test_a_flow_run_trains_records_and_samples(tmp_path, capsys):
    """`ditc train` on a flow spec: the velocity loss, the objective in run.json and the checkpoint's args,
    and `ditc sample` of the run with its defaults (euler, 50 steps, every channel guided)."""
    spec = tiny_spec(tmp_path, TINY_FLOW)
    run = tmp_path / "run"
    assert train(spec, run, TrainConfig(steps=40, lr=2e-3, backend="torch")) == 0
    rows = [line.split(",") for line in (run / "metrics.csv").read_text().splitlines()[1:]]
    losses = np.array([float(r[1]) for r in rows])
    assert all(r[3] == "" for r in rows) and losses[-10:].mean() < 0.8 * losses[:10].mean()
    recorded = json.loads((run / "run.json").read_text())["diffusion"]
    assert recorded == {"objective": "rectified_flow", "timestep_sampling": "logit_normal", "logit_mean": 0.2,
                        "logit_std": 0.9, "shift": 2.5}
    assert load_checkpoint(checkpoints(run)[-1])["args"]["diffusion"] == recorded
    assert main(["sample", str(run), "--n", "4", "--cfg", "2", "--backend", "torch", "--steps", "6"]) == 0
    assert "sampled 4 images (euler, 6 steps, cfg 2.0) on torch" in capsys.readouterr().out
    settings = json.loads((run / "samples" / "settings.json").read_text())
    assert settings["sampler"] == "euler" and settings["cfg_channels"] == "all"
    assert main(["sample", str(run), "--n", "4", "--backend", "torch", "--sampler", "ddim", "--out",
                 str(tmp_path / "x")]) == 2
    assert "--sampler ddim: the model was trained with the rectified_flow objective" in capsys.readouterr().err


def test_a_run_does_not_resume_with_another_objective(tmp_path, capsys):
    spec = tiny_spec(tmp_path, TINY_FLOW)
    assert train(spec, tmp_path / "run", TrainConfig(steps=2, lr=1e-3, backend="torch")) == 0
    other = tiny_spec(tmp_path / "other", TINY_FLOW.replace("shift: 2.5", "shift: 1"))
    assert main(["train", str(other.source), "--out", str(tmp_path / "run"), "--resume", "--steps", "3",
                 "--backend", "torch"]) == 2
    assert "trained with another model or diffusion objective" in capsys.readouterr().err


# -- NNTile ---------------------------------------------------------------------------------------------

@needs_nntile
@pytest.mark.nntile
@pytest.mark.parametrize("sampler, scheduler", [("euler", FlowMatchEulerDiscreteScheduler),
                                                ("heun", FlowMatchHeunDiscreteScheduler)])
def test_nntile_sampling_follows_diffusers_flow_schedulers(flow_model, sampler, scheduler):
    """ditc's sampler on NNTile against diffusers' scheduler loop on the same NNTile model and noise, and
    `generate` on NNTile against diffusers' loop over the torch reference: within 1e-5."""
    graph, build_dir, weights = flow_model
    labels = np.array([0, 3, 7, 9, 1], dtype=np.int64)
    backends = {}
    try:
        for name in ("nntile", "torch"):
            backends[name] = open_backend(name, build_dir, graph, inference=True)
            load_into(backends[name], weights, "random")
        nnt = backends["nntile"]
        mine, _ = ditc_trajectory(nnt, graph, labels, sampler, 20, 2.0, seed=4)
        noise = np.random.default_rng(4).standard_normal(mine[0].shape)
        theirs, _ = diffusers_trajectory(scheduler(shift=2.5), FixedBatch(nnt.predict, nnt.batch), noise, labels,
                                         20, 2.0, graph.spec.model.num_classes)
        assert _trajectory_error(mine, theirs) <= 1e-5
        config = SampleConfig(sampler=sampler, steps=20, cfg=2.0, seed=4)
        samples = generate(nnt, graph, labels, config)
        reference, _ = diffusers_trajectory(scheduler(shift=2.5), FixedBatch(backends["torch"].predict, nnt.batch),
                                            noise, labels, 20, 2.0, graph.spec.model.num_classes)
        assert rel_error(samples, reference[-1]) <= 1e-5
    finally:
        for backend in backends.values():
            backend.close()


@needs_nntile
@pytest.mark.nntile
def test_nntile_trains_the_flow_loss_as_torch_does(tmp_path):
    """20 steps of the flow loss from one initialisation with the same draws: every step's loss within 1e-4,
    the weights and EMA within 1e-3."""
    runs = {}
    for name in ("nntile", "torch"):
        runs[name] = tmp_path / name
        assert train(tiny_spec(tmp_path, TINY_FLOW), runs[name], TrainConfig(steps=20, lr=1e-3, backend=name)) == 0
    losses = {name: [float(line.split(",")[1]) for line in (run / "metrics.csv").read_text().splitlines()[1:]]
              for name, run in runs.items()}
    assert len(losses["nntile"]) == 20
    assert losses["nntile"] == pytest.approx(losses["torch"], rel=1e-4)
    a, b = (load_checkpoint(checkpoints(run)[-1]) for run in (runs["nntile"], runs["torch"]))
    for part in ("model", "ema"):
        assert group_error([(a[part][k].numpy(), b[part][k].numpy()) for k in b[part]]) < 1e-3, part
