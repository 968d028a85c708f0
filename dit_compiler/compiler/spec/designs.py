"""Which block-language values lowering builds, and which combinations make a model.

The schema lists every design and option the spec language can say (issue 24); a value listed in
`NOT_LOWERED` is valid language that ditc does not compile yet, refused at validation (naming the key and
the value) so that it never becomes a build failure. A helper lowering a design deletes its lines here.
`combination_problems` holds the rules that stay: pairs of values no model family has.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dit_compiler.compiler.spec.model import MODEL_SECTIONS, ModelSpec

#: Stands for every value but the key's default (a caption that is set, a table size that is not null).
SET = object()


@dataclass(frozen=True)
class Refusal:
    """`model.<path>` at `value` (or, with SET, at any value but its default) is not lowered yet."""

    path: tuple[str, ...]
    value: Any
    owner: str          # where the lowering comes from (the part)


NOT_LOWERED: tuple[Refusal, ...] = (
    # DiT's Figure 5 designs and the block options (issue 24, block designs).
    Refusal(("conditioning",), "adaln", "DiT's adaLN design"),
    Refusal(("conditioning",), "in_context", "DiT's in-context design"),
    Refusal(("conditioning",), "cross_attention", "DiT's cross-attention design"),
    Refusal(("attention", "qk_norm"), "layer_norm", "QK norm"),
    Refusal(("attention", "qk_norm"), "rms_norm", "QK norm"),
    Refusal(("attention", "bias"), False, "the block options"),
    Refusal(("mlp", "activation"), "gelu", "the block options"),
    Refusal(("mlp", "activation"), "swiglu", "the block options"),
    Refusal(("mlp", "bias"), False, "the block options"),
    Refusal(("norm", "type"), "rms_norm", "the block options"),
    Refusal(("norm", "affine"), True, "the block options"),

    # PixArt-alpha (issue 24, PixArt).
    Refusal(("conditioning",), "adaln_single", "PixArt-alpha"),
    Refusal(("caption",), SET, "captions"),
    Refusal(("size_conditioning",), True, "PixArt-alpha 1024"),
    Refusal(("num_classes",), 0, "text-only families"),

    # SD3's MMDiT (issue 24, MMDiT).
    Refusal(("conditioning",), "joint", "SD3's MMDiT"),
    Refusal(("caption", "pooled_width"), SET, "SD3's pooled text vector"),
    Refusal(("pos_embed_max_size",), SET, "SD3's positional table"),
)


def _value(model: ModelSpec, path: tuple[str, ...]) -> Any:
    value: Any = model
    for part in path:
        if value is None:
            return None
        value = getattr(value, part)
    return value


def _default(path: tuple[str, ...]) -> Any:
    """The default of `model.<path>`; a section's default where the model's is null (a caption's)."""
    if len(path) == 1:
        return getattr(ModelSpec(), path[0])
    return getattr(MODEL_SECTIONS[path[0]](), path[1])


def refused(path: tuple[str, ...]) -> list[Any]:
    """The values of `model.<path>` refused here (SET among them where any but the default is)."""
    return [refusal.value for refusal in NOT_LOWERED if refusal.path == path]


def refusals(model: ModelSpec) -> list[tuple[tuple[str, ...], Any, str]]:
    """(path under `model`, value, message) of every value of `model` that lowering does not build yet."""
    found = []
    for refusal in NOT_LOWERED:
        value = _value(model, refusal.path)
        if value is None and refusal.value is SET and len(refusal.path) > 1:
            continue
        if refusal.value is SET:
            hit = value != _default(refusal.path)
        else:   # by type too: num_classes 0 is not bias False
            hit = value == refusal.value and type(value) is type(refusal.value)
        if hit:
            found.append((refusal.path, value, f"not supported yet: ditc does not lower {refusal.owner} (valid "
                                               "spec language, not compiled by this version)"))
    return found


#: The conditioning designs a caption can drive.
CAPTION_DESIGNS = ("cross_attention", "adaln_single", "joint")
#: Designs of the DiT paper that diffusers has no model of: its naming (flavor diffusers) cannot hold them.
DIT_ONLY = ("adaln", "in_context")


def combination_problems(model: ModelSpec) -> list[tuple[tuple[str, ...], str, str]]:
    """(path under `model`, problem, what is allowed) of every pair of values no model family has."""
    found = []
    if model.caption is not None and model.conditioning not in CAPTION_DESIGNS:
        found.append((("caption",), f"conditioning {model.conditioning} has no way to read a caption",
                      "null, or conditioning " + ", ".join(CAPTION_DESIGNS)))
    if model.num_classes == 0 and model.caption is None:
        found.append((("num_classes",), "a model without class labels needs a caption to condition on",
                      "at least 1, or a model.caption"))
    if model.size_conditioning and model.conditioning != "adaln_single":
        found.append((("size_conditioning",), f"PixArt-alpha's size embeddings; conditioning here is "
                      f"{model.conditioning}", "false, or conditioning adaln_single"))
    if model.flavor == "diffusers" and (model.conditioning in DIT_ONLY
                                        or model.conditioning == "cross_attention" and model.caption is None):
        found.append((("flavor",), f"diffusers has no model with DiT's {model.conditioning} design to name "
                      "its weights after", "dit"))
    return found
