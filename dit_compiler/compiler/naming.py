"""DiT's names, in one place.

- `Flavor`: a flavor is a naming map, nothing else: its state_dict keys, the positional table's place,
  the reference's class names and its forward's argument names. Both flavors lower to the same ops.

- `StateKeys`: where each weight lives in a flavor's `state_dict` (facebookresearch/DiT's `models.py`,
  diffusers' `DiTTransformer2DModel`). Lowering gives every graph parameter its source key from here,
  and the diffusers oracle maps DiT's keys onto diffusers' with the two layouts side by side.
- `TRACE`: the graph name of every intermediate. Lowering names the graph's activations with these, and
  the torch templates tap (record) the reference's intermediates under the same names, so `ditc verify`
  compares like with like; a name changed here changes both sides.

Templates: `{i}` is a block index, `{b}` a block's key prefix (`StateKeys.block` with `{i}` filled in).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StateKeys:
    """state_dict key layout of one flavor (module paths; `.weight` and `.bias` follow)."""

    patch: str
    t_linear1: str
    t_linear2: str
    y_table: str
    block: str
    adaln: str
    attn_in: tuple[str, ...]    # one fused qkv projection, or q, k and v
    attn_out: str
    fc1: str
    fc2: str
    final_adaln: str
    final_linear: str
    cross_attn_in: tuple[str, str, str]   # conditioning cross_attention's q, k and v projections
    cross_attn_out: str
    qk_norm: tuple[str, str]              # model.attention.qk_norm's query and key norms
    cross_qk_norm: tuple[str, str]

    @property
    def per_block_conditioning(self) -> bool:
        """Whether every block owns its timestep and label embedders (diffusers) or shares one (DiT)."""
        return "{b}" in self.t_linear1


DIT = StateKeys(
    patch="x_embedder.proj", t_linear1="t_embedder.mlp.0", t_linear2="t_embedder.mlp.2",
    y_table="y_embedder.embedding_table", block="blocks.{i}", adaln="{b}.adaLN_modulation.1",
    attn_in=("{b}.attn.qkv",), attn_out="{b}.attn.proj", fc1="{b}.mlp.fc1", fc2="{b}.mlp.fc2",
    final_adaln="final_layer.adaLN_modulation.1", final_linear="final_layer.linear",
    cross_attn_in=("{b}.cross_attn.q", "{b}.cross_attn.k", "{b}.cross_attn.v"), cross_attn_out="{b}.cross_attn.proj",
    qk_norm=("{b}.attn.q_norm", "{b}.attn.k_norm"), cross_qk_norm=("{b}.cross_attn.q_norm", "{b}.cross_attn.k_norm"),
)
DIFFUSERS = StateKeys(
    patch="pos_embed.proj", t_linear1="{b}.norm1.emb.timestep_embedder.linear_1",
    t_linear2="{b}.norm1.emb.timestep_embedder.linear_2", y_table="{b}.norm1.emb.class_embedder.embedding_table",
    block="transformer_blocks.{i}", adaln="{b}.norm1.linear",
    attn_in=("{b}.attn1.to_q", "{b}.attn1.to_k", "{b}.attn1.to_v"), attn_out="{b}.attn1.to_out.0",
    fc1="{b}.ff.net.0.proj", fc2="{b}.ff.net.2", final_adaln="proj_out_1", final_linear="proj_out_2",
    cross_attn_in=("{b}.attn2.to_q", "{b}.attn2.to_k", "{b}.attn2.to_v"), cross_attn_out="{b}.attn2.to_out.0",
    qk_norm=("{b}.attn1.norm_q", "{b}.attn1.norm_k"), cross_qk_norm=("{b}.attn2.norm_q", "{b}.attn2.norm_k"),
)
KEYS: dict[str, StateKeys] = {"dit": DIT, "diffusers": DIFFUSERS}


@dataclass(frozen=True)
class JointKeys:
    """diffusers' `SD3Transformer2DModel` state_dict layout (MMDiT, conditioning `joint`): the image
    stream's weights as `StateKeys` names them, the context stream's (`*_context`, `add_*`) beside them."""

    patch: str = "pos_embed.proj"
    t_linear1: str = "time_text_embed.timestep_embedder.linear_1"
    t_linear2: str = "time_text_embed.timestep_embedder.linear_2"
    pooled_linear1: str = "time_text_embed.text_embedder.linear_1"
    pooled_linear2: str = "time_text_embed.text_embedder.linear_2"
    context: str = "context_embedder"
    block: str = "transformer_blocks.{i}"
    adaln: str = "{b}.norm1.linear"
    context_adaln: str = "{b}.norm1_context.linear"
    attn_in: tuple[str, ...] = ("{b}.attn.to_q", "{b}.attn.to_k", "{b}.attn.to_v")
    attn_out: str = "{b}.attn.to_out.0"
    context_in: tuple[str, ...] = ("{b}.attn.add_q_proj", "{b}.attn.add_k_proj", "{b}.attn.add_v_proj")
    context_out: str = "{b}.attn.to_add_out"
    fc1: str = "{b}.ff.net.0.proj"
    fc2: str = "{b}.ff.net.2"
    context_fc1: str = "{b}.ff_context.net.0.proj"
    context_fc2: str = "{b}.ff_context.net.2"
    final_adaln: str = "norm_out.linear"
    final_linear: str = "proj_out"
    #: QK norm (SD3.5): image q, k, context q, k.
    qk_norm: tuple[str, ...] = ("{b}.attn.norm_q", "{b}.attn.norm_k", "{b}.attn.norm_added_q",
                                "{b}.attn.norm_added_k")

    per_block_conditioning = False


SD3 = JointKeys()


@dataclass(frozen=True)
class Flavor:
    """What a flavor names besides its parameters' keys (`StateKeys`)."""

    keys: StateKeys | PixArtKeys | JointKeys
    pos_table: str          # the fixed positional table's attribute path in the torch module
    pos_table_saved: bool   # in state_dict (DiT: a frozen Parameter) or not (diffusers: a non-persistent buffer)
    model_class: str
    block_class: str
    inputs: tuple[str, ...]        # forward's arguments: latent, timesteps, labels (or the graph's inputs in order)
    about: str                     # what the reference's docstring says of the flavor


FLAVORS: dict[str, Flavor] = {
    "dit": Flavor(DIT, "pos_embed", True, "DiT", "DiTBlock", ("x", "t", "y"),
                  "facebookresearch/DiT semantics (`models.py`): its state_dict keys, so a DiT checkpoint "
                  "loads as is. SiLU(c) is computed once and read by every adaLN projection (DiT applies "
                  "the same SiLU inside each block; the result is identical)."),
    "diffusers": Flavor(DIFFUSERS, "pos_embed.pos_embed", False, "DiTTransformer2DModel", "BasicTransformerBlock",
                        ("hidden_states", "timestep", "class_labels"),
                        "diffusers `DiTTransformer2DModel` semantics as shipped: its state_dict keys, so its "
                        "checkpoints load as is. Every block owns its timestep and label embedders; diffusers "
                        "re-runs block 0's for the output head, this module reuses block 0's result (the same "
                        "values and gradients)."),
}

@dataclass(frozen=True)
class PixArtKeys:
    """diffusers' `PixArtTransformer2DModel` state_dict layout. The fields the DiT lowering's shared helpers
    read (`patch`, `block`, `attn_in`, `attn_out`, `fc1`, `fc2`) have StateKeys' names."""

    patch: str = "pos_embed.proj"
    t_linear1: str = "adaln_single.emb.timestep_embedder.linear_1"
    t_linear2: str = "adaln_single.emb.timestep_embedder.linear_2"
    #: PixArt 1024's size embedders, `{}` the input (resolution, aspect_ratio).
    size_linear1: str = "adaln_single.emb.{}_embedder.linear_1"
    size_linear2: str = "adaln_single.emb.{}_embedder.linear_2"
    adaln: str = "adaln_single.linear"
    caption_linear1: str = "caption_projection.linear_1"
    caption_linear2: str = "caption_projection.linear_2"
    block: str = "transformer_blocks.{i}"
    table: str = "{b}.scale_shift_table"
    attn_in: tuple[str, ...] = ("{b}.attn1.to_q", "{b}.attn1.to_k", "{b}.attn1.to_v")
    attn_out: str = "{b}.attn1.to_out.0"
    cross_attn_in: tuple[str, ...] = ("{b}.attn2.to_q", "{b}.attn2.to_k", "{b}.attn2.to_v")
    cross_attn_out: str = "{b}.attn2.to_out.0"
    qk_norm: tuple[str, str] = ("{b}.attn1.norm_q", "{b}.attn1.norm_k")
    cross_qk_norm: tuple[str, str] = ("{b}.attn2.norm_q", "{b}.attn2.norm_k")
    fc1: str = "{b}.ff.net.0.proj"
    fc2: str = "{b}.ff.net.2"
    final_table: str = "scale_shift_table"
    final_linear: str = "proj_out"
    qk_norm: tuple[str, str] = ("{b}.attn1.norm_q", "{b}.attn1.norm_k")
    cross_qk_norm: tuple[str, str] = ("{b}.attn2.norm_q", "{b}.attn2.norm_k")


PIXART = PixArtKeys()

#: The flavors of the block designs whose names differ from DiT's, by (conditioning, flavor).
DESIGN_FLAVORS: dict[tuple[str, str], Flavor] = {
    ("adaln_single", "diffusers"): Flavor(
        PIXART, "pos_embed.pos_embed", False, "PixArtTransformer2DModel", "BasicTransformerBlock",
        ("hidden_states", "timestep", "encoder_hidden_states", "encoder_attention_mask", "resolution", "aspect_ratio"),
        "diffusers `PixArtTransformer2DModel` semantics (PixArt-alpha): its state_dict keys, so its checkpoints "
        "load as is. adaLN-single: one timestep MLP and projection to six chunks shared by every block, each "
        "block adding its own learned `scale_shift_table`; captions projected and attended to after "
        "self-attention, padded tokens masked."),
    ("joint", "diffusers"): Flavor(
        SD3, "pos_embed.pos_embed", True, "SD3Transformer2DModel", "JointTransformerBlock",
        ("hidden_states", "timestep", "encoder_hidden_states", "pooled_projections"),
        "diffusers `SD3Transformer2DModel` semantics (Stable Diffusion 3's MMDiT): its state_dict keys, so its "
        "checkpoints load as is. The blocks pass the image and context streams on as one joint token sequence "
        "(image tokens first), split and joined in each block; SiLU of the conditioning is computed once for "
        "every adaLN projection."),
}


def flavor_of(model) -> Flavor:
    """The naming of a model (`ModelSpec`): its design's where that has its own, else its flavor's."""
    return DESIGN_FLAVORS.get((model.conditioning, model.flavor), FLAVORS[model.flavor])


#: The adaLN projection's row blocks, in DiT's `chunk(6)` order, and the final layer's `chunk(2)`;
#: conditioning adaln's `chunk(4)` (no gates).
ADALN_CHUNKS = ("shift_msa", "scale_msa", "gate_msa", "shift_mlp", "scale_mlp", "gate_mlp")
ADALN_NO_GATE_CHUNKS = ("shift_msa", "scale_msa", "shift_mlp", "scale_mlp")
FINAL_CHUNKS = ("shift", "scale")
#: diffusers' AdaLayerNormContinuous (SD3's norm_out, the last block's norm1_context): `chunk(2)` as
#: scale, then shift.
CONTINUOUS_CHUNKS = ("scale", "shift")


@dataclass(frozen=True)
class TraceNames:
    """Graph names of the model's intermediates. Names inside block i start with `block`."""

    x: str = "x"
    t: str = "t"
    y: str = "y"
    x_patches: str = "x_patches"
    x_proj: str = "x_proj"
    pos_embed: str = "pos_embed"
    x_tokens: str = "x_tokens"
    t_freq: str = "t_freq"
    t_hidden: str = "t_hidden"
    t_act: str = "t_act"
    t_emb: str = "t_emb"
    y_emb: str = "y_emb"
    c: str = "c"
    c_silu: str = "c_silu"
    block: str = "blocks.{i}."
    norm1: str = "norm1"
    mod_msa: str = "mod_msa"
    attn: str = "attn"
    res_msa: str = "res_msa"
    norm2: str = "norm2"
    mod_mlp: str = "mod_mlp"
    fc1: str = "fc1"
    gelu: str = "gelu"
    mlp: str = "mlp"
    out: str = "out"
    x_sequence: str = "x_sequence"     # in_context: the patches and the 2 conditioning tokens
    context: str = "context"           # cross_attention: [t_emb, y_emb] as 2 tokens
    norm_cross: str = "norm_cross"
    cross_attn: str = "cross_attn"
    res_cross: str = "res_cross"
    final: str = "final."
    final_norm: str = "norm"
    final_mod: str = "mod"
    final_out: str = "out"
    final_patches: str = "patches"     # in_context: the final output of the patch tokens
    image_out: str = "out"
    # captions (PixArt-alpha), its size conditioning, adaLN-single's shared projection and tables
    caption: str = "caption"
    caption_mask: str = "caption_mask"
    caption_hidden: str = "caption_hidden"
    caption_act: str = "caption_act"
    caption_emb: str = "caption_emb"
    pooled: str = "pooled"           # SD3's pooled text vector
    resolution: str = "resolution"
    aspect_ratio: str = "aspect_ratio"
    size_freq: str = "{}_freq"
    size_hidden: str = "{}_hidden"
    size_act: str = "{}_act"
    size_emb: str = "{}_emb"
    t_cond: str = "t_cond"           # timestep + size embeddings: the final layer's shift and scale read it
    t_mod: str = "t_mod."            # adaLN-single's shared projection, one chunk each
    table: str = "table_"            # a chunk + its row of the block's scale_shift_table


TRACE = TraceNames()
