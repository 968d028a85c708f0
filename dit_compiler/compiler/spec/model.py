"""The resolved spec: what the loader produces and every later stage reads.

A resolved spec has every key filled in (presets, `extends` and defaults applied) but tile sizes may
still be `auto`; `dit_compiler.compiler.tiling` turns them into integers when the graph is built.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Literal, Union

Flavor = Literal["dit", "diffusers"]
TileSize = Union[int, Literal["auto"]]

#: The tiled axes of a DiT graph, in the order they are documented. The head dimension is never tiled.
TILE_AXES: tuple[str, ...] = (
    "batch",      # images in a batch
    "tokens",     # patches per image, T = (input_size / patch_size)^2
    "hidden",     # hidden_size
    "mlp",        # MLP inner size, hidden_size * mlp_ratio
    "heads",      # attention heads
    "patch_dim",  # one input patch, in_channels * patch_size^2
    "out_dim",    # one output patch, out_channels * patch_size^2
    "frequency",  # sinusoidal timestep features, frequency_embedding_size
    "context",    # context tokens: the caption's, or conditioning cross_attention's 2 tokens [t_emb, y_emb]
    "caption",    # one caption token embedding, model.caption.width
)

PRECISIONS: tuple[str, ...] = ("fp32",)  # tf32 and bf16 are planned; the schema lists only what works


Conditioning = Literal["adaln_zero", "adaln", "in_context", "cross_attention", "adaln_single", "joint"]


@dataclass(frozen=True)
class AttentionSpec:
    """Options of every attention in a block (`model.attention`)."""

    qk_norm: Literal["none", "layer_norm", "rms_norm"] = "none"   # per head over head_dim, learned weight
    bias: bool = True                                           # q, k, v and output projection biases


@dataclass(frozen=True)
class MlpSpec:
    """The pointwise MLP (`model.mlp`); swiglu's hidden size is still hidden_size * mlp_ratio."""

    activation: Literal["gelu_tanh", "gelu", "swiglu"] = "gelu_tanh"
    bias: bool = True


@dataclass(frozen=True)
class NormSpec:
    """The norms before each branch and the final layer (`model.norm`)."""

    type: Literal["layer_norm", "rms_norm"] = "layer_norm"
    affine: bool = False          # a learned weight (and bias for layer_norm)


@dataclass(frozen=True)
class CaptionSpec:
    """Text conditioning (`model.caption`): `length` caption tokens of `width` features."""

    width: int = 4096             # T5-XXL
    length: int = 120             # PixArt-alpha 120, SD3 333
    pooled_width: int = 0         # a pooled text vector added to the timestep embedding (SD3: 2048); 0: none
    mask: bool = True             # a mask of the padded caption tokens is an input


#: The nested sections of `model:` and their dataclasses (a caption may also be null).
MODEL_SECTIONS: dict[str, type] = {"attention": AttentionSpec, "mlp": MlpSpec, "norm": NormSpec,
                                   "caption": CaptionSpec}


@dataclass(frozen=True)
class ModelSpec:
    """Architecture hyper-parameters; names and defaults follow facebookresearch/DiT's `DiT` class."""

    input_size: int = 32
    in_channels: int = 4
    patch_size: int = 2
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    class_dropout_prob: float = 0.1
    learn_sigma: bool = True
    frequency_embedding_size: int = 256
    norm_eps: float = 1e-6
    flavor: Flavor = "dit"
    conditioning: Conditioning = "adaln_zero"
    attention: AttentionSpec = field(default_factory=AttentionSpec)
    mlp: MlpSpec = field(default_factory=MlpSpec)
    norm: NormSpec = field(default_factory=NormSpec)
    caption: CaptionSpec | None = None
    size_conditioning: bool = False
    pos_embed_max_size: int | None = None

    @property
    def context_tokens(self) -> int:
        """Tokens of the context axis: the caption's, 2 ([t_emb, y_emb]) for conditioning cross_attention
        without a caption, 0 where the model has no context."""
        if self.caption is not None:
            return self.caption.length
        return 2 if self.conditioning == "cross_attention" else 0

    @property
    def mlp_size(self) -> int:
        """The MLP inner size, hidden_size * mlp_ratio; validation checks the product is whole up to
        floating-point rounding (100 * 1.1 is 110.00000000000001)."""
        return round(self.hidden_size * self.mlp_ratio)


@dataclass(frozen=True)
class TilingSpec:
    """Tile size of every tiled axis: an integer (edge tiles may be smaller) or `auto`."""

    batch: TileSize = "auto"
    tokens: TileSize = "auto"
    hidden: TileSize = "auto"
    mlp: TileSize = "auto"
    heads: TileSize = "auto"
    patch_dim: TileSize = "auto"
    out_dim: TileSize = "auto"
    frequency: TileSize = "auto"
    context: TileSize = "auto"
    caption: TileSize = "auto"


@dataclass(frozen=True)
class TrainSpec:
    """`ditc train`'s settings (the `train:` section; flags override it). Defaults as facebookresearch/DiT's
    `train.py` except where noted."""

    data: str = "digits"
    steps: int = 4000            # DiT counts epochs (1400 over ImageNet); a step count suits small data
    lr: float = 1e-4
    lr_schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = 0
    grad_clip: float = 0.0       # the largest global gradient norm; 0: no clipping
    accumulation: int = 1        # micro-batches of the compiled batch per step
    weight_decay: float = 0.0
    ema_decay: float = 0.9999
    ema_warmup: bool = True      # not DiT's: decay min(ema_decay, (1+s)/(10+s)) at step s
    seed: int = 0
    ckpt_every: int = 1000       # DiT: 50,000


Objective = Literal["ddpm", "rectified_flow"]
#: The samplers of each objective, its default first.
SAMPLERS: dict[str, tuple[str, ...]] = {"ddpm": ("ddpm", "ddim"), "rectified_flow": ("euler", "heun")}
#: Sampling steps by default, per objective: DiT's 250 respaced DDPM steps; 50 Euler steps for a flow.
DEFAULT_SAMPLE_STEPS: dict[str, int] = {"ddpm": 250, "rectified_flow": 50}


@dataclass(frozen=True)
class DiffusionSpec:
    """The training objective and its timestep distribution (the `diffusion:` section): a run setting, not
    part of the compiled model. `timestep_sampling`, `logit_*` and `shift` are rectified flow's."""

    objective: Objective = "ddpm"
    timestep_sampling: Literal["uniform", "logit_normal"] = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float = 1.0

    @property
    def flow(self) -> bool:
        return self.objective == "rectified_flow"


@dataclass(frozen=True)
class SampleSpec:
    """`ditc sample` and `ditc evaluate`'s defaults (the `sample:` section; flags override it). Defaults as
    facebookresearch/DiT's `sample.py`."""

    sampler: Literal["ddpm", "ddim", "euler", "heun"] = "ddpm"   # a flow's default: euler
    steps: int = 250                                            # a flow's default: 50
    eta: float = 0.0
    cfg: float = 4.0
    cfg_channels: Literal["auto", "dit", "all"] = "auto"   # auto: dit for 4+ channels, all below


@dataclass(frozen=True)
class Spec:
    """A complete, validated spec."""

    name: str
    source: str
    model: ModelSpec = field(default_factory=ModelSpec)
    batch: int = 1
    tiling: TilingSpec = field(default_factory=TilingSpec)
    precision: str = "fp32"
    target: str = "nntile-1.1"
    memory_limit: str | None = None   # as written, e.g. "1.5GiB"
    diffusion: DiffusionSpec = field(default_factory=DiffusionSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    sample: SampleSpec = field(default_factory=SampleSpec)

    @property
    def memory_limit_bytes(self) -> int | None:
        return memory_bytes(self.memory_limit) if self.memory_limit else None

    def compiled_dict(self) -> dict:
        """What the compiled model depends on (the build's digest and graph): all but the run settings
        (`memory_limit`, `diffusion`, `train`, `sample`)."""
        return {
            "name": self.name,
            "model": asdict(self.model),
            "batch": self.batch,
            "tiling": asdict(self.tiling),
            "precision": self.precision,
            "target": self.target,
        }

    def to_dict(self) -> dict:
        """The spec as plain data, in the key order of the spec language (source left out)."""
        return self.compiled_dict() | {"memory_limit": self.memory_limit, "diffusion": asdict(self.diffusion),
                                       "train": asdict(self.train),
                                       "sample": asdict(self.sample)}


_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?)\s*(?:([KMGT])(?:i?B)?|B)?\s*", re.IGNORECASE)
SIZE_FORM = "a size such as 1.5GiB, 1536MiB or 2G (binary units: K, M, G, T mean KiB, MiB, GiB, TiB)"
#: The largest memory size (`memory_limit`, `--memory-limit`): 1 PiB.
MAX_MEMORY = 1024 ** 5
SIZE_RANGE = "from 1 byte to 1 PiB (1024TiB)"


def memory_bytes(text: str) -> int:
    """Bytes of a memory size written as in `SIZE_FORM` (a bare number is bytes), in `SIZE_RANGE`;
    ValueError, naming the text and what is allowed, otherwise."""
    match = _SIZE.fullmatch(text)
    if not match:
        raise ValueError(f"{text!r} is not {SIZE_FORM}")
    number, unit = match.groups()
    size = float(number) * 1024 ** (" KMGT".index(unit.upper()) if unit else 0)  # inf for 400 digits
    if not 1 <= size <= MAX_MEMORY:
        raise ValueError(f"{text!r} is outside the memory sizes allowed, {SIZE_RANGE}")
    return int(size)


#: diffusers' default LayerNorm eps; flavor `diffusers` uses it for the MLP-branch norm unless set.
DIFFUSERS_NORM_EPS = 1e-5


def _preset(depth: int, hidden: int, heads: int, patch: int) -> dict:
    return {"depth": depth, "hidden_size": hidden, "num_heads": heads, "patch_size": patch}


#: The paper's 12 models (Table 1 and 4): model keys a `preset:` line fills in.
PRESETS: dict[str, dict] = {
    f"DiT-{size}/{patch}": _preset(depth, hidden, heads, patch)
    for size, (depth, hidden, heads) in {
        "S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16),
    }.items()
    for patch in (2, 4, 8)
}


def _pixart(input_size: int, size_conditioning: bool) -> dict:
    """PixArt-alpha XL/2 (arXiv:2310.00426; diffusers' PixArtTransformer2DModel defaults): DiT-XL/2's sizes,
    T5-XXL captions of 120 tokens, no class labels; the 1024 model also embeds resolution and aspect ratio."""
    return _preset(28, 1152, 16, 2) | {
        "input_size": input_size, "in_channels": 4, "mlp_ratio": 4.0, "learn_sigma": True, "num_classes": 0,
        "conditioning": "adaln_single", "flavor": "diffusers", "norm_eps": 1e-6,
        "caption": {"width": 4096, "length": 120, "mask": True}, "size_conditioning": size_conditioning,
    }


PRESETS |= {"PixArt-alpha-XL/2-256": _pixart(32, False), "PixArt-alpha-XL/2-1024": _pixart(128, True)}
PRESETS |= {
    # diffusers' SD3Transformer2DModel config of stabilityai/stable-diffusion-3-medium-diffusers: 24 heads of
    # 64 (hidden 1536 = caption_projection_dim), T5-XXL captions (joint_attention_dim 4096) of 77 + 256
    # tokens (CLIP's and T5's), CLIP's pooled vectors (pooled_projection_dim 2048), a cropped 192^2 table.
    "SD3-medium": {"input_size": 128, "in_channels": 16, "patch_size": 2, "hidden_size": 1536, "depth": 24,
                   "num_heads": 24, "mlp_ratio": 4.0, "num_classes": 0, "learn_sigma": False,
                   "norm_eps": 1e-6, "flavor": "diffusers", "conditioning": "joint", "pos_embed_max_size": 192,
                   "caption": {"width": 4096, "length": 333, "pooled_width": 2048, "mask": False}},
}


@dataclass(frozen=True)
class PaperFigure:
    """What a preset's paper prints: forward GMACs per image at batch 1 ("GFlops" in the DiT paper) and
    trainable parameters in millions; None where it prints none."""

    gmacs: float | None
    params_m: float | None
    source: str


_DIT_TABLE4 = "DiT paper (arXiv:2212.09748), Table 4"
_DIT_GFLOPS = {"S": (0.36, 1.41, 6.06), "B": (1.42, 5.56, 23.01), "L": (5.01, 19.70, 80.71), "XL": (7.39, 29.05, 118.64)}
_DIT_PARAMS_M = {"S": 32.87, "B": 130.32, "L": 457.84, "XL": 674.83}   # /2 models, pos-embed excluded

#: The papers' figures of the presets (`ditc inspect` prints them beside its own).
PAPER: dict[str, PaperFigure] = {
    f"DiT-{size}/{patch}": PaperFigure(gmacs, _DIT_PARAMS_M[size] if patch == 2 else None, _DIT_TABLE4)
    for size, figures in _DIT_GFLOPS.items() for patch, gmacs in zip((8, 4, 2), figures)
} | {
    name: PaperFigure(None, 600.0, "PixArt-alpha paper (arXiv:2310.00426): 0.6B parameters, no GFLOPs published")
    for name in ("PixArt-alpha-XL/2-256", "PixArt-alpha-XL/2-1024")
} | {
    "SD3-medium": PaperFigure(None, 2000.0, "SD3 paper (arXiv:2403.03206): the 2B model (depth 24), no "
                              "per-model GFLOPs published (its scaling plots are in training FLOPs)"),
}
