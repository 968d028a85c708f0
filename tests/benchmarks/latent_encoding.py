"""What latent training from an image folder costs (`ditc train --data FOLDER --vae VAE_DIR`): encoding cost
per image and a training step's data cost, cached against on the fly, for two random AutoencoderKLs:

- tiny: 8/16 channels, 2 levels, 16x16 images (the tests' VAE, tiny.yaml's 8x8 latents);
- sd-size: diffusers' default AutoencoderKL with sd-vae-ft's 4 levels of 128/256/512/512 channels, 2 layers a
  block (83.7M parameters), 256x256 images (DiT's 32x32 latents), random weights: the cost of the real one.

Run: python tests/benchmarks/latent_encoding.py [--images 4] [--batch 4] [--threads 1]. Prints, per VAE:
building the cache (read, crop, encode both flips; ms an image, after one warm-up encoding), the cache's
bytes an image, and a step's data for a batch of `--batch` images: drawn from the cache, and encoded on the
fly (ms a step, the better of 2). One torch thread by default: on a shared 2-core machine two threads
waiting on each other make a small VAE's timings vary tenfold. Takes about 5 minutes on one loaded EPYC
core (the sd-size VAE encodes about 10 s an image there).
"""
from __future__ import annotations

import argparse
import io
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from dit_compiler.app.data import ImageShape  # noqa: E402
from dit_compiler.app.latents import load_latent_folder  # noqa: E402
from dit_compiler.compiler.targets.torch import import_diffusers  # noqa: E402

LEVELS = {"tiny": ((8, 16), 4, 1, 8), "sd-size": ((128, 256, 512, 512), 32, 2, 32)}


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def measure(name: str, root: Path, images: int, batch: int) -> None:
    channels, groups, layers, latent = LEVELS[name]
    torch.manual_seed(0)
    vae = import_diffusers().AutoencoderKL(block_out_channels=channels, down_block_types=("DownEncoderBlock2D",) *
                                           len(channels), up_block_types=("UpDecoderBlock2D",) * len(channels),
                                           latent_channels=4, norm_num_groups=groups, layers_per_block=layers)
    vae.save_pretrained(root / name / "vae")
    side = latent * 2 ** (len(channels) - 1)
    rng = np.random.default_rng(0)
    for i in range(images):   # a photo's odd size, larger than the VAE's input: cropped and resized
        folder = root / name / "images" / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (side * 3 // 2, side * 2, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    shape = ImageShape(channels=4, size=latent, num_classes=2)
    with torch.no_grad():   # torch's first call of each kernel is slower: not a cost per image
        vae.encode(torch.zeros(1, 3, side, side))
    quiet = io.StringIO()
    began = time.perf_counter()
    cached = load_latent_folder(root / name / "images", root / name / "vae", shape, "cached", quiet)
    build = time.perf_counter() - began
    fly = load_latent_folder(root / name / "images", root / name / "vae", shape, "on-the-fly", quiet)
    index = np.arange(batch) % images
    rows = np.arange(batch)
    per_step = {}
    for kind, data in (("cached", cached), ("on the fly", fly)):
        times = []
        for _ in range(2):
            began = time.perf_counter()
            data.batch(index, np.random.default_rng(0), rows)
            times.append(time.perf_counter() - began)
        per_step[kind] = 1000 * min(times)
    params = sum(p.numel() for p in vae.parameters()) / 1e6
    cache_bytes = (cached.mean.nbytes + cached.std.nbytes) / images
    print(f"{name}: {params:.1f}M parameters, {side}x{side} images -> 4x{latent}x{latent} latents")
    print(f"  cache: built in {1000 * build / images:.1f} ms an image (read, crop, encode unflipped and flipped), "
          f"{cache_bytes / 1024:.0f} KiB an image")
    print(f"  a step's data, batch {batch}: cached {per_step['cached']:.2f} ms, on the fly "
          f"{per_step['on the fly']:.1f} ms ({per_step['on the fly'] / batch:.1f} ms an image encoded)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"CPU {_cpu()}, {os.cpu_count()} cores, torch {torch.__version__} with {torch.get_num_threads()} threads; "
          f"load average {os.getloadavg()[0]:.1f} (timings on a shared machine are loaded)")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["DITC_CACHE_DIR"] = str(Path(tmp) / "cache")
        for name in LEVELS:
            measure(name, Path(tmp), args.images, args.batch)


if __name__ == "__main__":
    main()
