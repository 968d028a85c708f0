"""The torch reference target: every op kind's torch code (`ops`, `functions`) and the emitter that
walks the block-folded graph into `torch_reference.py` (`emitter`). Building never imports torch: the
emitter copies `functions.py`'s code by its source text."""
from __future__ import annotations

import types


def import_diffusers() -> types.ModuleType:
    """diffusers, able to save and load weights: every use of diffusers in ditc (and its tests) imports it here.

    diffusers 0.32 saves and loads safetensors files through `safetensors.torch` without importing that
    submodule; it works only where something else imported it first (accelerate or transformers, which
    NNTile imports). Without them `save_pretrained` and `from_pretrained` fail with "module 'safetensors'
    has no attribute 'torch'", so it is imported here, before diffusers is used."""
    import safetensors.torch  # noqa: F401  (see the docstring: diffusers needs it imported)

    import diffusers

    return diffusers
