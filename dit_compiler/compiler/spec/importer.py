"""`ditc import`: a diffusers model folder's `config.json` -> a ditc spec of the same architecture.

One entry of `IMPORTERS` per diffusers class (`_class_name` in the config): it maps every config key
it knows onto spec keys, or refuses, naming the key and the value ditc cannot express. A key no entry
knows is refused too, so a config from a newer diffusers never imports as a silently different model.
Keys starting with `_` (`_class_name`, `_diffusers_version`, `_name_or_path`) are metadata.

The spec written uses flavor `diffusers` (diffusers' state_dict keys), so the torch reference loads the
folder's `diffusion_pytorch_model.safetensors` with strict=True (`ditc verify SPEC --weights DIR`).
"""
from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dit_compiler.errors import UsageError
from dit_compiler.userfiles import read_json

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
#: A diffusers config is about 1 KiB.
MAX_CONFIG = 1 << 20
#: PixArt-alpha's caption tokens: T5's `max_length` in its pipeline (120), not in the model's config.
PIXART_CAPTION_LENGTH = 120
#: SD3's caption tokens: CLIP's 77 and T5's 256 (StableDiffusion3Pipeline's max_sequence_length), joined.
SD3_CAPTION_LENGTH = 77 + 256


class Refusal(UsageError):
    """A config value ditc cannot express: `config.json: key = value: why`."""

    def __init__(self, source: str, key: str, value: Any, why: str):
        super().__init__(f"{source}: {key} = {_json(value)}: {why}; nothing written")


def _json(value: Any) -> str:
    """The value as config.json writes it (null, true, 0.1, "text")."""
    return json.dumps(value)[:200]


@dataclass
class _Config:
    """The config being read: every key read is ticked off, so those left over are refused."""

    data: dict
    source: str

    def __post_init__(self) -> None:
        self.unread = {k for k in self.data if not k.startswith("_")}

    def get(self, key: str, default: Any = None) -> Any:
        self.unread.discard(key)
        return self.data.get(key, default)

    def integer(self, key: str, default: int | None = None, low: int = 1) -> int:
        value = self.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            self.refuse(key, value, f"an integer of at least {low} is needed")
        return value

    def require(self, key: str, allowed: tuple, default: Any, why: str) -> Any:
        """The key's value, which must be one of `allowed` (compared by type too: 0 is not False)."""
        value = self.get(key, default)
        if not any(value == a and type(value) is type(a) for a in allowed):
            self.refuse(key, value, why)
        return value

    def ignore(self, *keys: str) -> None:
        """Keys that do not change the model ditc builds (each says why where it is called)."""
        for key in keys:
            self.get(key)

    def refuse(self, key: str, value: Any, why: str):
        raise Refusal(self.source, key, value, why)

    def finish(self) -> None:
        for key in sorted(self.unread):
            self.refuse(key, self.data[key], "a config key ditc's importer does not know, so it cannot say the "
                        "model is the one it would build")


def _common(c: _Config) -> dict:
    """The keys DiT and PixArt share: sizes, patches, the transformer block's fixed choices."""
    heads, head_dim = c.integer("num_attention_heads"), c.integer("attention_head_dim")
    in_channels = c.integer("in_channels", 4)
    out = c.get("out_channels")
    if out is None:
        out = in_channels
    if out not in (in_channels, 2 * in_channels) or isinstance(out, bool):
        c.refuse("out_channels", out, f"ditc's output is the noise (in_channels {in_channels}) or the noise and "
                 f"the learned variance (2 x in_channels = {2 * in_channels})")
    sample, patch = c.integer("sample_size"), c.integer("patch_size", 2)
    if sample % patch:
        c.refuse("sample_size", sample, f"not a multiple of patch_size {patch}")
    c.require("dropout", (0.0, 0), 0.0, "ditc has no dropout")
    c.require("activation_fn", ("gelu-approximate",), "gelu-approximate", "ditc's MLP here is GELU-tanh "
              "(gelu-approximate)")
    c.require("attention_bias", (True,), True, "the importer writes attention projections with biases")
    c.require("norm_elementwise_affine", (False,), False, "the block LayerNorms have no affine parameters")
    c.require("upcast_attention", (False, True), False, "")   # fp32 throughout: upcasting changes nothing
    c.ignore("norm_num_groups")   # GroupNorm groups: used by none of these models' modules
    eps = c.get("norm_eps", 1e-5)
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not 0 < eps < 1:
        c.refuse("norm_eps", eps, "a number between 0 and 1 is needed")
    return {"input_size": sample, "in_channels": in_channels, "patch_size": patch, "hidden_size": heads * head_dim,
            "depth": c.integer("num_layers"), "num_heads": heads, "mlp_ratio": 4.0, "learn_sigma": out == 2 * in_channels,
            "norm_eps": float(eps), "flavor": "diffusers"}


def _dit(c: _Config) -> dict:
    """`DiTTransformer2DModel` (diffusers 0.32): adaLN-Zero, per-block timestep and label embedders."""
    model = _common(c)
    c.require("norm_type", ("ada_norm_zero",), "ada_norm_zero", "DiTTransformer2DModel builds only ada_norm_zero")
    model["num_classes"] = c.integer("num_embeds_ada_norm", 1000)
    return model


def _pixart(c: _Config) -> dict:
    """`PixArtTransformer2DModel` (diffusers 0.32): adaLN-single, caption cross-attention, no labels."""
    model = _common(c)
    c.require("norm_type", ("ada_norm_single",), "ada_norm_single", "PixArtTransformer2DModel builds only "
              "ada_norm_single")
    c.require("attention_type", ("default",), "default", "ditc has no gated (GLIGEN) attention")
    c.ignore("num_embeds_ada_norm")   # PixArt only checks it is set; no label table is built
    width = c.get("caption_channels")
    if not isinstance(width, int) or isinstance(width, bool) or width < 1:
        c.refuse("caption_channels", width, "ditc's PixArt projects the captions (caption_projection); an integer "
                 "width is needed")
    cross = c.get("cross_attention_dim", 1152)
    if cross != model["hidden_size"]:
        c.refuse("cross_attention_dim", cross, f"the projected captions are hidden_size ({model['hidden_size']}) "
                 "wide, and ditc's cross-attention reads them at that width")
    size = c.get("use_additional_conditions")
    size = model["input_size"] == 128 if size is None else size
    if not isinstance(size, bool):
        c.refuse("use_additional_conditions", size, "true, false or null")
    scale = c.get("interpolation_scale")
    default_scale = max(model["input_size"] // 64, 1)
    if scale is not None and scale != default_scale:
        c.refuse("interpolation_scale", scale, f"ditc's PixArt positional table uses diffusers' default for "
                 f"sample_size {model['input_size']}, {default_scale}")
    return model | {"num_classes": 0, "conditioning": "adaln_single",
                    "caption": {"width": width, "length": PIXART_CAPTION_LENGTH, "mask": True},
                    "size_conditioning": size}


def _sd3(c: _Config) -> dict:
    """`SD3Transformer2DModel` (diffusers 0.32): MMDiT, conditioning joint (Stable Diffusion 3, and 3.5's QK
    norm; not 3.5's dual attention)."""
    sizes = {key: c.integer(key, default) for key, default in (
        ("sample_size", 128), ("patch_size", 2), ("in_channels", 16), ("num_layers", 18),
        ("attention_head_dim", 64), ("num_attention_heads", 18), ("joint_attention_dim", 4096),
        ("caption_projection_dim", 1152), ("pooled_projection_dim", 2048))}
    hidden = sizes["num_attention_heads"] * sizes["attention_head_dim"]
    if sizes["caption_projection_dim"] != hidden:
        c.refuse("caption_projection_dim", sizes["caption_projection_dim"], f"the context stream attends jointly "
                 f"with the image's, so it is num_attention_heads x attention_head_dim = {hidden} wide")
    sample, patch, channels = sizes["sample_size"], sizes["patch_size"], sizes["in_channels"]
    if sample % patch:
        c.refuse("sample_size", sample, f"not a multiple of patch_size {patch}")
    out = c.get("out_channels", 16)
    out = channels if out is None else out
    if out not in (channels, 2 * channels) or isinstance(out, bool):
        c.refuse("out_channels", out, f"ditc's output is in_channels ({channels}) or twice that (learned variance)")
    table = c.get("pos_embed_max_size", 96)
    if table is not None and (not isinstance(table, int) or isinstance(table, bool) or table < sample // patch):
        c.refuse("pos_embed_max_size", table, f"null or an integer of at least sample_size / patch_size = "
                 f"{sample // patch}")
    if c.get("dual_attention_layers", ()) not in ((), []):
        c.refuse("dual_attention_layers", c.data["dual_attention_layers"], "SD3.5's dual attention (a second "
                 "self-attention of the image stream) is not lowered by ditc's joint design")
    qk_norm = c.require("qk_norm", (None, "rms_norm"), None, "ditc's joint design lowers SD3.5's QK norm, rms_norm")
    return {"input_size": sample, "in_channels": channels, "patch_size": patch, "hidden_size": hidden,
            "depth": sizes["num_layers"], "num_heads": sizes["num_attention_heads"], "mlp_ratio": 4.0,
            "learn_sigma": out == 2 * channels, "norm_eps": 1e-6, "flavor": "diffusers", "conditioning": "joint",
            "num_classes": 0, "class_dropout_prob": 0.0, "pos_embed_max_size": table,
            "caption": {"width": sizes["joint_attention_dim"], "length": SD3_CAPTION_LENGTH,
                        "pooled_width": sizes["pooled_projection_dim"], "mask": False},
            "attention": {"qk_norm": qk_norm or "none"}}


#: The importer of each diffusers class, by `_class_name`.
IMPORTERS: dict[str, Callable[[_Config], dict]] = {
    "DiTTransformer2DModel": _dit,
    "PixArtTransformer2DModel": _pixart,
    "SD3Transformer2DModel": _sd3,
}


def config_path(source: str | Path) -> Path:
    """`source`'s config.json: the file itself, or the one in the folder."""
    path = Path(source)
    return path / CONFIG_FILE if path.is_dir() else path


def read_config(source: str | Path) -> tuple[dict, Path]:
    """The config of a diffusers model folder (or its config.json), bounded and checked to be an object."""
    path = config_path(source)
    data = read_json(path, MAX_CONFIG, "diffusers config")
    if not isinstance(data, dict):
        raise UsageError(f"{path}: the diffusers config is not a JSON object")
    return data, path


def import_model(source: str | Path) -> tuple[dict, str]:
    """The spec data (`name`, `model`) of the diffusers model at `source`, and its class name; a Refusal
    naming the config key and value where ditc cannot express it."""
    data, path = read_config(source)
    class_name = data.get("_class_name")
    if class_name not in IMPORTERS:
        raise Refusal(str(path), "_class_name", class_name, f"ditc imports {', '.join(IMPORTERS)}")
    config = _Config(data, str(path))
    model = IMPORTERS[class_name](config)
    config.finish()
    return {"name": spec_name(path), "model": model}, class_name


def spec_name(config: Path) -> str:
    """A build name from the model folder's name (characters a build name cannot hold become `-`)."""
    folder = config.absolute().parent.name
    name = re.sub(r"[^A-Za-z0-9._-]", "-", folder).lstrip("._-")
    return name or "imported"
