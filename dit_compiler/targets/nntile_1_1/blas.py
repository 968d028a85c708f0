"""The BLAS that NNTile's GEMMs run on: which library, which OpenBLAS core, and an opt-in to another core.

NNTile calls the CBLAS it was linked to; the library is found from NNTile's own extension module (a
symbol looked up through its handle resolves in its dependencies, not in numpy's bundled OpenBLAS),
without importing NNTile. OpenBLAS built for many CPUs (Debian's is) picks its kernels ("core") when it
loads, from the CPU or from $OPENBLAS_CORETYPE; on a CPU it does not know it falls back to an older
core, and a generic one (Prescott, SSE3) runs GEMMs at a fraction of the CPU's speed. `advice()` says
so, with the fix, when the core's vector instructions are below the CPU's. The opt-in $DITC_BLAS_CORE
(`--blas-core`) sets $OPENBLAS_CORETYPE for NNTile's process and its children, but only after a
subprocess has loaded NNTile's OpenBLAS with that core and checked its GEMMs against numpy.
"""
from __future__ import annotations

import contextlib
import ctypes
import importlib.machinery
import importlib.util
import json
import os
import subprocess
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dit_compiler.errors import UsageError

ENV = "DITC_BLAS_CORE"
#: OpenBLAS x86-64 cores by the widest vector instructions their kernels use; any other core (Prescott,
#: Core2, Nehalem, Atom, Barcelona, ...) is a generic SSE one.
CORE_ISA = {"skylakex": "AVX-512", "cooperlake": "AVX-512", "sapphirerapids": "AVX-512", "haswell": "AVX2",
            "zen": "AVX2", "sandybridge": "AVX", "bulldozer": "AVX", "piledriver": "AVX", "steamroller": "AVX",
            "excavator": "AVX"}
ISA_RANK = {"SSE": 0, "AVX": 1, "AVX2": 2, "AVX-512": 3}
#: (m, n, k, transposes) of the self-check's GEMMs: odd sizes reach the kernels' edge cases.
CHECKS = ((67, 45, 53, False, False), (131, 96, 200, True, False), (64, 129, 77, False, True))


class BlasWarning(UserWarning):
    """NNTile's OpenBLAS runs a core below this CPU's vector instructions."""


@dataclass(frozen=True)
class Blas:
    library: str        # the shared library NNTile's GEMMs call
    vendor: str         # OpenBLAS, MKL, BLIS, or "unknown BLAS"
    version: str        # its name and version, where it says
    core: str | None    # OpenBLAS's core

    def describe(self) -> str:
        core = f", core {self.core}" if self.core else ""
        return f"{self.version or self.vendor}{core} ({self.library})"


def _nntile_extension() -> Path | None:
    """NNTile's compiled module, found without importing NNTile (importing would load its BLAS)."""
    spec = importlib.util.find_spec("nntile")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            if (path := Path(folder) / f"nntile_core{suffix}").is_file():
                return path
    return None


class _DlInfo(ctypes.Structure):
    _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
                ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]


def _library_of(symbol) -> str:
    info = _DlInfo()
    ctypes.CDLL(None).dladdr(ctypes.cast(symbol, ctypes.c_void_p), ctypes.byref(info))
    return os.path.realpath(info.dli_fname.decode()) if info.dli_fname else "?"


def _string(lib: ctypes.CDLL, name: str) -> str | None:
    """The C string a no-argument function of the library returns, or None where it has no such function."""
    function = getattr(lib, name, None)
    if function is None:
        return None
    function.restype = ctypes.c_char_p
    return (function() or b"").decode().strip()


def _handle() -> ctypes.CDLL | None:
    """NNTile's module opened as a library: its symbols and its dependencies' (loads them if needed)."""
    path = _nntile_extension()
    return ctypes.CDLL(str(path)) if path else None


def nntile_blas() -> Blas | None:
    """The BLAS NNTile's GEMMs call, or None where NNTile or its CBLAS is not found."""
    lib = _handle()
    if lib is None or not hasattr(lib, "cblas_sgemm"):
        return None
    library = _library_of(lib.cblas_sgemm)
    if (core := _string(lib, "openblas_get_corename")) is not None:
        config = _string(lib, "openblas_get_config") or "OpenBLAS"   # "OpenBLAS 0.3.21 <build options>"
        return Blas(library, "OpenBLAS", " ".join(config.split()[:2]), core)
    if hasattr(lib, "mkl_get_version_string"):
        buffer = ctypes.create_string_buffer(256)
        lib.mkl_get_version_string(buffer, 256)
        return Blas(library, "MKL", buffer.value.decode().strip(), None)
    if (version := _string(lib, "bli_info_get_version_str")) is not None:
        return Blas(library, "BLIS", f"BLIS {version}", None)
    return Blas(library, "unknown BLAS", "", None)


def one_thread_per_call() -> None:
    """Make NNTile's BLAS run each call on the calling thread (where it says how: OpenBLAS, MKL, BLIS).

    StarPU already runs one task per core; a BLAS that also spawns a thread per core for each GEMM (OpenBLAS
    does unless $OPENBLAS_NUM_THREADS or $OMP_NUM_THREADS is 1) puts two threads on every core. Measured on 2
    cores: a 200-row digits forward took 88-101 ms on 2 workers that way, as long as on 1 worker, and 45 ms
    with one thread per call (torch: 54 ms)."""
    lib = _handle()
    for name in ("openblas_set_num_threads", "mkl_set_num_threads", "bli_thread_set_num_threads"):
        if lib is not None and (setter := getattr(lib, name, None)) is not None:
            setter(1)
            return


def cpu() -> tuple[str, str]:
    """(the widest vector instructions of this CPU as CORE_ISA names them, its vendor) from /proc/cpuinfo."""
    flags, vendor = set(), ""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                if key.strip() == "flags":
                    flags = set(value.split())
                elif key.strip() == "vendor_id":
                    vendor = value.strip()
                if flags and vendor:
                    break
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        return "AVX-512", vendor
    if {"avx2", "fma"} <= flags:
        return "AVX2", vendor
    return ("AVX" if "avx" in flags else "SSE"), vendor


def suggested_core(isa: str, vendor: str) -> str | None:
    """The OpenBLAS core for a CPU with these instructions: measured best on the machines in the README."""
    if isa == "AVX-512":
        return "SkylakeX"
    if isa == "AVX2":
        return "Zen" if vendor == "AuthenticAMD" else "Haswell"
    return None


def advice(blas: Blas | None) -> str | None:
    """What to do when NNTile's OpenBLAS runs a core below this CPU's vector instructions, else None."""
    if blas is None or blas.core is None:
        return None
    isa, vendor = cpu()
    core_isa = CORE_ISA.get(blas.core.lower(), "SSE")
    if ISA_RANK[core_isa] >= ISA_RANK[isa]:
        return None
    forced = os.environ.get("OPENBLAS_CORETYPE")
    why = (f"because OPENBLAS_CORETYPE={forced} is set" if forced
           else "as it does not recognise this CPU")
    fix = suggested_core(isa, vendor)
    return (f"NNTile's OpenBLAS runs its {'generic ' if core_isa == 'SSE' else ''}{blas.core} core ({core_isa}) on "
            f"a CPU with {isa}, {why}: its GEMMs may run well below this CPU's speed. Fix: --blas-core {fix} "
            f"(or {ENV}={fix}), which checks that core's GEMMs against numpy first, or link NNTile to a BLAS "
            "that knows this CPU (README, 'BLAS')")


_warned = False


def warn_once() -> None:
    """Warn (once per process) where `advice` has something to say about NNTile's BLAS."""
    global _warned
    if not _warned and (text := advice(nntile_blas())):
        warnings.warn(text, BlasWarning, stacklevel=2)
    _warned = True


def sgemm(m: int, n: int, k: int, trans_a: bool = False, trans_b: bool = False,
          seed: int = 0) -> tuple[Callable[[], None], np.ndarray, np.ndarray, np.ndarray]:
    """One fp32 GEMM C = op(A) op(B) [m, n] on NNTile's BLAS, as a call to repeat, with its column-major
    operands (op(A) is [m, k], op(B) [k, n])."""
    lib = _handle()
    if lib is None or not hasattr(lib, "cblas_sgemm"):
        raise RuntimeError("NNTile's CBLAS is not found")
    rng = np.random.default_rng(seed)
    a = np.asfortranarray(rng.standard_normal((k, m) if trans_a else (m, k), dtype=np.float32))
    b = np.asfortranarray(rng.standard_normal((n, k) if trans_b else (k, n), dtype=np.float32))
    c = np.zeros((m, n), np.float32, order="F")
    col_major, no, yes = 102, 111, 112
    args = (col_major, yes if trans_a else no, yes if trans_b else no, m, n, k, ctypes.c_float(1.0),
            a.ctypes.data_as(ctypes.c_void_p), a.shape[0], b.ctypes.data_as(ctypes.c_void_p), b.shape[0],
            ctypes.c_float(0.0), c.ctypes.data_as(ctypes.c_void_p), m)
    return (lambda: lib.cblas_sgemm(*args)), a, b, c


def _self_check() -> dict:
    """In the checking subprocess: NNTile's BLAS as loaded here, and the worst relative error of its GEMMs
    against numpy in float64."""
    blas = nntile_blas()
    worst = 0.0
    for m, n, k, trans_a, trans_b in CHECKS:
        run, a, b, c = sgemm(m, n, k, trans_a, trans_b)
        run()
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        # einsum without `optimize` multiplies in its own loops: the reference runs on no BLAS (numpy's
        # bundled OpenBLAS would read OPENBLAS_CORETYPE too)
        expected = np.einsum("ik,kj->ij", a64.T if trans_a else a64, b64.T if trans_b else b64)
        worst = max(worst, float(np.linalg.norm(c - expected) / np.linalg.norm(expected)))
    return {"core": blas.core if blas else None, "library": blas.library if blas else None, "error": worst}


def check_core(core: str, timeout: float = 120.0) -> str | None:
    """None when NNTile's OpenBLAS, loaded in a subprocess with OPENBLAS_CORETYPE=core, runs that core and its
    GEMMs match numpy's to 1e-5; else why not."""
    root = str(Path(__file__).resolve().parents[3])   # where `dit_compiler` is, installed or not
    env = os.environ | {"OPENBLAS_CORETYPE": core,
                        "PYTHONPATH": os.pathsep.join(filter(None, (root, os.environ.get("PYTHONPATH"))))}
    try:
        result = subprocess.run([sys.executable, "-m", __name__], env=env, capture_output=True, text=True,
                                timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"the check did not finish in {timeout:.0f} s"
    if result.returncode != 0:
        return f"the check failed: {(result.stderr.strip().splitlines() or ['(no output)'])[-1]}"
    found = json.loads(result.stdout.strip().splitlines()[-1])
    if found["core"] is None:
        return "NNTile's BLAS is not OpenBLAS (or NNTile is not found): OPENBLAS_CORETYPE would change nothing"
    if found["core"].lower() != core.lower():
        return f"OpenBLAS ran its {found['core']} core instead ({found['library']} may not know {core})"
    if not found["error"] <= 1e-5:
        return f"its GEMMs differ from numpy's by {found['error']:.2g} (relative), above 1e-05"
    return None


def apply_requested_core(flag: str | None = None) -> str | None:
    """Apply $DITC_BLAS_CORE (`auto`: `suggested_core`) as $OPENBLAS_CORETYPE once `check_core` passes; the
    core applied, or None where none is asked for. Must run before NNTile loads its BLAS. Raises
    UsageError, naming the request (`flag`, such as --blas-core, where one set the variable) and why,
    where it cannot be applied."""
    requested = os.environ.get(ENV)
    if not requested:
        return None
    asked = f"{flag} {requested}" if flag else f"{ENV}={requested}"
    core = suggested_core(*cpu()) if requested == "auto" else requested
    if core is None:
        raise UsageError(f"{asked}: no OpenBLAS core is known to suit this CPU ({cpu()[0]}); name one")
    if os.environ.get("OPENBLAS_CORETYPE", "").lower() == core.lower():
        return core  # applied already (by the process that started this one, or by hand)
    if "nntile" in sys.modules:
        if (loaded := nntile_blas()) and (loaded.core or "").lower() == core.lower():
            return core
        raise UsageError(f"{asked}: NNTile is loaded already, with its BLAS's "
                         f"{loaded.core if loaded else 'own'} core; set {ENV} before NNTile loads")
    if why := check_core(core):
        known = "" if core.lower() in CORE_ISA else \
            f"; allowed: auto, or an OpenBLAS core such as {', '.join(CORE_ISA)}, prescott (generic)"
        raise UsageError(f"{asked}: core {core} not applied: {why}{known}")
    os.environ["OPENBLAS_CORETYPE"] = core
    print(f"ditc: NNTile's OpenBLAS runs its {core} core (OPENBLAS_CORETYPE={core}), its GEMMs checked against "
          "float64 in a subprocess", file=sys.stderr, flush=True)
    return core


if __name__ == "__main__":  # the self-check, run by `check_core` with OPENBLAS_CORETYPE set
    print(json.dumps(_self_check()))
