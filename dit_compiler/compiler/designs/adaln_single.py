"""`conditioning: adaln_single`: PixArt-alpha's block (arXiv:2310.00426, Section 2.3), as diffusers'
`PixArtTransformer2DModel` computes it.

- adaLN-single: one timestep MLP (sinusoid 256 -> Linear -> SiLU -> Linear: `t_cond`) and one
  projection SiLU(t_cond) -> 6 D shared by every block; block i adds its learned `scale_shift_table`
  [6, D] row by row (`add_fiber`) to get its shift, scale and gate of each branch.
- Captions [W, L, N] are projected to D (Linear, GELU-tanh, Linear) once; every block attends to them
  after self-attention, without a norm or a gate (`x + CrossAttn(x, captions, mask)`).
- The MLP branch: LayerNorm, modulate, GELU-tanh MLP, gated residual, as DiT's.
- The final layer: LayerNorm, modulate with shift and scale = t_cond + the model's own table [2, D]
  (no projection), Linear to the patch outputs.
- Size conditioning (PixArt 1024, `use_additional_conditions`): the resolution (h, w) and the aspect
  ratio each through a sinusoid and an MLP to D/3, laid side by side and added to the timestep
  embedding (`add_rows`). The resolution embedder reads h and w in one batch of 2 N (all h, then all w:
  axis `size_pairs`), so its weights have one reader.
"""
from __future__ import annotations

from dit_compiler.compiler.designs.base import VECTOR, Lowering, MAX_PERIOD
from dit_compiler.compiler.graph.ir import Axis, Graph, ParamSource
from dit_compiler.compiler.graph.ops import Activation, Heads, Patch, Rows, Sinusoid
from dit_compiler.compiler.naming import ADALN_CHUNKS, FINAL_CHUNKS, TRACE, flavor_of
from dit_compiler.compiler.spec.model import Spec

CONTEXT = ("hidden", "context", "batch")


class AdaLNSingle(Lowering):
    def __init__(self, spec: Spec):
        super().__init__(spec)
        self.flavor = flavor_of(spec.model)
        self.keys = self.flavor.keys
        m = spec.model
        if m.size_conditioning:   # whole (untiled) axes of the size embeddings
            self.g.axes["size_hidden"] = Axis("size_hidden", m.hidden_size // 3, m.hidden_size // 3)
            self.g.axes["size_pairs"] = Axis("size_pairs", 2 * spec.batch, 2 * spec.batch)

    def lower(self) -> Graph:
        g, m, n, k = self.g, self.spec.model, TRACE, self.keys
        x = g.tensor(n.x, ("batch", "in_channels", "height", "width"), "input")
        t = g.tensor(n.t, ("batch",), "input")
        caption = g.tensor(n.caption, ("caption", "context", "batch"), "input")
        g.inputs = [x, t, caption]
        mask = g.tensor(n.caption_mask, ("context", "batch"), "input") if m.caption.mask else None
        g.inputs += [mask] if mask else []
        if m.size_conditioning:
            g.inputs += [g.tensor(n.resolution, (2, "batch"), "input"), g.tensor(n.aspect_ratio, ("batch",), "input")]

        tokens = self.embed_patches(x)
        t_cond = self.timestep_condition(t, g.inputs[-2:] if m.size_conditioning else None)
        t_silu = self.act(n.c_silu, VECTOR)
        self.node("act", {"x": t_cond}, {"y": t_silu}, "adaLN-single", "adaln_single", Activation("silu"))
        shared = self.adaln(t_silu, k.adaln, n.t_mod, ADALN_CHUNKS, "adaLN-single")
        context = self.project_captions(caption)
        for i in range(m.depth):
            self.block_index = i
            tokens = self.pixart_block(i, k.block.format(i=i), tokens, shared, context, mask)
        self.block_index = None
        self.final_layer(tokens, t_cond)
        return g

    # -- embeddings ---------------------------------------------------------------------------
    def mlp_embedder(self, freq: str, name: str, out_axis: str, key1: str, key2: str, scope: str) -> str:
        """diffusers' TimestepEmbedding: Linear, SiLU, Linear (outputs `name`_hidden, _act, _emb)."""
        n = TRACE
        dims = (out_axis,) + self.g.tensors[freq].dims[1:]
        h = self.linear(freq, n.size_hidden.format(name), out_axis, key1, "embeddings", scope)
        h_act = self.act(n.size_act.format(name), dims)
        self.node("act", {"x": h}, {"y": h_act}, "embeddings", scope, Activation("silu"))
        return self.linear(h_act, n.size_emb.format(name), out_axis, key2, "embeddings", scope)

    def sinusoid(self, t: str, out: str, dims: tuple[str, str]) -> str:
        """PixArt's `Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)`: [cos, sin], shift 0."""
        freq = self.act(out, dims)
        self.node("timestep_sinusoid", {"t": t}, {"y": freq}, "embeddings", "adaln_single.emb",
                  Sinusoid(MAX_PERIOD, 0))
        return freq

    def timestep_condition(self, t: str, size: list[str] | None) -> str:
        """The embedded timestep [D, N] (`embedded_timestep`), plus the size embeddings where they exist."""
        k, n = self.keys, TRACE
        t_freq = self.sinusoid(t, n.t_freq, ("frequency", "batch"))
        t_emb = self.mlp_embedder(t_freq, "t", "hidden", k.t_linear1, k.t_linear2, "adaln_single.emb.timestep_embedder")
        if size is None:
            return t_emb
        third = self.spec.model.hidden_size // 3
        cond = t_emb
        for j, (name, axis) in enumerate(((n.resolution, "size_pairs"), (n.aspect_ratio, "batch"))):
            freq = self.sinusoid(size[j], n.size_freq.format(name), ("frequency", axis))
            emb = self.mlp_embedder(freq, name, "size_hidden", k.size_linear1.format(name), k.size_linear2.format(name),
                                    f"adaln_single.emb.{name}_embedder")
            out = self.act(n.t_cond if j == 1 else f"{n.t_cond}.{name}", VECTOR)
            self.node("add_rows", {"x": cond, "h": emb}, {"y": out}, "embeddings", "adaln_single.emb",
                      Rows(2 * third * j))
            cond = out
        return cond

    def project_captions(self, caption: str) -> str:
        """`caption_projection`: Linear(W, D), GELU-tanh, Linear(D, D) over every caption token."""
        k, n = self.keys, TRACE
        h = self.linear(caption, n.caption_hidden, "hidden", k.caption_linear1, "caption projection",
                        "caption_projection")
        h_act = self.act(n.caption_act, CONTEXT)
        self.node("act", {"x": h}, {"y": h_act}, "caption projection", "caption_projection", Activation("gelutanh"))
        return self.linear(h_act, n.caption_emb, "hidden", k.caption_linear2, "caption projection", "caption_projection")

    def table_row(self, key: str, rows: int, row: int, name: str) -> str:
        """Row `row` of the learned table `key` [rows, D], a [hidden] parameter."""
        d = self.spec.model.hidden_size
        source = ParamSource(key, (rows, d), (row, row + 1))
        return self.g.tensor(f"{key}.{name}", ("hidden",), "param", source=source, block=self.block_index)

    # -- the block ----------------------------------------------------------------------------
    def pixart_block(self, i: int, key_prefix: str, x: str, shared: dict[str, str], context: str,
                     mask: str | None) -> str:
        n, k, m = TRACE, self.keys, self.spec.model
        p = n.block.format(i=i)
        scope = p.rstrip(".")
        table = k.table.format(b=key_prefix)
        mod = {}
        for row, name in enumerate(ADALN_CHUNKS):
            mod[name] = self.act(p + n.table + name, VECTOR)
            self.node("add_fiber", {"x": shared[name], "b": self.table_row(table, len(ADALN_CHUNKS), row, name)},
                      {"y": mod[name]}, "adaLN-single", scope)
        # self-attention branch
        norm1 = self.norm("layer_norm", x, p + n.norm1, m.norm_eps, "layer norm", scope)
        h = self.act(p + n.mod_msa)
        self.node("modulate", {"x": norm1, "shift": mod["shift_msa"], "scale": mod["scale_msa"]}, {"y": h},
                  "modulate", scope)
        attn = self.self_attention(h, p, key_prefix, scope)
        x_attn = self.act(p + n.res_msa)
        self.node("gated_residual", {"x": x, "h": attn, "gate": mod["gate_msa"]}, {"y": x_attn}, "gated residual",
                  scope)
        # cross-attention to the captions: no norm, no gate
        cross = self.caption_attention(x_attn, context, mask, p, key_prefix, scope)
        x_cross = self.act(p + n.res_cross)
        self.node("add", {"a": x_attn, "b": cross}, {"y": x_cross}, "cross-attention", scope)
        # MLP branch
        norm2 = self.norm("layer_norm", x_cross, p + n.norm2, m.norm_eps, "layer norm", scope)
        h = self.act(p + n.mod_mlp)
        self.node("modulate", {"x": norm2, "shift": mod["shift_mlp"], "scale": mod["scale_mlp"]}, {"y": h},
                  "modulate", scope)
        mlp = self.mlp(h, p, key_prefix, scope)
        out = self.act(p + n.out)
        self.node("gated_residual", {"x": x_cross, "h": mlp, "gate": mod["gate_mlp"]}, {"y": out}, "gated residual",
                  scope)
        return out

    def caption_attention(self, x: str, context: str, mask: str | None, p: str, key_prefix: str, scope: str) -> str:
        """`attn2`: queries from the tokens, keys and values from the projected captions, padded ones masked."""
        attn = self.act(p + TRACE.cross)
        ports = {"x": x, "context": context} | ({"mask": mask} if mask else {})
        ports |= self.attention_params(key_prefix, self.keys.cross_attn_in, self.keys.cross_attn_out)
        self.node("cross_attention", ports, {"y": attn}, "cross-attention", f"{scope}.attn2", Heads())
        return attn

    # -- the final layer ----------------------------------------------------------------------
    def final_layer(self, x: str, t_cond: str) -> None:
        g, k, n = self.g, self.keys, TRACE
        f = n.final
        mod = {}
        for row, name in enumerate(FINAL_CHUNKS):
            mod[name] = self.act(f + name, VECTOR)
            self.node("add_fiber", {"x": t_cond, "b": self.table_row(k.final_table, len(FINAL_CHUNKS), row, name)},
                      {"y": mod[name]}, "final layer", "final_layer")
        norm = self.norm("layer_norm", x, f + n.final_norm, self.choices.final_norm_eps, "final layer", "final_layer")
        h = self.act(f + n.final_mod)
        self.node("modulate", {"x": norm, "shift": mod["shift"], "scale": mod["scale"]}, {"y": h}, "final layer",
                  "final_layer")
        patches = self.linear(h, f + n.final_out, "out_dim", k.final_linear, "final layer", "final_layer")
        out = g.tensor(n.image_out, ("batch", "out_channels", "height", "width"), "activation")
        self.node("unpatchify", {"x": patches}, {"y": out}, "final layer", "final_layer",
                  Patch(self.spec.model.patch_size))
        g.outputs = [out]
