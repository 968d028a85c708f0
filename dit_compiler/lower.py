"""Lowering: resolved spec -> operation graph. The only module that knows DiT's structure.

Both flavors lower to the same op kinds; they differ in where parameters come from (state_dict keys),
in the timestep frequency shift, in the MLP-branch LayerNorm eps, and in diffusers' per-block
timestep and label embedders (the output head reuses block 0's conditioning, as diffusers does).
"""
from __future__ import annotations

from dataclasses import dataclass

from dit_compiler.graph.ir import Axis, Graph, Node, ParamSource
from dit_compiler.spec.model import Spec
from dit_compiler.tiling import axis_sizes, out_channels, resolve_tiles

TOKENS = ("hidden", "tokens", "batch")
VECTOR = ("hidden", "batch")
ADALN_CHUNKS = ("shift_msa", "scale_msa", "gate_msa", "shift_mlp", "scale_mlp", "gate_mlp")
FINAL_CHUNKS = ("shift", "scale")

#: Verify-table rows, in the order a reader meets them in the model.
COMPONENTS = ("embeddings", "adaLN modulation", "layer norm", "modulate", "attention", "gated residual",
              "pointwise MLP", "final layer")


@dataclass(frozen=True)
class _Keys:
    """state_dict key layout of one flavor."""

    patch: str
    t_linear1: str
    t_linear2: str
    y_table: str
    block: str
    adaln: str
    attn_in: tuple[str, str, str] | str
    attn_out: str
    fc1: str
    fc2: str
    final_adaln: str
    final_linear: str


DIT_KEYS = _Keys(
    patch="x_embedder.proj", t_linear1="t_embedder.mlp.0", t_linear2="t_embedder.mlp.2",
    y_table="y_embedder.embedding_table", block="blocks.{i}", adaln="{b}.adaLN_modulation.1",
    attn_in="{b}.attn.qkv", attn_out="{b}.attn.proj", fc1="{b}.mlp.fc1", fc2="{b}.mlp.fc2",
    final_adaln="final_layer.adaLN_modulation.1", final_linear="final_layer.linear",
)
DIFFUSERS_KEYS = _Keys(
    patch="pos_embed.proj", t_linear1="{b}.norm1.emb.timestep_embedder.linear_1",
    t_linear2="{b}.norm1.emb.timestep_embedder.linear_2", y_table="{b}.norm1.emb.class_embedder.embedding_table",
    block="transformer_blocks.{i}", adaln="{b}.norm1.linear",
    attn_in=("{b}.attn1.to_q", "{b}.attn1.to_k", "{b}.attn1.to_v"), attn_out="{b}.attn1.to_out.0",
    fc1="{b}.ff.net.0.proj", fc2="{b}.ff.net.2", final_adaln="proj_out_1", final_linear="proj_out_2",
)


def build_axes(spec: Spec) -> dict[str, Axis]:
    m = spec.model
    sizes = axis_sizes(m, spec.batch)
    tiles = resolve_tiles(m, spec.batch, spec.tiling)
    axes = {name: Axis(name, sizes[name], tiles[name]) for name in sizes}
    # Axes that are never tiled: the head dimension, the class table and the host-side image axes.
    whole = {
        "head_dim": m.hidden_size // m.num_heads,
        # DiT adds the null row only when labels can drop; diffusers always has it.
        "classes": m.num_classes + int(m.flavor == "diffusers" or m.class_dropout_prob > 0),
        "in_channels": m.in_channels,
        "out_channels": out_channels(m),
        "height": m.input_size,
        "width": m.input_size,
    }
    axes.update({name: Axis(name, size, size) for name, size in whole.items()})
    return axes


class _Lowering:
    def __init__(self, spec: Spec):
        self.spec = spec
        self.keys = DIT_KEYS if spec.model.flavor == "dit" else DIFFUSERS_KEYS
        self.g = Graph(spec=spec, axes=build_axes(spec))

    # -- helpers ------------------------------------------------------------------------------
    def act(self, name: str, dims: tuple[str, ...] = TOKENS) -> str:
        return self.g.tensor(name, dims, "activation")

    def param(self, name: str, dims: tuple[str, ...], key: str, rows: tuple[int, int] | None = None,
              layout: str = "same") -> str:
        return self.g.tensor(name, dims, "param", source=ParamSource(key, rows, layout))

    def node(self, op: str, inputs: tuple[str, ...], outputs: tuple[str, ...], component: str,
             scope: str, **attrs) -> None:
        self.g.add(Node(outputs[0], op, inputs, outputs, component, scope, attrs))

    def linear(self, x: str, out: str, out_axis: str, key: str, component: str, scope: str,
               rows: tuple[int, int] | None = None, suffix: str = "", layout: str = "same") -> str:
        """A torch Linear (or a row block of one) as a graph linear node."""
        in_axis = self.g.tensors[x].dims[0]
        w = self.param(f"{key}.weight{suffix}", (out_axis, in_axis), f"{key}.weight", rows, layout)
        b = self.param(f"{key}.bias{suffix}", (out_axis,), f"{key}.bias", rows)
        y = self.act(out, (out_axis,) + self.g.tensors[x].dims[1:])
        self.node("linear", (x, w, b), (y,), component, scope)
        return y

    # -- the model ----------------------------------------------------------------------------
    def lower(self) -> Graph:
        g, m = self.g, self.spec.model
        flavor_diffusers = m.flavor == "diffusers"
        g.attrs = {
            "flavor": m.flavor,
            "frequency_shift": 1 if flavor_diffusers else 0,
            "max_period": 10000,
            "attn_norm_eps": 1e-6 if flavor_diffusers else m.norm_eps,
            "mlp_norm_eps": m.norm_eps,
            "final_norm_eps": 1e-6 if flavor_diffusers else m.norm_eps,
            "class_dropout_prob": m.class_dropout_prob,
            "num_classes": m.num_classes,
            "patch_size": m.patch_size,
            "depth": m.depth,
        }
        x = g.tensor("x", ("batch", "in_channels", "height", "width"), "input")
        t = g.tensor("t", ("batch",), "input")
        y = g.tensor("y", ("batch",), "input", dtype="int64")
        g.inputs = [x, t, y]

        tokens = self.embed_patches(x)
        t_freq = self.act("t_freq", ("frequency", "batch"))
        self.node("timestep_sinusoid", (t,), (t_freq,), "embeddings", "t_embedder",
                  max_period=g.attrs["max_period"], shift=g.attrs["frequency_shift"])
        shared_c = None if flavor_diffusers else self.conditioning("", t_freq, y, "")
        first_c = None
        for i in range(m.depth):
            prefix = self.keys.block.format(i=i)
            c_silu = shared_c or self.conditioning(f"blocks.{i}.", t_freq, y, prefix)
            first_c = first_c or c_silu
            tokens = self.block(i, prefix, tokens, c_silu)
        self.final_layer(tokens, first_c)
        return g

    def embed_patches(self, x: str) -> str:
        g, key = self.g, self.keys.patch
        patches = self.act("x_patches", ("patch_dim", "tokens", "batch"))
        self.node("patchify", (x,), (patches,), "embeddings", "x_embedder", patch_size=g.attrs["patch_size"])
        proj = self.linear(patches, "x_proj", "hidden", key, "embeddings", "x_embedder", layout="conv")
        pos = g.tensor("pos_embed", ("hidden", "tokens"), "const")
        tokens = self.act("x_tokens")
        self.node("add_const_slice", (proj, pos), (tokens,), "embeddings", "pos_embed", axis=2)
        return tokens

    def conditioning(self, prefix: str, t_freq: str, y: str, block: str) -> str:
        """Timestep + label embedding and its SiLU: the `SiLU(c)` every adaLN linear reads."""
        k = self.keys
        h = self.linear(t_freq, f"{prefix}t_hidden", "hidden", k.t_linear1.format(b=block), "embeddings", "t_embedder")
        h_act = self.act(f"{prefix}t_act", VECTOR)
        self.node("act", (h,), (h_act,), "embeddings", "t_embedder", fn="silu")
        t_emb = self.linear(h_act, f"{prefix}t_emb", "hidden", k.t_linear2.format(b=block), "embeddings", "t_embedder")
        table_key = k.y_table.format(b=block)
        table = self.param(f"{table_key}.weight", ("hidden", "classes"), f"{table_key}.weight", layout="transpose")
        y_emb = self.act(f"{prefix}y_emb", VECTOR)
        self.node("embedding", (y, table), (y_emb,), "embeddings", "y_embedder")
        c = self.act(f"{prefix}c", VECTOR)
        self.node("add", (t_emb, y_emb), (c,), "embeddings", "conditioning")
        c_silu = self.act(f"{prefix}c_silu", VECTOR)
        self.node("act", (c,), (c_silu,), "adaLN modulation", "conditioning", fn="silu")
        return c_silu

    def adaln(self, c_silu: str, key: str, prefix: str, chunks: tuple[str, ...], component: str) -> dict[str, str]:
        """adaLN projection as one linear node per chunk (NNTile has no split): rows k*d..(k+1)*d."""
        d = self.spec.model.hidden_size
        return {
            name: self.linear(c_silu, f"{prefix}{name}", "hidden", key, component, prefix.rstrip("."),
                              rows=(k * d, (k + 1) * d), suffix=f".{name}")
            for k, name in enumerate(chunks)
        }

    def block(self, i: int, key_prefix: str, x: str, c_silu: str) -> str:
        k, a = self.keys, self.g.attrs
        p = f"blocks.{i}."
        scope = f"blocks.{i}"
        mod = self.adaln(c_silu, k.adaln.format(b=key_prefix), p, ADALN_CHUNKS, "adaLN modulation")
        # attention branch
        norm1 = self.act(f"{p}norm1")
        self.node("layer_norm", (x,), (norm1,), "layer norm", scope, eps=a["attn_norm_eps"])
        h = self.act(f"{p}mod_msa")
        self.node("modulate", (norm1, mod["shift_msa"], mod["scale_msa"]), (h,), "modulate", scope)
        attn = self.act(f"{p}attn")
        self.node("attention", (h,) + self.attention_params(key_prefix), (attn,), "attention", f"{scope}.attn",
                  heads=self.spec.model.num_heads)
        x_attn = self.act(f"{p}res_msa")
        self.node("gated_residual", (x, attn, mod["gate_msa"]), (x_attn,), "gated residual", scope)
        # MLP branch
        norm2 = self.act(f"{p}norm2")
        self.node("layer_norm", (x_attn,), (norm2,), "layer norm", scope, eps=a["mlp_norm_eps"])
        h = self.act(f"{p}mod_mlp")
        self.node("modulate", (norm2, mod["shift_mlp"], mod["scale_mlp"]), (h,), "modulate", scope)
        fc1 = self.linear(h, f"{p}fc1", "mlp", k.fc1.format(b=key_prefix), "pointwise MLP", f"{scope}.mlp")
        gelu = self.act(f"{p}gelu", ("mlp", "tokens", "batch"))
        self.node("act", (fc1,), (gelu,), "pointwise MLP", f"{scope}.mlp", fn="gelutanh")
        mlp = self.linear(gelu, f"{p}mlp", "hidden", k.fc2.format(b=key_prefix), "pointwise MLP", f"{scope}.mlp")
        out = self.act(f"{p}out")
        self.node("gated_residual", (x_attn, mlp, mod["gate_mlp"]), (out,), "gated residual", scope)
        return out

    def attention_params(self, key_prefix: str) -> tuple[str, ...]:
        """q, k, v weights [heads, head_dim, hidden] and biases [heads, head_dim], output weight and bias."""
        d = self.spec.model.hidden_size
        fused = isinstance(self.keys.attn_in, str)
        weights, biases = [], []
        for j, part in enumerate("qkv"):
            key = (self.keys.attn_in if fused else self.keys.attn_in[j]).format(b=key_prefix)
            rows = (j * d, (j + 1) * d) if fused else None
            suffix = f".{part}" if fused else ""
            weights.append(self.param(f"{key}.weight{suffix}", ("heads", "head_dim", "hidden"), f"{key}.weight",
                                      rows, "heads_in"))
            biases.append(self.param(f"{key}.bias{suffix}", ("heads", "head_dim"), f"{key}.bias", rows))
        out = self.keys.attn_out.format(b=key_prefix)
        w_o = self.param(f"{out}.weight", ("hidden", "heads", "head_dim"), f"{out}.weight", layout="heads_out")
        b_o = self.param(f"{out}.bias", ("hidden",), f"{out}.bias")
        return (*weights, *biases, w_o, b_o)

    def final_layer(self, x: str, c_silu: str) -> None:
        g, k = self.g, self.keys
        mod = self.adaln(c_silu, k.final_adaln, "final.", FINAL_CHUNKS, "final layer")
        norm = self.act("final.norm")
        self.node("layer_norm", (x,), (norm,), "final layer", "final_layer", eps=g.attrs["final_norm_eps"])
        h = self.act("final.mod")
        self.node("modulate", (norm, mod["shift"], mod["scale"]), (h,), "final layer", "final_layer")
        patches = self.linear(h, "final.out", "out_dim", k.final_linear, "final layer", "final_layer")
        out = g.tensor("out", ("batch", "out_channels", "height", "width"), "activation")
        self.node("unpatchify", (patches,), (out,), "final layer", "final_layer", patch_size=g.attrs["patch_size"])
        g.outputs = [out]


def lower(spec: Spec) -> Graph:
    """Build the operation graph of `spec` and check it."""
    graph = _Lowering(spec).lower()
    graph.lint()
    return graph
