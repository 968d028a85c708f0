"""Latent training data from an image folder, as facebookresearch/DiT's `train.py` makes it: `ditc train
--data FOLDER --vae VAE_DIR`.

Each image (a sub-folder per class, as torchvision's ImageFolder) is converted to the VAE's channels (RGB,
as ImageFolder's loader converts) and centre-cropped and resized to the VAE's input side, the spec's
`input_size` times the VAE's downsampling factor (ADM's `center_crop_arr`, which DiT's `train.py` uses:
halved with a box filter while at least twice the side, resized bicubically so the short side fits, the
centre cropped). Each training step flips each image horizontally with probability 1/2 and draws its
latent from the VAE's posterior, `latent_dist.sample()` times the scale, as DiT's `train.py` does.

Two ways to get there, the same draws from the run's generator either way (flips, then the posterior's
noise for the whole global batch), so both train on the same latents up to float rounding:

- `cached` (the default): every image is encoded once, unflipped and flipped, and the posterior's mean
  and standard deviation of both are stored in a cache file (`DITC_CACHE_DIR`'s `latents/`, 64 KiB an
  image at 256x256 through sd-vae-ft: 2 orientations x mean and std x 4x32x32 float32) that later runs
  reuse; a step then costs a sample from the stored distribution, no VAE. Storing the distribution, not
  one sampled latent (as fast-DiT's extracted features do), keeps DiT's randomness: a new flip and a new
  posterior sample each time an image is seen. The cache is keyed by the folder's files (class, name,
  size and modification time of each), the VAE's config and weights (`vae.vae_digest`) and the
  resolution; a folder that changes makes a new one. It is held in memory while training.
- `on-the-fly`: the cropped images are held in memory (uint8) and each step encodes its own images (this
  rank's rows of the global batch) with the VAE, as DiT's `train.py` does.

The cache is written whole or not at all (`files.write_atomic`): an error or Ctrl-C while encoding
leaves none, and a cache file that cannot be read is encoded again.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np

from dit_compiler.app.data import IMAGE_EXTENSIONS, ImageShape, check_labels, class_files, read_image
from dit_compiler.app.progress import Progress, counted
from dit_compiler.app.vae import VaeGeometry, check_vae, encode_pixels, vae_digest
from dit_compiler.errors import UsageError
from dit_compiler.files import cache_root, write_atomic
from dit_compiler.userfiles import load_npz

ENCODINGS = ("cached", "on-the-fly")
#: Bumped whenever what a cache file holds for the same key changes (the crop, the arrays).
CACHE_FORMAT = 1
_MODES = {1: "L", 3: "RGB"}


def center_crop_arr(image, size: int):
    """ADM's `center_crop_arr` (guided-diffusion, as DiT's `train.py` imports it): a PIL image of `size` x
    `size`."""
    from PIL import Image

    while min(*image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = size / min(*image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    array = np.array(image)
    top, left = (array.shape[0] - size) // 2, (array.shape[1] - size) // 2
    return Image.fromarray(array[top:top + size, left:left + size])


@dataclass(frozen=True)
class LatentDataset:
    """An image folder as VAE latents: `mean`/`std` [N, 2, c, h, w] (unflipped, flipped) when cached,
    else the cropped `pixels` [N, H, W, C] uint8 and the `vae` that encodes them each step."""

    labels: np.ndarray
    source: str
    geometry: VaeGeometry
    latent_shape: tuple[int, int, int]
    mean: np.ndarray | None = None
    std: np.ndarray | None = None
    pixels: np.ndarray | None = None
    vae: object = None

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, index: np.ndarray, rng: np.random.Generator, rows: np.ndarray) -> np.ndarray:
        """Scaled latents [len(index), c, h, w] of the images at `index`, each flipped with probability 1/2
        and sampled from its posterior with `rng`'s draws (for every image of the batch, so that every
        rank draws alike). On the fly only `rows` (this rank's) are encoded; the others stay zero."""
        flip = (rng.random(len(index)) < 0.5).astype(np.int64)
        eps = rng.standard_normal((len(index), *self.latent_shape)).astype(np.float32)
        if self.mean is not None:
            mean, std = self.mean[index, flip], self.std[index, flip]
        else:
            mean, std = np.zeros_like(eps), np.zeros_like(eps)
            pixels = self.pixels[index[rows]]
            flipped = flip[rows].astype(bool)
            pixels[flipped] = pixels[flipped, :, ::-1]
            mean[rows], std[rows] = encode_pixels(self.vae, pixels)
        return (mean + std * eps - self.geometry.shift) * self.geometry.scale


def load_latent_folder(folder: Path, vae_dir: Path, expect: ImageShape, encoding: str,
                       stream: TextIO | None = None) -> LatentDataset:
    """The class folders under `folder` as latents of the VAE in `vae_dir` for a model of shape `expect`
    (see the module docstring); `encoding` one of ENCODINGS."""
    stream = stream or sys.stderr
    files = class_files(folder)
    if not files:
        raise UsageError(f"{folder}: no images (a sub-folder of images per class: {', '.join(IMAGE_EXTENSIONS)})")
    labels = np.array([label for label, _ in files], dtype=np.int64)
    check_labels(labels, str(folder), expect)
    vae = check_vae(vae_dir, expect.channels)
    geometry = VaeGeometry.of(vae)
    if geometry.image_channels not in _MODES:
        raise UsageError(f"--vae {vae_dir}: encodes {geometry.image_channels}-channel images; allowed: 1 (grey) or "
                         "3 (RGB)")
    side = expect.size * geometry.factor
    latent_shape = (expect.channels, expect.size, expect.size)
    common = {"labels": labels, "source": str(folder), "geometry": geometry, "latent_shape": latent_shape}

    def fit(image):
        return center_crop_arr(image.convert(_MODES[geometry.image_channels]), side)

    if encoding == "on-the-fly":
        pixels = np.stack(_each(files, lambda f: read_image(f, fit), f"read {folder}", stream))
        return LatentDataset(pixels=pixels, vae=vae, **common)
    key = _cache_key(folder, files, side, vae_digest(vae))
    path = cache_root() / "latents" / f"{key}.npz"
    if os.path.lexists(path):
        try:
            mean, std = _cached(path, key, len(files), latent_shape)
            print(f"latents of {folder} ({counted(len(files), 'image')}, {side}x{side}): cached in {path}",
                  file=stream)
            return LatentDataset(mean=mean, std=std, **common)
        except UsageError as error:   # a cache is ditc's own: one it cannot read is encoded again
            print(f"note: {error}; encoding the images again", file=stream)
    began = time.perf_counter()

    def encoded(file: Path) -> np.ndarray:
        pixels = read_image(file, fit)
        mean, std = encode_pixels(vae, np.stack([pixels, pixels[:, ::-1]]))
        return np.stack([mean, std])   # [2 (mean, std), 2 (flip), c, h, w]

    both = np.stack(_each(files, encoded, f"encode {folder}", stream))
    took = time.perf_counter() - began
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda file: np.savez(file, mean=both[:, 0], std=both[:, 1], key=np.array(key)))
    print(f"encoded {counted(len(files), 'image')} of {folder} at {side}x{side} in {took:.1f} s "
          f"({1000 * took / len(files):.0f} ms an image, both flips) -> {path}", file=stream)
    return LatentDataset(mean=both[:, 0], std=both[:, 1], **common)



def _each(files: list[tuple[int, Path]], work, desc: str, stream: TextIO) -> list[np.ndarray]:
    """`work(file)` for each file, with a progress display."""
    progress = Progress(len(files), desc, "image", stream=stream)
    try:
        out = []
        for _, file in files:
            out.append(work(file))
            progress.update()
        return out
    finally:
        progress.close()


def _cache_key(folder: Path, files: list[tuple[int, Path]], side: int, vae: str) -> str:
    """The sha256 of what a cache's latents depend on: the files (class folder, name, size and modification
    time of each), the VAE's digest, the side images are cropped to and the cache format."""
    listing = []
    for label, file in files:
        info = file.stat()
        listing.append([label, str(file.relative_to(folder)), info.st_size, info.st_mtime_ns])
    text = json.dumps({"format": CACHE_FORMAT, "side": side, "vae": vae, "files": listing})
    return hashlib.sha256(text.encode()).hexdigest()


def _cached(path: Path, key: str, count: int, latent_shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The mean and std in the cache file `path`, refused (UsageError) unless it is the one for `key`, with
    finite arrays of `count` images' latents of `latent_shape` (std at least 0)."""
    arrays = load_npz(path, ("mean", "std", "key"), "latent cache")
    mean, std = arrays["mean"], arrays["std"]
    shape = (count, 2, *latent_shape)
    if str(arrays["key"]) != key or mean.shape != shape or std.shape != shape:
        raise UsageError(f"{path}: not the latent cache of these images and VAE (its key or shapes differ)")
    if mean.dtype != np.float32 or std.dtype != np.float32 or not (np.isfinite(mean).all() and np.isfinite(std).all()
                                                                     and (std >= 0).all()):
        raise UsageError(f"{path}: the latent cache holds values that are not finite float32 latents")
    return mean, std
