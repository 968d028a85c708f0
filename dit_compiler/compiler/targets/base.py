"""What a target provides: the interface every target package implements (`Target`), and the types its
training backend shares with the application (`OptimConfig`, `DataParallel`).

A target is a package (`targets.TARGETS` maps a spec's `target:` to it) whose module namespace satisfies
`Target`; `tests/test_layout.py` checks the NNTile target against it, member by member and signature by
signature. The names a generated model imports from its target (layers, the model base class, host-side
ops) are the target's own business, between its package and its templates, and not part of this
interface: another target emits other code.
"""
from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from dit_compiler.compiler.graph.ir import Graph


@dataclass(frozen=True)
class OptimConfig:
    """AdamW's settings, fixed when a backend is made (defaults: DiT's `train.py`)."""

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    accumulation: int = 1       # backward calls whose gradients add up before a step
    max_grad_norm: float = 0.0  # clip the global gradient norm to this before a step; 0: never

    @property
    def whole_gradients(self) -> bool:
        """Whether a step needs every gradient at once (summed over micro-batches, or its norm): a backend
        that otherwise updates each layer as its backward ends cannot do that then."""
        return self.accumulation > 1 or self.max_grad_norm > 0


def clip_scale(norm: float, max_norm: float) -> float:
    """The factor gradients of global norm `norm` are scaled by under clipping to `max_norm` (0: none), as
    torch's `clip_grad_norm_`: max_norm / (norm + 1e-6), at most 1. Every backend clips with it."""
    if max_norm <= 0:
        return 1.0
    return min(1.0, max_norm / (norm + 1e-6))


class GradientAverager(Protocol):
    """Averages a fixed list of gradients over the ranks of a data-parallel run (`app.distributed`)."""

    last: dict[str, float]

    def average(self, read: Callable[[int, Any], None], write: Callable[[int, Any], None]) -> None: ...


class DataParallel(Protocol):
    """One rank of a data-parallel run, as a target's backend sees it (`app.distributed.World`)."""

    size: int

    def gradient_buckets(self, shapes: Sequence[tuple[int, ...]]) -> GradientAverager: ...


@runtime_checkable
class Target(Protocol):
    """The members of a target package, grouped by who calls them."""

    # -- identity
    NAME: str                     # the spec's `target:` value
    RUNTIME_VERSION: int          # bumped when an earlier ditc's generated model would not run
    BACKEND: str                  # "module:Class" of its `ditc train`/`sample` backend (`app.backend.Backend`)
    WORKERS: str                  # its CPU workers, in words (reports)
    WORKERS_HELP: str             # --ncpus's help: its workers and where their default count comes from

    # -- compile-time hooks (`compiler.build`, `compiler.inspect`)
    def prepare(self, graph: Graph) -> None: ...
    def emit(self, graph: Graph) -> str: ...
    def predict(self, graph: Graph) -> Any: ...                 # a training step's predicted peak memory
    def unmovable_bytes(self, graph: Graph) -> int: ...
    def check_limit(self, graph: Graph, limit: int, peak: Any = None) -> Any: ...
    def out_of_core(self, graph: Graph, limit: int, parent: Any = None) -> contextlib.AbstractContextManager: ...

    # -- runtime hooks (the checks and the backend)
    OutOfCore: type                                           # what `out_of_core` yields, rebuilt from its JSON
    def require(self, version: int) -> None: ...
    def installed(self) -> str | None: ...                      # None, or why the runtime is not importable
    def problem(self) -> str | None: ...                        # the same, importing it
    def nntile_runtime(self, ncpus: int | None = None, out_of_core: Any = None) -> Iterator[None]: ...
    def wait_for_all(self) -> None: ...
    def pause(self) -> None: ...
    def resume(self) -> None: ...
    def scheduler(self) -> str: ...

    # -- command line and worker environment
    def add_arguments(self, parser: argparse.ArgumentParser) -> None: ...   # its own options of a runner
    def settings(self, args: argparse.Namespace) -> dict[str, str]: ...    # those options as the environment
    def requested_workers(self) -> int | None: ...            # the worker count the environment sets, else None
    def default_workers(self) -> int: ...                     # the environment's worker count, else every core
    def worker_environment(self, ncpus: int) -> dict[str, str]: ...        # what runs `ncpus` workers
    def check_environment(self, graph: Graph, work: str | None = "train") -> None: ...  # refuse (UsageError) an environment `work` cannot start in

    # -- kernel sets
    KERNEL_SETS: Sequence[str]
    def kernel_sets(self) -> Mapping[str, str | None]: ...     # each set: None where available, else why not
    def choose_kernels(self, requested: str | None = None) -> Any: ...

    # -- BLAS
    def apply_blas_core(self, flag: str | None = None) -> str | None: ...
    def blas_report(self) -> tuple[str, str | None, str | None]: ...
    def faster_blas(self, core: str) -> tuple[str, dict[str, str]] | None: ...
    def gemm(self, m: int, n: int, k: int) -> Callable[[], None]: ...
