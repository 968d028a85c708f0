"""A user's diffusers `AutoencoderKL` folder (`--vae DIR`): read and checked to be one, its geometry from
its config, images encoded to the latent distribution and latents decoded to images.

Latents are scaled as diffusers' pipelines scale them: a model sees `(z - shift_factor) * scaling_factor`
for a VAE latent z (`scaling_factor` 0.18215 for DiT's sd-vae-ft-mse/ema; `shift_factor` null there, set
for SD3's and Flux's VAEs), and decoding inverts it. A VAE's input is `2 ** (len(block_out_channels) - 1)`
times its latent's side (diffusers' `vae_scale_factor`: 8 for sd-vae-ft, so a 32x32 latent is 256x256).
"""
from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dit_compiler.compiler.targets.torch import import_diffusers
from dit_compiler.errors import UsageError, shown
from dit_compiler.userfiles import MAX_METADATA, available_memory, read_json, regular_size

#: The weight files diffusers reads from a model folder (safetensors first; `.bin` through torch's
#: weights-only loader, which runs no code).
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
#: Images encoded or latents decoded per VAE call.
CHUNK = 16


@functools.lru_cache(maxsize=1)
def load_vae(vae_dir: Path):
    """The AutoencoderKL, read once per process (the commands read it before sampling or training, so a
    folder that is not one is refused before any work). Refused: a config.json that is not an
    AutoencoderKL's (or over 1 MiB), weight files that are not regular files or larger than the machine's
    memory, and weights that do not fill the model its config describes (diffusers would leave the rest
    randomly initialised, with a warning)."""
    config = read_json(vae_dir / "config.json", MAX_METADATA, "VAE config")
    kind = config.get("_class_name") if isinstance(config, dict) else None
    if kind != "AutoencoderKL":
        raise UsageError(f"--vae {vae_dir}: not a diffusers AutoencoderKL folder (its config.json's _class_name is "
                         f"{shown(kind)}); allowed: a folder AutoencoderKL.save_pretrained wrote, such as "
                         "stabilityai/sd-vae-ft-ema")
    for name in WEIGHT_FILES:
        if (vae_dir / name).exists():
            regular_size(vae_dir / name, available_memory(), "VAE weights")
    diffusers = import_diffusers()
    verbosity = diffusers.utils.logging.get_verbosity()
    # diffusers' messages while it looks for the weights ("An error occurred while trying to fetch" the
    # safetensors, "Defaulting to unsafe serialization" of a `.bin` torch reads weights-only) are not the
    # user's: what is wrong is reported below, in one line
    diffusers.utils.logging.set_verbosity(diffusers.utils.logging.CRITICAL)
    try:
        vae, info = diffusers.AutoencoderKL.from_pretrained(str(vae_dir), low_cpu_mem_usage=False,
                                                            output_loading_info=True)
    except Exception as error:   # diffusers raises OSError, ValueError, JSON and safetensors errors...
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise UsageError(f"--vae {vae_dir}: not a diffusers AutoencoderKL folder with its weights ({first})") \
            from None
    finally:
        diffusers.utils.logging.set_verbosity(verbosity)
    unfit = info["missing_keys"] or info["mismatched_keys"]
    if unfit:
        raise UsageError(f"--vae {vae_dir}: not a diffusers AutoencoderKL folder with its weights (its weights lack "
                         f"{len(unfit)} of the model's tensors, e.g. {unfit[0]})")
    return vae.eval()


def check_vae(vae_dir: Path, channels: int):
    """The AutoencoderKL in `vae_dir`, loaded (a folder without weights, or for other latents, is refused
    before any sampling) and checked to make and decode `channels`-channel latents."""
    vae = load_vae(Path(vae_dir))
    if vae.config.latent_channels != channels:
        raise UsageError(f"--vae {vae_dir}: decodes {vae.config.latent_channels}-channel latents, the model makes "
                         f"{channels} channels")
    return vae


@dataclass(frozen=True)
class VaeGeometry:
    """What a VAE's config says about its latents: the pixels per latent side, the image channels it
    encodes and the latent scale and shift (see the module docstring)."""

    factor: int
    image_channels: int
    scale: float
    shift: float

    @classmethod
    def of(cls, vae) -> "VaeGeometry":
        config = vae.config
        return cls(2 ** (len(config.block_out_channels) - 1), int(config.in_channels),
                   float(config.scaling_factor), float(config.get("shift_factor") or 0.0))


def vae_digest(vae) -> str:
    """The sha256 of a VAE's config and weights (the names, dtypes, shapes and bytes of its state_dict):
    what a cache of its latents is keyed by, whatever its folder's name or weight format."""
    sha = hashlib.sha256(json.dumps({k: v for k, v in vae.config.items() if not k.startswith("_")},
                                    sort_keys=True, default=str).encode())
    for name, tensor in sorted(vae.state_dict().items()):
        sha.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        sha.update(tensor.detach().contiguous().numpy().tobytes())
    return sha.hexdigest()


def encode_pixels(vae, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images [N, H, W, C] -> the mean and standard deviation [N, c, h, w] of the VAE's latent
    distribution (unscaled), the images taken to [-1, 1] as DiT's `Normalize(0.5, 0.5)` takes them."""
    import torch

    means, stds = [], []
    with torch.no_grad():
        for start in range(0, len(pixels), CHUNK):
            x = torch.from_numpy(pixels[start:start + CHUNK].transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0)
            dist = vae.encode(x).latent_dist
            means.append(dist.mean.numpy())
            stds.append(dist.std.numpy())
    return np.concatenate(means).astype(np.float32), np.concatenate(stds).astype(np.float32)


def decode_latents(latents: np.ndarray, vae_dir: Path) -> np.ndarray:
    """Model latents [N, c, h, w] decoded by the AutoencoderKL folder (`latents / scale + shift`, its
    config's) to images [N, C, H, W] in about [-1, 1]."""
    import torch

    vae = check_vae(vae_dir, latents.shape[1])
    geometry = VaeGeometry.of(vae)
    with torch.no_grad():
        parts = [vae.decode(torch.from_numpy(latents[i:i + CHUNK] / geometry.scale + geometry.shift).float())
                 .sample.numpy() for i in range(0, len(latents), CHUNK)]
    return np.concatenate(parts).astype(np.float32)
