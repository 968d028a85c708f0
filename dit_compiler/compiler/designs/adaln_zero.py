"""`conditioning: adaln_zero`: facebookresearch/DiT's block (the DiT paper's Figure 5, right). SiLU(c)
projects to six chunks: shift, scale and gate of each branch; the branches are LayerNorm (no affine),
modulate, attention or the MLP, and a gated residual."""
from __future__ import annotations

from typing import ClassVar

from dit_compiler.compiler.designs.base import Lowering
from dit_compiler.compiler.naming import ADALN_CHUNKS, TRACE


class AdaLNZero(Lowering):
    GROUPS = {"adaLN-Zero": ("adaLN modulation", "layer norm", "modulate", "gated residual")}
    #: The adaLN projection's row blocks.
    CHUNKS: ClassVar[tuple[str, ...]] = ADALN_CHUNKS

    def residual(self, x: str, h: str, mod: dict[str, str], branch: str, out: str, scope: str) -> str:
        """x + gate * h, the branch's gate broadcast over the tokens."""
        y = self.act(out)
        self.node("gated_residual", {"x": x, "h": h, "gate": mod[f"gate_{branch}"]}, {"y": y}, "gated residual",
                  scope)
        return y

    def block(self, i: int, key_prefix: str, x: str, c_silu: str) -> str:
        k, n, choices = self.keys, TRACE, self.choices
        p = n.block.format(i=i)
        scope = p.rstrip(".")
        mod = self.adaln(c_silu, k.adaln.format(b=key_prefix), p, self.CHUNKS, "adaLN modulation")
        # attention branch
        norm1 = self.norm("layer_norm", x, p + n.norm1, choices.attn_norm_eps, "layer norm", scope)
        h = self.act(p + n.mod_msa)
        self.node("modulate", {"x": norm1, "shift": mod["shift_msa"], "scale": mod["scale_msa"]}, {"y": h},
                  "modulate", scope)
        attn = self.self_attention(h, p, key_prefix, scope)
        x_attn = self.residual(x, attn, mod, "msa", p + n.res_msa, scope)
        # MLP branch
        norm2 = self.norm("layer_norm", x_attn, p + n.norm2, choices.mlp_norm_eps, "layer norm", scope)
        h = self.act(p + n.mod_mlp)
        self.node("modulate", {"x": norm2, "shift": mod["shift_mlp"], "scale": mod["scale_mlp"]}, {"y": h},
                  "modulate", scope)
        mlp = self.mlp(h, p, key_prefix, scope)
        return self.residual(x_attn, mlp, mod, "mlp", p + n.out, scope)
