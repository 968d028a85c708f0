"""ditc's own CPU kernels for the NNTile 1.1 target: an optional native extension, and which kernels run.

NNTile 1.1.0's softmax and GELU-tanh kernels are scalar loops. `kernels.cc` (beside this file) holds
ditc's fp32 replacements as StarPU codelets submitted on the tiles of NNTile tensors. It is compiled on
first use, against the NNTile that `import nntile` finds:

- NNTile's build tree is the folder above the `nntile` package that holds `CMakeCache.txt`; that file
  names NNTile's source (`CMAKE_HOME_DIRECTORY`, for its headers), its C++ compiler, StarPU's headers and
  library, and the pybind11 it was built with (`pybind11_DIR`). The extension uses that same compiler
  and pybind11, so NNTile's `Tensor_fp32` objects pass to it as they are (one pybind11 type registry).
- It is built with `-O3 -march=native -fopenmp-simd` (and `FLAGS`' others) into the cache folder
  ($DITC_CACHE_DIR, else $XDG_CACHE_HOME/ditc, else ~/.cache/ditc), under a hash of the source, the compile command, the
  compiler's version, the CPU's flags and the NNTile build (its CMakeCache.txt and libnntile), so a
  changed source or a rebuilt NNTile builds anew and everything else loads in milliseconds.

Where it cannot be built (no build tree, no compiler, a compile error) the model runs NNTile's kernels
and says why. The kernel set a model uses is `kernels(requested)`: `ditc` (this extension for softmax,
softmax backward and GELU-tanh; NNTile's kernels for everything else) or `nntile` (NNTile's only);
by default $DITC_KERNELS, else `auto`: ditc's where the extension is available.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import os
import stat
import subprocess
import sys
import sysconfig
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from dit_compiler.errors import UsageError
from dit_compiler.files import cache_root, read_small, write_text_atomic

SOURCE = Path(__file__).with_name("kernels.cc")
MODULE = "ditc_nntile_kernels"
ENV = "DITC_KERNELS"
#: The kernel sets a model can run, and how reports name them.
KERNEL_SETS = {"ditc": "ditc's kernels", "nntile": "NNTile's kernels"}
#: What the extension replaces (the rest is NNTile's either way).
REPLACED = "attention softmax and its backward, GELU-tanh forward and backward, the AdamW update"
#: `-fno-trapping-math`: with trapping maths GCC keeps the selects of the branch-free `exp` as branches
#: where the vector ISA has no masked operations (AVX2), and GELU's loops stayed scalar there (6 ns an
#: element on this AVX2 EPYC); `-fno-math-errno`: `sqrt` setting errno keeps AdamW's loop scalar. The
#: kernels read no floating-point exception flags and no errno.
FLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-fno-trapping-math", "-fno-math-errno", "-DNDEBUG",
         "-std=gnu++17", "-fPIC", "-shared", "-fvisibility=hidden")


class Unavailable(RuntimeError):
    """The extension cannot be built or loaded here; the message says why."""


class KernelWarning(UserWarning):
    """ditc's kernels were asked for by default but are unavailable: NNTile's run instead."""


@dataclass(frozen=True)
class NNTileBuild:
    """What compiling against the installed NNTile needs, read from its build tree's CMakeCache.txt."""

    cache: Path                  # CMakeCache.txt
    compiler: str
    include_dirs: tuple[str, ...]
    link: tuple[str, ...]        # linker arguments: libnntile, libstarpu, their rpaths
    library: Path                # libnntile, whose bytes are part of the cache key


def _cmake_cache(path: Path) -> dict[str, str]:
    entries = {}
    for line in path.read_text(errors="replace").splitlines():
        if line and not line.startswith(("#", "//")) and "=" in line and ":" in line.split("=", 1)[0]:
            key, value = line.split("=", 1)
            entries[key.split(":", 1)[0]] = value
    return entries


def nntile_build() -> NNTileBuild:
    """The installed NNTile's build tree, from `import nntile`'s location (raises `Unavailable`)."""
    spec = importlib.util.find_spec("nntile")
    if spec is None or not spec.submodule_search_locations:
        raise Unavailable("NNTile is not importable")
    package = Path(next(iter(spec.submodule_search_locations))).resolve()
    cache = next((p / "CMakeCache.txt" for p in package.parents if (p / "CMakeCache.txt").is_file()), None)
    if cache is None:
        raise Unavailable(f"no NNTile build tree (CMakeCache.txt) above {package}: ditc's kernels compile "
                          "against NNTile's headers and build")
    entries, build = _cmake_cache(cache), cache.parent
    needed = ("CMAKE_HOME_DIRECTORY", "CMAKE_CXX_COMPILER", "StarPU_INCLUDE_DIRS", "StarPU_LIBDIR", "pybind11_DIR")
    if absent := [key for key in needed if not entries.get(key)]:
        raise Unavailable(f"{cache} lacks {', '.join(absent)}")
    pybind11 = Path(entries["pybind11_DIR"]).parents[2] / "include"   # <prefix>/share/cmake/pybind11
    libraries = sorted(build.glob("libnntile.so*")) or sorted(build.rglob("libnntile.so*"))
    starpu = next((name for name in entries.get("StarPU_LIBRARIES", "").split(";") if name.startswith("starpu")),
                  None)
    problems = [what for what, ok in (("pybind11's headers", (pybind11 / "pybind11" / "pybind11.h").is_file()),
                                      ("libnntile", bool(libraries)), ("StarPU's library name", bool(starpu)))
                if not ok]
    if problems:
        raise Unavailable(f"NNTile's build tree {build} lacks {', '.join(problems)}")
    library, starpu_dir = libraries[0], entries["StarPU_LIBDIR"]
    includes = (str(Path(entries["CMAKE_HOME_DIRECTORY"]) / "include"), str(build / "include"),
                *entries["StarPU_INCLUDE_DIRS"].split(";"), str(pybind11), sysconfig.get_paths()["include"])
    link = (str(library), f"-Wl,-rpath,{library.parent}", f"-L{starpu_dir}", f"-l{starpu}", f"-Wl,-rpath,{starpu_dir}")
    return NNTileBuild(cache, entries["CMAKE_CXX_COMPILER"], includes, link, library)


def _cpu_flags() -> str:
    """The CPU's feature flags (`-march=native` compiles for them)."""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as cpuinfo:
            return next((line for line in cpuinfo if line.startswith(("flags", "Features"))), "")
    return ""


def _command(build: NNTileBuild, output: Path) -> list[str]:
    return [build.compiler, *FLAGS, *(f"-I{d}" for d in build.include_dirs), str(SOURCE), "-o", str(output),
            *build.link]


def _key(build: NNTileBuild) -> str:
    """The cache key: everything that changes the compiled module."""
    try:
        version = subprocess.run([build.compiler, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as error:
        raise Unavailable(f"NNTile's C++ compiler {build.compiler} does not run ({error})") from None
    digest = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(_command(build, Path("out"))).encode(), version.encode(),
                 _cpu_flags().encode(), build.cache.read_bytes(), build.library.read_bytes(),
                 sys.version.encode()):
        digest.update(hashlib.sha256(part).digest())
    return digest.hexdigest()[:16]


def built_module(progress=None) -> Path:
    """The compiled extension's path, compiling it first where the cache lacks it (raises `Unavailable`).
    `progress` (default: a line on stderr) hears about a compile, which takes seconds.

    The compile records the module's sha256 beside it (`<module>.sha256`); a cached module is used only
    when its bytes still have that hash, so a truncated or overwritten one (which would kill the process
    with SIGBUS, or fail to import) is compiled again instead of loaded."""
    build = nntile_build()
    folder = cache_root() / "nntile-1.1-kernels" / _key(build)
    target = folder / (MODULE + sysconfig.get_config_var("EXT_SUFFIX"))
    record = target.with_name(target.name + ".sha256")
    if _intact(target, record):
        return target
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # never through a link; O_NONBLOCK: a FIFO there must not block the open (it is refused below)
        lock = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o600)
    except OSError as error:
        raise Unavailable(f"cannot write the kernel cache {folder} ({error.strerror}); set DITC_CACHE_DIR") from None
    try:
        if not stat.S_ISREG(os.fstat(lock).st_mode):
            raise Unavailable(f"{folder / '.lock'} is not a regular file; remove it, or set DITC_CACHE_DIR")
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be compiling the same module
        if _intact(target, record):
            return target
        (progress or (lambda line: print(line, file=sys.stderr, flush=True)))(
            f"ditc: compiling its NNTile CPU kernels into {folder} (once per NNTile build)")
        with tempfile.TemporaryDirectory(dir=folder) as tmp:   # a private folder: the compiler writes there
            partial = Path(tmp) / target.name
            result = subprocess.run(_command(build, partial), capture_output=True, text=True)
            try:
                write_text_atomic(folder / "build.log",
                                  " ".join(_command(build, target)) + "\n" + result.stdout + result.stderr)
            except UsageError as error:
                raise Unavailable(str(error)) from None
            if result.returncode != 0:
                first = next((line for line in result.stderr.splitlines() if "error" in line), result.stderr[-300:])
                raise Unavailable(f"compiling {SOURCE.name} failed ({first.strip()}); see {folder / 'build.log'}")
            digest = _sha256(partial)
            if target.is_symlink() or (target.exists() and not target.is_file()):
                raise Unavailable(f"{target} is not a regular file; remove it, or set DITC_CACHE_DIR")
            os.replace(partial, target)  # atomic: an interrupted compile leaves nothing behind
            try:
                write_text_atomic(record, digest + "\n")   # last: a module without it is compiled again
            except UsageError as error:
                raise Unavailable(str(error)) from None
    except OSError as error:
        raise Unavailable(f"cannot write the kernel cache {folder} ({error.strerror}); set DITC_CACHE_DIR") from None
    finally:
        os.close(lock)
    return target


def _sha256(path: Path) -> str:
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def _intact(module: Path, record: Path) -> bool:
    """Whether `module` is a regular file whose sha256 is the one its compile recorded in `record`."""
    try:
        recorded = read_small(record, 100).decode("ascii", errors="replace").strip()
        return not module.is_symlink() and module.is_file() and recorded == _sha256(module)
    except (OSError, ValueError):
        return False


#: The extension once loaded, or why it could not be: a failed build is not tried again in this process.
_loaded: ModuleType | Unavailable | None = None


def load() -> ModuleType:
    """The extension module, compiled and imported on first use (raises `Unavailable`)."""
    global _loaded
    if isinstance(_loaded, Unavailable):
        raise Unavailable(str(_loaded))
    if _loaded is None:
        try:
            path = built_module()
            import nntile.nntile_core  # noqa: F401  NNTile's types first: the extension's arguments are them

            spec = importlib.util.spec_from_file_location(MODULE, path)
            module = importlib.util.module_from_spec(spec)
            try:
                spec.loader.exec_module(module)
            except ImportError as error:
                raise Unavailable(f"{path} does not load ({error})") from None
        except Unavailable as error:
            _loaded = error
            raise
        _loaded = module
    return _loaded


def problem() -> str | None:
    """None when ditc's kernels can run here, else why not."""
    try:
        load()
    except Unavailable as error:
        return str(error)
    return None


def available() -> dict[str, str | None]:
    """Every kernel set: None where it can run here, else why not."""
    return {"ditc": problem(), "nntile": None}


@dataclass(frozen=True)
class KernelChoice:
    """The kernel set a model runs: `name` (a key of KERNEL_SETS), the extension where it is ditc's, and
    a sentence for reports."""

    name: str
    module: ModuleType | None
    note: str


def kernels(requested: str | None = None) -> KernelChoice:
    """The kernel set to run: `requested`, else $DITC_KERNELS, else `auto` (ditc's where available, else
    NNTile's, with a warning saying why). An unknown name, or `ditc` where it is unavailable, raises
    UsageError."""
    name = requested or os.environ.get(ENV) or "auto"
    source = "requested" if requested else f"${ENV}"
    if name not in (*KERNEL_SETS, "auto"):
        raise UsageError(f"{source} kernel set {name!r}: allowed are auto, {', '.join(KERNEL_SETS)}")
    if name == "nntile":
        return KernelChoice("nntile", None, "NNTile's kernels (asked for)")
    why = problem()
    if why is None:
        return KernelChoice("ditc", load(), f"ditc's kernels for {REPLACED}, NNTile's for the rest")
    if name == "ditc":
        raise UsageError(f"{source} kernel set ditc: ditc's kernels are unavailable here: {why}")
    warnings.warn(f"ditc's CPU kernels are unavailable ({why}); running NNTile's", KernelWarning, stacklevel=2)
    return KernelChoice("nntile", None, f"NNTile's kernels (ditc's are unavailable: {why})")
