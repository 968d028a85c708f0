"""Starting and stopping StarPU for NNTile 1.1.0, waiting for its tasks, pausing its workers."""
from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import os
from collections.abc import Callable, Iterator

from dit_compiler.compiler.targets.nntile_1_1 import blas
from dit_compiler.compiler.targets.nntile_1_1.ooc import OutOfCore, check_memory_variables
from dit_compiler.errors import UsageError
from dit_compiler.limits import cores

NAME = "nntile-1.1"
NNTILE_VERSION = "1.1.0"
#: Bumped whenever a generated model of an earlier ditc would not run on this runtime.
RUNTIME_VERSION = 1

#: What the generated models of this target need of NNTile: the 1.1 API (renamed in later versions).
REQUIRED_API = ("starpu.Config", "starpu.pause", "tensor.add_slice3_async", "tensor.gelutanh_inplace_async",
                "tensor.embedding_backward_async")


def installed() -> str | None:
    """None when an `nntile` package is installed here, else why not: without importing it, so that
    out-of-core can still be set up before the import (see `problem` for the full check)."""
    if importlib.util.find_spec("nntile") is None:
        return "NNTile is not importable (no module named 'nntile')"
    return None


def problem() -> str | None:
    """None when NNTile 1.1 is importable here, else why not, in a sentence (this imports NNTile). Applies
    a requested OpenBLAS core first (`blas.apply_requested_core`: NNTile's BLAS reads it when it loads)."""
    blas.apply_requested_core()
    try:
        import nntile
    except Exception as error:  # ImportError, or a broken build that fails while importing
        return f"NNTile is not importable ({type(error).__name__}: {error})"
    missing = [name for name in REQUIRED_API if not _has(nntile, name)]
    if missing:
        return f"the installed NNTile lacks {', '.join(missing)}: this target needs NNTile 1.1.x"
    return None


def _has(module, dotted: str) -> bool:
    for part in dotted.split("."):
        module = getattr(module, part, None)
        if module is None:
            return False
    return True


def _starpu_wait() -> Callable[[], None]:
    """StarPU's own `starpu_task_wait_for_all`, from the libstarpu that NNTile loaded.

    NNTile 1.1.0's `nntile.starpu.wait_for_all` polls: it wakes every 1 ms, and with as many workers as
    cores each wake-up preempts a worker (about 3000 context switches in a DiT-S/2 batch 8 training step
    on 2 cores). StarPU's call sleeps until the last task ends: 130 switches, and paired steps 5%
    faster. Falls back to the polling wait where the library is not found (no /proc)."""
    import nntile

    try:
        with open("/proc/self/maps") as maps:
            paths = sorted({path for path in (line.split()[-1] for line in maps)
                            if os.path.basename(path).startswith("libstarpu-")})
    except OSError:
        paths = []
    return ctypes.CDLL(paths[0]).starpu_task_wait_for_all if paths else nntile.starpu.wait_for_all


_wait: Callable[[], None] | None = None


def wait_for_all() -> None:
    """Block until every submitted task has run."""
    global _wait
    if _wait is None:
        _wait = _starpu_wait()
    _wait()


def pause() -> None:
    """Stop StarPU's workers from spinning (while another process is timed beside this one)."""
    import nntile

    nntile.starpu.pause()


def resume() -> None:
    import nntile

    nntile.starpu.resume()


@contextlib.contextmanager
def nntile_runtime(ncpus: int | None = None, out_of_core: OutOfCore | None = None) -> Iterator[None]:
    """Start StarPU on `ncpus` CPU workers (default: all cores) and shut it down on exit.

    The scheduler is $STARPU_SCHED, by default `lws` (locality work stealing) rather than NNTile's
    `dmda`: on CPU workers dmda's transfer and history models buy nothing, and lws runs a task where
    its inputs were just written (DiT-S/2 batch 8 training step, 2 workers: 3.31 s against 3.63 s).
    `out_of_core` (from `ooc.out_of_core`) is applied before NNTile is imported and StarPU starts, as is a
    requested OpenBLAS core. While it runs, NNTile's BLAS and the host's torch run each call on the calling
    thread: StarPU's workers have the cores (`blas.one_thread_per_call`)."""
    global _swapping
    check_starpu_home()
    if out_of_core is not None:
        out_of_core.apply()
    blas.apply_requested_core()
    import nntile

    os.environ.setdefault("STARPU_SILENT", "1")
    os.environ.setdefault("STARPU_SCHED", "lws")
    blas.one_thread_per_call()
    config = nntile.starpu.Config(ncpus or os.cpu_count() or 1, 0, 0)
    nntile.starpu.init()
    if out_of_core is not None:
        out_of_core.check()
    _swapping = out_of_core is not None and out_of_core.swaps
    blas.warn_once()
    # the host's torch (timestep features) on the calling thread: its OpenMP threads spin after each call,
    # on the cores StarPU's workers run on (a 200-row digits forward: 52 ms beside them, 45 ms without)
    import torch

    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        wait_for_all()
        torch.set_num_threads(torch_threads)
        _swapping = False
        del config  # its destructor shuts StarPU down; never shut down twice


_swapping = False


def check_environment(graph, work: str | None = "train") -> None:
    """Refuse (UsageError) an environment StarPU would abort or hang in, before it starts: a folder it
    cannot keep its performance models in, a memory limit under what `work` on `graph` holds at once
    (None: ditc sets StarPU's memory variables itself)."""
    check_starpu_home()
    if work is not None:
        check_memory_variables(graph, work)


def check_starpu_home() -> None:
    """Refuse (UsageError) a folder StarPU cannot keep its performance models in: StarPU makes
    $STARPU_PERF_MODEL_DIR, else $STARPU_HOME/.starpu/sampling, else $HOME/.starpu/sampling, when it starts,
    and aborts the process (SIGABRT, no message of ours) where it cannot. Made here first, as StarPU would."""
    if models := os.environ.get("STARPU_PERF_MODEL_DIR"):
        folder, variable = models, "STARPU_PERF_MODEL_DIR"
    else:
        variable = "STARPU_HOME" if os.environ.get("STARPU_HOME") else "HOME"
        folder = os.path.join(os.environ.get(variable) or os.path.expanduser("~"), ".starpu", "sampling")
    try:
        os.makedirs(folder, exist_ok=True)
        if not os.access(folder, os.W_OK | os.X_OK):
            raise PermissionError(13, "not writable")
    except OSError as error:
        raise UsageError(f"${variable}={os.environ.get(variable)}: StarPU keeps its performance models in {folder} "
                         f"and cannot make or write it ({error.strerror or error}); set {variable} to a writable "
                         "folder, or unset it") from None


def swapping() -> bool:
    """Whether StarPU runs out-of-core with more tensors than its memory limit holds."""
    return _swapping


def scheduler() -> str:
    """The scheduling policy StarPU runs (set before it starts)."""
    return os.environ.get("STARPU_SCHED", "lws")


#: What a worker of this runtime is (reports), and --ncpus's help (where its default comes from).
WORKERS = "StarPU CPU workers"
WORKERS_HELP = f"{WORKERS} (default: $STARPU_NCPU or all cores)"


def requested_workers() -> int | None:
    """$STARPU_NCPU when set (refused unless a count from 1 to the cores), else None."""
    text = os.environ.get("STARPU_NCPU", "").strip()
    if not text:
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= cores():
        raise UsageError(f"STARPU_NCPU={text!r} in the environment is not a number of CPU workers; allowed: an "
                         f"integer from 1 to {cores()} (this machine's cores), or unset for all of them; --ncpus N "
                         "overrides it")
    return value


def default_workers() -> int:
    """$STARPU_NCPU when set (checked, `requested_workers`), else every core."""
    return requested_workers() or cores()


def worker_environment(ncpus: int) -> dict[str, str]:
    """What runs `ncpus` StarPU CPU workers in this process and the processes it starts (StarPU reads it),
    without StarPU's banner (noise in a command's output) unless the user asked for it."""
    return {"STARPU_NCPU": str(ncpus), "STARPU_SILENT": os.environ.get("STARPU_SILENT", "1")}

