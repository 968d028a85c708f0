"""DiT's initialisation of the torch reference, and checkpoints in facebookresearch/DiT's format.

A checkpoint is a `torch.save`d dict `{"model", "ema", "opt", "args"}` as DiT's `train.py` writes
(`model`/`ema`: the reference's state_dict; `opt`: `torch.optim.AdamW.state_dict()`; `args`: the
training settings as a plain dict; DiT's own runs save an `argparse.Namespace`, which the loader also
reads), plus `train_state`
(step, data order, random generator, wall time) for an exact `--resume`. DiT's own loaders take
`ckpt["ema"]` and ignore the rest. Every write is atomic: a temporary file, then a rename.
"""
from __future__ import annotations

import argparse
import re
import tempfile
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from dit_compiler.compiler.build import TORCH_FILE, load_module
from dit_compiler.compiler.naming import KEYS, PIXART, SD3
from dit_compiler.compiler.spec.importer import WEIGHTS_FILE
from dit_compiler.errors import UsageError
from dit_compiler.files import write_atomic
from dit_compiler.userfiles import regular_size

StateDict = dict[str, np.ndarray]


def _xavier_linears(modules: dict[str, nn.Module], patch: str, generator: torch.Generator) -> None:
    """What DiT's, PixArt's and (by ditc) SD3's initialisations share, drawn first and in the module's
    registration order: every Linear xavier-uniform with zero bias (where it has one: `model.attention.bias`
    and `model.mlp.bias` may drop them), then the patch projection xavier-uniform as a Linear over the patch
    vector, zero bias."""
    for m in modules.values():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight, generator=generator)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    weight = modules[patch].weight
    nn.init.xavier_uniform_(weight.view(weight.shape[0], -1), generator=generator)
    nn.init.zeros_(modules[patch].bias)


def _zero(linears: list[nn.Module]) -> None:
    """Zero weights and biases: the projections a fresh model starts as the identity (or zero output) with."""
    for linear in linears:
        nn.init.zeros_(linear.weight)
        if linear.bias is not None:
            nn.init.zeros_(linear.bias)


@torch.no_grad()
def initialize_dit_weights(module: nn.Module, flavor: str, depth: int, seed: int,
                           conditioning: str = "adaln_zero") -> None:
    """DiT's `initialize_weights` on a reference module of either flavor's key layout.

    Every Linear xavier-uniform with zero bias; the patch projection xavier-uniform as a Linear over
    the patch vector, zero bias; label tables N(0, 0.02); the timestep MLP's weights N(0, 0.02); every
    adaLN projection and the output Linear zero. (The fixed positional table is built by the module.)
    Draws come from a generator seeded with `seed`, in the module's registration order. The other
    designs keep DiT's final layer and its zero initialisation; their blocks' linears stay xavier-uniform
    (adaln's modulation too: only adaLN-Zero starts each block as the identity).
    """
    keys = KEYS[flavor]
    generator = torch.Generator().manual_seed(seed)
    modules = dict(module.named_modules())
    blocks = [keys.block.format(i=i) for i in range(depth)]

    def every(pattern: str) -> list[nn.Module]:
        return [modules[name] for name in dict.fromkeys(pattern.format(b=b) for b in blocks)]

    _xavier_linears(modules, keys.patch, generator)
    for table in every(keys.y_table):
        nn.init.normal_(table.weight, std=0.02, generator=generator)
    for linear in every(keys.t_linear1) + every(keys.t_linear2):
        nn.init.normal_(linear.weight, std=0.02, generator=generator)
    zero_blocks = every(keys.adaln) if conditioning == "adaln_zero" else []
    _zero(zero_blocks + [modules[keys.final_adaln], modules[keys.final_linear]])


@torch.no_grad()
def initialize_pixart_weights(module: nn.Module, depth: int, seed: int) -> None:
    """PixArt-alpha's `initialize_weights` (PixArt-alpha/PixArt-alpha, `PixArt.initialize_weights`) on a
    reference of diffusers' PixArtTransformer2DModel key layout.

    Every Linear xavier-uniform with zero bias; the patch projection xavier-uniform as a Linear over the
    patch vector; the timestep, size and caption MLPs' weights and the shared adaLN-single projection
    N(0, 0.02); every cross-attention output projection and the output Linear zero; the scale_shift_tables
    N(0, 1) / sqrt(hidden) (as their constructors draw them). Draws in the module's registration order.
    """
    keys = PIXART
    generator = torch.Generator().manual_seed(seed)
    modules = dict(module.named_modules())
    _xavier_linears(modules, keys.patch, generator)
    normal = [keys.t_linear1, keys.t_linear2, keys.adaln, keys.caption_linear1, keys.caption_linear2]
    normal += [k.format(name) for name in ("resolution", "aspect_ratio") for k in (keys.size_linear1, keys.size_linear2)]
    for name in normal:
        if name in modules:
            nn.init.normal_(modules[name].weight, std=0.02, generator=generator)
    zero = [keys.cross_attn_out.format(b=keys.block.format(i=i)) for i in range(depth)] + [keys.final_linear]
    _zero([modules[name] for name in zero])
    for name, param in module.named_parameters():
        if name.endswith("scale_shift_table"):
            param.copy_(torch.randn(param.shape, generator=generator) / param.shape[1] ** 0.5)


@torch.no_grad()
def initialize_sd3_weights(module: nn.Module, depth: int, seed: int) -> None:
    """DiT's `initialize_weights` carried over to SD3Transformer2DModel's key layout (diffusers ships no
    initialisation of its own): every Linear xavier-uniform with zero bias, the patch projection as a Linear;
    the timestep and pooled-text MLPs N(0, 0.02); both streams' adaLN projections, norm_out's and the output
    Linear zero, so a fresh model outputs zero. Draws in the module's registration order."""
    keys = SD3
    generator = torch.Generator().manual_seed(seed)
    modules = dict(module.named_modules())
    _xavier_linears(modules, keys.patch, generator)
    for name in (keys.t_linear1, keys.t_linear2, keys.pooled_linear1, keys.pooled_linear2):
        nn.init.normal_(modules[name].weight, std=0.02, generator=generator)
    blocks = [keys.block.format(i=i) for i in range(depth)]
    zero = [k.format(b=b) for b in blocks for k in (keys.adaln, keys.context_adaln)]
    _zero([modules[name] for name in zero + [keys.final_adaln, keys.final_linear]])


def to_numpy(state: dict) -> StateDict:
    return {k: (v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)).copy()
            for k, v in state.items()}


def to_torch(state: StateDict) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}


#: The kind of folder checkpoints are written into (its marker, `files.OUTPUT_MARKER`, says so).
CHECKPOINTS = "checkpoints"


def save_checkpoint(path: Path, model: StateDict, ema: StateDict, opt: dict, args: dict, train_state: dict) -> None:
    payload = {"model": to_torch(model), "ema": to_torch(ema), "opt": opt, "args": args, "train_state": train_state}
    write_atomic(path, lambda file: torch.save(payload, file), CHECKPOINTS)


def save_safetensors(path: Path, state: StateDict) -> None:
    from safetensors.numpy import save

    write_atomic(path, lambda file: file.write(save({k: np.ascontiguousarray(v) for k, v in state.items()})),
                 CHECKPOINTS)


def check_weights(state: StateDict, source: str) -> None:
    """Refuse (UsageError) weights a model cannot run on: a tensor that is not real floating point
    (complex, integer, boolean), or that holds NaN or an infinity, named; they would sample NaN images."""
    for key, value in state.items():
        if not np.issubdtype(value.dtype, np.floating):
            raise UsageError(f"{source}: weight {key} is {value.dtype}; allowed: real floating-point tensors")
        if not np.isfinite(value).all():
            bad = int(np.size(value) - np.isfinite(value).sum())
            raise UsageError(f"{source}: weight {key} holds {bad} NaN or infinite value(s) of {np.size(value)}; "
                             "a model with them samples NaN images (a diverged run? resume from an earlier checkpoint)")


def load_checkpoint(path: Path) -> dict:
    """A DiT-format `.pt` (or any torch-saved dict), read without executing code."""
    regular_size(path, None, "checkpoint")
    try:
        with open(path, "rb") as f:
            head = f.read(1)
    except OSError as error:
        raise UsageError(f"{path}: cannot be read ({error.strerror})") from None
    if not zipfile.is_zipfile(path) and head != b"\x80":   # torch's zip format, or a pickle (older torch)
        raise UsageError(f"{path}: not a checkpoint (neither torch's zip format nor a pickle)")
    try:
        # DiT's train.py saves its `args` as an argparse.Namespace: a plain attribute holder, no code
        with warnings.catch_warnings(), torch.serialization.safe_globals([argparse.Namespace]):
            warnings.simplefilter("ignore")   # torch's notes on pickle protocols are not the user's concern
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated file, not a torch file, pickled code
        text = str(error)
        if "Weights only load failed" in text or "WeightsUnpickler" in text:
            # torch's advice (load with weights_only=False, allowlist the global) is not repeated: only
            # what the file refers to
            found = re.search(r"GLOBAL ([\w.]+)", text)
            refers = f" (it refers to {found.group(1)})" if found else ""
            raise UsageError(f"{path}: holds Python objects besides tensors and plain containers{refers}; ditc "
                             "never runs code from a checkpoint") from None
        first = (text.strip().splitlines() or [""])[0]
        raise UsageError(f"{path}: not a checkpoint torch can read ({type(error).__name__}: {first})") from None
    if not isinstance(checkpoint, dict):
        raise UsageError(f"{path}: holds a {type(checkpoint).__name__}, not a checkpoint dict")
    return checkpoint


def load_weights(path: Path, ema: bool) -> tuple[StateDict, str]:
    """Model weights from a DiT-format checkpoint (its `ema` or `model` entry), a bare state_dict (DiT's
    released `.pt` files) or a `.safetensors` file; returns them and which entry was read."""
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        regular_size(path, None, "checkpoint")
        try:
            state, entry = load_file(str(path)), "safetensors"
        except Exception as error:
            raise UsageError(f"{path}: not a readable safetensors file ({error})") from None
    else:
        checkpoint = load_checkpoint(path)
        entry = "ema" if ema and "ema" in checkpoint else "model" if "model" in checkpoint else None
        state = checkpoint[entry] if entry else checkpoint
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise UsageError(f"{path}: no `model` or `ema` weights in it (keys: {', '.join(map(str, checkpoint))})")
        state, entry = to_numpy(state), entry or "state_dict"
    check_weights(state, f"{path} ({entry})")
    return state, entry


def check_weights_fit(build_dir: Path, weights: dict, source: str) -> None:
    """Refuse weights with a key the model lacks, without one of its trained parameters, or of another shape."""
    with torch.device("meta"):   # shapes only: nothing is allocated
        model = load_module(build_dir / TORCH_FILE).Model()
    extra = sorted(set(weights) - set(model.state_dict()))
    if extra:
        raise UsageError(f"{source}: its weights do not fit this spec's model ({len(extra)} it does not have, such as "
                         f"{extra[0]})")
    for key, param in model.named_parameters():
        if key not in weights and param.requires_grad:
            raise UsageError(f"{source}: its weights do not fit this spec's model (no {key})")
        if key in weights and tuple(weights[key].shape) != tuple(param.shape):
            raise UsageError(f"{source}: its weights do not fit this spec's model ({key} is "
                             f"{list(weights[key].shape)}, the model's {list(param.shape)})")


def read_init(path: Path) -> tuple[StateDict, str]:
    """The weights `ditc train --init PATH` names: a facebookresearch/DiT checkpoint (a released bare state_dict,
    or `train.py`'s {"model", "ema", "opt", "args"}: its EMA), a ditc checkpoint (its EMA), an EMA
    `.safetensors`, or a diffusers model folder (its `diffusion_pytorch_model.safetensors`: the weights of a
    spec of flavor diffusers, as `ditc import` writes it); returns them and the entry read."""
    if path.is_dir():
        if not (path / WEIGHTS_FILE).is_file():
            raise UsageError(f"--init {path}: a folder without {WEIGHTS_FILE} (a diffusers model folder has it; "
                             "sharded weights are not read)")
        weights, _ = load_weights(path / WEIGHTS_FILE, ema=True)
        return weights, f"diffusers folder, {WEIGHTS_FILE}"
    if not path.is_file():
        raise UsageError(f"--init {path}: no such file")
    return load_weights(path, ema=True)


def init_weights(path: Path, build) -> tuple[StateDict, str]:
    """`read_init`'s weights, checked against the model of `build` (a `dit_compiler.compiler.build.Build`) before
    anything is written."""
    weights, entry = read_init(path)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / TORCH_FILE).write_text(build.files[TORCH_FILE])
        check_weights_fit(Path(tmp), weights, f"--init {path} ({entry})")
    return weights, entry
