"""`conditioning: in_context`: the DiT paper's in-context conditioning (Figure 5, Section 3.2). The
timestep and class embeddings t_emb and y_emb join the patch tokens as two more tokens (after them), and
the blocks are plain pre-norm ViT blocks: x + attention(LayerNorm(x)), then x + MLP(LayerNorm(x)), the
LayerNorms without affine parameters (as DiT's) and nothing modulated.

After the blocks the two tokens are dropped. The final layer is DiT's in every design (LayerNorm,
shift and scale from SiLU(t_emb + y_emb), a linear to patch_size^2 x out_channels): its ops act per
token, so ditc runs them on the whole sequence and drops the two tokens after the final linear; the
patches' values are those of dropping them first. The `tokens` axis is the sequence (patches + 2, its
tile `tiling.tokens`); the patch embedding runs on the `patches` axis (the same tile)."""
from __future__ import annotations

from dit_compiler.compiler.designs.base import Lowering
from dit_compiler.compiler.naming import TRACE


class InContext(Lowering):
    patch_axis = "patches"

    def sequence(self, tokens: str) -> str:
        seq = self.act(TRACE.x_sequence)
        self.node("append_tokens", {"x": tokens, "a": self.t_emb, "b": self.y_emb}, {"y": seq},
                  "conditioning tokens", "in_context")
        return seq

    def final_patches(self, out: str) -> str:
        patches = self.act(TRACE.final + TRACE.final_patches, ("out_dim", "patches", "batch"))
        self.node("take_tokens", {"x": out}, {"y": patches}, "conditioning tokens", "in_context")
        return patches

    def block(self, i: int, key_prefix: str, x: str, c_silu: str) -> str:
        n, choices = TRACE, self.choices
        p = n.block.format(i=i)
        scope = p.rstrip(".")
        norm1 = self.norm("layer_norm", x, p + n.norm1, choices.attn_norm_eps, "layer norm", scope)
        x_attn = self.add(x, self.self_attention(norm1, p, key_prefix, scope), p + n.res_msa, "residual", scope)
        norm2 = self.norm("layer_norm", x_attn, p + n.norm2, choices.mlp_norm_eps, "layer norm", scope)
        return self.add(x_attn, self.mlp(norm2, p, key_prefix, scope), p + n.out, "residual", scope)
