"""The torch reference against the real thing: diffusers' `DiTTransformer2DModel`, built from a config.

Flavor `diffusers` is diffusers' model as shipped: the state_dict keys are identical and load as is.
Flavor `dit` (facebookresearch/DiT) is diffusers' model with `norm_eps=1e-6`, the timestep frequency
shift set to 0 in every block, and the weights mapped as diffusers' `scripts/convert_dit_to_diffusers.py`
maps a DiT checkpoint: DiT's one timestep and label embedder is copied into every block, the fused
qkv is split into q, k and v. Gradients map back the other way: a copied embedder's gradient is the
sum over the blocks, the qkv gradient the concatenation of q, k and v.

Designs other than DiT's (`model.conditioning`): adaln is DiTTransformer2DModel with its gates fixed at 1
(gate rows of weight 0 and bias 1); in_context's and cross_attention's block 0 is compared with diffusers'
BasicTransformerBlock (norm_type layer_norm, no affine norms) on the stream the reference's block 0 reads.

Nothing here downloads: the diffusers model is built from its config with `from_config`-style kwargs.
"""
from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch

from dit_compiler.checks.common import Inputs, group_error, rel_error
from dit_compiler.compiler.graph.ir import Graph
from dit_compiler.compiler.naming import DIFFUSERS, DIT, TRACE, StateKeys
from dit_compiler.compiler.spec.importer import IMPORTERS, WEIGHTS_FILE, read_config
from dit_compiler.compiler.targets.torch import import_diffusers
from dit_compiler.errors import UsageError
from dit_compiler.userfiles import regular_size

#: What diffusers cannot change: the sinusoid size of `CombinedTimestepLabelEmbeddings`, its period,
#: the FeedForward multiplier, and the eps of the attention-branch and output LayerNorms.
DIFFUSERS_FREQUENCY = 256
DIFFUSERS_MAX_PERIOD = 10000
DIFFUSERS_MLP_RATIO = 4
DIFFUSERS_FIXED_EPS = 1e-6

#: A parameter's gradient counts for `worst_param` when its norm is at least this share of the largest
#: (the attention key bias has an analytically zero gradient: softmax is shift invariant).
WORST_PARAM_FLOOR = 1e-3


@dataclass(frozen=True)
class OracleReport:
    """Norm-wise relative errors of the torch reference against diffusers (diffusers is the expected side)."""

    oracle: str                # what was compared: the diffusers class (and the part of the model)
    forward: float
    input_grad: float
    param_grad: float          # all reference parameters taken as one vector
    worst_param: str           # reference key of the worst parameter gradient (among the non-negligible)
    worst_param_error: float
    source: str = "built from the spec's config, the reference's weights mapped onto it"
    #: The NNTile model against diffusers (forward, input gradient), where `ditc verify` ran both.
    nntile_forward: float | None = None
    nntile_input_grad: float | None = None


# -- the config -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _GraphFacts:
    """What the config needs beyond axes, read off the graph's nodes: block 0's two LayerNorms (attention
    branch, MLP branch), the output LayerNorm after the blocks, the sinusoid's and the label table's
    attributes."""

    attn_norm_eps: float
    mlp_norm_eps: float
    final_norm_eps: float
    frequency_shift: int
    max_period: int
    num_classes: int

    @classmethod
    def of(cls, graph: Graph) -> _GraphFacts | str:
        block = [n.attrs.eps for n in graph.nodes if n.op == "layer_norm" and n.block == 0]
        after = [n.attrs.eps for n in graph.nodes if n.op == "layer_norm" and n.block is None]
        if len(block) != 2 or len(after) != 1 or any(n.op not in _DIT_OPS for n in graph.nodes):
            return "the graph is not DiT's (two LayerNorms a block, one after, DiT's op kinds only)"
        sinusoid = graph.first("timestep_sinusoid").attrs
        return cls(*block, *after, sinusoid.shift, sinusoid.max_period, graph.first("embedding").attrs.null_class)


#: The op kinds diffusers' DiT has.
_DIT_OPS = frozenset({"patchify", "timestep_sinusoid", "unpatchify", "linear", "add_const_slice", "embedding",
                      "act", "add", "layer_norm", "modulate", "gated_residual", "attention"})


#: The designs DiTTransformer2DModel computes: adaLN-Zero, and adaLN as adaLN-Zero whose gates are 1 (their
#: rows of the modulation: weight 0, bias 1).
_MODEL_DESIGNS = ("adaln_zero", "adaln")


def oracle_config(graph: Graph) -> dict | str:
    """`DiTTransformer2DModel` kwargs for `graph`, or a sentence saying why diffusers cannot express it."""
    ax, flavor = graph.axes, graph.spec.model.flavor
    hidden, heads = ax["hidden"].size, ax["heads"].size
    if flavor not in ("dit", "diffusers"):
        return f"flavor {flavor!r} has no diffusers counterpart"
    if graph.spec.model.conditioning not in _MODEL_DESIGNS:
        return f"conditioning {graph.spec.model.conditioning}: DiTTransformer2DModel is adaLN-Zero's"
    m = graph.spec.model
    if (m.attention.qk_norm, m.attention.bias, m.mlp.activation, m.mlp.bias) != ("none", True, "gelu_tanh", True):
        return "diffusers' DiT has no QK norm, and always projection and MLP biases and a GELU-tanh MLP"
    a = _GraphFacts.of(graph)
    if isinstance(a, str):
        return a
    if ax["frequency"].size != DIFFUSERS_FREQUENCY:
        return (f"frequency_embedding_size {ax['frequency'].size}: diffusers fixes the timestep sinusoid "
                f"at {DIFFUSERS_FREQUENCY}")
    if a.max_period != DIFFUSERS_MAX_PERIOD:
        return f"max_period {a.max_period}: diffusers fixes it at {DIFFUSERS_MAX_PERIOD}"
    if ax["mlp"].size != DIFFUSERS_MLP_RATIO * hidden:
        return (f"mlp_ratio {ax['mlp'].size / hidden:g}: diffusers' FeedForward fixes it at "
                f"{DIFFUSERS_MLP_RATIO}")
    if hidden != heads * ax["head_dim"].size:
        return f"hidden_size {hidden} is not a multiple of num_heads {heads}"
    if ax["classes"].size != a.num_classes + 1:
        # diffusers' LabelEmbedding always gets class_dropout_prob 0.1, hence always a null row.
        return (f"the class table has {ax['classes'].size} rows for {a.num_classes} classes: "
                "diffusers always has a null row (num_classes + 1)")
    for name in ("attn_norm_eps", "final_norm_eps"):
        if getattr(a, name) != DIFFUSERS_FIXED_EPS:
            return (f"norm_eps {getattr(a, name):g}: diffusers fixes the attention-branch and output LayerNorm "
                    f"eps at {DIFFUSERS_FIXED_EPS:g}")
    if flavor == "dit" and a.mlp_norm_eps != DIFFUSERS_FIXED_EPS:
        return f"norm_eps {a.mlp_norm_eps:g}: diffusers can only match DiT at {DIFFUSERS_FIXED_EPS:g}"
    expected_shift = 1 if flavor == "diffusers" else 0
    if a.frequency_shift != expected_shift:
        return f"frequency shift {a.frequency_shift} for flavor {flavor} (expected {expected_shift})"
    return {
        "num_attention_heads": heads,
        "attention_head_dim": ax["head_dim"].size,
        "in_channels": ax["in_channels"].size,
        "out_channels": ax["out_channels"].size,
        "num_layers": graph.depth,
        "sample_size": ax["height"].size,
        "patch_size": graph.first("patchify").attrs.patch_size,
        "num_embeds_ada_norm": a.num_classes,
        "norm_eps": a.mlp_norm_eps if flavor == "diffusers" else DIFFUSERS_FIXED_EPS,
    }


def pixart_config(graph: Graph) -> dict | str:
    """`PixArtTransformer2DModel` kwargs for a graph of conditioning adaln_single (flavor diffusers), or why
    diffusers cannot express it."""
    ax, m = graph.axes, graph.spec.model
    if m.flavor != "diffusers":
        return f"flavor {m.flavor}: PixArt's diffusers class names its weights as flavor diffusers does"
    if ax["frequency"].size != DIFFUSERS_FREQUENCY or ax["mlp"].size != DIFFUSERS_MLP_RATIO * ax["hidden"].size:
        return (f"diffusers fixes the timestep sinusoid at {DIFFUSERS_FREQUENCY} and the MLP at "
                f"{DIFFUSERS_MLP_RATIO} x hidden_size")
    if (m.attention.qk_norm, m.attention.bias, m.mlp.activation, m.mlp.bias, m.norm.type, m.norm.affine) != \
            ("none", True, "gelu_tanh", True, "layer_norm", False):
        return "diffusers' PixArtTransformer2DModel has only the default block options (model.attention, mlp, norm)"
    block = {n.attrs.eps for n in graph.nodes if n.op == "layer_norm" and n.block == 0}
    final = [n.attrs.eps for n in graph.nodes if n.op == "layer_norm" and n.block is None]
    if len(block) != 1 or final != [DIFFUSERS_FIXED_EPS]:
        return f"diffusers' PixArt has one block LayerNorm eps and a final one of {DIFFUSERS_FIXED_EPS:g}"
    return {
        "num_attention_heads": ax["heads"].size, "attention_head_dim": ax["head_dim"].size,
        "in_channels": ax["in_channels"].size, "out_channels": ax["out_channels"].size, "num_layers": graph.depth,
        "sample_size": ax["height"].size, "patch_size": graph.first("patchify").attrs.patch_size,
        "cross_attention_dim": ax["hidden"].size, "caption_channels": ax["caption"].size,
        "norm_eps": block.pop(), "use_additional_conditions": bool(m.size_conditioning),
    }


def sd3_config(graph: Graph) -> dict | str:
    """`SD3Transformer2DModel` kwargs for a graph of conditioning joint, or why diffusers cannot express it
    (validation admits only SD3's block: its sizes are what remains)."""
    ax = graph.axes
    if ax["frequency"].size != DIFFUSERS_FREQUENCY or ax["mlp"].size != DIFFUSERS_MLP_RATIO * ax["hidden"].size:
        return (f"diffusers fixes the timestep sinusoid at {DIFFUSERS_FREQUENCY} and the MLP at "
                f"{DIFFUSERS_MLP_RATIO} x hidden_size")
    table = graph.tensors[TRACE.pos_embed].source
    return {
        "sample_size": ax["height"].size, "patch_size": graph.first("patchify").attrs.patch_size,
        "in_channels": ax["in_channels"].size, "num_layers": graph.depth,
        "attention_head_dim": ax["head_dim"].size, "num_attention_heads": ax["heads"].size,
        "joint_attention_dim": ax["caption"].size, "caption_projection_dim": ax["hidden"].size,
        "pooled_projection_dim": ax["pooled"].size, "out_channels": ax["out_channels"].size,
        "pos_embed_max_size": math.isqrt(table.torch_shape[1]) if table.layout == "crop" else None,
        "qk_norm": "rms_norm" if "n_q" in graph.first("joint_attention_pre").inputs else None,
    }


#: The diffusers class of each design that has one, and its config from the graph.
_ORACLES = {"adaln_zero": ("DiTTransformer2DModel", oracle_config), "adaln": ("DiTTransformer2DModel", oracle_config),
            "adaln_single": ("PixArtTransformer2DModel", pixart_config),
            "joint": ("SD3Transformer2DModel", sd3_config)}


def build_diffusers(graph: Graph):
    """A randomly initialised diffusers model (`DiTTransformer2DModel`, `PixArtTransformer2DModel`,
    `SD3Transformer2DModel`) with the graph's semantics (eval mode, float32), or the reason it cannot have them."""
    design = graph.spec.model.conditioning
    if design not in _ORACLES:
        return f"diffusers has no model of conditioning {design}"
    class_name, configure = _ORACLES[design]
    config = configure(graph)
    if isinstance(config, str):
        return config
    try:
        model_class = getattr(import_diffusers(), class_name)
    except Exception as error:  # not installed, or an incompatible build
        return f"diffusers is not importable ({type(error).__name__}: {error})"
    model = model_class(**config).float().eval()
    if graph.spec.model.flavor == "dit":
        for block in model.transformer_blocks:
            block.norm1.emb.time_proj.downscale_freq_shift = 0
    return model


# -- the weight mapping -----------------------------------------------------------------------------

@dataclass(frozen=True)
class _Map:
    """One reference tensor and the diffusers tensors it becomes.

    `copy`: one target, same tensor; `shared`: the same tensor in every target (gradient: the sum);
    `split`: row blocks of equal size, one per target (gradient: the concatenation);
    `gated`: conditioning adaln's 4 chunks (shift, scale of each branch) as adaLN-Zero's 6 with gate rows
    of weight 0 and bias 1 (gradient: the 4 chunks' rows).
    """

    key: str
    targets: tuple[str, ...]
    how: str = "copy"


def weight_map(graph: Graph) -> list[_Map]:
    """How every reference parameter (pos_embed aside) maps onto diffusers' state_dict keys: for flavor
    `dit`, DiT's key layout against diffusers' (`dit_compiler.compiler.naming`), field by field (the
    fields of modules the graph does not have, another design's, left out)."""
    if graph.spec.model.flavor == "diffusers":
        return [_Map(k, (k,)) for k in _reference_keys(graph)]
    depth, reference = graph.depth, set(_reference_keys(graph))
    maps: list[_Map] = []
    for f in fields(StateKeys):
        if f.name == "block":
            continue
        src, dst = _as_tuple(getattr(DIT, f.name)), _as_tuple(getattr(DIFFUSERS, f.name))
        per_block = "{b}" in src[0]
        for i in range(depth) if per_block else (None,):
            sources = [k.format(b=DIT.block.format(i=i)) for k in src]
            if f"{sources[0]}.weight" not in reference:
                continue
            if per_block or "{b}" not in dst[0]:
                targets, how = [k.format(b=DIFFUSERS.block.format(i=i)) for k in dst], "copy"
                how = "split" if len(targets) > len(sources) else how
            else:  # one DiT module copied into every diffusers block
                targets, how = [k.format(b=DIFFUSERS.block.format(i=j)) for j in range(depth) for k in dst], "shared"
            if f.name == "adaln" and graph.spec.model.conditioning == "adaln":
                how = "gated"
            for p in ("weight",) if f.name in _TABLES else ("weight", "bias"):
                maps.append(_Map(f"{sources[0]}.{p}", tuple(f"{t}.{p}" for t in targets), how))
    return maps


#: Where adaLN-Zero's gates sit among its 6 chunks (DiT's order: shift, scale, gate per branch).
_GATES = (2, 5)


def _with_gates(value: torch.Tensor, gate: float) -> torch.Tensor:
    """adaln's 4 row chunks as adaLN-Zero's 6: gate rows filled with `gate`."""
    chunks = list(value.chunk(4, dim=0))
    for at in _GATES:
        chunks.insert(at, torch.full_like(chunks[0], gate))
    return torch.cat(chunks, dim=0)


def _without_gates(value: torch.Tensor) -> torch.Tensor:
    return torch.cat([c for j, c in enumerate(value.chunk(6, dim=0)) if j not in _GATES], dim=0)


#: StateKeys fields that are embedding tables (a weight, no bias).
_TABLES = ("y_table",)


def _as_tuple(keys: str | tuple[str, ...]) -> tuple[str, ...]:
    return keys if isinstance(keys, tuple) else (keys,)


def _reference_keys(graph: Graph) -> list[str]:
    return list(dict.fromkeys(t.source.key for t in graph.params))


def to_diffusers_state_dict(graph: Graph, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The reference's state_dict (or any tensors keyed alike) in diffusers' key space; with flavor
    diffusers, the saved constant tables too (SD3's positional table, a persistent buffer)."""
    out: dict[str, torch.Tensor] = {}
    if graph.spec.model.flavor == "diffusers":
        out.update((t.source.key, state[t.source.key]) for t in graph.tensors.values()
                   if t.role == "const" and t.source.saved and t.source.key in state)
    for m in weight_map(graph):
        value = state[m.key]
        if m.how == "split":
            out.update(zip(m.targets, value.chunk(len(m.targets), dim=0)))
        elif m.how == "gated":
            out.update((target, _with_gates(value, 1.0 if m.key.endswith(".bias") else 0.0)) for target in m.targets)
        else:
            out.update((target, value) for target in m.targets)
    return {k: v.detach().clone() for k, v in out.items()}


def to_reference_grads(graph: Graph, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Gradients in diffusers' key space -> the reference's key space (sum shared, concatenate split)."""
    out: dict[str, torch.Tensor] = {}
    for m in weight_map(graph):
        parts = [grads[t] for t in m.targets]
        if m.how == "split":
            out[m.key] = torch.cat(parts, dim=0)
        elif m.how == "gated":
            out[m.key] = _without_gates(parts[0])
        elif m.how == "shared":
            out[m.key] = torch.stack(parts).sum(dim=0)
        else:
            out[m.key] = parts[0]
    return out


# -- the check --------------------------------------------------------------------------------------

def _forward_backward(model, forward, inputs: Inputs) -> tuple[np.ndarray, np.ndarray, dict[str, torch.Tensor]]:
    """Output, input gradient and parameter gradients, without touching any `.grad` of the model."""
    x = inputs.x.detach().clone().float().requires_grad_(True)
    named = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
    out = forward(x)
    grads = torch.autograd.grad(out, [x] + [p for _, p in named], grad_outputs=inputs.grad_out.float(),
                                allow_unused=True)
    params = {k: (torch.zeros_like(p) if g is None else g) for (k, p), g in zip(named, grads[1:])}
    return out.detach().numpy(), grads[0].numpy(), params


def load_pretrained(folder: Path) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """The diffusers model of a model folder (`from_pretrained`, local files only) and the weights of its
    `diffusion_pytorch_model.safetensors` (read with a size check first: a regular file), or a UsageError."""
    config, path = read_config(folder)
    class_name = config.get("_class_name")
    if class_name not in IMPORTERS:
        raise UsageError(f"--weights {folder}: a {class_name} folder; ditc verifies {', '.join(IMPORTERS)}")
    weights = path.parent / WEIGHTS_FILE
    regular_size(weights, None, "diffusers weights")
    import safetensors.torch

    try:
        model = getattr(import_diffusers(), class_name).from_pretrained(
            str(path.parent), local_files_only=True, low_cpu_mem_usage=False)
        state = safetensors.torch.load_file(str(weights))
    except Exception as error:   # diffusers raises OSError, ValueError, JSON and safetensors errors...
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise UsageError(f"--weights {folder}: not a readable diffusers {class_name} folder ({first})") from None
    return model.float().eval(), state


def oracle_kwargs(oracle: torch.nn.Module, inputs: Inputs) -> dict:
    """The keyword arguments of the diffusers model's forward besides the latent."""
    c = inputs.context
    if type(oracle).__name__ == "SD3Transformer2DModel":
        return {"encoder_hidden_states": c[TRACE.caption], "pooled_projections": c[TRACE.pooled], "timestep": inputs.t,
                "return_dict": False}
    if type(oracle).__name__ != "PixArtTransformer2DModel":
        return {"timestep": inputs.t, "class_labels": inputs.y, "return_dict": False}
    size = {"resolution": c[TRACE.resolution], "aspect_ratio": c[TRACE.aspect_ratio][:, None]} \
        if TRACE.resolution in c else None
    return {"encoder_hidden_states": c[TRACE.caption], "timestep": inputs.t,
            "encoder_attention_mask": c.get(TRACE.caption_mask), "added_cond_kwargs": size, "return_dict": False}


def check_against_diffusers(graph: Graph, reference: torch.nn.Module, inputs: Inputs,
                            pretrained: torch.nn.Module | None = None,
                            expected: dict[str, np.ndarray] | None = None) -> OracleReport | str:
    """Run the reference (with its current weights) and diffusers on the same mapped weights and inputs,
    forward and backward with `inputs.grad_out`; the errors, or why diffusers cannot be compared. The
    whole model against its diffusers class (DiTTransformer2DModel for adaln_zero and adaln,
    PixArtTransformer2DModel, SD3Transformer2DModel), or block 0 against diffusers' BasicTransformerBlock
    (in_context, cross_attention: diffusers has no model of these designs). `pretrained`: a diffusers model
    loaded from a folder, run with its own weights (the reference holds the same ones); `expected` receives
    diffusers' output and input gradient ("out", "dx")."""
    if graph.spec.model.conditioning in _BLOCK_DESIGNS and pretrained is None:
        return check_block_against_diffusers(graph, reference, inputs)
    oracle = build_diffusers(graph) if pretrained is None else pretrained
    if isinstance(oracle, str):
        return oracle
    ref_params = {k: p for k, p in reference.named_parameters() if p.requires_grad}
    state = reference.state_dict()
    missing = sorted(set(_reference_keys(graph)) - set(state))
    if missing:
        return f"the reference lacks graph parameters {missing[:3]}"
    if pretrained is None:
        oracle.load_state_dict(to_diffusers_state_dict(graph, state), strict=True)

    was_training = reference.training
    reference.eval()
    try:
        with torch.enable_grad():
            ref_out, ref_dx, ref_grads = _forward_backward(
                reference, lambda x: reference(x, *inputs.args(graph)[1:]), inputs)
            hf_out, hf_dx, hf_grads = _forward_backward(oracle, lambda x: oracle(x, **oracle_kwargs(oracle, inputs))[0],
                                                        inputs)
    finally:
        reference.train(was_training)

    if expected is not None:
        expected.update(out=hf_out, dx=hf_dx)
    mapped = to_reference_grads(graph, hf_grads)
    keys = sorted(ref_params)
    unmapped = [k for k in keys if k not in mapped]
    if unmapped:
        return f"no diffusers counterpart for reference parameters {unmapped[:3]}"
    pairs = {k: (ref_grads[k].numpy(), mapped[k].numpy()) for k in keys}
    report = _report(type(oracle).__name__, ref_out, hf_out, ref_dx, hf_dx, pairs)
    return report if pretrained is None else replace(report, source="loaded from the model folder with its own weights")


def _report(oracle: str, ref_out, hf_out, ref_dx, hf_dx, pairs: dict[str, tuple[np.ndarray, np.ndarray]],
            source: str = "built from the spec's config, the reference's weights mapped onto it") -> OracleReport:
    """The errors; the worst parameter among those whose gradient is not negligible."""
    keys = sorted(pairs)
    norms = {k: float(np.linalg.norm(expected)) for k, (_, expected) in pairs.items()}
    floor = WORST_PARAM_FLOOR * max(norms.values(), default=0.0)
    per_param = {k: rel_error(*pairs[k]) for k in keys if norms[k] >= floor and norms[k] > 0}
    worst = max(per_param, key=per_param.get) if per_param else ""
    return OracleReport(
        oracle=oracle,
        forward=rel_error(ref_out, hf_out),
        input_grad=rel_error(ref_dx, hf_dx),
        param_grad=group_error([pairs[k] for k in keys]),
        worst_param=worst,
        worst_param_error=per_param.get(worst, math.nan),
    )


# -- a block against diffusers' BasicTransformerBlock ---------------------------------------------------

#: The designs whose block is diffusers' BasicTransformerBlock with norm_type layer_norm and no affine
#: norms: the tensors block 0 reads (the token stream, the context).
_BLOCK_DESIGNS = {"in_context": (TRACE.x_sequence, None), "cross_attention": (TRACE.x_tokens, TRACE.context)}
#: Block 0's modules (DiT's keys less `blocks.0.`) -> BasicTransformerBlock's; `qkv` is split in three.
_BLOCK_KEYS = {"attn.qkv": ("attn1.to_q", "attn1.to_k", "attn1.to_v"), "attn.proj": ("attn1.to_out.0",),
               "cross_attn.q": ("attn2.to_q",), "cross_attn.k": ("attn2.to_k",), "cross_attn.v": ("attn2.to_v",),
               "cross_attn.proj": ("attn2.to_out.0",), "mlp.fc1": ("ff.net.0.proj",), "mlp.fc2": ("ff.net.2",)}


def build_block(graph: Graph):
    """diffusers' BasicTransformerBlock with block 0's configuration (eval mode, float32), or why not."""
    m, ax = graph.spec.model, graph.axes
    if m.flavor != "dit":
        return f"flavor {m.flavor}: the block oracle maps DiT's keys"
    if m.attention.qk_norm != "none":
        return "QK norm: diffusers' BasicTransformerBlock has none"
    eps = {n.attrs.eps for n in graph.nodes if n.op == "layer_norm" and n.block == 0}
    if len(eps) != 1:
        return f"block 0's LayerNorms have several eps {sorted(eps)}: BasicTransformerBlock has one norm_eps"
    try:
        import_diffusers()
        block_class = importlib.import_module("diffusers.models.attention").BasicTransformerBlock
    except Exception as error:  # not installed, or an incompatible build
        return f"diffusers is not importable ({type(error).__name__}: {error})"
    return block_class(ax["hidden"].size, ax["heads"].size, ax["head_dim"].size,
                       cross_attention_dim=ax["hidden"].size if m.conditioning == "cross_attention" else None,
                       activation_fn={"gelu_tanh": "gelu-approximate", "gelu": "gelu"}[m.mlp.activation],
                       attention_bias=m.attention.bias, attention_out_bias=m.attention.bias, ff_bias=m.mlp.bias,
                       norm_elementwise_affine=False, norm_type="layer_norm", norm_eps=eps.pop(),
                       ff_inner_dim=ax["mlp"].size).float().eval()


def check_block_against_diffusers(graph: Graph, reference: torch.nn.Module, inputs: Inputs) -> OracleReport | str:
    """Block 0 of the reference against BasicTransformerBlock with its weights, on the stream (and context)
    block 0 reads when the reference runs `inputs`, forward and backward with a seeded output gradient."""
    oracle = build_block(graph)
    if isinstance(oracle, str):
        return oracle
    block, prefix = reference.blocks[0], "blocks.0."
    state = {k[len(prefix):]: v for k, v in reference.state_dict().items() if k.startswith(prefix)}
    mapped = {}
    for ours, theirs in _BLOCK_KEYS.items():
        for p in ("weight", "bias"):
            if f"{ours}.{p}" in state:
                mapped.update(zip((f"{t}.{p}" for t in theirs), state[f"{ours}.{p}"].chunk(len(theirs), dim=0)))
    oracle.load_state_dict({k: v.detach().clone() for k, v in mapped.items()}, strict=True)
    stream, context = _BLOCK_DESIGNS[graph.spec.model.conditioning]
    trace: dict = {}
    was_training = reference.training
    reference.eval()
    try:
        with torch.no_grad():
            reference(inputs.x, inputs.t, inputs.y, trace)
        x = trace[stream].detach()
        ctx = trace[context].detach() if context else None
        grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(x.numel()))
        block_inputs = Inputs(x=x, t=inputs.t, y=inputs.y, grad_out=grad)
        with torch.enable_grad():
            ref_out, ref_dx, ref_grads = _forward_backward(block, lambda h: block(h, *(ctx,) * bool(context)),
                                                           block_inputs)
            hf_out, hf_dx, hf_grads = _forward_backward(
                oracle, lambda h: oracle(h, encoder_hidden_states=ctx), block_inputs)
    finally:
        reference.train(was_training)
    pairs = {}
    for ours, theirs in _BLOCK_KEYS.items():
        for p in ("weight", "bias"):
            if f"{ours}.{p}" in state:
                expected = torch.cat([hf_grads[f"{t}.{p}"] for t in theirs], dim=0)
                pairs[prefix + f"{ours}.{p}"] = (ref_grads[f"{ours}.{p}"].numpy(), expected.numpy())
    return _report("BasicTransformerBlock (block 0)", ref_out, hf_out, ref_dx, hf_dx, pairs)
