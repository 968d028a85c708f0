"""NNTile 1.1.0's tensor kernels (`nntile.tensor`), imported on first use.

Layers call `kernels.gemm_async(...)`. Importing NNTile here lazily keeps the target's layer
declarations readable (by `ditc build` and `ditc inspect`) where NNTile is not installed; the first
kernel call imports it, and every later look-up finds the kernel in this module's namespace.
"""
from __future__ import annotations

import importlib
from typing import Any


def __getattr__(name: str) -> Any:
    if name.startswith("__"):  # tools probing a module's dunders must not import NNTile
        raise AttributeError(name)
    value = getattr(importlib.import_module("nntile.tensor"), name)
    globals()[name] = value
    return value
