"""`ditc export RUN --diffusers DIR`: trained weights as a diffusers model folder (`DiTTransformer2DModel`;
`PixArtTransformer2DModel` for conditioning adaln_single: `checks.oracle.build_diffusers` picks the class).

Only flavor `diffusers` exports: its reference's state_dict is diffusers' own, key for key. A flavor
`dit` model differs from anything diffusers can load (its timestep frequencies use shift 0, diffusers'
embedder fixes 1), so it is refused with the reason rather than exported approximately.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dit_compiler.checks.oracle import build_diffusers
from dit_compiler.compiler.graph.ir import Graph
from dit_compiler.errors import UsageError
from dit_compiler.files import write_folder_atomic


def export_diffusers(graph: Graph, weights: dict[str, np.ndarray], out: Path, source: str) -> Path:
    """Write `out/` with `save_pretrained`, whole or not at all (a failed export leaves no folder to refuse a
    rerun); the class's `from_pretrained(out)` gives the same outputs."""
    if graph.spec.model.flavor != "diffusers":
        raise UsageError(f"{source}: flavor {graph.spec.model.flavor!r} has no exact diffusers counterpart (DiT's "
                         "timestep frequencies use shift 0, diffusers' embedder fixes 1); export needs a spec with "
                         "model.flavor: diffusers")
    model = build_diffusers(graph)
    if isinstance(model, str):
        raise UsageError(f"{source}: diffusers cannot express this model ({model})")
    if out.is_symlink() or (out.exists() and (not out.is_dir() or any(out.iterdir()))):
        raise UsageError(f"--diffusers {out}: exists and is not an empty folder; choose a new one")
    try:
        model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in weights.items()}, strict=True)
    except RuntimeError as error:
        raise UsageError(f"{source}: its weights do not fit this spec's model ({str(error).splitlines()[0]})") from None
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        write_folder_atomic(out, lambda staging: model.save_pretrained(str(staging), safe_serialization=True))
    except OSError as error:
        raise UsageError(f"--diffusers {out}: cannot be written ({error.strerror})") from None
    return out
