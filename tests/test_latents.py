"""Latent training from an image folder (`ditc train --data FOLDER --vae VAE_DIR`), end to end with a small
randomly initialised AutoencoderKL saved by diffusers and a folder of generated PNGs of odd sizes."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, SPECS, needs_nntile
from dit_compiler.app.data import ImageShape, read_image
from dit_compiler.app.latents import center_crop_arr, load_latent_folder
from dit_compiler.app.vae import encode_pixels, load_vae
from dit_compiler.cli import main
from dit_compiler.compiler.targets.torch import import_diffusers

TINY = ImageShape(channels=4, size=8, num_classes=10)   # specs/tiny.yaml's model
SIZES = [(20, 17), (16, 16), (40, 23)]                   # width, height: none the VAE's 16x16


def _images(folder: Path, per_class: int = 3, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for name in ("cat", "dog"):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            w, h = SIZES[i % len(SIZES)]
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / name / f"{i}.png")
    return folder


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """`vae/` (4 latent channels, 2x downsampling: 16x16 images for tiny.yaml's 8x8 latents) and `images/`."""
    root = tmp_path_factory.mktemp("latents")
    torch.manual_seed(0)
    vae = import_diffusers().AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                                           up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4,
                                           norm_num_groups=4, layers_per_block=1, scaling_factor=0.5)
    vae.save_pretrained(root / "vae")
    _images(root / "images")
    return root


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("DITC_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "latents"


def test_centre_crop_keeps_the_middle_at_the_short_side():
    columns = np.tile(np.arange(48, dtype=np.uint8) * 5, (16, 1))   # 48 wide, 16 high: value 5x the column
    cropped = np.asarray(center_crop_arr(Image.fromarray(columns), 16))
    assert cropped.shape == (16, 16)
    np.testing.assert_array_equal(cropped[0], np.arange(16, 32) * 5)
    big = np.asarray(center_crop_arr(Image.fromarray(np.zeros((70, 33, 3), np.uint8)), 16))
    assert big.shape == (16, 16, 3)   # halved (box) once, then bicubic to the short side


def test_cache_is_written_once_reused_and_matches_encoding_on_the_fly(files, cache, capsys):
    first = load_latent_folder(files / "images", files / "vae", TINY, "cached")
    assert "encoded 6 images" in capsys.readouterr().err
    written = list(cache.iterdir())
    assert len(written) == 1 and written[0].suffix == ".npz"
    stamp = written[0].stat().st_mtime_ns
    again = load_latent_folder(files / "images", files / "vae", TINY, "cached")
    assert "cached in" in capsys.readouterr().err and written[0].stat().st_mtime_ns == stamp
    np.testing.assert_array_equal(again.mean, first.mean)
    np.testing.assert_array_equal(first.labels, [0, 0, 0, 1, 1, 1])

    fly = load_latent_folder(files / "images", files / "vae", TINY, "on-the-fly")
    index = np.array([5, 0, 2, 2, 4, 1, 3, 0])
    cached = first.batch(index, np.random.default_rng(1), np.arange(8))
    live = fly.batch(index, np.random.default_rng(1), np.arange(8))
    assert cached.shape == (8, 4, 8, 8)
    np.testing.assert_allclose(live, cached, rtol=1e-4, atol=1e-5)
    part = fly.batch(index, np.random.default_rng(1), np.arange(4, 8))   # a rank's rows only
    np.testing.assert_allclose(part[4:], cached[4:], rtol=1e-4, atol=1e-5)
    assert not part[:4].any()

    written[0].write_bytes(b"not an npz")   # a cache it cannot read is encoded again, never used
    load_latent_folder(files / "images", files / "vae", TINY, "cached")
    assert "encoding the images again" in capsys.readouterr().err
    np.testing.assert_array_equal(np.load(written[0])["mean"], first.mean)


def test_each_step_flips_and_samples_the_posterior(files, cache):
    data = load_latent_folder(files / "images", files / "vae", TINY, "cached")
    vae = load_vae(files / "vae")
    fit = lambda image: center_crop_arr(image.convert("RGB"), 16)   # noqa: E731
    pixels = read_image(files / "images" / "cat" / "2.png", fit)
    mean, std = encode_pixels(vae, np.stack([pixels, pixels[:, ::-1]]))
    np.testing.assert_allclose(data.mean[2], mean, rtol=1e-5, atol=1e-6)   # [1]: the mirror image's latent
    np.testing.assert_allclose(data.std[2], std, rtol=1e-5, atol=1e-6)
    assert np.abs(mean[0] - mean[1]).max() > 1e-3

    index = np.full(64, 2)
    draws = data.batch(index, np.random.default_rng(0), np.arange(64)) / 0.5   # the VAE's scaling_factor
    nearer_flipped = np.abs(draws - mean[1]).mean(axis=(1, 2, 3)) < np.abs(draws - mean[0]).mean(axis=(1, 2, 3))
    assert 10 < nearer_flipped.sum() < 54                                        # both orientations, about half each
    noise = draws - np.where(nearer_flipped[:, None, None, None], mean[1], mean[0])
    assert np.std(noise / np.where(nearer_flipped[:, None, None, None], std[1], std[0])) == pytest.approx(1, abs=0.05)


def _train(files: Path, out: Path, *extra: str) -> int:
    return main(["train", str(SPECS / "tiny.yaml"), "--data", str(files / "images"), "--vae", str(files / "vae"),
                 "--steps", "5", "--out", str(out), *extra])


def _losses(run: Path) -> list[float]:
    return [float(line.split(",")[1]) for line in (run / "metrics.csv").read_text().splitlines()[1:]]


def test_train_five_steps_then_sample_decodes_with_the_run_vae(files, cache, tmp_path, capsys):
    assert _train(files, tmp_path / "run", "--backend", "torch") == 0
    config = json.loads((tmp_path / "run" / "run.json").read_text())["config"]
    assert config["vae"] == str((files / "vae").resolve()) and config["encode"] == "cached"
    losses = _losses(tmp_path / "run")
    assert len(losses) == 5 and all(np.isfinite(losses))

    assert main(["sample", str(tmp_path / "run"), "--steps", "2", "--n", "3", "--backend", "torch"]) == 0
    assert "decoding with the VAE the run trained with" in capsys.readouterr().err
    samples = np.load(tmp_path / "run" / "samples" / "samples.npz")
    assert samples["latents"].shape == (3, 4, 8, 8) and samples["images"].shape == (3, 3, 16, 16)
    with torch.no_grad():
        want = load_vae(files / "vae").decode(torch.from_numpy(samples["latents"] / 0.5)).sample.numpy()
    np.testing.assert_allclose(samples["images"], want, rtol=1e-5, atol=1e-5)

    assert _train(files, tmp_path / "fly", "--backend", "torch", "--encode", "on-the-fly") == 0
    np.testing.assert_allclose(_losses(tmp_path / "fly"), losses, rtol=1e-4)   # the same draws: the same latents

    assert _train(files, tmp_path / "resumed", "--backend", "torch", "--steps", "3") == 0
    assert main(["train", str(SPECS / "tiny.yaml"), "--out", str(tmp_path / "resumed"), "--resume",
                 "--steps", "5"]) == 0
    np.testing.assert_array_equal(_losses(tmp_path / "resumed"), losses)   # the run's VAE, flips and samples go on


@needs_nntile
@pytest.mark.nntile
def test_train_five_steps_on_nntile(files, cache, tmp_path):
    assert _train(files, tmp_path / "run", "--backend", "nntile") == 0
    assert len((tmp_path / "run" / "metrics.csv").read_text().splitlines()) == 6


def test_corrupt_image_and_non_vae_folder_are_refused_cleanly(files, cache, tmp_path, capsys):
    bad = tmp_path / "bad"
    _images(bad)
    (bad / "dog" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    assert main(["train", str(SPECS / "tiny.yaml"), "--data", str(bad), "--vae", str(files / "vae"), "--steps", "5",
                 "--out", str(tmp_path / "run")]) == 2
    assert f"{bad / 'dog' / '1.png'}: not a readable image" in capsys.readouterr().err
    assert not (tmp_path / "run").exists() and not (cache.exists() and list(cache.iterdir()))   # nothing half-written

    import_diffusers().DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=1,
                                             sample_size=8, num_embeds_ada_norm=10).save_pretrained(tmp_path / "dit")
    assert main(["train", str(SPECS / "tiny.yaml"), "--data", str(files / "images"), "--vae", str(tmp_path / "dit"),
                 "--out", str(tmp_path / "run")]) == 2
    assert "not a diffusers AutoencoderKL folder (its config.json's _class_name is 'DiTTransformer2DModel')" in \
        capsys.readouterr().err
    other = tmp_path / "other"   # an AutoencoderKL's config, weights of another shape: never half random
    other.mkdir()
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        (other / name).write_bytes((files / "vae" / name).read_bytes())
    config = json.loads((other / "config.json").read_text()) | {"layers_per_block": 2}
    (other / "config.json").write_text(json.dumps(config))
    assert main(["train", str(SPECS / "tiny.yaml"), "--data", str(files / "images"), "--vae", str(other),
                 "--out", str(tmp_path / "run")]) == 2
    assert "not a diffusers AutoencoderKL folder with its weights" in capsys.readouterr().err
    assert main(["train", str(SPECS / "tiny.yaml"), "--encode", "cached", "--out", str(tmp_path / "run")]) == 2
    assert "--encode cached: how --vae encodes an image folder" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_ctrl_c_while_encoding_leaves_no_cache(files, tmp_path):
    images = _images(tmp_path / "many", per_class=150)   # encoding takes seconds: the signal lands in it
    env = os.environ | {"PYTHONPATH": str(ROOT), "DITC_CACHE_DIR": str(tmp_path / "cache")}
    process = subprocess.Popen([sys.executable, "-m", "dit_compiler.cli", "train", str(SPECS / "tiny.yaml"), "--data",
                                str(images), "--vae", str(files / "vae"), "--out", str(tmp_path / "run")],
                               stderr=subprocess.PIPE, text=True, env=env)
    for line in process.stderr:
        if line.startswith("[encode"):
            break
    process.send_signal(signal.SIGINT)
    rest = process.communicate(timeout=120)[1]
    assert process.returncode == 130, rest
    left = list((tmp_path / "cache").rglob("*"))
    assert [p for p in left if p.is_file()] == [] and not (tmp_path / "run").exists()
