"""`conditioning: joint`: Stable Diffusion 3's MMDiT (arXiv:2403.03206; diffusers' SD3Transformer2DModel).

Two token streams, the image's and the caption's (the context), each with its own weights: adaLN-Zero
(norm1, norm1_context), q, k, v and output projections, LayerNorm and MLP; one attention runs over both
streams' tokens joined (image tokens first). The last block is `context_pre_only` as diffusers': its
context stream is keys and values only (AdaLayerNormContinuous, no output projection, no MLP). The
conditioning is the timestep embedding plus the pooled text vector's (CombinedTimestepTextProjEmbeddings);
the caption tokens are projected to the hidden size (context_embedder); the positional table is the
centred crop of a pos_embed_max_size^2 one where that is set (PatchEmbed).

The blocks pass the two streams on as one joint sequence [hidden, image + context tokens, batch], so
generated code chains one tensor from block to block; each block splits it (token_slice) and joins its
two outputs again (token_join). The last block passes on the image stream alone.
"""
from __future__ import annotations

from dataclasses import dataclass

from dit_compiler.compiler.designs.base import MAX_PERIOD, TOKENS, VECTOR, Lowering
from dit_compiler.compiler.graph.ir import Axis, Graph, ParamSource
from dit_compiler.compiler.graph.ops import OPS, Activation, Norm, Patch, Sinusoid, TokenRange
from dit_compiler.compiler.naming import ADALN_CHUNKS, CONTINUOUS_CHUNKS, TRACE, flavor_of
from dit_compiler.compiler.spec.model import Spec

CONTEXT = ("hidden", "context", "batch")
JOINT = ("hidden", "joint", "batch")
#: LayerNorm eps everywhere in SD3Transformer2DModel (AdaLayerNormZero, norm2, AdaLayerNormContinuous), and
#: its QK norm's (RMSNorm) eps.
EPS = 1e-6


@dataclass(frozen=True)
class JointNames:
    """Graph names of MMDiT's intermediates beside DiT's (`TRACE`); the context stream's start with `c_`."""

    pooled_hidden: str = "pooled_hidden"
    pooled_act: str = "pooled_act"
    pooled_emb: str = "pooled_emb"
    context: str = "context"
    joint: str = "joint"
    x: str = "x"
    x_out: str = "x_out"
    c: str = "c"
    joint_attn: str = "joint_attn"
    c_prefix: str = "c_"


NAMES = JointNames()


def joint_axis(axes: dict[str, Axis]) -> Axis:
    """The joint sequence's axis: image then context tokens, tiled as the image tokens are (its tiles
    need not meet the streams' boundary: copy_intersection moves tokens between any tilings)."""
    size = axes["tokens"].size + axes["context"].size
    return Axis("joint", size, min(axes["tokens"].tile, size))


class Joint(Lowering):
    GROUPS = {"adaLN-Zero": ("adaLN modulation", "layer norm", "modulate", "gated residual")}

    def __init__(self, spec: Spec):
        super().__init__(spec)
        self.flavor = flavor_of(spec.model)   # SD3Transformer2DModel's names
        self.keys = self.flavor.keys
        m = spec.model
        self.g.axes["joint"] = joint_axis(self.g.axes)
        self.g.axes["pooled"] = Axis("pooled", m.caption.pooled_width, m.caption.pooled_width)

    def lower(self) -> Graph:
        g, m, n, k = self.g, self.spec.model, TRACE, self.keys
        x = g.tensor(n.x, ("batch", "in_channels", "height", "width"), "input")
        t = g.tensor(n.t, ("batch",), "input")
        caption = g.tensor(n.caption, ("caption", "context", "batch"), "input")
        pooled = g.tensor(n.pooled, ("pooled", "batch"), "input")
        g.inputs = [x, t, caption, pooled]

        tokens = self.embed_patches(x)
        c_silu = self.conditioning_of(t, pooled)
        context = self.linear(caption, NAMES.context, "hidden", k.context, "embeddings", "context_embedder")
        stream = self.act(NAMES.joint, JOINT)
        self.node("token_join", {"a": tokens, "b": context}, {"y": stream}, "embeddings", "joint")
        for i in range(m.depth):
            self.block_index = i
            stream = self.block(i, k.block.format(i=i), stream, c_silu)
        self.block_index = None
        self.final_layer(stream, c_silu)
        return g

    def embed_patches(self, x: str) -> str:
        """As DiT's, with diffusers' cropped table where pos_embed_max_size is set (a persistent buffer of
        pos_embed_max_size^2 rows, the crop added); a non-persistent table of the grid otherwise."""
        g, n, m = self.g, TRACE, self.spec.model
        patches = self.act(n.x_patches, ("patch_dim", "tokens", "batch"))
        self.node("patchify", {"x": x}, {"y": patches}, "embeddings", "pos_embed", Patch(m.patch_size))
        proj = self.linear(patches, n.x_proj, "hidden", self.keys.patch, "embeddings", "pos_embed", layout="conv")
        hidden, tokens = g.axes["hidden"].size, g.axes["tokens"].size
        size = m.pos_embed_max_size
        source = ParamSource(self.flavor.pos_table, (1, tokens, hidden), layout="table", saved=False) if size is None \
            else ParamSource(self.flavor.pos_table, (1, size * size, hidden), layout="crop")
        pos = g.tensor(n.pos_embed, ("hidden", "tokens"), "const", source=source)
        out = self.act(n.x_tokens)
        self.node("add_const_slice", {"x": proj, "table": pos}, {"y": out}, "embeddings", "pos_embed")
        return out

    def two_layer(self, x: str, names: tuple[str, str, str], keys: tuple[str, str], scope: str) -> str:
        """Linear, SiLU, Linear to the hidden size (TimestepEmbedding, PixArtAlphaTextProjection)."""
        h = self.linear(x, names[0], "hidden", keys[0], "embeddings", scope)
        h_act = self.act(names[1], self.g.tensors[h].dims)
        self.node("act", {"x": h}, {"y": h_act}, "embeddings", scope, Activation("silu"))
        return self.linear(h_act, names[2], "hidden", keys[1], "embeddings", scope)

    def conditioning_of(self, t: str, pooled: str) -> str:
        """SiLU(timestep embedding + pooled text embedding): what every adaLN projection reads."""
        n, k = TRACE, self.keys
        t_freq = self.act(n.t_freq, ("frequency", "batch"))
        self.node("timestep_sinusoid", {"t": t}, {"y": t_freq}, "embeddings", "time_text_embed",
                  Sinusoid(MAX_PERIOD, 0))
        t_emb = self.two_layer(t_freq, (n.t_hidden, n.t_act, n.t_emb), (k.t_linear1, k.t_linear2),
                               "time_text_embed.timestep_embedder")
        p_emb = self.two_layer(pooled, (NAMES.pooled_hidden, NAMES.pooled_act, NAMES.pooled_emb),
                               (k.pooled_linear1, k.pooled_linear2), "time_text_embed.text_embedder")
        c = self.act(n.c, VECTOR)
        self.node("add", {"a": t_emb, "b": p_emb}, {"y": c}, "embeddings", "time_text_embed")
        c_silu = self.act(n.c_silu, VECTOR)
        self.node("act", {"x": c}, {"y": c_silu}, "adaLN modulation", "time_text_embed", Activation("silu"))
        return c_silu

    def modulated(self, x: str, out: str, shift: str, scale: str, scope: str) -> str:
        """LayerNorm (no affine) then modulate."""
        dims = self.g.tensors[x].dims
        norm = self.norm("layer_norm", x, out + "_norm", EPS, "layer norm", scope)
        h = self.g.tensor(out, dims, "activation", block=self.block_index)
        self.node("modulate", {"x": norm, "shift": shift, "scale": scale}, {"y": h}, "modulate", scope)
        return h

    def gated(self, x: str, h: str, gate: str, out: str, scope: str) -> str:
        y = self.g.tensor(out, self.g.tensors[x].dims, "activation", block=self.block_index)
        self.node("gated_residual", {"x": x, "h": h, "gate": gate}, {"y": y}, "gated residual", scope)
        return y

    def slice(self, joint: str, start: int, out: str, dims: tuple[str, ...], component: str, scope: str) -> str:
        y = self.g.tensor(out, dims, "activation", block=self.block_index)
        self.node("token_slice", {"x": joint}, {"y": y}, component, scope, TokenRange(start))
        return y

    def projections(self, key_in: tuple[str, ...], key_out: str | None, key_prefix: str,
                    suffix: str) -> dict[str, str]:
        """q, k, v weights [heads, head_dim, hidden] and biases [heads, head_dim], and the output
        projection, of one stream (ports `w_q`.. or, with suffix `a`, `w_aq`..)."""
        ports = {}
        for part, key in zip("qkv", key_in):
            key = key.format(b=key_prefix)
            ports[f"w_{suffix}{part}"] = self.param(f"{key}.weight", ("heads", "head_dim", "hidden"),
                                                    f"{key}.weight", layout="heads_in")
            ports[f"b_{suffix}{part}"] = self.param(f"{key}.bias", ("heads", "head_dim"), f"{key}.bias",
                                                    layout="heads_in")
        if key_out is not None:
            out = key_out.format(b=key_prefix)
            ports[f"w_{suffix}o"] = self.param(f"{out}.weight", ("hidden", "heads", "head_dim"), f"{out}.weight",
                                               layout="heads_out")
            ports[f"b_{suffix}o"] = self.param(f"{out}.bias", ("hidden",), f"{out}.bias")
        return ports

    def feed_forward(self, h: str, p: str, keys: tuple[str, str], scope: str) -> str:
        """FeedForward(gelu-approximate): Linear to mlp_ratio * hidden, GELU-tanh, Linear back."""
        n = TRACE
        dims = self.g.tensors[h].dims
        fc1 = self.linear(h, p + n.fc1, "mlp", keys[0], "pointwise MLP", scope)
        gelu = self.act(p + n.gelu, ("mlp",) + dims[1:])
        self.node("act", {"x": fc1}, {"y": gelu}, "pointwise MLP", scope, Activation("gelutanh"))
        return self.linear(gelu, p + n.mlp, "hidden", keys[1], "pointwise MLP", scope)

    def block(self, i: int, key_prefix: str, x: str, c_silu: str) -> str:
        """JointTransformerBlock i: reads the joint sequence, returns it (the image stream alone from the
        last block, context_pre_only)."""
        k, n, m = self.keys, TRACE, self.spec.model
        pre = i == m.depth - 1
        p, cp = n.block.format(i=i), n.block.format(i=i) + NAMES.c_prefix
        scope = key_prefix
        tokens = self.g.axes["tokens"].size
        image = self.slice(x, 0, p + NAMES.x, TOKENS, "joint attention", scope)
        context = self.slice(x, tokens, cp + NAMES.x, CONTEXT, "joint attention", scope)
        mod = self.adaln(c_silu, k.adaln.format(b=key_prefix), p, ADALN_CHUNKS, "adaLN modulation")
        c_chunks = tuple(NAMES.c_prefix + c for c in (CONTINUOUS_CHUNKS if pre else ADALN_CHUNKS))
        c_mod = self.adaln(c_silu, k.context_adaln.format(b=key_prefix), p, c_chunks, "adaLN modulation")
        c_mod = {name[len(NAMES.c_prefix):]: tensor for name, tensor in c_mod.items()}
        h = self.modulated(image, p + n.mod_msa, mod["shift_msa"], mod["scale_msa"], f"{scope}.norm1")
        hc = self.modulated(context, cp + n.mod_msa, c_mod["shift_msa" if not pre else "shift"],
                            c_mod["scale_msa" if not pre else "scale"], f"{scope}.norm1_context")
        ports = {"x": h, "c": hc} | self.projections(k.attn_in, k.attn_out, key_prefix, "") \
            | self.projections(k.context_in, None if pre else k.context_out, key_prefix, "a")
        if m.attention.qk_norm == "rms_norm":   # SD3.5: RMSNorm of each head's q and k, per stream
            for port, key in zip(("n_q", "n_k", "n_aq", "n_ak"), k.qk_norm):
                key = key.format(b=key_prefix)
                ports[port] = self.param(f"{key}.weight", ("head_dim",), f"{key}.weight")
        attn_scope = f"{scope}.attn"
        kind = "joint_attention_pre" if pre else "joint_attention"
        ports = {port: ports[port] for port in OPS[kind].inputs if port in ports}
        if pre:
            attn = self.act(p + n.attn)
            self.node("joint_attention_pre", ports, {"y": attn}, "joint attention", attn_scope, Norm(EPS))
        else:
            joint = self.act(p + NAMES.joint_attn, JOINT)
            self.node("joint_attention", ports, {"y": joint}, "joint attention", attn_scope, Norm(EPS))
            attn = self.slice(joint, 0, p + n.attn, TOKENS, "joint attention", attn_scope)
            c_attn = self.slice(joint, tokens, cp + n.attn, CONTEXT, "joint attention", attn_scope)
        # the chain each block passes on is `out`: the joint sequence, the image stream's from the last block
        out = self.stream(image, attn, mod, p, p + (n.out if pre else NAMES.x_out), (k.fc1, k.fc2), key_prefix,
                          scope, "ff")
        if pre:
            return out
        c_out = self.stream(context, c_attn, c_mod, cp, cp + n.out, (k.context_fc1, k.context_fc2), key_prefix,
                            scope, "ff_context")
        joined = self.act(p + n.out, JOINT)
        self.node("token_join", {"a": out, "b": c_out}, {"y": joined}, "joint attention", scope)
        return joined

    def stream(self, x: str, attn: str, mod: dict[str, str], p: str, out: str, ff_keys: tuple[str, str],
               key_prefix: str, scope: str, ff: str) -> str:
        """One stream's gated attention residual and its MLP branch (norm2, modulate, MLP, gated residual)."""
        n = TRACE
        x_attn = self.gated(x, attn, mod["gate_msa"], p + n.res_msa, scope)
        h = self.modulated(x_attn, p + n.mod_mlp, mod["shift_mlp"], mod["scale_mlp"], scope)
        mlp = self.feed_forward(h, p, tuple(key.format(b=key_prefix) for key in ff_keys), f"{scope}.{ff}")
        return self.gated(x_attn, mlp, mod["gate_mlp"], out, scope)

    def final_layer(self, x: str, c_silu: str) -> None:
        """norm_out (AdaLayerNormContinuous: scale, then shift), proj_out, unpatchify."""
        g, k, n = self.g, self.keys, TRACE
        f = n.final
        mod = self.adaln(c_silu, k.final_adaln, f, CONTINUOUS_CHUNKS, "final layer")
        norm = self.norm("layer_norm", x, f + n.final_norm, EPS, "final layer", "norm_out")
        h = self.act(f + n.final_mod)
        self.node("modulate", {"x": norm, "shift": mod["shift"], "scale": mod["scale"]}, {"y": h}, "final layer",
                  "norm_out")
        patches = self.linear(h, f + n.final_out, "out_dim", k.final_linear, "final layer", "proj_out")
        out = g.tensor(n.image_out, ("batch", "out_channels", "height", "width"), "activation")
        self.node("unpatchify", {"x": patches}, {"y": out}, "final layer", "proj_out",
                  Patch(self.spec.model.patch_size))
        g.outputs = [out]
