"""Lowering's common part: what every block design shares (the patch and timestep embeddings, the
label embedding, attention's and the MLP's parameters, the final layer) as `Lowering`, whose `block` each
design (a module of `dit_compiler.compiler.designs`, one per `model.conditioning`) writes.

Both flavors lower to the same op kinds; they differ in where parameters come from (state_dict keys,
`dit_compiler.compiler.naming`), in the timestep frequency shift, in the MLP-branch LayerNorm eps, and in
diffusers' per-block timestep and label embedders (the output head reuses block 0's conditioning, as
diffusers does).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from dit_compiler.compiler.graph.ir import Axis, Graph, Node, ParamSource
from dit_compiler.compiler.graph.ops import Activation, Heads, LabelDrop, Norm, Patch, Sinusoid
from dit_compiler.compiler.naming import FINAL_CHUNKS, FLAVORS, TRACE
from dit_compiler.compiler.spec.model import Spec
from dit_compiler.compiler.tiling import axis_sizes, out_channels, resolve_tiles

TOKENS = ("hidden", "tokens", "batch")
VECTOR = ("hidden", "batch")

MAX_PERIOD = 10000


def build_axes(spec: Spec) -> dict[str, Axis]:
    m = spec.model
    sizes = axis_sizes(m, spec.batch)
    tiles = resolve_tiles(m, spec.batch, spec.tiling)
    axes = {name: Axis(name, sizes[name], tiles[name]) for name in sizes}
    if m.conditioning == "in_context":   # the image's own tokens, before the 2 conditioning tokens join them
        axes["patches"] = Axis("patches", (m.input_size // m.patch_size) ** 2, tiles["tokens"])
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


@dataclass(frozen=True)
class _Choices:
    """What the flavors decide besides names, as node attributes take them."""

    frequency_shift: int         # 0 as DiT, 1 as diffusers' Timesteps(downscale_freq_shift=1)
    attn_norm_eps: float
    mlp_norm_eps: float
    final_norm_eps: float

    @classmethod
    def of(cls, spec: Spec) -> _Choices:
        m = spec.model
        diffusers = m.flavor == "diffusers"
        return cls(frequency_shift=1 if diffusers else 0, attn_norm_eps=1e-6 if diffusers else m.norm_eps,
                   mlp_norm_eps=m.norm_eps, final_norm_eps=1e-6 if diffusers else m.norm_eps)


class Lowering:
    """DiT's structure as graph nodes, less the block: a design's subclass writes `block` (and may
    change any other step: `sequence` before the blocks, `final_patches` after the final linear). Its
    helpers (`linear`, `norm`, `node`) are the hooks for more structure."""

    #: `ditc verify`'s rows made of several components of the blocks (a node's `component` names its own row).
    GROUPS: ClassVar[dict[str, tuple[str, ...]]] = {}
    #: The token axis of the patch embedding and of the final layer's output.
    patch_axis: ClassVar[str] = "tokens"

    def __init__(self, spec: Spec):
        self.spec = spec
        self.flavor = FLAVORS[spec.model.flavor]
        self.keys = self.flavor.keys
        self.choices = _Choices.of(spec)
        self.g = Graph(spec=spec, axes=build_axes(spec))
        self.block_index: int | None = None   # the block being lowered
        self.t_emb = self.y_emb = ""          # the last conditioning's timestep and label embeddings

    # -- helpers ------------------------------------------------------------------------------
    def act(self, name: str, dims: tuple[str, ...] = TOKENS) -> str:
        return self.g.tensor(name, dims, "activation", block=self.block_index)

    def param(self, name: str, dims: tuple[str, ...], key: str, rows: tuple[int, int] | None = None,
              layout: str = "same", torch_rows: int | None = None) -> str:
        """A parameter: `rows` of the torch tensor `key` (which has `torch_rows` rows), in `layout`."""
        shape = tuple(self.g.axes[d].size for d in dims)
        m = self.spec.model
        if layout == "transpose":
            torch_shape = shape[::-1]
        elif layout == "heads_in":       # [H, hd, ...] from [H*hd, ...]
            torch_shape = (shape[0] * shape[1],) + shape[2:]
        elif layout == "heads_out":      # [D, H, hd] from [D, H*hd]
            torch_shape = (shape[0], shape[1] * shape[2])
        elif layout == "conv":           # [d, C*p*p] from the conv weight [d, C, p, p]
            torch_shape = (shape[0], m.in_channels, m.patch_size, m.patch_size)
        else:
            torch_shape = shape
        if rows is not None:
            torch_shape = (torch_rows,) + torch_shape[1:]
        source = ParamSource(key, torch_shape, rows, layout)
        return self.g.tensor(name, dims, "param", source=source, block=self.block_index)

    def node(self, op: str, inputs: dict[str, str], outputs: dict[str, str], component: str, scope: str,
             attrs=None) -> None:
        name = next(iter(outputs.values()))
        self.g.add(Node(name, op, inputs, outputs, component, scope, self.block_index, attrs))

    def norm(self, op: str, x: str, out: str, eps: float, component: str, scope: str,
             weight_key: str | None = None) -> str:
        """A normalisation over the hidden axis: `layer_norm` (no parameters) or `rms_norm` (its weight
        at state_dict key `weight_key`.weight)."""
        y = self.act(out, self.g.tensors[x].dims)
        inputs = {"x": x}
        if weight_key is not None:
            inputs["weight"] = self.param(f"{weight_key}.weight", self.g.tensors[x].dims[:1], f"{weight_key}.weight")
        self.node(op, inputs, {"y": y}, component, scope, Norm(eps))
        return y

    def linear(self, x: str, out: str, out_axis: str, key: str, component: str, scope: str,
               rows: tuple[int, int] | None = None, suffix: str = "", layout: str = "same",
               torch_rows: int | None = None, bias: bool = True) -> str:
        """A torch Linear (or a row block of one, of a Linear with `torch_rows` outputs) as a graph linear node."""
        in_axis = self.g.tensors[x].dims[0]
        ports = {"x": x, "w": self.param(f"{key}.weight{suffix}", (out_axis, in_axis), f"{key}.weight", rows, layout,
                                         torch_rows)}
        if bias:
            ports["b"] = self.param(f"{key}.bias{suffix}", (out_axis,), f"{key}.bias", rows, torch_rows=torch_rows)
        y = self.act(out, (out_axis,) + self.g.tensors[x].dims[1:])
        self.node("linear", ports, {"y": y}, component, scope)
        return y

    # -- the model ----------------------------------------------------------------------------
    def lower(self) -> Graph:
        g, m, n = self.g, self.spec.model, TRACE
        x = g.tensor(n.x, ("batch", "in_channels", "height", "width"), "input")
        t = g.tensor(n.t, ("batch",), "input")
        y = g.tensor(n.y, ("batch",), "input", dtype="int64")
        g.inputs = [x, t, y]

        tokens = self.embed_patches(x)
        t_freq = self.act(n.t_freq, ("frequency", "batch"))
        self.node("timestep_sinusoid", {"t": t}, {"y": t_freq}, "embeddings", "t_embedder",
                  Sinusoid(MAX_PERIOD, self.choices.frequency_shift))
        shared_c = None if self.keys.per_block_conditioning else self.conditioning("", t_freq, y, "")
        tokens = self.sequence(tokens)
        first_c = None
        for i in range(m.depth):
            self.block_index = i
            prefix = self.keys.block.format(i=i)
            c_silu = shared_c or self.conditioning(n.block.format(i=i), t_freq, y, prefix)
            first_c = first_c or c_silu
            tokens = self.block(i, prefix, tokens, c_silu)
        self.block_index = None
        self.final_layer(tokens, first_c)
        return g

    def sequence(self, tokens: str) -> str:
        """The token stream the blocks read, from the embedded patches (DiT: the patches themselves)."""
        return tokens

    def final_patches(self, out: str) -> str:
        """The final linear's output per patch, from its output per token (DiT: the same)."""
        return out

    def embed_patches(self, x: str) -> str:
        g, n, key, axis = self.g, TRACE, self.keys.patch, self.patch_axis
        patches = self.act(n.x_patches, ("patch_dim", axis, "batch"))
        patch = Patch(self.spec.model.patch_size)
        self.node("patchify", {"x": x}, {"y": patches}, "embeddings", "x_embedder", patch)
        proj = self.linear(patches, n.x_proj, "hidden", key, "embeddings", "x_embedder", layout="conv")
        hidden, tokens = g.axes["hidden"].size, g.axes[axis].size
        pos = g.tensor(n.pos_embed, ("hidden", axis), "const",
                       source=ParamSource(self.flavor.pos_table, (1, tokens, hidden), layout="table",
                                          saved=self.flavor.pos_table_saved))
        tokens = self.act(n.x_tokens, ("hidden", axis, "batch"))
        self.node("add_const_slice", {"x": proj, "table": pos}, {"y": tokens}, "embeddings", "pos_embed")
        return tokens

    def conditioning(self, prefix: str, t_freq: str, y: str, block: str) -> str:
        """Timestep + label embedding and its SiLU: the `SiLU(c)` every adaLN linear reads."""
        k, n = self.keys, TRACE
        h = self.linear(t_freq, prefix + n.t_hidden, "hidden", k.t_linear1.format(b=block), "embeddings", "t_embedder")
        h_act = self.act(prefix + n.t_act, VECTOR)
        self.node("act", {"x": h}, {"y": h_act}, "embeddings", "t_embedder", Activation("silu"))
        t_emb = self.linear(h_act, prefix + n.t_emb, "hidden", k.t_linear2.format(b=block), "embeddings", "t_embedder")
        table_key = k.y_table.format(b=block)
        table = self.param(f"{table_key}.weight", ("hidden", "classes"), f"{table_key}.weight", layout="transpose")
        y_emb = self.act(prefix + n.y_emb, VECTOR)
        m = self.spec.model
        self.node("embedding", {"labels": y, "table": table}, {"y": y_emb}, "embeddings", "y_embedder",
                  LabelDrop(m.num_classes, m.class_dropout_prob))
        self.t_emb, self.y_emb = t_emb, y_emb
        c = self.act(prefix + n.c, VECTOR)
        self.node("add", {"a": t_emb, "b": y_emb}, {"y": c}, "embeddings", "conditioning")
        c_silu = self.act(prefix + n.c_silu, VECTOR)
        self.node("act", {"x": c}, {"y": c_silu}, "adaLN modulation", "conditioning", Activation("silu"))
        return c_silu

    def adaln(self, c_silu: str, key: str, prefix: str, chunks: tuple[str, ...], component: str) -> dict[str, str]:
        """adaLN projection as one linear node per chunk (NNTile has no split): rows k*d..(k+1)*d."""
        d = self.spec.model.hidden_size
        return {
            name: self.linear(c_silu, prefix + name, "hidden", key, component, prefix.rstrip("."),
                              rows=(k * d, (k + 1) * d), suffix=f".{name}", torch_rows=len(chunks) * d)
            for k, name in enumerate(chunks)
        }

    def block(self, i: int, key_prefix: str, x: str, c_silu: str) -> str:
        """Block i of the design: reads the token stream `x` and the conditioning, returns the stream."""
        raise NotImplementedError

    def add(self, a: str, b: str, out: str, component: str, scope: str) -> str:
        """y = a + b (a residual)."""
        y = self.act(out, self.g.tensors[a].dims)
        self.node("add", {"a": a, "b": b}, {"y": y}, component, scope)
        return y

    def self_attention(self, h: str, p: str, key_prefix: str, scope: str) -> str:
        """Multi-head self-attention of the tokens `h` (block prefix `p`)."""
        attn = self.act(p + TRACE.attn)
        ports = self.attention_params(key_prefix) | self.qk_norm_params(self.keys.qk_norm, key_prefix)
        self.node("attention", {"x": h} | ports, {"y": attn}, "attention", f"{scope}.attn", self.heads())
        return attn

    def heads(self) -> Heads:
        """Attention's options: model.attention.qk_norm, with eps model.norm_eps."""
        m = self.spec.model
        return Heads(qk_norm=m.attention.qk_norm, qk_eps=m.norm_eps)

    def qk_norm_params(self, keys: tuple[str, str], key_prefix: str) -> dict[str, str]:
        """QK norm's weights [head_dim] (and biases for layer_norm) at `keys` (the query's and the key's
        norm modules), or none without QK norm."""
        kind = self.spec.model.attention.qk_norm
        if kind == "none":
            return {}
        ports = {}
        for side, key in zip("qk", keys):
            module = key.format(b=key_prefix)
            ports[f"{side}_norm_w"] = self.param(f"{module}.weight", ("head_dim",), f"{module}.weight")
            if kind == "layer_norm":
                ports[f"{side}_norm_b"] = self.param(f"{module}.bias", ("head_dim",), f"{module}.bias")
        return {port: ports[port] for port in ("q_norm_w", "q_norm_b", "k_norm_w", "k_norm_b") if port in ports}

    def mlp(self, h: str, p: str, key_prefix: str, scope: str) -> str:
        """The pointwise MLP: fc1, the activation (model.mlp.activation), fc2; biases as model.mlp.bias."""
        k, n, options = self.keys, TRACE, self.spec.model.mlp
        fc1 = self.linear(h, p + n.fc1, "mlp", k.fc1.format(b=key_prefix), "pointwise MLP", f"{scope}.mlp",
                          bias=options.bias)
        gelu = self.act(p + n.gelu, ("mlp", "tokens", "batch"))
        fn = {"gelu_tanh": "gelutanh", "gelu": "gelu"}[options.activation]
        self.node("act", {"x": fc1}, {"y": gelu}, "pointwise MLP", f"{scope}.mlp", Activation(fn))
        return self.linear(gelu, p + n.mlp, "hidden", k.fc2.format(b=key_prefix), "pointwise MLP", f"{scope}.mlp",
                           bias=options.bias)

    def attention_params(self, key_prefix: str, attn_in: tuple[str, ...] | None = None,
                         attn_out: str | None = None) -> dict[str, str]:
        """q, k, v weights [heads, head_dim, hidden] and biases [heads, head_dim] (model.attention.bias), output
        weight and bias, at
        the keys `attn_in` (one fused qkv projection, or q, k and v) and `attn_out` (default: self-attention's)."""
        d = self.spec.model.hidden_size
        attn_in = attn_in or self.keys.attn_in
        fused = len(attn_in) == 1
        parts = [(part, attn_in[0 if fused else j].format(b=key_prefix),
                  (j * d, (j + 1) * d) if fused else None, f".{part}" if fused else "")
                 for j, part in enumerate("qkv")]
        torch_rows = 3 * d if fused else None
        ports = {f"w_{part}": self.param(f"{key}.weight{suffix}", ("heads", "head_dim", "hidden"), f"{key}.weight",
                                         rows, "heads_in", torch_rows) for part, key, rows, suffix in parts}
        bias = self.spec.model.attention.bias
        ports |= {f"b_{part}": self.param(f"{key}.bias{suffix}", ("heads", "head_dim"), f"{key}.bias", rows,
                                          "heads_in", torch_rows) for part, key, rows, suffix in parts if bias}
        out = (attn_out or self.keys.attn_out).format(b=key_prefix)
        ports["w_o"] = self.param(f"{out}.weight", ("hidden", "heads", "head_dim"), f"{out}.weight", layout="heads_out")
        if bias:
            ports["b_o"] = self.param(f"{out}.bias", ("hidden",), f"{out}.bias")
        return ports

    def final_layer(self, x: str, c_silu: str) -> None:
        g, k, n = self.g, self.keys, TRACE
        f = n.final
        mod = self.adaln(c_silu, k.final_adaln, f, FINAL_CHUNKS, "final layer")
        norm = self.norm("layer_norm", x, f + n.final_norm, self.choices.final_norm_eps, "final layer", "final_layer")
        h = self.act(f + n.final_mod)
        self.node("modulate", {"x": norm, "shift": mod["shift"], "scale": mod["scale"]}, {"y": h}, "final layer",
                  "final_layer")
        patches = self.final_patches(self.linear(h, f + n.final_out, "out_dim", k.final_linear, "final layer",
                                                 "final_layer"))
        out = g.tensor(n.image_out, ("batch", "out_channels", "height", "width"), "activation")
        self.node("unpatchify", {"x": patches}, {"y": out}, "final layer", "final_layer",
                  Patch(self.spec.model.patch_size))
        g.outputs = [out]

