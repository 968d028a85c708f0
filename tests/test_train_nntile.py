"""Training and sampling on the NNTile backend against the torch backend: the same loop, the same draws."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import needs_nntile
from dit_compiler.checks.common import group_error
from dit_compiler.app.train import TrainConfig, checkpoints, train
from dit_compiler.app.weights import load_checkpoint
from train_helpers import tiny_spec, train_tiny

pytestmark = [needs_nntile, pytest.mark.nntile]


def _losses(run) -> list[float]:
    return [float(line.split(",")[1]) for line in (run / "metrics.csv").read_text().splitlines()[1:]]


def _final(run) -> dict:
    return load_checkpoint(checkpoints(run)[-1])


def _weights_error(a: dict, b: dict) -> float:
    return group_error([(a[k].numpy(), b[k].numpy()) for k in b])


def test_nntile_trains_as_torch_does(tmp_path):
    """From one initialisation, with the same data, timesteps, noise and dropped labels: every step's loss
    within 1e-4, the weights, the EMA and AdamW's moments within 1e-3 after 10 steps."""
    nnt, ref = train_tiny(tmp_path / "nntile", 10, "nntile"), train_tiny(tmp_path / "torch", 10, "torch")
    assert _losses(nnt) == pytest.approx(_losses(ref), rel=1e-4)
    a, b = _final(nnt), _final(ref)
    assert a["train_state"]["backend"] == "nntile" and b["train_state"]["backend"] == "torch"
    assert list(a["model"]) == list(b["model"])
    assert _weights_error(a["model"], b["model"]) < 1e-3
    assert _weights_error(a["ema"], b["ema"]) < 1e-3
    assert a["opt"]["param_groups"] == b["opt"]["param_groups"]
    assert a["opt"]["state"].keys() == b["opt"]["state"].keys()
    for moment in ("exp_avg", "exp_avg_sq"):
        pairs = [(a["opt"]["state"][i][moment].numpy(), b["opt"]["state"][i][moment].numpy()) for i in b["opt"]["state"]]
        assert group_error(pairs) < 1e-3, moment
    assert all(torch.equal(a["opt"]["state"][i]["step"], b["opt"]["state"][i]["step"]) for i in b["opt"]["state"])


@pytest.mark.parametrize("first, then", [("nntile", "torch"), ("torch", "nntile")])
def test_a_run_resumes_on_the_other_backend(tmp_path, first, then):
    """A checkpoint written on one backend resumes on the other and ends where an uninterrupted run ends."""
    whole = train_tiny(tmp_path / "whole", 6, then)
    half = train_tiny(tmp_path / "half", 3, first)
    train_tiny(tmp_path / "half", 6, then, resume=True)
    a, b = _final(half), _final(whole)
    assert a["train_state"]["step"] == 6
    assert _losses(half) == pytest.approx(_losses(whole), rel=1e-4)
    assert _weights_error(a["model"], b["model"]) < 1e-3 and _weights_error(a["ema"], b["ema"]) < 1e-3


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_nntile_samples_what_torch_samples(tmp_path, sampler):
    """From the same initial and per-step noise, NNTile's and torch's trajectories end on the same samples."""
    from dit_compiler.compiler.build import graph_of
    from dit_compiler.app.backend import load_into, open_backend
    from dit_compiler.app.sample import SampleConfig, generate
    from dit_compiler.app.train import run_build_dir

    run = train_tiny(tmp_path, 3, "torch")
    spec, build_dir = tiny_spec(tmp_path), run_build_dir(run)
    graph, weights = graph_of(spec), {k: v.numpy() for k, v in _final(run)["ema"].items()}
    labels = np.array([0, 3, 7, 9, 1], dtype=np.int64)
    samples = {}
    for name in ("nntile", "torch"):
        backend = open_backend(name, build_dir, graph)
        try:
            load_into(backend, weights, "test")
            samples[name] = generate(backend, graph, labels, SampleConfig(sampler=sampler, steps=20, cfg=2.0))
        finally:
            backend.close()
    assert group_error([(samples["nntile"], samples["torch"])]) < 1e-4


def test_train_under_a_memory_limit_swaps_and_trains_as_torch_does(tmp_path):
    """`ditc train --memory-limit`: StarPU holds 65 of the step's 133 MiB and swaps the rest to disk, in
    a fresh process (out-of-core is set up before NNTile is imported); the losses are torch's."""
    import os
    import subprocess
    import sys

    from conftest import ROOT

    spec = tiny_spec(tmp_path, "name: wide\nmodel: {input_size: 8, in_channels: 1, patch_size: 2, hidden_size: 512, "
                               "depth: 2, num_heads: 4, num_classes: 10}\nbatch: 8\n")
    done = subprocess.run([sys.executable, "-m", "dit_compiler.cli", "train", str(spec.source), "--steps", "3",
                           "--lr", "1e-3", "--out", str(tmp_path / "ooc"), "--memory-limit", "360MiB"],
                          capture_output=True, text=True, env=os.environ | {"PYTHONPATH": str(ROOT)},
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert "nntile out-of-core under 360 MiB: StarPU holds at most" in done.stderr
    assert "trained wide on nntile" in done.stdout
    assert train(spec, tmp_path / "torch", TrainConfig(steps=3, lr=1e-3, backend="torch")) == 0
    assert _losses(tmp_path / "ooc") == pytest.approx(_losses(tmp_path / "torch"), rel=1e-4)
