"""The BLAS that NNTile's GEMMs run on: which library, which OpenBLAS core, and an opt-in to another core.

NNTile calls the CBLAS it was linked to; the library is found from NNTile's own extension module (a
symbol looked up through its handle resolves in its dependencies, not in numpy's bundled OpenBLAS),
without importing NNTile. OpenBLAS built for many CPUs (Debian's is) picks its kernels ("core") when it
loads, from the CPU or from $OPENBLAS_CORETYPE; on a CPU it does not know it falls back to an older
core, and a generic one (Prescott, SSE3) runs GEMMs at a fraction of the CPU's speed.

`apply_requested_core` runs before NNTile loads. $DITC_BLAS_CORE (`--blas-core`) names a core, `auto`
or `none` (the library's choice); a named core is set as $OPENBLAS_CORETYPE for NNTile's process and its
children, but only after a subprocess has loaded NNTile's OpenBLAS with that core and checked its GEMMs
against float64. Unset, with $OPENBLAS_CORETYPE unset too, the core the library picks is found in a
subprocess, and where its vector instructions are below the CPU's the best core that passes the same
check is applied (`candidates`). Both findings are cached per CPU and library (`_Cache`), so only the
first run pays for the subprocesses. A $OPENBLAS_CORETYPE set by the machine or the user is kept;
`advice()` names the fix where it is below the CPU, and `faster_core` finds the checked alternative
`ditc bench` times.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
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
from dit_compiler.files import cache_root, write_text_atomic

ENV = "DITC_BLAS_CORE"
#: Tests only (README, "BLAS"): the probe for the core the library picks loads it with
#: OPENBLAS_CORETYPE set to this, as if the library had picked it; part of the cache key. ditc never sets it.
TEST_LIBRARY_CORE = "DITC_TEST_LIBRARY_CORE"
#: OpenBLAS x86-64 cores by the widest vector instructions their kernels use; any other core (Prescott,
#: Core2, Nehalem, Atom, Barcelona, ...) is a generic SSE one.
CORE_ISA = {"skylakex": "AVX-512", "cooperlake": "AVX-512", "sapphirerapids": "AVX-512", "haswell": "AVX2",
            "zen": "AVX2", "sandybridge": "AVX", "bulldozer": "AVX", "piledriver": "AVX", "steamroller": "AVX",
            "excavator": "AVX"}
ISA_RANK = {"SSE": 0, "AVX": 1, "AVX2": 2, "AVX-512": 3}
#: The cores tried for each level of vector instructions, best first (GEMM rates in README, "BLAS");
#: on AMD, Zen before Haswell.
CANDIDATES = {"AVX-512": ("SkylakeX", "Cooperlake"), "AVX2": ("Haswell", "Zen"), "AVX": ("SandyBridge",)}
#: (m, n, k, transposes) of the self-check's GEMMs: odd sizes reach the kernels' edge cases.
CHECKS = ((67, 45, 53, False, False), (131, 96, 200, True, False), (64, 129, 77, False, True))


class Unfinished(str):
    """Why a check did not pass that may not hold next time (it timed out): never cached."""


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
    """The path the library holding `symbol` was opened by (a link, such as Debian's alternatives)."""
    info = _DlInfo()
    ctypes.CDLL(None).dladdr(ctypes.cast(symbol, ctypes.c_void_p), ctypes.byref(info))
    return info.dli_fname.decode() if info.dli_fname else "?"


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
    library = os.path.realpath(_library_of(lib.cblas_sgemm))
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


def cpuinfo(text: str | None = None) -> dict[str, str]:
    """The first CPU's `vendor_id`, `model name` and `flags` from /proc/cpuinfo (or `text`, in its format)."""
    if text is None:
        text = ""
        with contextlib.suppress(OSError):
            with open("/proc/cpuinfo") as file:
                text = file.read(1 << 20)
    found: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if (key := key.strip()) in ("vendor_id", "model name", "flags"):
            found.setdefault(key, value.strip())
    return found


def cpu(info: dict[str, str] | None = None) -> tuple[str, str]:
    """(the widest vector instructions of this CPU as CORE_ISA names them, its vendor) from `cpuinfo()`."""
    info = cpuinfo() if info is None else info
    flags, vendor = set(info.get("flags", "").split()), info.get("vendor_id", "")
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        return "AVX-512", vendor
    if {"avx2", "fma"} <= flags:
        return "AVX2", vendor
    return ("AVX" if "avx" in flags else "SSE"), vendor


def candidates(core: str, isa: str, vendor: str) -> list[str]:
    """The cores worth trying instead of the library's `core` on a CPU with `isa` (from `cpu`), best first:
    those whose vector instructions are above `core`'s and within the CPU's; none where `core` matches
    the CPU already."""
    rank = ISA_RANK[CORE_ISA.get(core.lower(), "SSE")]
    found = []
    for level in sorted(CANDIDATES, key=ISA_RANK.get, reverse=True):
        if rank < ISA_RANK[level] <= ISA_RANK[isa]:
            cores = CANDIDATES[level]
            found += sorted(cores, key=lambda c: c != "Zen") if vendor == "AuthenticAMD" else cores
    return found


def suggested_core(isa: str, vendor: str) -> str | None:
    """The OpenBLAS core for a CPU with these instructions: measured best on the machines in the README."""
    return next(iter(candidates("Prescott", isa, vendor)), None)


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
    """In the checking subprocess: NNTile's BLAS as loaded here (the path it was opened by too), and the
    worst relative error of its GEMMs against numpy in float64."""
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
    return {"core": blas.core if blas else None, "library": blas.library if blas else None,
            "opened": _library_of(_handle().cblas_sgemm) if blas else None, "error": worst}


def _run_self_check(coretype: str | None, timeout: float) -> dict | str:
    """`_self_check` in a subprocess with OPENBLAS_CORETYPE=coretype (None: unset): its findings, or why
    it did not finish."""
    root = str(Path(__file__).resolve().parents[3])   # where `dit_compiler` is, installed or not
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_CORETYPE"}
    env |= {"OPENBLAS_CORETYPE": coretype} if coretype else {}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (root, os.environ.get("PYTHONPATH"))))
    try:
        result = subprocess.run([sys.executable, "-m", __name__], env=env, capture_output=True, text=True,
                                timeout=timeout)
    except subprocess.TimeoutExpired:
        return Unfinished(f"the check did not finish in {timeout:.0f} s")
    if result.returncode != 0:
        return f"the check failed: {(result.stderr.strip().splitlines() or ['(no output)'])[-1]}"
    try:
        return json.loads(result.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return f"the check printed no result ({result.stdout.strip()[-200:] or 'nothing'})"


def check_core(core: str, timeout: float = 120.0) -> str | None:
    """None when NNTile's OpenBLAS, loaded in a subprocess with OPENBLAS_CORETYPE=core, runs that core and its
    GEMMs match numpy's to 1e-5; else why not."""
    found = _run_self_check(core, timeout)
    if isinstance(found, str):
        return found
    if found["core"] is None:
        return "NNTile's BLAS is not OpenBLAS (or NNTile is not found): OPENBLAS_CORETYPE would change nothing"
    if found["core"].lower() != core.lower():
        return f"OpenBLAS ran its {found['core']} core instead ({found['library']} may not know {core})"
    if not found["error"] <= 1e-5:
        return f"its GEMMs differ from numpy's by {found['error']:.2g} (relative), above 1e-05"
    return None


def _stat(path: str) -> list[int]:
    status = os.stat(path)
    return [status.st_size, status.st_mtime_ns, status.st_ino]


class _Cache:
    """What the subprocesses found about NNTile's OpenBLAS on this CPU: the core it picks by itself and
    `check_core`'s verdict on each core tried, in one JSON file under ditc's cache folder.

    The file is named by a hash of what can be known without loading the library (the CPU's model and
    flags, NNTile's module, the loader's variables, the test hook); inside, the library as the probe
    loaded it (the path it was opened by, the file that is, its size, mtime and inode) must still be what
    that path leads to, or the entry is found anew. So is an entry that is not what this class writes."""

    VERSION = 1

    def __init__(self, extension: Path):
        info = cpuinfo()
        self.key = {"cpu": [info.get("model name", ""), info.get("flags", "")],
                    "module": [str(extension), *_stat(str(extension))],
                    "loader": [os.environ.get(name, "") for name in ("LD_LIBRARY_PATH", "LD_PRELOAD")],
                    "test": os.environ.get(TEST_LIBRARY_CORE, "")}
        digest = hashlib.sha256(json.dumps(self.key).encode()).hexdigest()[:16]
        self.path = cache_root() / "openblas-cores" / f"{digest}.json"
        self.entry = self._read()
        self.changed = False

    def _read(self) -> dict | None:
        try:   # O_NOFOLLOW: a link in the file's place is not ditc's entry
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW)
            with os.fdopen(fd, "rb") as file:
                entry = json.loads(file.read(1 << 16))
            library = entry["library"]
            fresh = (entry["version"] == self.VERSION and entry["key"] == self.key
                     and os.path.realpath(library["opened"]) == library["path"]
                     and _stat(library["path"]) == library["stat"]
                     and isinstance(entry["core"], str) and isinstance(entry["verdicts"], dict)
                     and all(why is None or isinstance(why, str) for why in entry["verdicts"].values()))
        except (OSError, ValueError, KeyError, TypeError, RecursionError):   # RecursionError: "[[[[..."
            return None
        return entry if fresh else None

    def library_core(self) -> str | None:
        """The core the library picks on its own (None: NNTile's BLAS is not OpenBLAS, or no NNTile), probed
        in a subprocess unless cached."""
        if self.entry is None:
            found = _run_self_check(os.environ.get(TEST_LIBRARY_CORE), 120.0)
            if isinstance(found, str) or found["core"] is None:
                return None
            self.entry = {"version": self.VERSION, "key": self.key, "core": found["core"], "verdicts": {},
                          "library": {"opened": found["opened"], "path": found["library"],
                                      "stat": _stat(found["library"])}}
            self.changed = True
        return self.entry["core"]

    def first_passing(self, cores: list[str]) -> tuple[str | None, dict[str, str]]:
        """The first of `cores` that passes `check_core` (its cached verdict, else a check), and why each one
        before it failed."""
        failed = {}
        for core in cores:
            if core in self.entry["verdicts"]:
                why = self.entry["verdicts"][core]
            elif not isinstance(why := check_core(core), Unfinished):
                self.entry["verdicts"][core] = why
                self.changed = True
            if why is None:
                return core, failed
            failed[core] = why
        return None, failed

    def save(self) -> str | None:
        """Write the entry where it changed, whole or not at all (`files.write_text_atomic`: never through
        a link); None, or why it could not be written."""
        if not self.changed:
            return None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.path, json.dumps(self.entry))
        except OSError as error:
            return f"{self.path.parent}: {error.strerror}"
        except UsageError as error:   # a link or a special file where the entry goes
            return str(error)
        self.changed = False
        return None


def _cache() -> _Cache | None:
    """The cache entry of NNTile's OpenBLAS here, or None where NNTile is not installed."""
    extension = _nntile_extension()
    return _Cache(extension) if extension else None


def faster_core(current: str) -> str | None:
    """The best core above `current` for this CPU that passes `check_core` (verdicts cached), or None; None
    too where ditc or $DITC_BLAS_CORE chose `current` (`none` keeps the library's choice: not a choice)."""
    if os.environ.get(ENV, "none").lower() != "none":
        return None
    cache = _cache()
    if cache is None or cache.library_core() is None:
        return None
    core, _ = cache.first_passing(candidates(current, *cpu()))
    cache.save()
    return core


def _apply_automatic() -> str | None:
    """Where NNTile's OpenBLAS picks a core below this CPU's vector instructions, apply the best core that
    passes `check_core` and say so on stderr; the core applied, or None."""
    if "nntile" in sys.modules or (cache := _cache()) is None or (library := cache.library_core()) is None:
        return None
    isa, vendor = cpu()
    core, failed = cache.first_passing(candidates(library, isa, vendor))
    unsaved = cache.save()
    if core is None:
        return None   # `advice` warns where NNTile starts
    os.environ["OPENBLAS_CORETYPE"] = os.environ[ENV] = core   # ENV: NNTile's processes below apply no other
    skipped = "".join(f"; {name} not: {why}" for name, why in failed.items())
    print(f"ditc: NNTile's OpenBLAS picks its {library} core ({CORE_ISA.get(library.lower(), 'SSE')}) on this "
          f"{isa} CPU; running its {core} core instead, its GEMMs checked against float64{skipped} "
          f"(--blas-core none keeps {library})" + (f"; not cached: {unsaved}" if unsaved else ""),
          file=sys.stderr, flush=True)
    return core


def apply_requested_core(flag: str | None = None) -> str | None:
    """Apply $DITC_BLAS_CORE as $OPENBLAS_CORETYPE once `check_core` passes (`auto`: `suggested_core`;
    `none`: the library's choice); unset, with $OPENBLAS_CORETYPE unset too, `_apply_automatic`. The core
    applied, or None. Must run before NNTile loads its BLAS. Raises UsageError, naming the request (`flag`,
    such as --blas-core, where one set the variable) and why, where a requested core cannot be applied."""
    requested = os.environ.get(ENV)
    if not requested:
        return None if os.environ.get("OPENBLAS_CORETYPE") else _apply_automatic()
    if requested.lower() == "none":
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
            f"; allowed: auto, none, or an OpenBLAS core such as {', '.join(CORE_ISA)}, prescott (generic)"
        raise UsageError(f"{asked}: core {core} not applied: {why}{known}")
    os.environ["OPENBLAS_CORETYPE"] = core
    print(f"ditc: NNTile's OpenBLAS runs its {core} core (OPENBLAS_CORETYPE={core}), its GEMMs checked against "
          "float64 in a subprocess", file=sys.stderr, flush=True)
    return core


if __name__ == "__main__":  # the self-check, run by `check_core` with OPENBLAS_CORETYPE set
    print(json.dumps(_self_check()))
