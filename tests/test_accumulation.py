"""A global batch larger than the compiled one (gradient accumulation), learning-rate warm-up and schedules,
and gradient-norm clipping: on torch and (marked nntile) on NNTile, against one batch that large."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from conftest import needs_nntile
from dit_compiler.cli import main
from dit_compiler.checks.common import group_error
from dit_compiler.app.schedules import lr_at, micro_batches
from dit_compiler.compiler.targets.base import clip_scale
from dit_compiler.app.train import TrainConfig, checkpoints, train
from dit_compiler.app.weights import load_checkpoint
from train_helpers import TINY_DIGITS, tiny_spec


def test_learning_rate_warms_up_then_holds_or_decays():
    assert [lr_at(s, 1.0, "constant", 4, 10) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    cosine = [lr_at(s, 2.0, "cosine", 2, 12) for s in range(12)]
    assert cosine[:3] == [1.0, 2.0, 2.0]
    assert cosine[7] == pytest.approx(2.0 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert all(a > b for a, b in zip(cosine[2:], cosine[3:])) and cosine[-1] < 0.1
    assert lr_at(5, 3e-4) == 3e-4


def test_micro_batches_split_the_global_batch_then_the_ranks():
    assert [list(r) for r in micro_batches(8, 2, slice(0, 4))] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    # 2 ranks of batch 2, accumulation 2: rank 1 takes rows 2-3 of each half
    assert [list(r) for r in micro_batches(8, 2, slice(2, 4))] == [[2, 3], [6, 7]]
    assert clip_scale(10.0, 0) == 1.0 and clip_scale(0.5, 1.0) == 1.0
    assert clip_scale(4.0, 1.0) == pytest.approx(0.25)


def _run(folder, batch: int, backend: str = "torch", steps: int = 5, **config):
    spec = tiny_spec(folder, TINY_DIGITS.replace("batch: 8", f"batch: {batch}"))
    run = folder / "run"
    assert train(spec, run, TrainConfig(steps=steps, lr=1e-3, backend=backend, **config)) == 0
    return run


def _losses(run) -> np.ndarray:
    return np.array([float(line.split(",")[1]) for line in (run / "metrics.csv").read_text().splitlines()[1:]])


def _error(a, b, part: str = "model") -> float:
    x, y = load_checkpoint(checkpoints(a)[-1])[part], load_checkpoint(checkpoints(b)[-1])[part]
    return group_error([(x[k].numpy(), y[k].numpy()) for k in y])


SETTINGS = {"lr_schedule": "cosine", "warmup_steps": 2, "grad_clip": 0.5}


def test_accumulation_takes_the_steps_of_one_big_batch_on_torch(tmp_path):
    """Batch 4 x accumulation 2 against batch 8, with warm-up, cosine and clipping on: the same losses and,
    after 5 steps, the same weights, EMA and moments up to float rounding."""
    big = _run(tmp_path / "big", 8, **SETTINGS)
    acc = _run(tmp_path / "acc", 4, accumulation=2, **SETTINGS)
    np.testing.assert_allclose(_losses(acc), _losses(big), rtol=1e-6)
    assert _error(acc, big) < 1e-6 and _error(acc, big, "ema") < 1e-6
    state = load_checkpoint(checkpoints(acc)[-1])
    assert state["train_state"]["global_batch"] == 8
    assert state["args"]["accumulation"] == 2 and state["args"]["grad_clip"] == 0.5
    assert json.loads((acc / "run.json").read_text())["config"]["lr_schedule"] == "cosine"
    lr = [float(line.split(",")[4]) for line in (acc / "metrics.csv").read_text().splitlines()[1:]]
    assert lr == pytest.approx([lr_at(s, 1e-3, "cosine", 2, 5) for s in range(5)], rel=1e-5)


def test_clipping_changes_the_steps_only_above_the_norm(tmp_path):
    plain = _run(tmp_path / "plain", 8, steps=3)
    loose = _run(tmp_path / "loose", 8, steps=3, grad_clip=1e6)
    tight = _run(tmp_path / "tight", 8, steps=3, grad_clip=1e-3)
    assert _error(loose, plain) == 0.0
    assert _error(tight, plain) > 1e-4


def test_the_flags_reach_the_run(tmp_path, capsys):
    spec = tiny_spec(tmp_path)
    out = tmp_path / "run"
    assert main(["train", str(spec.source), "--out", str(out), "--steps", "2", "--backend", "torch",
                 "--accumulation", "2", "--warmup-steps", "1", "--lr-schedule", "cosine", "--grad-clip", "1"]) == 0
    config = json.loads((out / "run.json").read_text())["config"]
    assert (config["accumulation"], config["warmup_steps"], config["lr_schedule"], config["grad_clip"]) == \
        (2, 1, "cosine", 1.0)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        main(["train", str(spec.source), "--out", str(tmp_path / "x"), "--accumulation", "0"])
    assert exited.value.code == 2 and "--accumulation: 0 is outside 1 to 4096" in capsys.readouterr().err


@needs_nntile
@pytest.mark.nntile
def test_nntile_accumulates_and_clips_as_one_big_batch(tmp_path):
    """On NNTile, batch 4 x accumulation 2 against NNTile at batch 8 and against torch, with warm-up, cosine
    and clipping: losses within 1e-4, weights and EMA within 1e-4 after 5 steps."""
    acc = _run(tmp_path / "acc", 4, "nntile", accumulation=2, **SETTINGS)
    big = _run(tmp_path / "big", 8, "nntile", **SETTINGS)
    ref = _run(tmp_path / "ref", 8, "torch", **SETTINGS)
    np.testing.assert_allclose(_losses(acc), _losses(big), rtol=1e-4)
    np.testing.assert_allclose(_losses(acc), _losses(ref), rtol=1e-4)
    assert _error(acc, big) < 1e-4 and _error(acc, big, "ema") < 1e-4
    assert _error(acc, ref) < 1e-4
    opt = load_checkpoint(checkpoints(acc)[-1])["opt"]
    assert opt["param_groups"][0]["lr"] == pytest.approx(lr_at(4, 1e-3, "cosine", 2, 5))


@needs_nntile
@pytest.mark.nntile
def test_two_nntile_ranks_accumulate_as_one_big_batch(tmp_path):
    """`--nproc 2` at batch 2 x accumulation 2 (a global batch of 8), clipping on: the steps of one
    process at batch 8 (the host sums are averaged over the ranks once a step)."""
    import os
    import subprocess
    import sys

    from conftest import ROOT

    spec = tiny_spec(tmp_path / "two", TINY_DIGITS.replace("batch: 8", "batch: 2"))
    two = tmp_path / "two" / "run"
    env = {k: v for k, v in os.environ.items() if k != "STARPU_NCPU"} | {"PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "dit_compiler.cli", "train", str(spec.source), "--out", str(two),
                           "--steps", "4", "--lr", "1e-3", "--backend", "nntile", "--nproc", "2", "--accumulation",
                           "2", "--grad-clip", "0.5"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    one = _run(tmp_path / "one", 8, "nntile", steps=4, grad_clip=0.5)
    assert load_checkpoint(checkpoints(two)[-1])["train_state"]["global_batch"] == 8
    np.testing.assert_allclose(_losses(two), _losses(one), rtol=1e-5)
    assert _error(two, one) < 1e-5
