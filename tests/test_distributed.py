"""Data-parallel training: N ranks at compiled batch B/N take the steps one process takes at batch B, on
NNTile (`ditc train --nproc`) and on torch (DDP, under torchrun); a run resumes on another number of
ranks; a signal stops every rank at one step; a failing rank ends the run with its error."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, SPECS, needs_nntile
from dit_compiler.errors import UsageError
from dit_compiler.checks.common import group_error
from dit_compiler.app.distributed import rank_cores, world_from_env
from dit_compiler.app.train import TrainConfig, checkpoints, train
from dit_compiler.app.weights import load_checkpoint
from train_helpers import TINY_DIGITS, terminate_training, tiny_spec, train_tiny

HALF = TINY_DIGITS.replace("batch: 8", "batch: 4")   # the compiled batch of each of 2 ranks
#: The ranks take their share of the cores themselves (a STARPU_NCPU of the caller's would override it).
ENV = {k: v for k, v in os.environ.items() if k != "STARPU_NCPU"} | {"PYTHONPATH": str(ROOT)}
DITC = [sys.executable, "-m", "dit_compiler.cli"]


def _ditc(*args, command=DITC) -> subprocess.CompletedProcess:
    return subprocess.run([*command, *map(str, args)], capture_output=True, text=True, env=ENV, timeout=300)


def _train_two_ranks(spec, run: Path, steps: int, backend: str, *flags: str) -> subprocess.CompletedProcess:
    result = _ditc("train", spec.source, "--out", run, "--steps", steps, "--lr", "1e-3", "--backend", backend,
                   "--nproc", 2, *flags)
    assert result.returncode == 0, result.stderr
    return result


def _losses(run: Path) -> np.ndarray:
    """step, loss, mse, vb per row of metrics.csv."""
    rows = (run / "metrics.csv").read_text().splitlines()[1:]
    return np.array([[float(v) for v in row.split(",")[:4]] for row in rows])


def _checkpoint(run: Path, step: int | None = None) -> dict:
    return load_checkpoint(run / "checkpoints" / f"{step:07d}.pt" if step else checkpoints(run)[-1])


def _errors(a: dict, b: dict) -> dict[str, float]:
    """Norm-wise relative errors of a's weights, EMA and AdamW moments against b's."""
    errors = {part: group_error([(a[part][k].numpy(), b[part][k].numpy()) for k in b[part]]) for part in ("model", "ema")}
    state_a, state_b = a["opt"]["state"], b["opt"]["state"]
    for moment in ("exp_avg", "exp_avg_sq"):
        errors[moment] = group_error([(state_a[i][moment].numpy(), state_b[i][moment].numpy()) for i in state_b])
    return errors


def _agree(a: Path, b: Path, rtol: float, step: int | None = None) -> None:
    """a's losses (up to `step`) and its weights, EMA and AdamW moments at `step` (default the last) are b's."""
    la, lb = _losses(a), _losses(b)
    rows = step or len(lb)
    np.testing.assert_allclose(la[:rows], lb[:rows], rtol=rtol)
    errors = _errors(_checkpoint(a, step), _checkpoint(b, step))
    assert max(errors.values()) < rtol, errors


# -- a rank's place, its cores -------------------------------------------------------------------------
def test_a_rank_reads_its_place_from_torchruns_variables():
    env = {"WORLD_SIZE": "4", "RANK": "3", "LOCAL_WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.1",
           "MASTER_PORT": "29500"}
    world = world_from_env(env)
    assert (world.rank, world.size, world.local_rank, world.local_size) == (3, 4, 1, 2)
    assert world.launcher == "torchrun" and world.slice(8) == slice(24, 32)
    assert world_from_env({}) is None
    with pytest.raises(UsageError, match=r"RANK='4' in the environment .*allowed: an integer from 0 to 3"):
        world_from_env(env | {"RANK": "4"})
    with pytest.raises(UsageError, match="MASTER_ADDR is unset"):
        world_from_env({k: v for k, v in env.items() if k != "MASTER_ADDR"})
    with pytest.raises(UsageError, match=r"MASTER_PORT='99999' .*allowed: an integer from 1 to 65535"):
        world_from_env(env | {"MASTER_PORT": "99999"})


def test_ranks_of_a_machine_get_equal_cores_and_never_share_one():
    assert [rank_cores(r, 2, [0, 1]) for r in range(2)] == [[0], [1]]
    assert [rank_cores(r, 3, list(range(8))) for r in range(3)] == [[0, 1], [2, 3], [4, 5]]
    with pytest.raises(UsageError, match="3 ranks on a machine with 2 cores"):
        rank_cores(0, 3, [0, 1])


def test_nproc_is_refused_beyond_the_cores_and_under_torchrun(tmp_path):
    spec = tiny_spec(tmp_path)
    result = _ditc("train", spec.source, "--nproc", os.cpu_count() * 4)
    assert result.returncode == 2 and "--nproc" in result.stderr and "outside 1 to" in result.stderr
    under_torchrun = dict(WORLD_SIZE="1", RANK="0")
    result = subprocess.run([*DITC, "train", str(spec.source), "--nproc", "2"], capture_output=True, text=True,
                            env=ENV | under_torchrun, timeout=120)
    assert result.returncode == 2 and "torchrun starts the ranks; drop --nproc" in result.stderr
    assert not (tmp_path / "runs").exists()


# -- the NNTile runtime: gradients as backward finishes them ------------------------------------------------
@needs_nntile
def test_gradients_read_while_backward_runs_are_those_of_a_whole_backward(tmp_path):
    """`backward_async` returns at once; `to_array` of a parameter gradient, in `gradient_order`, waits for
    that gradient only, and reads what a waited-for backward gives."""
    from dit_compiler.compiler.build import NNTILE_FILE, TORCH_FILE, compile_spec, write_build
    from dit_compiler.checks.common import randomize_
    from dit_compiler.compiler.build import load_module
    from dit_compiler.compiler.spec import load_spec
    from dit_compiler.compiler.targets.nntile_1_1 import nntile_runtime, wait_for_all

    build_dir = write_build(compile_spec(load_spec(SPECS / "tiny.yaml")), tmp_path)   # ragged multi-tile
    reference = load_module(build_dir / TORCH_FILE).Model()
    randomize_(reference, 0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 4, 8, 8)).astype(np.float32)
    t, y = np.array([1.0, 500.0, 999.0], np.float32), np.array([0, 3, 10])
    with nntile_runtime(2):
        model = load_module(build_dir / NNTILE_FILE).Model()
        try:
            model.load_state_dict(reference.state_dict())
            grad_out = rng.standard_normal(model.forward(x, t, y).shape).astype(np.float32)
            model.backward(grad_out, input_grad=False)
            whole = model.to_torch([p.grad for p in model.parameters])
            model.forward(x, t, y)
            model.backward_async(grad_out)
            read = {}
            for k in model.gradient_order:
                grad = model.parameters[k].grad
                read[k] = np.zeros(grad.shape, np.float32, order="F")
                grad.to_array(read[k])
            wait_for_all()
            names = model.param_names
            assert names[model.gradient_order[0]].startswith("final")        # the last layer's, first
            assert "x_embedder" in names[model.gradient_order[-1]] or "t_embedder" in names[model.gradient_order[-1]]
            for k, value in read.items():
                np.testing.assert_array_equal(value, _read(model.parameters[k].grad))
            assert group_error([(model.to_torch([p.grad for p in model.parameters])[key], ref)
                                for key, ref in whole.items()]) < 1e-6
        finally:
            model.unregister()


def _read(tensor) -> np.ndarray:
    out = np.zeros(tensor.shape, np.float32, order="F")
    tensor.to_array(out)
    return out


# -- equivalence and resume -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def nntile_runs(tmp_path_factory):
    """One process at batch 8, and 2 ranks at batch 4 (`ditc train --nproc 2`), 10 steps with a
    checkpoint at 7, on NNTile."""
    tmp = tmp_path_factory.mktemp("nntile")
    one = train_tiny(tmp / "one", 10, "nntile", ckpt_every=7)
    two = tmp / "two" / "run"
    result = _train_two_ranks(tiny_spec(tmp / "two", HALF), two, 10, "nntile", "--ckpt-every", "7")
    return one, two, result.stdout


@needs_nntile
def test_two_nntile_ranks_take_the_steps_of_one_process_at_twice_the_batch(nntile_runs):
    """Same data, timesteps, noise and dropped labels: every step's loss, and the weights, EMA and AdamW
    moments after 10 steps agree to NNTile's rounding (the tiles of batch 4 and 8 sum in another order)."""
    one, two, log = nntile_runs
    assert "on nntile (2 ranks)" in log
    state = _checkpoint(two)["train_state"]
    assert (state["ranks"], state["global_batch"], state["backend"]) == (2, 8, "nntile")
    _agree(two, one, rtol=1e-5)


@needs_nntile
def test_a_distributed_run_resumes_on_two_ranks_and_on_one_process(tmp_path, nntile_runs):
    """From the 2-rank run's checkpoint at step 7: 2 ranks end where the uninterrupted 2-rank run ends, and
    one process compiled for the global batch (8) ends where one process at batch 8 ends."""
    one, two, _ = nntile_runs
    for name in ("two", "one"):
        shutil.copytree(two, tmp_path / name / "run")
        for path in (tmp_path / name / "run" / "checkpoints").glob("0000010*"):
            path.unlink()
    result = _train_two_ranks(tiny_spec(tmp_path / "two", HALF), tmp_path / "two" / "run", 10, "nntile", "--resume")
    assert "resuming" in result.stderr and "at step 7" in result.stderr
    _agree(tmp_path / "two" / "run", two, rtol=1e-6)
    run = train_tiny(tmp_path / "one", 10, "nntile", resume=True)
    assert _checkpoint(run)["train_state"]["ranks"] == 1
    _agree(run, one, rtol=1e-5)


def test_two_torch_ranks_under_torchrun_take_the_steps_of_one_process(tmp_path):
    """The torch backend under DistributedDataParallel, started by torchrun."""
    one = train_tiny(tmp_path / "one", 10, "torch")
    spec, two = tiny_spec(tmp_path / "two", HALF), tmp_path / "two" / "run"
    result = _ditc("--standalone", "--nproc-per-node", 2, "-m", "dit_compiler.cli", "train", spec.source, "--out", two,
                   "--steps", 10, "--lr", "1e-3", "--backend", "torch", command=[sys.executable, "-m", "torch.distributed.run"])
    assert result.returncode == 0, result.stderr
    assert "on torch (2 ranks)" in result.stdout
    _agree(two, one, rtol=1e-5)


def test_sigterm_stops_every_rank_at_one_step_and_the_run_resumes_on_one_process(tmp_path):
    """SIGTERM to `ditc train --nproc 2` reaches both ranks; they stop at the same step, rank 0 writes the
    checkpoint, and one process compiled for the global batch continues the run as if it had run it all."""
    spec, run = tiny_spec(tmp_path / "b4", HALF), tmp_path / "run"
    code, err = terminate_training(["train", str(spec.source), "--out", str(run), "--steps", "100000", "--lr", "1e-3",
                                    "--backend", "torch", "--nproc", "2"], run, ENV)
    assert code == 143, err
    assert "stopped by SIGTERM" in err and f"--out {run} --resume --nproc 2" in err
    step = _checkpoint(run)["train_state"]["step"]
    assert step >= 3 and len(_losses(run)) == step
    assert train(tiny_spec(tmp_path / "b8"), run, TrainConfig(steps=step + 2, lr=1e-3, backend="torch"), resume=True) == 0
    _agree(run, train_tiny(tmp_path / "one", step + 2, "torch"), rtol=1e-5)


RANK_SCRIPT = """\
import os, sys, time
import torch, torch.distributed as dist
from dit_compiler.app.distributed import joined, world_from_env

world = world_from_env()
with joined(world, 60):
    dist.all_reduce(torch.ones(1))
    if world.rank == 1:
        if sys.argv[1] == "raise":
            raise RuntimeError("rank 1 lost its data")
        os.kill(os.getpid(), 9)
    dist.all_reduce(torch.ones(1))   # waits for rank 1
    time.sleep(600)
"""


@pytest.mark.parametrize("how, code, said", [("raise", 1, "exited with code 1"), ("kill", 137, "was killed by SIGKILL")])
def test_a_failing_rank_ends_every_rank_with_its_error(tmp_path, how, code, said):
    """Rank 1 fails while rank 0 waits for it in a collective: the launcher names rank 1, exits with its
    code and leaves no rank behind, in seconds."""
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    launcher = f"import sys; from dit_compiler.app.launch import launch; sys.exit(launch([sys.executable, {str(script)!r}, {how!r}], 2))"
    began = time.monotonic()
    result = subprocess.run([sys.executable, "-c", launcher], capture_output=True, text=True, env=ENV, timeout=120)
    assert time.monotonic() - began < 60
    assert result.returncode == code, result.stderr
    assert re.search(f"ditc train: rank 1 {said}; (killed ranks 0|no other rank was left)", result.stderr)
    if how == "raise":
        assert "RuntimeError: rank 1 lost its data" in result.stderr
