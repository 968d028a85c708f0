"""Which block-language values lowering builds, and which combinations make a model.

The schema lists every design and option the spec language can say (issue 24); a value listed in
`NOT_LOWERED` is valid language that ditc does not compile yet, refused at validation (naming the key and
the value) so that it never becomes a build failure; lowering a value removes its line here.
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
    Refusal(("mlp", "activation"), "swiglu", "the block options"),
    Refusal(("norm", "type"), "rms_norm", "the block options"),
    Refusal(("norm", "affine"), True, "the block options"),
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
    if model.conditioning == "adaln_single":
        if model.num_classes:
            found.append((("num_classes",), "PixArt-alpha's adaLN-single conditions on captions, not class labels",
                          "0, with a model.caption"))
        if model.flavor != "diffusers":
            found.append((("flavor",), "PixArt-alpha's weights are named as diffusers' PixArtTransformer2DModel "
                          "names them", "diffusers"))
        if model.size_conditioning and model.hidden_size % 3:
            found.append((("size_conditioning",), f"the resolution and aspect-ratio embeddings are hidden_size / 3 "
                          f"wide each, and hidden_size {model.hidden_size} is not a multiple of 3",
                          "false, or a hidden_size divisible by 3"))
    return found + joint_problems(model)


#: The block options conditioning joint lowers: SD3's (diffusers' JointTransformerBlock has no others).
JOINT_OPTIONS: dict[tuple[str, ...], Any] = {("attention", "bias"): True,
                                              ("mlp", "activation"): "gelu_tanh", ("mlp", "bias"): True,
                                              ("norm", "type"): "layer_norm", ("norm", "affine"): False}


def joint_problems(model: ModelSpec) -> list[tuple[tuple[str, ...], str, str]]:
    """What conditioning joint (SD3's MMDiT) cannot be, and SD3's positional table elsewhere."""
    grid = model.input_size // model.patch_size
    found = []
    if model.pos_embed_max_size is not None and model.conditioning != "joint":
        found.append((("pos_embed_max_size",), f"SD3's cropped positional table; conditioning here is "
                      f"{model.conditioning}", "null, or conditioning joint"))
    elif model.pos_embed_max_size is not None and model.pos_embed_max_size < grid:
        found.append((("pos_embed_max_size",), f"smaller than the {grid} patches per side the table is cropped to",
                      f"at least input_size / patch_size = {grid}, or null"))
    if model.conditioning != "joint":
        return found
    joint = "conditioning joint (SD3's MMDiT)"
    if model.attention.qk_norm == "layer_norm":
        found.append((("attention", "qk_norm"), f"{joint} lowers SD3.5's QK norm only", "none or rms_norm"))
    if model.caption is None:
        found.append((("conditioning",), f"{joint} attends to caption tokens jointly with the image's",
                      "a model.caption"))
    else:
        if model.caption.pooled_width == 0:
            found.append((("caption", "pooled_width"), f"{joint} adds a pooled text vector to the timestep "
                          "embedding", "a width of at least 1 (SD3: 2048)"))
        if model.caption.mask:
            found.append((("caption", "mask"), f"{joint} attends to every caption token, as diffusers' "
                          "SD3Transformer2DModel (no mask input)", "false"))
    if model.num_classes != 0:
        found.append((("num_classes",), f"{joint} reads no class labels", "0"))
    if model.flavor != "diffusers":
        found.append((("flavor",), f"{joint} is named after diffusers' SD3Transformer2DModel", "diffusers"))
    for path, allowed in JOINT_OPTIONS.items():
        if _value(model, path) != allowed:
            found.append((path, f"{joint} lowers SD3's block only", json_value(allowed)))
    return found


def json_value(value: Any) -> str:
    return "true" if value is True else "false" if value is False else str(value)
