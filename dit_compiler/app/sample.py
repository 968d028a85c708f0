"""`ditc sample`: DiT's samplers on a compiled model, from a training run or any checkpoint.

The model is compiled for a fixed batch; `FixedBatch` runs any number of images through it (under
guidance that is twice the sample count: the conditional and the null-class halves). The samplers and
every random draw run on the host (`dit_compiler.app.diffusion`), so backends given one seed start from
the same noise and add the same noise at every step. Output: `grid.png` (a row per class),
`samples.npz` (`images` N,C,H,W in [-1, 1] and `labels`; `latents` too after `--vae`) and
`settings.json` with everything needed to repeat the run. A latent spec (4 channels) without `--vae`
writes its latents and a per-channel preview instead of images.
"""
from __future__ import annotations

import functools
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TextIO

import numpy as np

from dit_compiler.app.backend import Backend
from dit_compiler.app.data import LATENT_CHANNELS
from dit_compiler.app.diffusion import guided
from dit_compiler.app.diffusion.objective import objective_of
from dit_compiler.app.diffusion.sampling import CfgChannels, ModelFn
from dit_compiler.app.progress import Progress, counted
from dit_compiler.compiler.captions import label_classes
from dit_compiler.compiler.graph.ir import Graph
from dit_compiler.compiler.targets.torch import import_diffusers
from dit_compiler.errors import UsageError
from dit_compiler.files import write_atomic, write_text_atomic

VAE_SCALE = 0.18215   # DiT's latent scale: decode `latents / 0.18215`
#: The kind of folder `ditc sample` writes (its marker, `files.OUTPUT_MARKER`, says so).
SAMPLES = "samples"


@dataclass(frozen=True)
class SampleConfig:
    """Sampling settings; defaults as facebookresearch/DiT's `sample.py` (250 DDPM steps, guidance 4).
    `eta` is DDIM's, `clip_denoised` and `sigma_small` DDPM's and DDIM's; the flow samplers (euler, heun)
    have none."""

    sampler: str = "ddpm"   # ddpm, ddim (objective ddpm); euler, heun (rectified_flow)
    steps: int = 250
    eta: float = 0.0
    cfg: float = 4.0
    cfg_channels: CfgChannels | None = None   # None: `dit` for 4 or more channels, `all` below
    seed: int = 0
    clip_denoised: bool = False
    sigma_small: bool = False

    def channels_for(self, in_channels: int) -> CfgChannels:
        """`dit` only for DDPM's epsilon of latents; a flow's velocity has no variance channels: `all`."""
        dit = in_channels >= LATENT_CHANNELS and self.sampler in ("ddpm", "ddim")
        return self.cfg_channels or ("dit" if dit else "all")


class FixedBatch:
    """A model function for any number of images over one compiled for `batch`: chunks of `batch`,
    the last padded with copies of its final image, whose outputs are dropped."""

    def __init__(self, model: ModelFn, batch: int):
        self.model, self.batch = model, batch

    def __call__(self, x: np.ndarray, t: np.ndarray, y: np.ndarray) -> np.ndarray:
        outs = []
        for start in range(0, len(x), self.batch):
            chunk = slice(start, start + self.batch)
            xs, ts, ys = x[chunk], t[chunk], y[chunk]
            pad = self.batch - len(xs)
            if pad:
                xs, ts, ys = (np.concatenate([a, np.repeat(a[-1:], pad, axis=0)]) for a in (xs, ts, ys))
            outs.append(np.asarray(self.model(xs, ts, ys))[:self.batch - pad])
        return np.concatenate(outs)


def sample_labels(num_classes: int, classes: list[int] | None, n: int | None) -> np.ndarray:
    """`classes` as given, or `n` labels cycling over the classes (default: 8 of each of the first 10)."""
    if classes is not None:
        bad = [c for c in classes if not 0 <= c < num_classes]
        if bad:
            raise UsageError(f"--classes: {bad[0]} is out of range; allowed: 0..{num_classes - 1}")
        return np.array(classes, dtype=np.int64)
    if n is None:
        shown = min(num_classes, 10)
        return np.arange(8 * shown, dtype=np.int64) % shown
    return np.arange(n, dtype=np.int64) % num_classes


def generate(backend: Backend, graph: Graph, labels: np.ndarray, config: SampleConfig,
             stream: TextIO | None = None) -> np.ndarray:
    """Samples [N, C, H, W] (float32) for `labels` with the backend's current weights."""
    num_classes = label_classes(graph.spec.model)
    if config.cfg != 1.0 and graph.spec.model.caption is None and graph.axes["classes"].size == num_classes:
        raise UsageError(f"--cfg {config.cfg}: the model has no null class (class_dropout_prob 0), so it cannot "
                         "be guided; use --cfg 1")
    channels, size = graph.axes["in_channels"].size, graph.axes["height"].size
    objective = objective_of(graph.spec.diffusion)
    options = {} if graph.spec.diffusion.flow else {"eta": config.eta, "clip_denoised": config.clip_denoised,
                                                     "sigma_small": config.sigma_small}
    model = guided(FixedBatch(backend.predict, backend.batch), config.cfg, num_classes,
                   config.channels_for(channels))
    progress = Progress(config.steps, f"sample {len(labels)}", "step", stream=stream or sys.stderr)
    try:
        x = objective.sample(model, labels, (len(labels), channels, size, size), np.random.default_rng(config.seed),
                             sampler=config.sampler, steps=config.steps, progress=progress.update, **options)
    finally:
        progress.close()
    return x.astype(np.float32)


@functools.lru_cache(maxsize=1)
def load_vae(vae_dir: Path):
    """The AutoencoderKL, read once per process (the commands read it before sampling, so a folder that
    is not one is refused before any work; `ditc evaluate` decodes once per guidance scale)."""
    try:
        return import_diffusers().AutoencoderKL.from_pretrained(str(vae_dir), low_cpu_mem_usage=False).eval()
    except Exception as error:   # diffusers raises OSError, ValueError, JSON and safetensors errors...
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise UsageError(f"--vae {vae_dir}: not a diffusers AutoencoderKL folder with its weights ({first})") \
            from None


def check_vae(vae_dir: Path, channels: int):
    """The AutoencoderKL in `vae_dir`, loaded (a folder without weights, or for other latents, is refused
    before any sampling) and checked to decode `channels`-channel latents."""
    vae = load_vae(Path(vae_dir))
    if vae.config.latent_channels != channels:
        raise UsageError(f"--vae {vae_dir}: decodes {vae.config.latent_channels}-channel latents, the model makes "
                         f"{channels} channels")
    return vae


def decode_latents(latents: np.ndarray, vae_dir: Path, chunk: int = 16) -> np.ndarray:
    """A diffusers AutoencoderKL folder decodes `latents / 0.18215` to images in about [-1, 1]."""
    import torch

    vae = check_vae(vae_dir, latents.shape[1])
    with torch.no_grad():
        parts = [vae.decode(torch.from_numpy(latents[i:i + chunk] / VAE_SCALE).float()).sample.numpy()
                 for i in range(0, len(latents), chunk)]
    return np.concatenate(parts).astype(np.float32)


def _to_uint8(images: np.ndarray) -> np.ndarray:
    """[N, C, H, W] in [-1, 1] -> [N, H, W, C] uint8."""
    return np.clip((images + 1) * 127.5 + 0.5, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


def _tile_sheet(tiles: list[list[np.ndarray | None]], side: int, pad: int = 2):
    """Rows of [H, W, C] uint8 tiles (None: empty) as one PIL image, tiles scaled up to at least `side`."""
    from PIL import Image

    h, w, c = next(t for row in tiles for t in row if t is not None).shape
    zoom = max(1, side // max(h, w))
    cols = max(len(row) for row in tiles)
    sheet = np.zeros((len(tiles) * (h * zoom + pad) + pad, cols * (w * zoom + pad) + pad, c), dtype=np.uint8)
    for r, row in enumerate(tiles):
        for k, tile in enumerate(row):
            if tile is not None:
                y0, x0 = pad + r * (h * zoom + pad), pad + k * (w * zoom + pad)
                sheet[y0:y0 + h * zoom, x0:x0 + w * zoom] = tile.repeat(zoom, 0).repeat(zoom, 1)
    return Image.fromarray(sheet[..., 0] if c == 1 else sheet)


def image_grid(images: np.ndarray, labels: np.ndarray, side: int = 64, columns: int = 16):
    """A row per class (in label order), that class's first `columns` samples left to right."""
    pixels = _to_uint8(images)
    return _tile_sheet([[pixels[i] for i in np.flatnonzero(labels == c)[:columns]] for c in np.unique(labels)], side)


def channel_preview(latents: np.ndarray, rows: int = 16, side: int = 64):
    """A row per sample (the first `rows`), a grey tile per channel, each channel scaled to its range."""
    shown = latents[:rows]
    low = shown.min(axis=(0, 2, 3), keepdims=True)
    high = shown.max(axis=(0, 2, 3), keepdims=True)
    grey = np.clip((shown - low) / np.maximum(high - low, 1e-12) * 255 + 0.5, 0, 255).astype(np.uint8)
    return _tile_sheet([[g[..., None] for g in sample] for sample in grey], side)


def write_samples(out_dir: Path, samples: np.ndarray, labels: np.ndarray, settings: dict,
                  vae: Path | None = None) -> tuple[np.ndarray, list[str]]:
    """grid.png (or preview.png for latents without a VAE), samples.npz and settings.json; returns the
    images (the latents where there are none) and notes for the user."""
    notes, arrays = [], {"labels": labels}
    channels = samples.shape[1]
    if vae is not None:   # before the folder is made: a VAE that cannot decode them leaves none
        arrays |= {"latents": samples, "images": decode_latents(samples, vae)}
    elif channels >= LATENT_CHANNELS:
        arrays["latents"] = samples
        notes.append(f"note: a {channels}-channel (latent) model and no --vae: wrote latents and a per-channel "
                     f"preview ({out_dir / 'preview.png'}), not images; pass --vae DIR to decode them")
    else:
        arrays["images"] = samples
    out_dir.mkdir(parents=True, exist_ok=True)
    sheet, name = (image_grid(arrays["images"], labels), "grid.png") if "images" in arrays else \
        (channel_preview(samples), "preview.png")
    write_atomic(out_dir / name, lambda file: sheet.save(file, format="PNG"), SAMPLES)
    write_atomic(out_dir / "samples.npz", lambda file: np.savez(file, **arrays), SAMPLES)
    write_text_atomic(out_dir / "settings.json", json.dumps(settings, indent=1) + "\n", SAMPLES)
    return arrays.get("images", samples), notes


def sample_settings(config: SampleConfig, channels: int, labels: np.ndarray, extra: dict) -> dict:
    return asdict(config) | {"cfg_channels": config.channels_for(channels), "labels": labels.tolist()} | extra


def run_sample(backend: Backend, graph: Graph, labels: np.ndarray, config: SampleConfig, out_dir: Path,
               vae: Path | None, extra: dict) -> tuple[np.ndarray, float]:
    """Generate, write, and print where; returns the images (decoded with a VAE) and the sampling time in
    seconds."""
    began = time.perf_counter()
    samples = generate(backend, graph, labels, config)
    elapsed = time.perf_counter() - began
    settings = sample_settings(config, graph.axes["in_channels"].size, labels,
                               extra | {"backend": backend.name, "sampling_s": round(elapsed, 3)})
    images, notes = write_samples(out_dir, samples, labels, settings, vae)
    for note in notes:
        print(note, file=sys.stderr)
    print(f"sampled {counted(len(labels), 'image')} ({config.sampler}, {counted(config.steps, 'step')}, "
          f"cfg {config.cfg}) on {backend.name} in {elapsed:.1f} s -> {out_dir}/")
    return images, elapsed
