"""`ditc train --init WEIGHTS`: a new run from facebookresearch/DiT's checkpoints (a released bare state_dict,
train.py's {"model", "ema", "opt", "args"} with its argparse args) or a ditc checkpoint; refused, writing
nothing, when the weights do not fit the spec."""
from __future__ import annotations

import argparse
import json

import pytest
import torch

from dit_compiler.cli import main
from dit_compiler.checks.common import group_error
from dit_compiler.app.train import checkpoints
from dit_compiler.app.weights import load_checkpoint
from train_helpers import TINY_DIGITS, tiny_spec, train_tiny


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A trained tiny run: its last checkpoint's model and EMA differ."""
    return checkpoints(train_tiny(tmp_path_factory.mktemp("source"), steps=3))[-1]


def _train(spec, out, *flags) -> int:
    return main(["train", str(spec.source), "--out", str(out), "--steps", "1", "--lr", "1e-12", "--backend", "torch",
                 *map(str, flags)])


def _error(a: dict, b: dict) -> float:
    return group_error([(a[k].numpy(), b[k].numpy()) for k in b])


@pytest.mark.parametrize("form", ["dit-train", "dit-released", "ditc", "safetensors"])
def test_a_run_starts_from_the_weights_with_a_fresh_optimizer(tmp_path, source, form, capsys):
    ckpt = load_checkpoint(source)
    ema = ckpt["ema"]
    path = tmp_path / "weights.pt"
    if form == "dit-train":   # as facebookresearch/DiT's train.py writes it
        torch.save({"model": ckpt["model"], "ema": ema, "opt": ckpt["opt"],
                    "args": argparse.Namespace(model="DiT-S/2", lr=1e-4)}, path)
    elif form == "dit-released":
        torch.save(dict(ema), path)
    elif form == "ditc":
        path = source
    else:
        path = source.with_name(source.stem + "-ema.safetensors")
    spec = tiny_spec(tmp_path)
    assert _train(spec, tmp_path / "run", "--init", path) == 0
    assert f"starting from {path}" in capsys.readouterr().err
    after = load_checkpoint(checkpoints(tmp_path / "run")[-1])
    assert _error(after["model"], ema) < 1e-6        # one step at lr 1e-12 from the EMA weights
    assert _error(after["ema"], ema) < 1e-6          # the EMA starts from them too
    assert {int(s["step"]) for s in after["opt"]["state"].values()} == {1}   # AdamW fresh
    assert after["args"]["init"] == str(path)
    assert json.loads((tmp_path / "run" / "run.json").read_text())["config"]["init"] == str(path)


def test_weights_of_another_model_are_refused_naming_the_key(tmp_path, source, capsys):
    wide = tiny_spec(tmp_path / "wide", TINY_DIGITS.replace("hidden_size: 32", "hidden_size: 64"))
    assert _train(wide, tmp_path / "run", "--init", source) == 2
    err = capsys.readouterr().err
    assert f"--init {source} (ema): its weights do not fit this spec's model (" in err
    assert "pos_embed is [1, 16, 32], the model's [1, 16, 64])" in err   # the first that does not fit
    assert not (tmp_path / "run").exists()
    assert _train(wide, tmp_path / "run", "--init", tmp_path / "missing.pt") == 2
    assert "missing.pt: no such file" in capsys.readouterr().err


def test_init_and_resume_are_refused_together(tmp_path, source, capsys):
    spec = tiny_spec(tmp_path)
    assert _train(spec, tmp_path / "run", "--init", source, "--resume") == 2
    assert "drop one" in capsys.readouterr().err


def test_a_run_starts_from_a_diffusers_model_folder(tmp_path, capsys):
    """A DiTTransformer2DModel folder (here `ditc export`'s, which diffusers' from_pretrained reads) starts a run of
    the spec of flavor diffusers; a folder without diffusers' weight file is refused, writing nothing."""
    text = TINY_DIGITS.replace("num_classes: 10}", "num_classes: 10, flavor: diffusers}")
    spec = tiny_spec(tmp_path / "spec", text)
    source = tmp_path / "source"
    assert main(["train", str(spec.source), "--out", str(source), "--steps", "2", "--backend", "torch"]) == 0
    folder = tmp_path / "diffusers"
    assert main(["export", str(source), "--diffusers", str(folder)]) == 0
    ema = load_checkpoint(checkpoints(source)[-1])["ema"]
    assert _train(spec, tmp_path / "run", "--init", folder) == 0
    assert f"starting from {folder}" in capsys.readouterr().err
    after = load_checkpoint(checkpoints(tmp_path / "run")[-1])
    assert _error(after["ema"], ema) < 1e-6
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _train(spec, tmp_path / "run2", "--init", empty) == 2
    assert "without diffusion_pytorch_model.safetensors" in capsys.readouterr().err
    assert not (tmp_path / "run2").exists()
