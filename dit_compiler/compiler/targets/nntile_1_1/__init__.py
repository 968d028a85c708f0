"""ditc's NNTile 1.1 target: the runtime a generated `nntile_model.py` imports, and its emitter.

Runtime (ordinary, tested modules; NNTile itself is imported on first use, see `kernels`):
`runtime` (StarPU start and stop, waiting, pausing), `alloc` (tensors), `layers` (one class per op
kind), `optim` (AdamW), `host` (numpy-side ops), `plan` (the memory plan), `model` (the base class of
every generated model), `memory` (the predicted peak of a training step), `ooc` (out-of-core under a
memory limit), `native` (ditc's own CPU kernels, and which kernel set a model runs), `blas` (the BLAS
NNTile's GEMMs run on). Compiler side: `prepare` (the graph pass that adds the layers' own tensors) and
`emit` (the jinja2 emitter in `emitter`, `templates/nntile-1.1/`). Command line and environment: its
runner options (`add_arguments`, `settings`) and its StarPU workers (`worker_environment`). The package
implements `dit_compiler.compiler.targets.base.Target`.
"""
from __future__ import annotations

import argparse
from collections.abc import Callable

from dit_compiler import __version__
from dit_compiler.compiler.graph.ir import Graph
from dit_compiler.compiler.graph.passes import attach_internals
from dit_compiler.compiler.posembed import crop_pos_embed, sincos_pos_embed
from dit_compiler.compiler.targets.nntile_1_1 import blas, native
from dit_compiler.compiler.targets.nntile_1_1.blas import apply_requested_core as apply_blas_core
from dit_compiler.compiler.targets.nntile_1_1.emitter import check_layers, emit_model
from dit_compiler.compiler.targets.nntile_1_1.host import (Geometry, patchify, patchify_grad, timestep_features,
                                                           unpatchify, unpatchify_grad)
from dit_compiler.compiler.targets.nntile_1_1.layers import LAYERS
from dit_compiler.compiler.targets.nntile_1_1.memory import StepMemory, predict, unmovable_bytes
from dit_compiler.compiler.targets.nntile_1_1.model import Decl, Model, param
from dit_compiler.compiler.targets.nntile_1_1.native import (KERNEL_SETS, available as kernel_sets,
                                                             kernels as choose_kernels)
from dit_compiler.compiler.targets.nntile_1_1.ooc import (LimitCheck, OutOfCore, OutOfCoreError, check_limit,
                                                          out_of_core)
from dit_compiler.compiler.targets.nntile_1_1.runtime import (NAME, NNTILE_VERSION, RUNTIME_VERSION, WORKERS,
                                                              WORKERS_HELP, check_environment,
                                                              default_workers, installed, nntile_runtime, pause,
                                                              problem, requested_workers, resume, scheduler,
                                                              wait_for_all, worker_environment)

#: The training and sampling backend (`dit_compiler.app.backend`), imported when opened.
BACKEND = "dit_compiler.compiler.targets.nntile_1_1.backend:NNTileBackend"

__all__ = ["Decl", "Geometry", "KERNEL_SETS", "LimitCheck", "Model", "NAME", "NNTILE_VERSION", "OutOfCore",
           "OutOfCoreError", "RUNTIME_VERSION", "StepMemory", "WORKERS", "WORKERS_HELP", "add_arguments",
           "apply_blas_core", "blas_report", "check_environment", "check_limit", "choose_kernels", "crop_pos_embed",
           "default_workers",
           "emit", "faster_blas", "gemm", "installed", "kernel_sets", "nntile_runtime", "out_of_core", "param",
           "patchify", "patchify_grad", "pause", "predict", "prepare", "problem", "require", "requested_workers",
           "resume", "scheduler", "settings", "sincos_pos_embed", "timestep_features", "unmovable_bytes", "unpatchify",
           "unpatchify_grad", "wait_for_all", "worker_environment"]


def require(version: int) -> None:
    """Called by a generated model: fail clearly when it was made for another version of this runtime."""
    if version != RUNTIME_VERSION:
        raise ImportError(f"this NNTile model was generated for version {version} of ditc's {NAME} runtime, "
                          f"but the installed ditc {__version__} provides version {RUNTIME_VERSION}; "
                          "rebuild it with `ditc build SPEC`")


def gemm(m: int, n: int, k: int) -> Callable[[], None]:
    """One fp32 GEMM [m, k] x [k, n] on the BLAS NNTile's GEMMs call, on the calling thread, as a call to time."""
    blas.one_thread_per_call()
    return blas.sgemm(m, n, k)[0]


def blas_report() -> tuple[str, str | None, str | None]:
    """The BLAS NNTile's GEMMs call, in words, what to do where it runs below this CPU's vector
    instructions (None where nothing), and its OpenBLAS core (None where not OpenBLAS)."""
    found = blas.nntile_blas()
    return (found.describe() if found else "BLAS not found"), blas.advice(found), found.core if found else None


def faster_blas(core: str) -> tuple[str, dict[str, str]] | None:
    """Where NNTile ran OpenBLAS's `core` as the library or the machine chose it (not ditc, not
    --blas-core), the best core above it for this CPU that passes the GEMM check, and the environment
    variables that run it; else None. Run before NNTile loads here, or in a process that does not load it."""
    faster = blas.faster_core(core)
    return (faster, {"OPENBLAS_CORETYPE": faster, blas.ENV: faster}) if faster else None


def prepare(graph: Graph) -> None:
    """The target's graph pass: every layer's own tensors become graph tensors (`attach_internals`)."""
    check_layers()
    attach_internals(graph, LAYERS)


def emit(graph: Graph) -> str:
    """`nntile_model.py` for a prepared graph."""
    return emit_model(graph)


#: The runner options this target adds (`add_arguments`) -> the environment variable each is applied as.
OPTIONS = {"kernels": native.ENV, "blas_core": blas.ENV}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of a command that runs this target (verify, bench): its kernel set and BLAS core."""
    parser.add_argument("--kernels", choices=("auto", *native.KERNEL_SETS),
                        help=f"NNTile target: ditc's own CPU kernels or NNTile's (default: ${native.ENV}, else auto: "
                             "ditc's where they build)")
    parser.add_argument("--blas-core", metavar="CORE",
                        help="NNTile target: run OpenBLAS's CORE kernels (OPENBLAS_CORETYPE; auto: the one for this "
                             "CPU; none: the library's or $OPENBLAS_CORETYPE's) once a GEMM check against float64 "
                             f"passes (default: ${blas.ENV}; unset, with OPENBLAS_CORETYPE unset, the best checked "
                             "core where the library's is below this CPU)")


def settings(args: argparse.Namespace) -> dict[str, str]:
    """The options `add_arguments` added, as the environment this target reads where it starts (its runners'
    subprocesses inherit it); those not given are left out."""
    return {variable: getattr(args, option) for option, variable in OPTIONS.items() if getattr(args, option, None)}
