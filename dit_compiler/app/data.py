"""Training data: the built-in `digits`, a user `.npz` or an image folder, and a loader of full batches.

Images become `[N, C, H, W]` float32; pixels (uint8 or 8-bit image files) are scaled to [-1, 1], float
arrays are taken as they are (pixels already in [-1, 1], or latents). Every problem (a size or channel
count that does not fit the spec, a label out of range, no images) is a `UsageError` naming the file,
raised before training starts.

`digits` is scikit-learn's bundled copy of the UCI handwritten digits: 1,797 grey 8x8 images of
0..9 with 17 grey levels (0..16, scaled to [-1, 1]). Its held-out split, which training never sees, is
fixed: in scikit-learn's order, the images whose index among the images of their class is 4 mod 5
(every fifth of each class): 355 held-out images (34-36 per class), 1,442 for training.
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from dit_compiler.compiler.captions import label_classes
from dit_compiler.errors import UsageError
from dit_compiler.userfiles import load_npz, regular_size

DIGITS = "digits"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
_MODE_CHANNELS = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4}
#: Models with this many channels or more take latents (DiT's VAE latents, 4 channels) rather than pixels.
LATENT_CHANNELS = 4
#: The largest magnitude a training latent may have (DiT's scaled VAE latents have about unit variance).
LATENT_BOUND = 100.0


@dataclass(frozen=True)
class Dataset:
    images: np.ndarray   # [N, C, H, W] float32
    labels: np.ndarray   # [N] int64
    source: str

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class ImageShape:
    """What a compiled model takes: channels, side, and class count (labels 0..num_classes-1)."""

    channels: int
    size: int
    num_classes: int

    @classmethod
    def of_graph(cls, graph) -> "ImageShape":
        """Read from the operation graph (never re-derived from the spec)."""
        return cls(graph.axes["in_channels"].size, graph.axes["height"].size, label_classes(graph.spec.model))


#: The built-in digits: grey 8x8 images of 10 classes.
DIGITS_SHAPE = ImageShape(channels=1, size=8, num_classes=10)


def digits(split: Literal["train", "heldout"]) -> Dataset:
    """The built-in digits, training or held-out split (see the module docstring)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    labels = data.target.astype(np.int64)
    heldout = digits_heldout_mask(labels)
    keep = heldout if split == "heldout" else ~heldout
    images = (data.images[keep] / 8.0 - 1.0).astype(np.float32)[:, None]
    return Dataset(images, labels[keep], f"{DIGITS} ({split})")


def digits_heldout_mask(labels: np.ndarray) -> np.ndarray:
    """True for every fifth image of each class (index within its class = 4 mod 5)."""
    rank = np.zeros(len(labels), dtype=np.int64)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        rank[members] = np.arange(len(members))
    return rank % 5 == 4


def load_dataset(source: str, expect: ImageShape) -> Dataset:
    """`digits` (its training split), an `.npz` with `images` and `labels`, or a folder of class folders."""
    if source == DIGITS:
        data = digits("train")
    else:
        path = Path(source)
        if path.is_dir():
            data = _load_folder(path)
        elif path.suffix == ".npz" and path.is_file():
            data = _load_npz(path)
        elif path.exists() and not path.is_file():
            raise UsageError(f"{source}: not a regular file or a folder (a pipe or a device?); allowed: `{DIGITS}`, "
                             "an .npz file with `images` and `labels`, or a folder with one sub-folder per class")
        else:
            raise UsageError(f"{source}: no such dataset; allowed: `{DIGITS}`, an .npz file with `images` and "
                             "`labels`, or a folder with one sub-folder of images per class")
    check_fits(data, expect)
    return data


def check_fits(data: Dataset, expect: ImageShape) -> None:
    """Raise a UsageError naming the source when `data` cannot train a model of shape `expect`."""
    if len(data) == 0:
        raise UsageError(f"{data.source}: no images")
    _, c, h, w = data.images.shape
    if (h, w) != (expect.size, expect.size):
        raise UsageError(f"{data.source}: images are {h}x{w}, the spec's model takes {expect.size}x{expect.size}")
    if c != expect.channels:
        raise UsageError(f"{data.source}: images have {c} channel(s), the spec's model takes {expect.channels}")
    # pixels in [-1, 1], the range the samplers start from; latents (4+ channels, as DiT's VAE scales them)
    # about unit variance: a value past LATENT_BOUND is a mistake, not a latent
    bound = 1.0 if c < LATENT_CHANNELS else LATENT_BOUND
    low, high = float(data.images.min()), float(data.images.max())
    if low < -bound or high > bound:
        kind = "pixel values" if c < LATENT_CHANNELS else "latents"
        raise UsageError(f"{data.source}: images hold values from {low:g} to {high:g}; allowed as {kind}: "
                         f"-{bound:g} to {bound:g} (or uint8 pixels 0..255)")
    bad = (data.labels < 0) | (data.labels >= expect.num_classes)
    if bad.any():
        raise UsageError(f"{data.source}: label {int(data.labels[bad][0])} is out of range; allowed: "
                         f"0..{expect.num_classes - 1} (the spec's num_classes {expect.num_classes})")


def _scaled(images: np.ndarray, source: str) -> np.ndarray:
    if images.dtype == np.uint8:
        return images.astype(np.float32) / 127.5 - 1.0
    if np.issubdtype(images.dtype, np.floating):
        if not np.isfinite(images).all():
            raise UsageError(f"{source}: images hold NaN or infinite values")
        return images.astype(np.float32)
    raise UsageError(f"{source}: images are {images.dtype}; allowed: uint8 (pixels 0..255) or float")


def _load_npz(path: Path) -> Dataset:
    arrays = load_npz(path, ("images", "labels"), "dataset")
    images, labels = arrays["images"], arrays["labels"]
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4:
        raise UsageError(f"{path}: images has shape {images.shape}; allowed: N,H,W or N,H,W,C")
    if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
        raise UsageError(f"{path}: labels must be {len(images)} integers (one per image), got {labels.dtype} "
                         f"of shape {labels.shape}")
    if len(labels) and labels.max() > np.iinfo(np.int64).max:   # uint64 past int64 would wrap to a negative label
        raise UsageError(f"{path}: label {int(labels.max())} is out of range; allowed: labels of the spec's classes")
    return Dataset(_scaled(images, str(path)).transpose(0, 3, 1, 2).copy(), labels.astype(np.int64), str(path))


def _read_image(file: Path) -> np.ndarray:
    """One 8-bit image file as [H, W, C] uint8 (palette images become RGB or RGBA). A file of more than
    PIL's MAX_IMAGE_PIXELS (89 million: a decompression bomb, or no image a DiT trains on) is refused."""
    from PIL import Image

    regular_size(file, None, "image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(file) as image:
                image = image.convert("L") if image.mode == "1" else image
                if image.mode == "P":
                    image = image.convert("RGBA" if "transparency" in image.info else "RGB")
                mode = image.mode
                array = np.asarray(image, dtype=np.uint8) if mode in _MODE_CHANNELS else None
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as error:
        pixels = re.search(r"\((\d+) pixels\)", str(error))
        raise UsageError(f"{file}: an image of {int(pixels[1]) if pixels else 'too many':,} pixels; allowed: at most "
                         f"{Image.MAX_IMAGE_PIXELS:,} (PIL's limit against decompression bombs)") from None
    except Exception as error:   # PIL's decoders raise OSError, ValueError, SyntaxError, struct.error...
        raise UsageError(f"{file}: not a readable image ({type(error).__name__}: {error})") from None
    if array is None:
        raise UsageError(f"{file}: image mode {mode}; allowed: {', '.join(_MODE_CHANNELS)} (8 bits per channel)")
    return array[..., None] if array.ndim == 2 else array


def _read_images(files: list[Path]) -> list[np.ndarray]:
    """Image files of one size and channel count, as [H, W, C] uint8 arrays."""
    images: list[np.ndarray] = []
    for file in files:
        array = _read_image(file)
        if images and array.shape != images[0].shape:
            raise UsageError(f"{file}: {array.shape[1]}x{array.shape[0]} with {array.shape[2]} channel(s), "
                             f"unlike the folder's first image ({images[0].shape[1]}x{images[0].shape[0]}, "
                             f"{images[0].shape[2]} channel(s))")
        images.append(array)
    return images


def _image_files(folder: Path, recursive: bool = False) -> list[Path]:
    found = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(f for f in found if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)


def _load_folder(path: Path) -> Dataset:
    """One sub-folder per class, classes numbered in the sorted order of their names."""
    classes = sorted(p for p in path.iterdir() if p.is_dir())
    files = [(label, f) for label, folder in enumerate(classes) for f in _image_files(folder)]
    images = _read_images([f for _, f in files])
    if not images:
        return Dataset(np.zeros((0, 0, 0, 0), np.float32), np.zeros(0, np.int64), str(path))
    stacked = np.stack(images).transpose(0, 3, 1, 2)
    return Dataset(_scaled(stacked, str(path)), np.array([label for label, _ in files], dtype=np.int64), str(path))


def load_images(source: str) -> np.ndarray:
    """Unlabelled images [N, C, H, W] float32: an .npz's `images` or every image file under a folder."""
    path = Path(source)
    if path.is_dir():
        images = _read_images(_image_files(path, recursive=True))
        if not images:
            raise UsageError(f"{path}: no images ({', '.join(IMAGE_EXTENSIONS)})")
        return _scaled(np.stack(images).transpose(0, 3, 1, 2), str(path))
    if path.suffix == ".npz" and path.is_file():
        images = load_npz(path, ("images",), "reference images")["images"]
        if images.ndim != 4 or len(images) == 0:
            raise UsageError(f"{path}: images has shape {images.shape}; allowed: N,C,H,W (ditc sample) or N,H,W,C")
        channels_last = images.shape[-1] in (1, 3, 4) and images.shape[1] not in (1, 3, 4)
        return _scaled(images.transpose(0, 3, 1, 2) if channels_last else images, str(path))
    raise UsageError(f"{source}: no such folder or .npz file")


class BatchLoader:
    """Full batches of `batch` images in a shuffled order that a small state restores exactly.

    Epoch e visits the images in the order `default_rng([seed, e]).permutation(N)`. The remainder
    wraps: a batch that runs past an epoch's end takes its rest from the start of the next epoch's
    order, so no image is dropped and a dataset smaller than the batch still works. The state is
    (seed, epoch, position in the epoch's order).
    """

    def __init__(self, dataset: Dataset, batch: int, seed: int):
        self.dataset, self.batch, self.seed = dataset, batch, seed
        self.epoch, self.position = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.dataset))

    def next(self) -> tuple[np.ndarray, np.ndarray]:
        """The next batch: images [batch, C, H, W] float32 and labels [batch] int64."""
        picked = []
        need = self.batch
        while need:
            take = self._order[self.position:self.position + need]
            picked.append(take)
            need -= len(take)
            self.position += len(take)
            if self.position == len(self._order):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
        index = np.concatenate(picked)
        return self.dataset.images[index], self.dataset.labels[index]

    def state(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position}

    def load_state(self, state: dict) -> None:
        """Go on from `state`; a position past the end of this dataset's epoch (a run resumed on a smaller
        dataset) starts the next epoch."""
        self.seed, self.epoch, self.position = int(state["seed"]), int(state["epoch"]), int(state["position"])
        if not 0 <= self.position < len(self.dataset):
            self.epoch, self.position = self.epoch + 1, 0
        self._order = self._permutation(self.epoch)
