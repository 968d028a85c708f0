"""Shared fixtures. NNTile tests skip, saying why, where `import nntile` fails."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SPECS = ROOT / "specs"

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("STARPU_SILENT", "1")


def _nntile_problem() -> str | None:
    try:
        import nntile  # noqa: F401
    except Exception as error:  # a missing or broken build
        return f"NNTile is not importable here ({type(error).__name__}: {error}); see README, 'NNTile'"
    return None


NNTILE_PROBLEM = _nntile_problem()
needs_nntile = pytest.mark.skipif(NNTILE_PROBLEM is not None, reason=NNTILE_PROBLEM or "")
#: Out-of-core compiles a small C library (`dit_compiler.compiler.targets.nntile_1_1.ooc`).
needs_cc = pytest.mark.skipif(shutil.which(os.environ.get("CC", "cc")) is None,
                              reason="out-of-core compiles a small C library, and there is no C compiler ($CC or cc)")


def ditc_without_transformers(args: list[str]) -> subprocess.CompletedProcess:
    """`ditc ARGS` in a new process where `transformers` and `accelerate` cannot be imported, as on a machine
    without NNTile (whose imports load transformers, and with it `safetensors.torch`, hiding a diffusers that
    uses it unimported)."""
    code = ("import sys; sys.modules['transformers'] = sys.modules['accelerate'] = None; "
            "from dit_compiler.cli import main; sys.exit(main(sys.argv[1:]))")
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          env=os.environ | {"PYTHONPATH": str(ROOT)})
