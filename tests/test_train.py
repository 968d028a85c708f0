"""The training loop on the torch backend: DiT's initialisation, host-side draws, checkpoints in DiT's
format, exact resume, and Ctrl-C/SIGTERM handling."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from conftest import ROOT, ditc_without_transformers
from dit_compiler.compiler.build import TORCH_FILE, compile_spec, write_build
from dit_compiler.cli import main, parse_args
from dit_compiler.errors import UsageError
from dit_compiler.compiler.lower import lower
from dit_compiler.app import backend as backend_module
from dit_compiler.app.backend import TorchBackend, open_backend
from dit_compiler.compiler.targets.base import OptimConfig
from dit_compiler.compiler.build import load_module
from dit_compiler.app.train import TrainConfig, checkpoints, initial_weights, run_build_dir, train
from dit_compiler.app.weights import initialize_dit_weights, load_checkpoint
from dit_compiler.compiler.spec import load_spec
from train_helpers import TINY_DIGITS, terminate_training, tiny_spec, train_tiny


def _reference(tmp_path: Path, spec):
    build_dir = write_build(compile_spec(spec), tmp_path / "build")
    return build_dir, lower(spec), load_module(build_dir / TORCH_FILE).Model().eval()


@pytest.mark.parametrize("flavor", ["dit", "diffusers"])
def test_initialisation_is_dits(tmp_path, flavor):
    spec = load_spec(ROOT / "specs" / ("tiny.yaml" if flavor == "dit" else "tiny-diffusers.yaml"))
    _, graph, model = _reference(tmp_path, spec)
    initialize_dit_weights(model, flavor, graph.depth, seed=0)
    state = model.state_dict()
    zero = [k for k in state if any(p in k for p in ("adaLN_modulation.1", "norm1.linear", "final_layer.linear",
                                                      "proj_out"))]
    assert len(zero) == 8
    assert all(not state[k].any() for k in zero)
    tables = [k for k in state if k.endswith("embedding_table.weight")]
    assert tables and all(0.015 < state[k].std() < 0.025 for k in tables)
    qkv = state["blocks.0.attn.qkv.weight" if flavor == "dit" else "transformer_blocks.0.attn1.to_q.weight"]
    bound = np.sqrt(6 / sum(qkv.shape))
    assert qkv.abs().max() <= bound and qkv.abs().max() > 0.9 * bound        # xavier uniform
    biases = [k for k in state if k.endswith(".bias")]
    assert all(not state[k].any() for k in biases)
    x = torch.randn(3, 4, 8, 8)
    out = model(x, torch.tensor([1.0, 500.0, 999.0]), torch.tensor([0, 3, 10]))
    assert not out.any()                                  # adaLN-Zero: a fresh DiT outputs exactly zero
    again = load_module(tmp_path / "build" / spec.name / TORCH_FILE).Model()
    initialize_dit_weights(again, flavor, graph.depth, seed=0)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in state.items())


def test_torch_backend_runs_the_reference_and_keeps_canonical_state(tmp_path):
    build_dir, graph, reference = _reference(tmp_path, tiny_spec(tmp_path))
    backend = open_backend("torch", build_dir, graph, OptimConfig(lr=1e-2))
    weights = initial_weights(build_dir, graph, seed=0)
    weights["final_layer.linear.weight"] = np.random.default_rng(0).standard_normal(
        weights["final_layer.linear.weight"].shape).astype(np.float32) * 0.1
    backend.load(weights)
    assert list(backend.state_dict()) == list(reference.state_dict())
    x = np.random.default_rng(1).standard_normal((8, 1, 8, 8)).astype(np.float32)
    t, y = np.arange(8, dtype=np.float32) * 100, np.arange(8) % 11
    out = backend.forward(x, t, y)
    np.testing.assert_array_equal(out, backend.predict(x, t, y))
    with pytest.raises(ValueError, match="compiled for batch 8"):
        backend.predict(x[:3], t[:3], y[:3])
    backend.backward(np.ones_like(out))
    backend.step()
    after = backend.state_dict()
    assert not np.array_equal(after["final_layer.linear.bias"], weights["final_layer.linear.bias"])
    backend.ema_update(0.75)
    ema = backend.ema_state_dict()
    key = "final_layer.linear.bias"
    np.testing.assert_allclose(ema[key], 0.75 * weights[key] + 0.25 * after[key], rtol=1e-6)
    opt = torch.optim.AdamW(reference.parameters())
    opt.load_state_dict(backend.optimizer_state())       # torch's own format, DiT's parameter order
    state = backend.optimizer_state()["state"]
    assert 0 not in state                                 # index 0 is DiT's frozen pos_embed, as in DiT's optimizer
    assert set(state[1]) == {"step", "exp_avg", "exp_avg_sq"}
    with pytest.raises(UsageError, match="--backend tpu: not available here; allowed: auto, nntile, torch"):
        open_backend("tpu", build_dir, graph)


def test_checkpoint_is_dits_format_and_loads_into_the_reference(tmp_path):
    run = train_tiny(tmp_path, steps=3)
    ckpt = load_checkpoint(checkpoints(run)[-1])
    assert {"model", "ema", "opt", "args"} <= set(ckpt) and ckpt["train_state"]["step"] == 3
    reference = load_module(run_build_dir(run) / TORCH_FILE).Model()
    reference.load_state_dict(ckpt["model"])
    reference.load_state_dict(ckpt["ema"])
    torch.optim.AdamW(reference.parameters()).load_state_dict(ckpt["opt"])
    ema = load_file(str(checkpoints(run)[-1].with_name("0000003-ema.safetensors")))
    assert all(np.array_equal(v.numpy(), ema[k]) for k, v in ckpt["ema"].items())
    assert ckpt["args"]["lr"] == 1e-3 and (run / "loss.png").is_file()
    rows = (run / "metrics.csv").read_text().splitlines()
    assert rows[0] == "step,loss,mse,vb,lr,images_per_s,wall_s" and len(rows) == 4


def test_a_checkpoint_of_dits_own_train_py_loads_as_it_is(tmp_path, capsys):
    """facebookresearch/DiT's train.py saves {"model", "ema", "opt", "args"}, `args` its argparse.Namespace."""
    import argparse
    import copy
    from fractions import Fraction

    from dit_compiler.checks.common import randomize_
    from dit_compiler.app.weights import load_weights

    spec = tiny_spec(tmp_path)
    _, _, model = _reference(tmp_path, spec)
    randomize_(model, 0)
    ema = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)
    model.train()
    model(torch.randn(2, 1, 8, 8), torch.tensor([3.0, 700.0]), torch.tensor([1, 2])).square().mean().backward()
    opt.step()
    args = argparse.Namespace(data_path="/data/imagenet/train", results_dir="results", model="DiT-XL/2",
                              image_size=256, num_classes=1000, epochs=1400, global_batch_size=256, global_seed=0,
                              vae="ema", num_workers=4, log_every=100, ckpt_every=50_000)
    ckpt = tmp_path / "0050000.pt"
    torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "args": args}, ckpt)
    assert load_checkpoint(ckpt)["args"] == args
    weights, entry = load_weights(ckpt, ema=True)
    assert entry == "ema" and all(np.array_equal(weights[k], v.numpy()) for k, v in ema.state_dict().items())
    assert main(["sample", str(spec.source), "--ckpt", str(ckpt), "--backend", "torch", "--steps", "1", "--n", "1",
                 "--cfg", "1", "--out", str(tmp_path / "samples")]) == 2   # DDPM's variance needs a next step
    assert "DDPM takes at least 2 steps" in capsys.readouterr().err and not (tmp_path / "samples").exists()
    assert main(["sample", str(spec.source), "--ckpt", str(ckpt), "--backend", "torch", "--steps", "1", "--n", "1",
                 "--cfg", "1", "--sampler", "ddim", "--out", str(tmp_path / "samples")]) == 0
    assert "sampled 1 image (ddim, 1 step, cfg 1.0)" in capsys.readouterr().out
    # only the attribute holder is allowed: any other class in a checkpoint is still refused
    torch.save({"model": model.state_dict(), "args": Fraction(1, 3)}, tmp_path / "other.pt")
    assert main(["sample", str(spec.source), "--ckpt", str(tmp_path / "other.pt"), "--backend", "torch"]) == 2
    assert "holds Python objects besides tensors" in capsys.readouterr().err


class Recording(TorchBackend):
    """The torch backend, recording what the loop feeds it."""

    calls: list = []

    def forward(self, x, t, y):
        assert not self.model.training
        Recording.calls.append((x.copy(), t.copy(), y.copy()))
        return super().forward(x, t, y)


def test_host_draws_depend_on_the_seed_only(tmp_path, monkeypatch):
    monkeypatch.setitem(backend_module.BACKENDS, "recording", f"{__name__}:Recording")
    runs = []
    for name in ("a", "b"):
        Recording.calls = []
        assert train(tiny_spec(tmp_path), tmp_path / name, TrainConfig(steps=40, backend="recording")) == 0
        runs.append(Recording.calls)
    for (xa, ta, ya), (xb, tb, yb) in zip(*runs):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ta, tb)
        np.testing.assert_array_equal(ya, yb)
    labels = np.concatenate([y for _, _, y in runs[0]])
    times = np.concatenate([t for _, t, _ in runs[0]])
    assert 0.03 < np.mean(labels == 10) < 0.2          # the host drops labels with p = 0.1 to the null class
    assert times.min() >= 0 and times.max() <= 999 and (times == np.round(times)).all()


def test_resume_ends_where_an_uninterrupted_run_ends(tmp_path):
    whole = train_tiny(tmp_path / "whole", steps=6)
    half = train_tiny(tmp_path / "half", steps=3)
    assert train_tiny(tmp_path / "half", steps=6, resume=True) == half
    a, b = (load_checkpoint(checkpoints(r)[-1]) for r in (whole, half))
    for part in ("model", "ema"):
        assert all(torch.equal(v, b[part][k]) for k, v in a[part].items()), part
    for index, moments in a["opt"]["state"].items():
        assert all(torch.equal(v, b["opt"]["state"][index][k]) for k, v in moments.items())
    def losses(run):   # step, loss, mse, vb (the timing columns differ)
        return [line.split(",")[:4] for line in (run / "metrics.csv").read_text().splitlines()[1:]]

    assert losses(whole) == losses(half) and len(losses(half)) == 6


def test_run_folder_guards(tmp_path, capsys):
    run = train_tiny(tmp_path, steps=2)
    spec = str(tmp_path / "tiny-digits.yaml")
    assert main(["train", spec, "--out", str(run), "--steps", "3"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main(["train", spec, "--out", str(tmp_path / "none"), "--resume"]) == 2
    assert "nothing to resume" in capsys.readouterr().err
    wider = tiny_spec(tmp_path / "wider", TINY_DIGITS.replace("hidden_size: 32", "hidden_size: 64"))
    assert main(["train", str(wider.source), "--out", str(run), "--steps", "3", "--resume"]) == 2
    assert "trained with another model" in capsys.readouterr().err   # another batch would resume (test_distributed)


def test_sigterm_checkpoints_and_exits_143_with_a_resume_hint(tmp_path):
    spec = tiny_spec(tmp_path)
    run = tmp_path / "run"
    code, err = terminate_training(["train", str(spec.source), "--out", str(run), "--steps", "100000"], run,
                                   os.environ | {"PYTHONPATH": str(ROOT)}, rows=2)
    assert code == 143, err
    assert "stopped by SIGTERM" in err and f"--out {run} --resume" in err
    step = load_checkpoint(checkpoints(run)[-1])["train_state"]["step"]
    assert step >= 2 and len((run / "metrics.csv").read_text().splitlines()) == step + 1
    assert train(spec, run, TrainConfig(steps=step + 2, lr=1e-4, backend="torch"), resume=True) == 0
    assert load_checkpoint(checkpoints(run)[-1])["train_state"]["step"] == step + 2


def test_export_writes_a_diffusers_model_that_gives_the_same_outputs(tmp_path, capsys, monkeypatch):
    """Random (not DiT-initialised, whose output is zero) weights of a flavor-diffusers spec, exported."""
    import safetensors.torch
    from safetensors.torch import save_file

    from dit_compiler.checks.common import randomize_

    from dit_compiler.compiler.targets.torch import import_diffusers

    spec = tiny_spec(tmp_path, TINY_DIGITS.replace("num_classes: 10}", "num_classes: 10, flavor: diffusers}"))
    build_dir, _, reference = _reference(tmp_path, spec)
    randomize_(reference, 0)
    save_file(dict(reference.state_dict()), str(tmp_path / "weights.safetensors"))
    args = ["export", str(spec.source), "--ckpt", str(tmp_path / "weights.safetensors"), "--diffusers"]

    def disk_full(tensors, filename, metadata=None):   # the weights half written when the disk fills
        Path(filename).write_bytes(b"\0" * 100)
        raise OSError(28, "No space left on device", filename)

    with monkeypatch.context() as patch:
        patch.setattr(safetensors.torch, "save_file", disk_full)
        assert main(args + [str(tmp_path / "hf")]) == 2
    assert "No space left on device" in capsys.readouterr().err
    before = sorted(p.name for p in tmp_path.iterdir())
    assert "hf" not in before and not any(".ditc-tmp" in name for name in before)   # nothing left behind
    # the rerun, as without NNTile: nothing else has imported safetensors.torch for diffusers
    done = ditc_without_transformers(args + [str(tmp_path / "hf")])
    assert done.returncode == 0, done.stderr
    exported = import_diffusers().DiTTransformer2DModel.from_pretrained(str(tmp_path / "hf")).eval()
    x, t, y = torch.randn(8, 1, 8, 8), torch.tensor([1.0, 50, 999, 3, 0, 7, 500, 10]), torch.arange(8)
    with torch.no_grad():
        out = reference(x, t, y)
        assert out.abs().mean() > 0.1
        torch.testing.assert_close(exported(x, timestep=t, class_labels=y).sample, out, rtol=1e-5, atol=1e-6)
    assert main(args + [str(tmp_path / "hf")]) == 2      # never over a folder that holds files
    dit_run = train_tiny(tmp_path / "dit", steps=1)
    assert main(["export", str(dit_run), "--diffusers", str(tmp_path / "hf2")]) == 2
    assert "flavor 'dit' has no exact diffusers counterpart" in capsys.readouterr().err


class Threads(TorchBackend):
    """The torch backend, recording the torch threads and StarPU workers (what NNTile's backend reads) it got."""

    seen: list = []

    def __init__(self, *args, **kwargs):
        Threads.seen.append((torch.get_num_threads(), os.environ.get("STARPU_NCPU")))
        super().__init__(*args, **kwargs)


def test_train_ncpus_sets_the_workers_and_threads(tmp_path, monkeypatch, capsys):
    from dit_compiler.limits import cores

    monkeypatch.setitem(backend_module.BACKENDS, "torch", f"{__name__}:Threads")
    monkeypatch.delenv("STARPU_NCPU", raising=False)
    before = torch.get_num_threads()
    spec = str(tiny_spec(tmp_path).source)
    Threads.seen = []
    assert main(["train", spec, "--out", str(tmp_path / "run"), "--steps", "1", "--backend", "torch",
                 "--ncpus", "1"]) == 0
    assert Threads.seen == [(1, "1")] and torch.get_num_threads() == before and "STARPU_NCPU" not in os.environ
    assert "trained tiny-digits on torch: 1 step in" in capsys.readouterr().out   # not "1 steps"
    assert main(["train", spec, "--out", str(tmp_path / "r2"), "--ncpus", str(cores()), "--nproc", "2"]) == 2
    assert f"--ncpus {cores()} with --nproc 2" in capsys.readouterr().err and not (tmp_path / "r2").exists()


def test_the_specs_train_and_sample_sections_are_the_defaults_flags_override(tmp_path):
    from dit_compiler.compiler.build import graph_of
    from dit_compiler.cli.app import _sample_config
    from dit_compiler.app.train import resolve_config

    spec = tiny_spec(tmp_path, TINY_DIGITS + "train: {steps: 7, lr: 0.002}\nsample: {cfg: 1.5, steps: 20}\n")
    config = resolve_config(tmp_path / "run", {"steps": None, "seed": 3}, False, spec)
    assert (config.steps, config.lr, config.seed, config.ema_decay) == (7, 0.002, 3, 0.9999)
    assert resolve_config(tmp_path / "run", {"steps": 2}, False, spec).steps == 2
    args = parse_args(["sample", "x", "--steps", "9"])
    sample = _sample_config(args, graph_of(spec))
    assert (sample.cfg, sample.steps, sample.sampler, sample.cfg_channels) == (1.5, 9, "ddpm", None)
    # the train and sample settings are not the model: they leave the compiled files alone
    plain = tiny_spec(tmp_path / "plain")
    assert compile_spec(spec).files["nntile_model.py"] == compile_spec(plain).files["nntile_model.py"]


def test_a_folder_of_the_users_or_a_bad_dataset_is_refused_before_anything_is_written(tmp_path, capsys):
    spec = str(tiny_spec(tmp_path).source)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "metrics.csv").write_text("mine\n")
    assert main(["train", spec, "--out", str(mine), "--steps", "2"]) == 2
    assert "--out" in capsys.readouterr().err and (mine / "metrics.csv").read_text() == "mine\n"
    assert sorted(p.name for p in mine.iterdir()) == ["metrics.csv"]
    (tmp_path / "a-file").write_text("x")
    assert main(["train", spec, "--out", str(tmp_path / "a-file"), "--steps", "2"]) == 2
    assert "a file, not a folder" in capsys.readouterr().err
    assert main(["train", spec, "--out", str(tmp_path / "r"), "--backend", "torch", "--memory-limit", "1GiB"]) == 2
    assert "the torch backend cannot run under a memory limit" in capsys.readouterr().err
    np.savez(tmp_path / "huge.npz", images=np.full((4, 8, 8), 1e30, np.float32), labels=np.zeros(4, np.int64))
    (tmp_path / "text.npz").write_text("not a zip")
    for data, says in (("huge.npz", "values from 1e+30 to 1e+30; allowed as pixel values: -1 to 1"), ("text.npz", "not an .npz file")):
        assert main(["train", spec, "--out", str(tmp_path / "r"), "--data", str(tmp_path / data)]) == 2
        assert says in capsys.readouterr().err
    # a spec the built-in digits cannot feed (DiT-XL/2: 4-channel 32x32 latents) says it needs --data
    assert main(["train", str(ROOT / "specs" / "dit-xl.yaml"), "--out", str(tmp_path / "r")]) == 2
    assert "dit-xl.yaml: its model takes 4-channel 32x32 images, and the built-in `digits` (train.data's default) " \
        "are 1-channel 8x8: this spec needs --data" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_a_backend_that_cannot_start_leaves_no_run_behind(tmp_path, monkeypatch, capsys):
    def refuse(*args, **kwargs):
        raise UsageError("no backend today")

    monkeypatch.setattr("dit_compiler.app.train.open_backend", refuse)
    spec = str(tiny_spec(tmp_path).source)
    assert main(["train", spec, "--out", str(tmp_path / "r"), "--steps", "2"]) == 2
    assert "no backend today" in capsys.readouterr().err and not (tmp_path / "r").exists()


def test_a_resume_that_cannot_go_on_changes_nothing(tmp_path, capsys):
    run = train_tiny(tmp_path, steps=2)
    spec = str(tmp_path / "tiny-digits.yaml")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert main(["train", spec, "--out", str(run), "--resume", "--steps", "2"]) == 0
    assert "nothing to train, nothing changed" in capsys.readouterr().err
    (run / "checkpoints" / "0000002.pt").write_text("garbage")
    before[run / "checkpoints" / "0000002.pt"] = b"garbage"
    assert main(["train", spec, "--out", str(run), "--resume", "--steps", "3"]) == 2
    assert "not a checkpoint" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
