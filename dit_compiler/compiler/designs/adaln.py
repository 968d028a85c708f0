"""`conditioning: adaln`: the DiT paper's adaLN block (Figure 5, Section 3.2): adaLN-Zero's shift and
scale regressed from SiLU(c), without the gates (a gate fixed at 1): SiLU(c) projects to four chunks,
shift and scale of each branch (`adaLN_modulation.1` has 4 x hidden_size rows), and each residual is a
plain sum. The final layer is DiT's."""
from __future__ import annotations

from dit_compiler.compiler.designs.adaln_zero import AdaLNZero
from dit_compiler.compiler.naming import ADALN_NO_GATE_CHUNKS


class AdaLN(AdaLNZero):
    GROUPS = {"adaLN": ("adaLN modulation", "layer norm", "modulate", "residual")}
    CHUNKS = ADALN_NO_GATE_CHUNKS

    def residual(self, x: str, h: str, mod: dict[str, str], branch: str, out: str, scope: str) -> str:
        return self.add(x, h, out, "residual", scope)
