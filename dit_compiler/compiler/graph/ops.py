"""Every op kind, defined once: its named ports, typed attributes, tiling rule, cost, and where its
implementations live (the NNTile target's layer class, the torch reference's code).

Adding an op is one `OpKind` here, one layer class in the NNTile target's `layers.py` (registered under
the name `layer` gives), its torch code in `dit_compiler/targets/torch/ops.py` (registered under the name
`torch` gives), its use in lowering, and its tests. `Graph.lint` rejects a node whose kind is unknown,
whose ports or attributes differ from its kind's, or that breaks its kind's rule; the targets' tests
check that every kind has its layer and its torch code.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from dit_compiler.compiler.graph import rules
from dit_compiler.compiler.graph.rules import Rule

if TYPE_CHECKING:
    from dit_compiler.compiler.graph.ir import Graph, Node


# -- typed attributes -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Activation:
    fn: Literal["silu", "gelutanh", "gelu"]


@dataclass(frozen=True)
class Norm:
    eps: float


@dataclass(frozen=True)
class LabelDrop:
    """Classifier-free guidance's label dropout: in training a label drops to row `null_class` with
    probability `prob`. Training drops labels itself (for every backend); the torch reference also does
    in train mode, as DiT's LabelEmbedder does."""

    null_class: int
    prob: float


@dataclass(frozen=True)
class Rows:
    """Where a piece lands along the first axis."""

    offset: int


@dataclass(frozen=True)
class Patch:
    patch_size: int


@dataclass(frozen=True)
class TokenRange:
    """Tokens start..start+length of the joint sequence (the length is the output's token axis)."""

    start: int


@dataclass(frozen=True)
class Sinusoid:
    max_period: int
    shift: int        # divide by (half - shift): 0 as DiT, 1 as diffusers


@dataclass(frozen=True)
class Heads:
    """Attention's options: `qk_norm` normalises queries and keys per head over head_dim before the scores
    (diffusers' Attention(qk_norm=...): LayerNorm with weight and bias, or RMSNorm with weight; eps
    `qk_eps`); cross-attention adds `mask_bias` (diffusers' -10000) to a padded key's scores."""

    qk_norm: Literal["none", "layer_norm", "rms_norm"] = "none"
    qk_eps: float = 1e-6
    mask_bias: float = -10000.0


def _no_macs(graph: Graph, node: Node) -> int:
    return 0


def _linear_macs(graph: Graph, node: Node) -> int:
    return graph.tensors[node.outputs["y"]].numel * graph.tensors[node.inputs["w"]].shape[1]


def _attention_macs(graph: Graph, node: Node) -> int:
    """Four projections and the two score GEMMs, as the DiT paper's Table 4 counts them."""
    d, tokens, batch = graph.tensors[node.inputs["x"]].shape
    return batch * (4 * tokens * d * d + 2 * tokens * tokens * d)


def _joint_attention_macs(graph: Graph, node: Node) -> int:
    """MMDiT's joint attention: q, k, v projections of both streams, the two score GEMMs over the joint
    sequence, and the output projections (the image's, and the context's unless it is the last block's)."""
    d, tokens, batch = graph.tensors[node.inputs["x"]].shape
    context = graph.tensors[node.inputs["c"]].shape[1]
    joint = tokens + context
    outputs = joint if "w_ao" in node.inputs else tokens
    return batch * (3 * joint * d * d + 2 * joint * joint * d + outputs * d * d)


def _cross_attention_macs(graph: Graph, node: Node) -> int:
    """The query and output projections over the tokens, key and value projections over the context,
    and the two score GEMMs (tokens x context)."""
    d, tokens, batch = graph.tensors[node.inputs["x"]].shape
    c, context, _ = graph.tensors[node.inputs["context"]].shape
    return batch * (2 * tokens * d * d + 2 * context * c * d + 2 * tokens * context * d)


@dataclass(frozen=True)
class OpKind:
    name: str
    doc: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    rule: Rule
    torch: str                                   # its torch code: a key of `targets.torch.ops.TORCH_OPS`
    layer: str | None = None                     # the target layer class; None for host ops
    attrs: type = type(None)
    macs: Callable[[Graph, Node], int] = _no_macs
    #: The torch reference records this op's outputs under their graph names (`tap`); host ops whose
    #: output has no torch counterpart say False and are checked through the tensors around them.
    traced: bool = True
    #: Inputs a node may leave out (a mask where nothing is padded): the layer then sees None.
    optional: tuple[str, ...] = ()

    def ports_of(self, node: Node) -> tuple[str, ...]:
        """The kind's inputs as a node binds them: all, less the optional ones it leaves out."""
        return tuple(p for p in self.inputs if p in node.inputs or p not in self.optional)

    @property
    def host(self) -> bool:
        return self.layer is None


#: QK norm's weights and biases [head_dim] (optional ports: present with qk_norm, biases with layer_norm).
_QK_NORM = ("q_norm_w", "q_norm_b", "k_norm_w", "k_norm_b")
#: The projections' biases: optional (model.attention.bias).
_BIASES = ("b_q", "b_k", "b_v", "b_o")
_ATTENTION_INPUTS = ("x", "w_q", "w_k", "w_v", "b_q", "b_k", "b_v", "w_o", "b_o") + _QK_NORM
_CROSS_ATTENTION_INPUTS = ("x", "context", "mask", "w_q", "w_k", "w_v", "b_q", "b_k", "b_v", "w_o", "b_o") + _QK_NORM
_QK_NORM_RULES = tuple(rules.fiber_of(port, f"w_{port[0]}", "head_dim", optional=True) for port in _QK_NORM)
#: Joint attention's ports: the image stream's as attention's, then the context stream's (`add_*` in
#: diffusers), its output projection last (`to_add_out`; the last block has none: context_pre_only).
#: Optional: QK norm's weights [head_dim] (SD3.5's RMSNorm per head: norm_q, norm_k, norm_added_q, _k).
_JOINT_QK = ("n_q", "n_k", "n_aq", "n_ak")
_JOINT_STREAMS = ("x", "c", "w_q", "w_k", "w_v", "b_q", "b_k", "b_v", "w_o", "b_o",
                  "w_aq", "w_ak", "w_av", "b_aq", "b_ak", "b_av")
_JOINT_PRE_INPUTS = _JOINT_STREAMS + _JOINT_QK
_JOINT_INPUTS = _JOINT_STREAMS + ("w_ao", "b_ao") + _JOINT_QK
_JOINT_HEADS = tuple(rules.heads(w, "x") for w in ("w_q", "w_k", "w_v")) + tuple(
    rules.heads(w, "c") for w in ("w_aq", "w_ak", "w_av")) + tuple(
    rules.fiber_of(port, weight, "head_dim", optional=True) for port, weight in zip(_JOINT_QK, ("w_q", "w_k", "w_aq", "w_ak")))

OPS: dict[str, OpKind] = {kind.name: kind for kind in (
    OpKind("patchify", "host: image [N, C, H, W] -> patch vectors [patch_dim, tokens, batch], (c, p, q) order",
           ("x",), ("y",), rules.host, "patchify", attrs=Patch,
           traced=False),
    OpKind("timestep_sinusoid", "host: timesteps [batch] -> [cos, sin] features [frequency, batch]",
           ("t",), ("y",), rules.host, "timestep_sinusoid", attrs=Sinusoid),
    OpKind("unpatchify", "host: patch outputs [out_dim, tokens, batch] -> image [N, C_out, H, W]",
           ("x",), ("y",), rules.host, "unpatchify", attrs=Patch),
    OpKind("linear", "y = W x + b over the first axis (b optional); W keeps torch's [out, in] shape",
           ("x", "w", "b"), ("y",), rules.gemm("x", "w", "y", "b"), "linear", "Linear", macs=_linear_macs,
           optional=("b",)),
    OpKind("add_const_slice", "y = x + table, the constant table broadcast over the batch",
           ("x", "table"), ("y",), rules.all_of(rules.same("x", "y"), rules.slice_of("table", "x", "batch")),
           "add_const_slice", "AddConstSlice"),
    OpKind("add_fiber", "y = x + b, b a [hidden] parameter broadcast over the other axes (a row of PixArt's "
           "scale_shift_table)", ("x", "b"), ("y",), rules.all_of(rules.same("x", "y"), rules.fiber_of("b", "x", "hidden")),
           "add_fiber", "AddFiber"),
    OpKind("add_rows", "y = x, with h added to rows offset..offset+len(h) of its first axis (a concatenation "
           "of pieces added to x: PixArt's size embeddings)", ("x", "h"), ("y",),
           rules.all_of(rules.same("x", "y"), rules.rows_of("h", "x")), "add_rows", "AddRows", attrs=Rows),
    OpKind("embedding", "y[:, n] = table[:, labels[n]]",
           ("labels", "table"), ("y",), rules.embedding("labels", "table", "y"), "embedding", "Embedding", attrs=LabelDrop),
    OpKind("act", "element-wise activation (silu, gelutanh or gelu)",
           ("x",), ("y",), rules.same("x", "y"), "act", "Act", attrs=Activation),
    OpKind("add", "y = a + b", ("a", "b"), ("y",), rules.same("a", "b", "y"), "add", "Add"),
    OpKind("layer_norm", "normalise over the hidden axis, no affine parameters",
           ("x",), ("y",), rules.same("x", "y"), "layer_norm", "LayerNormNoAffine",
           attrs=Norm),
    OpKind("rms_norm", "y = x / sqrt(mean(x^2) + eps) * weight over the hidden axis (RMSNorm)",
           ("x", "weight"), ("y",), rules.all_of(rules.same("x", "y"), rules.fiber_of("weight", "x", "hidden")),
           "rms_norm", "RMSNorm", attrs=Norm),
    OpKind("modulate", "y = x * (1 + scale) + shift, shift and scale broadcast over tokens",
           ("x", "shift", "scale"), ("y",),
           rules.all_of(rules.same("x", "y"), rules.slice_of("shift", "x", 1),
                        rules.slice_of("scale", "x", 1)), "modulate", "Modulate"),
    OpKind("gated_residual", "y = x + gate * h, gate broadcast over tokens",
           ("x", "h", "gate"), ("y",), rules.all_of(rules.same("x", "h", "y"), rules.slice_of("gate", "x", 1)),
           "gated_residual", "GatedResidual"),
    OpKind("attention", "multi-head self-attention with q, k, v and output projections; optional QK norm "
           "(its weights and biases over head_dim)",
           _ATTENTION_INPUTS, ("y",),
           rules.all_of(rules.same("x", "y"), *(rules.heads(w, "x") for w in ("w_q", "w_k", "w_v")), *_QK_NORM_RULES),
           "attention", "Attention", attrs=Heads, macs=_attention_macs, optional=_BIASES + _QK_NORM),
    OpKind("joint_attention", "MMDiT's joint attention: one attention over the image tokens followed by the "
           "context tokens, each stream with its own q, k, v and output projections; y holds both streams' "
           "outputs in that order (token_slice splits them). Optional QK norm: RMSNorm of every head's q and k "
           "over head_dim with each stream's weights (n_*), eps the attribute's",
           _JOINT_INPUTS, ("y",), rules.all_of(rules.streams("x", "c"), rules.joined("x", "c", "y"), *_JOINT_HEADS),
           "joint_attention", "JointAttention", attrs=Norm, macs=_joint_attention_macs, optional=_JOINT_QK),
    OpKind("joint_attention_pre", "joint attention of the last MMDiT block (context_pre_only): the context "
           "tokens are keys and values only, y is the image stream's output",
           _JOINT_PRE_INPUTS, ("y",), rules.all_of(rules.streams("x", "c"), rules.same("x", "y"), *_JOINT_HEADS),
           "joint_attention", "JointAttentionPre", attrs=Norm, macs=_joint_attention_macs, optional=_JOINT_QK),
    OpKind("token_join", "y = the tokens of a followed by those of b (MMDiT's two streams as one joint sequence)",
           ("a", "b"), ("y",), rules.all_of(rules.streams("a", "b"), rules.joined("a", "b", "y")),
           "token_join", "TokenJoin"),
    OpKind("token_slice", "y = x[:, start:start + length] over the token axis (a stream of the joint sequence)",
           ("x",), ("y",), rules.token_range("x", "y"), "token_slice", "TokenSlice", attrs=TokenRange),
    OpKind("cross_attention", "multi-head attention of the tokens x [hidden, tokens, batch] (queries) to a context "
           "[width, context, batch] (keys and values) with q, k, v and output projections; mask [context, batch] "
           "(1 keep, 0 padded; optional) adds mask_bias to a padded key's scores, as diffusers' Attention",
           _CROSS_ATTENTION_INPUTS, ("y",),
           rules.all_of(rules.same("x", "y"), rules.heads("w_q", "x"), rules.heads("w_k", "context"),
                        rules.heads("w_v", "context"), rules.mask_of("mask", "context"), *_QK_NORM_RULES),
           "cross_attention", "CrossAttention", attrs=Heads, macs=_cross_attention_macs,
           optional=("mask",) + _BIASES + _QK_NORM),
    OpKind("append_tokens", "y = [x, a, b] along the token axis: the vectors a and b [hidden, batch] become two "
           "more tokens after x's (without x: y = [a, b])",
           ("x", "a", "b"), ("y",), rules.token_concat("x", ("a", "b"), "y"), "append_tokens", "AppendTokens",
           optional=("x",)),
    OpKind("take_tokens", "y = the first tokens of x (as many as y has): x [f, tokens, batch] -> y [f, n, batch]",
           ("x",), ("y",), rules.token_prefix("x", "y"), "take_tokens", "TakeTokens"),
)}
