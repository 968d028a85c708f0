"""Code-generation targets: one package per runtime version ditc emits for.

A target package provides its runtime (ordinary modules the generated model imports) and its emitter.
Everything specific to a target's runtime lives inside its package and its templates; nothing else in
ditc imports the runtime (NNTile) itself. See the README, "Adding a target".
"""
from __future__ import annotations

import importlib
from types import ModuleType

#: Spec `target:` value -> the package that implements it.
TARGETS: dict[str, str] = {
    "nntile-1.1": "dit_compiler.compiler.targets.nntile_1_1",
}
DEFAULT = "nntile-1.1"


def get(name: str) -> ModuleType:
    """The target package named `name` (a spec's `target:`)."""
    return importlib.import_module(TARGETS[name])
