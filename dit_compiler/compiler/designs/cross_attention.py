"""`conditioning: cross_attention`: the DiT paper's cross-attention block (Figure 5, Section 3.2). The
timestep and class embeddings form a 2-token context [t_emb, y_emb] (the `context` axis); each block is
x + attention(LayerNorm(x)), then x + cross-attention(LayerNorm(x), context) (queries from the tokens,
keys and values from the context, each its own projection), then x + MLP(LayerNorm(x)); the LayerNorms
have no affine parameters and nothing is modulated (diffusers' BasicTransformerBlock with norm_type
layer_norm and cross_attention_dim = hidden_size, without affine norms). The final layer is DiT's."""
from __future__ import annotations

from dit_compiler.compiler.designs.base import Lowering
from dit_compiler.compiler.naming import TRACE


class CrossAttention(Lowering):

    def sequence(self, tokens: str) -> str:
        self.context = self.act(TRACE.context, ("hidden", "context", "batch"))
        self.node("append_tokens", {"a": self.t_emb, "b": self.y_emb}, {"y": self.context}, "conditioning tokens",
                  "cross_attention")
        return tokens

    def block(self, i: int, key_prefix: str, x: str, c_silu: str) -> str:
        n, choices = TRACE, self.choices
        p = n.block.format(i=i)
        scope = p.rstrip(".")
        norm1 = self.norm("layer_norm", x, p + n.norm1, choices.attn_norm_eps, "layer norm", scope)
        x_attn = self.add(x, self.self_attention(norm1, p, key_prefix, scope), p + n.res_msa, "residual", scope)
        norm_cross = self.norm("layer_norm", x_attn, p + n.norm_cross, choices.attn_norm_eps, "layer norm", scope)
        cross = self.act(p + n.cross_attn)
        self.node("cross_attention", {"x": norm_cross, "context": self.context}
                  | self.attention_params(key_prefix, self.keys.cross_attn_in, self.keys.cross_attn_out)
                  | self.qk_norm_params(self.keys.cross_qk_norm, key_prefix),
                  {"y": cross}, "cross-attention", f"{scope}.cross_attn", self.heads())
        x_cross = self.add(x_attn, cross, p + n.res_cross, "residual", scope)
        norm2 = self.norm("layer_norm", x_cross, p + n.norm2, choices.mlp_norm_eps, "layer norm", scope)
        return self.add(x_cross, self.mlp(norm2, p, key_prefix, scope), p + n.out, "residual", scope)
