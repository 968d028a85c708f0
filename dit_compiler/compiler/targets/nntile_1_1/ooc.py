"""Out-of-core training under a memory limit: StarPU's disk swap, set up before StarPU starts.

NNTile 1.1.0 has no out-of-core API; StarPU's environment does it. Under a limit of L bytes for the
whole process, `out_of_core` chooses
- `STARPU_LIMIT_CPU_MEM`: the MiB StarPU may hold in memory, L less the process's baseline (Python,
  torch, NNTile) and a tenth of the rest for what is not StarPU's (host arrays, weights being loaded);
  beyond it StarPU evicts the least recently used tiles to
- `STARPU_DISK_SWAP`: a fresh folder, removed at exit (`STARPU_DISK_SWAP_SIZE` MiB at most: every tensor
  a step allocates, and half as much again), through
- `STARPU_DISK_SWAP_BACKEND=unistd_o_direct`: O_DIRECT, so swapped tiles never sit in the page cache
  (which a memory cgroup counts against the process);
- glibc's mmap threshold fixed at 128 KiB (`mallopt(M_MMAP_THRESHOLD)`, what `MALLOC_MMAP_THRESHOLD_`
  sets at process start): tiles StarPU frees go back to the system at once. With glibc's sliding
  threshold they stay in the heap, and the process outgrows its limit.

O_DIRECT moves whole pages only: StarPU aborts on a tile whose bytes are not a multiple of the page
size (biases, norm statistics, labels). A small library (`PIN_SOURCE`, compiled into the swap folder)
wraps `starpu_variable_data_register`, through which NNTile registers every tile, and clears the
out-of-core flag of such tiles: they stay in memory (`memory.unmovable_bytes`: a few MiB for a DiT).
It must be loaded before NNTile is imported; `runtime.nntile_runtime(ncpus, out_of_core)` does that
and checks that it took effect.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from dit_compiler.compiler.graph.ir import Graph
from dit_compiler.compiler.targets.nntile_1_1 import kernels
from dit_compiler.compiler.targets.nntile_1_1.memory import (BASELINE, MIB, StepMemory, all_bytes, predict,
                                                             unmovable_bytes)
from dit_compiler.errors import UsageError
from dit_compiler.files import write_text_atomic

BACKEND = "unistd_o_direct"
MMAP_THRESHOLD = 128 * 1024
#: glibc's mallopt parameter number of M_MMAP_THRESHOLD.
_M_MMAP_THRESHOLD = -3
#: Of what the limit leaves above the baseline, the part kept for memory StarPU does not count.
MARGIN = 0.1
#: The least StarPU is given to work in (a few tiles per worker).
MIN_STARPU = 64 * MIB
PIN_LIBRARY = "libditc_pin.so"
PIN_SOURCE = r"""
/* ditc: keep tiles that are not whole pages out of StarPU's O_DIRECT disk swap (see ooc.py). */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stddef.h>
#include <stdint.h>
#include <unistd.h>

static long registered, pinned;
long ditc_registered_tiles(void) { return registered; }
long ditc_pinned_tiles(void) { return pinned; }

static void *starpu_symbol(const char *name)
{
    void *symbol = dlsym(RTLD_NEXT, name);
    if (!symbol) {
        void *lib = dlopen("libstarpu-1.4.so.9", RTLD_LAZY | RTLD_NOLOAD);
        if (lib) symbol = dlsym(lib, name);
    }
    return symbol;
}

void starpu_variable_data_register(void **handle, int home_node, uintptr_t ptr, size_t size)
{
    static void (*real)(void **, int, uintptr_t, size_t);
    static void (*set_ooc_flag)(void *, unsigned);
    if (!real) {
        real = (void (*)(void **, int, uintptr_t, size_t)) starpu_symbol("starpu_variable_data_register");
        set_ooc_flag = (void (*)(void *, unsigned)) starpu_symbol("starpu_data_set_ooc_flag");
    }
    real(handle, home_node, ptr, size);
    registered++;
    if (size % (size_t) getpagesize()) {
        set_ooc_flag(*handle, 0);
        pinned++;
    }
}
"""


class OutOfCoreError(UsageError):
    """Out-of-core cannot be set up as asked (a limit below the baseline, no room for the swap, no C
    compiler): the user's to fix, said in a sentence (`ditc` exits 2)."""


@dataclass(frozen=True)
class OutOfCore:
    """StarPU's out-of-core settings for a process limited to `limit` bytes (see the module docstring)."""

    limit: int
    starpu_mib: int          # STARPU_LIMIT_CPU_MEM
    swap_dir: str            # STARPU_DISK_SWAP (inside `folder`)
    swap_mib: int            # STARPU_DISK_SWAP_SIZE
    pin_library: str
    swaps: bool = True       # whether the model's tensors exceed `starpu_mib` (AdamW then writes behind)
    backend: str = BACKEND
    mmap_threshold: int = MMAP_THRESHOLD

    def environment(self) -> dict[str, str]:
        """StarPU's variables (read when StarPU starts)."""
        return {"STARPU_LIMIT_CPU_MEM": str(self.starpu_mib), "STARPU_DISK_SWAP": self.swap_dir,
                "STARPU_DISK_SWAP_SIZE": str(self.swap_mib), "STARPU_DISK_SWAP_BACKEND": self.backend}

    def describe(self) -> str:
        return (f"out-of-core under {self.limit / MIB:.0f} MiB: StarPU holds at most {self.starpu_mib} MiB in memory "
                f"(STARPU_LIMIT_CPU_MEM), swaps to {self.swap_dir} (STARPU_DISK_SWAP, up to {self.swap_mib} MiB, "
                f"backend {self.backend}); malloc mmap threshold {self.mmap_threshold // 1024} KiB")

    def to_json(self) -> dict:
        return asdict(self)

    def apply(self) -> None:
        """In this process, before StarPU starts and before NNTile is imported: load the pinning library,
        fix the malloc threshold, set StarPU's variables."""
        ctypes.CDLL(self.pin_library, mode=os.RTLD_GLOBAL | os.RTLD_NOW)
        libc = ctypes.CDLL(None)
        if not libc.mallopt(_M_MMAP_THRESHOLD, self.mmap_threshold):
            raise RuntimeError("mallopt(M_MMAP_THRESHOLD) failed: is this glibc?")
        os.environ.update(self.environment())

    def check(self) -> None:
        """After StarPU started: a tile made now goes through the pinning library (else O_DIRECT would
        abort on the first small tile StarPU evicts)."""
        pin = ctypes.CDLL(self.pin_library)
        before = pin.ditc_registered_tiles()
        kernels.Tensor_fp32(kernels.TensorTraits([1], [1]), [0], 0).unregister()
        if pin.ditc_registered_tiles() == before:
            raise RuntimeError("out-of-core: NNTile's tiles bypass ditc's pinning library, which must be loaded "
                               "before NNTile is first imported in the process; run out-of-core work in a "
                               "fresh process")


def starpu_share(limit: int) -> int:
    """Bytes StarPU may hold in memory under `limit`: what the baseline leaves, less the margin."""
    return max(0, int((limit - BASELINE) * (1 - MARGIN)))


@dataclass(frozen=True)
class LimitCheck:
    """A training step's predicted peak against a memory limit, as `ditc inspect` reports it."""

    limit: int
    peak: int           # the predicted peak, baseline included
    starpu: int         # what StarPU may hold under the limit
    data: int           # what StarPU holds at the peak, unlimited
    unmovable: int      # of which in tiles that never go to disk (not whole pages)

    @property
    def fits(self) -> bool:
        return self.data <= self.starpu

    @property
    def too_small(self) -> bool:
        """Whether the limit leaves StarPU too little to run at all."""
        return self.starpu < MIN_STARPU or self.unmovable > self.starpu

    @property
    def held(self) -> int:
        """The process's predicted peak under the limit: StarPU swaps what exceeds its share."""
        return self.peak - self.data + min(self.data, self.starpu)

    def summary(self) -> str:
        limit = f"{self.limit / MIB:.0f} MiB" if self.limit >= MIB else f"{self.limit} bytes"
        head = f"memory limit {limit} against a predicted peak of {self.peak / MIB:.0f} MiB: "
        if self.too_small:
            return head + (f"too small: NNTile's process needs {BASELINE / MIB:.0f} MiB before the model allocates, "
                           f"and StarPU at least {max(MIN_STARPU, self.unmovable) / MIB:.0f} MiB more")
        if self.fits:
            return head + "fits in memory"
        return head + (f"out-of-core: StarPU holds at most {self.starpu / MIB:.0f} MiB of the step's "
                       f"{self.data / MIB:.0f} MiB and swaps the rest to disk ({self.unmovable / MIB:.1f} MiB in "
                       "tiles that are not whole pages stay in memory)")


def check_limit(graph: Graph, limit: int, peak: StepMemory | None = None) -> LimitCheck:
    """`limit` against the step's predicted peak (`peak`, where the caller has predicted it already)."""
    peak = peak or predict(graph)
    return LimitCheck(limit, peak.total, starpu_share(limit), peak.data, unmovable_bytes(graph))


#: StarPU's variables that cap what its CPU memory nodes hold, in MiB (read when StarPU starts).
MEMORY_VARIABLES = re.compile(r"STARPU_LIMIT_CPU(_NUMA)?(_[0-9]+)?_MEM")


def check_memory_variables(graph: Graph, work: str = "train") -> None:
    """Refuse (OutOfCoreError) a StarPU memory limit in the environment under which `graph` cannot run:
    StarPU would wait forever for memory no task frees (`STARPU_LIMIT_CPU_MEM=1 ditc verify` hung). The
    least is what the `work` ("train", "verify" or "sample") holds at once: a training step's tensors
    (verify: less AdamW's moments; sample: the parameters and inputs), or with StarPU's disk swap
    (`STARPU_DISK_SWAP`) the tiles that cannot go to disk; never less than MIN_STARPU."""
    for variable, text in sorted(os.environ.items()):
        if not MEMORY_VARIABLES.fullmatch(variable):
            continue
        try:
            mib = int(text.strip())
        except ValueError:
            raise OutOfCoreError(f"{variable}={text!r} in the environment is not a number of MiB; allowed: an "
                                 "integer (StarPU reads it as MiB), or unset") from None
        if mib < 0:   # StarPU's "no limit"
            continue
        if os.environ.get("STARPU_DISK_SWAP"):
            need, what = max(MIN_STARPU, unmovable_bytes(graph)), "the tiles that cannot be swapped to disk"
        else:
            peak = predict(graph)
            need = {"train": peak.data, "verify": peak.data - peak.optimizer,
                    "sample": peak.parameters + peak.inputs}[work]
            need, what = max(MIN_STARPU, need), f"the tensors {work} holds at once"
        if mib * MIB < need:
            raise OutOfCoreError(f"{variable}={text} in the environment leaves StarPU {mib} MiB; {graph.spec.name!r} "
                                 f"needs at least {-(-need // MIB)} MiB ({what}), or StarPU waits forever: unset it, "
                                 "raise it, or train out-of-core with --memory-limit")


def settings(graph: Graph, limit: int, folder: Path) -> OutOfCore:
    """The settings for `graph` under `limit` bytes, swapping into `folder` (which must exist)."""
    check = check_limit(graph, limit)
    if check.too_small:
        raise OutOfCoreError(check.summary())
    swap_mib = max(64, int(1.5 * all_bytes(graph) / MIB))
    free_mib = shutil.disk_usage(folder).free // MIB
    if free_mib < swap_mib:
        raise OutOfCoreError(f"{folder}: {free_mib} MiB free, out-of-core may need {swap_mib} MiB; "
                             "choose another folder for the swap")
    return OutOfCore(limit, check.starpu // MIB, str(folder / "swap"), swap_mib, str(_compile_pin_library(folder)),
                     not check.fits)


def _compile_pin_library(folder: Path) -> Path:
    source, library = folder / "ditc_pin.c", folder / PIN_LIBRARY
    write_text_atomic(source, PIN_SOURCE)
    compiler = os.environ.get("CC", "cc")
    try:
        subprocess.run([compiler, "-shared", "-fPIC", "-O2", "-o", str(library), str(source), "-ldl"],
                       check=True, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError) as error:
        detail = getattr(error, "stderr", "") or str(error)
        raise OutOfCoreError(f"out-of-core needs a C compiler ({compiler}, or $CC) to build its small tile-pinning "
                             f"library: {detail.strip()}") from None
    return library


@contextlib.contextmanager
def out_of_core(graph: Graph, limit: int, parent: str | os.PathLike | None = None) -> Iterator[OutOfCore]:
    """Out-of-core settings for `graph` under `limit` bytes, with a fresh swap folder under `parent`
    (default: the system's temporary folder), removed on exit, on Ctrl-C and on SIGTERM. The caller
    hands the settings to `nntile_runtime` in the process that trains: this one, or a child it starts,
    whose swap files go with the folder even when the child is killed outright (by the OOM killer)."""
    if parent is not None and not Path(parent).is_dir():
        what = "a file, not a folder" if Path(parent).exists() else "no such folder"
        raise OutOfCoreError(f"{parent}: {what} for the out-of-core swap")
    folder = Path(tempfile.mkdtemp(prefix="ditc-swap-", dir=parent))
    ours = signal.getsignal(signal.SIGTERM) == signal.SIG_DFL and threading.current_thread() is threading.main_thread()
    if ours:
        signal.signal(signal.SIGTERM, _terminate)
    try:
        yield settings(graph, limit, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        if ours:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _terminate(signum, frame) -> None:
    """SIGTERM as an exception, so that `finally` blocks (the swap folder's removal) run."""
    raise SystemExit(128 + signum)
