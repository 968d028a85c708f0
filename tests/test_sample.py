"""`ditc sample`: the fixed-batch adapter, outputs, guidance limits and the VAE path."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from conftest import SPECS, ditc_without_transformers
from dit_compiler.cli import main
from dit_compiler.app.diffusion import create_diffusion, guided, sample_loop
from dit_compiler.errors import UsageError
from dit_compiler.compiler.lower import lower
from dit_compiler.app.backend import open_backend
from dit_compiler.app.sample import FixedBatch, SampleConfig, generate, sample_labels
from dit_compiler.app.train import TrainConfig, run_build_dir, train
from dit_compiler.app.weights import load_checkpoint
from dit_compiler.compiler.spec import load_spec
from train_helpers import TINY_DIGITS, tiny_spec, train_tiny


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return train_tiny(tmp_path_factory.mktemp("sample"), steps=3)


def test_fixed_batch_runs_any_count_through_the_compiled_batch():
    calls = []

    def model(x, t, y):
        calls.append(len(x))
        return x * t[:, None, None, None] + y[:, None, None, None]

    x = np.random.default_rng(0).standard_normal((7, 1, 2, 2))
    t, y = np.arange(7.0), np.arange(7)
    out = FixedBatch(model, 3)(x, t, y)
    assert calls == [3, 3, 3] and out.shape == x.shape
    np.testing.assert_array_equal(out, model(x, t, y))


def test_labels():
    assert list(sample_labels(10, [0, 3, 3], None)) == [0, 3, 3]
    assert list(sample_labels(3, None, 5)) == [0, 1, 2, 0, 1]
    assert len(sample_labels(1000, None, None)) == 80
    with pytest.raises(UsageError, match="--classes: 10 is out of range"):
        sample_labels(10, [10], None)


def test_sample_command_writes_grid_npz_settings_and_repeats(run, tmp_path, capsys):
    args = ["sample", str(run), "--steps", "4", "--classes", "0,1,1,7", "--cfg", "2", "--seed", "3", "--backend", "torch"]
    assert main(args + ["--out", str(tmp_path / "a")]) == 0
    assert main(args + ["--out", str(tmp_path / "b")]) == 0
    assert "sampled 4 images (ddpm, 4 steps, cfg 2.0) on torch" in capsys.readouterr().out
    a, b = (np.load(tmp_path / d / "samples.npz") for d in ("a", "b"))
    assert a["images"].shape == (4, 1, 8, 8) and list(a["labels"]) == [0, 1, 1, 7]
    np.testing.assert_array_equal(a["images"], b["images"])
    settings = json.loads((tmp_path / "a" / "settings.json").read_text())
    assert settings["cfg"] == 2.0 and settings["cfg_channels"] == "all" and settings["steps"] == 4
    assert settings["checkpoint"].endswith("0000003.pt (ema)")
    from PIL import Image

    grid = Image.open(tmp_path / "a" / "grid.png")
    assert grid.size == (2 + 2 * 66, 2 + 3 * 66)          # rows: classes 0, 1, 7; columns: up to 2 samples


def test_generate_equals_dits_loop_on_the_reference(run):
    """The runner's samples are DiT's guided DDPM loop over the torch reference (batch 8 split, padded)."""
    graph = lower(load_spec(run_build_dir(run) / "spec.resolved.yaml"))
    backend = open_backend("torch", run_build_dir(run), graph)
    ema = {k: v.numpy() for k, v in load_checkpoint(sorted((run / "checkpoints").glob("*.pt"))[-1])["ema"].items()}
    backend.load(ema)
    labels = np.arange(5) % 10
    got = generate(backend, graph, labels, SampleConfig(steps=5, cfg=3.0, seed=1))

    def whole(x, t, y):
        with torch.no_grad():
            return backend.model(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(y)).numpy()

    want = sample_loop(create_diffusion(5), guided(whole, 3.0, 10, "all"), labels, (5, 1, 8, 8),
                       np.random.default_rng(1))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_spec_without_checkpoint_or_null_class_is_refused(tmp_path, capsys):
    assert main(["sample", str(SPECS / "tiny.yaml")]) == 2
    assert "a spec has no trained weights; pass --ckpt" in capsys.readouterr().err
    spec = tmp_path / "no-null.yaml"
    spec.write_text(f"extends: {SPECS / 'tiny.yaml'}\nname: no-null\nmodel: {{class_dropout_prob: 0}}\n")
    graph = lower(load_spec(spec))
    from dit_compiler.compiler.build import compile_spec, write_build

    backend = open_backend("torch", write_build(compile_spec(load_spec(spec)), tmp_path), graph)
    with pytest.raises(UsageError, match="no null class"):
        generate(backend, graph, np.zeros(2, np.int64), SampleConfig(cfg=2.0, steps=2))


def test_latent_spec_decodes_with_a_vae_folder_or_writes_latents(tmp_path, capsys):
    from dit_compiler.compiler.targets.torch import import_diffusers

    AutoencoderKL = import_diffusers().AutoencoderKL
    torch.manual_seed(0)
    for name, channels in (("vae", 4), ("vae2", 2)):
        AutoencoderKL(block_out_channels=(32,), latent_channels=channels, norm_num_groups=8,
                      layers_per_block=1).save_pretrained(tmp_path / name)
    from dit_compiler.compiler.build import TORCH_FILE, compile_spec, write_build
    from dit_compiler.checks.common import randomize_
    from dit_compiler.compiler.build import load_module

    model = load_module(write_build(compile_spec(load_spec(SPECS / "tiny.yaml")), tmp_path / "b") / TORCH_FILE).Model()
    randomize_(model, 0)
    torch.save({"model": model.state_dict()}, tmp_path / "ckpt.pt")
    common = ["sample", str(SPECS / "tiny.yaml"), "--ckpt", str(tmp_path / "ckpt.pt"), "--steps", "2", "--n", "3",
              "--backend", "torch"]
    # as without NNTile: diffusers reads the VAE's safetensors with nothing else having imported safetensors.torch
    done = ditc_without_transformers(common + ["--vae", str(tmp_path / "vae"), "--out", str(tmp_path / "decoded")])
    assert done.returncode == 0, done.stderr
    f = np.load(tmp_path / "decoded" / "samples.npz")
    assert f["latents"].shape == (3, 4, 8, 8) and f["images"].shape == (3, 3, 8, 8)
    with torch.no_grad():
        want = AutoencoderKL.from_pretrained(tmp_path / "vae").decode(torch.from_numpy(f["latents"] / 0.18215)).sample
    np.testing.assert_allclose(f["images"], want.numpy(), rtol=1e-5, atol=1e-5)
    assert (tmp_path / "decoded" / "grid.png").is_file()

    assert main(common + ["--out", str(tmp_path / "latent")]) == 0
    assert "no --vae: wrote latents and a per-channel preview" in capsys.readouterr().err
    assert (tmp_path / "latent" / "preview.png").is_file()
    assert set(np.load(tmp_path / "latent" / "samples.npz").files) == {"latents", "labels"}
    assert main(common + ["--vae", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert main(common + ["--vae", str(tmp_path / "vae2"), "--out", str(tmp_path / "x")]) == 2
    assert "decodes 2-channel latents, the model makes 4 channels" in capsys.readouterr().err
    shutil.copytree(tmp_path / "vae", tmp_path / "broken")
    (tmp_path / "broken" / "diffusion_pytorch_model.safetensors").write_bytes(b"not weights")
    assert main(common + ["--vae", str(tmp_path / "broken"), "--out", str(tmp_path / "x")]) == 2
    assert "not a diffusers AutoencoderKL folder" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()   # a VAE that cannot decode leaves no --out folder behind


def test_outputs_and_inputs_are_checked_before_sampling(run, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "grid.png").write_text("mine")
    junk = tmp_path / "junk.pt"
    junk.write_text("junk")
    before = sorted(p.name for p in run.iterdir())
    for argv, says in ((["--out", str(mine)], "a folder ditc did not write"),
                       (["--ckpt", str(junk), "--out", str(tmp_path / "s")], "not a checkpoint"),
                       (["--vae", str(tmp_path / "none"), "--out", str(tmp_path / "s")], "--vae"),
                       (["--out", str(junk)], "a file, not a folder")):
        assert main(["sample", str(run), "--backend", "torch", "--steps", "2", "--n", "2", *argv]) == 2
        assert says in capsys.readouterr().err
    assert (mine / "grid.png").read_text() == "mine" and not (tmp_path / "s").exists()
    assert sorted(p.name for p in run.iterdir()) == before   # no sampling variant built for a refused command
    out = tmp_path / "again"
    for _ in range(2):   # ditc's own samples folder is rewritten
        assert main(["sample", str(run), "--backend", "torch", "--steps", "2", "--n", "2", "--out", str(out)]) == 0
    assert main(["evaluate", str(run), "--backend", "torch", "--steps", "2", "--n", "2", "--ref", str(out)]) == 2
    assert "needs --inception" in capsys.readouterr().err
    assert main(["sample", str(run), "--backend", "torch", "--steps", "2", "--n", "2", "--eta", "0.5"]) == 2
    assert "eta is DDIM's" in capsys.readouterr().err


def test_weights_of_another_model_are_refused_before_a_variant_is_built(run, tmp_path, capsys):
    other = tmp_path / "other"
    wider = tiny_spec(tmp_path, TINY_DIGITS.replace("hidden_size: 32", "hidden_size: 64"))
    assert train(wider, other, TrainConfig(steps=1, lr=1e-3, backend="torch")) == 0
    before = sorted(p.name for p in other.iterdir())
    ckpt = str(sorted((run / "checkpoints").glob("*.pt"))[-1])
    assert main(["sample", str(other), "--ckpt", ckpt, "--backend", "torch", "--steps", "2", "--n", "2",
                 "--out", str(tmp_path / "s")]) == 2
    assert "do not fit this spec's model" in capsys.readouterr().err
    assert sorted(p.name for p in other.iterdir()) == before
