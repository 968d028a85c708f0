"""`ditc build`: spec -> graph -> every emitter -> `generated/<name>/`, deterministically, replacing only
what ditc wrote.

A build folder holds a manifest, `ditc-build.json`, naming the files ditc wrote there (with their
sha256) and the ditc version. A build writes into a folder only if the folder is missing, empty or
has a manifest, and replaces only files its manifest lists; any other folder or file at those paths
is refused (`UsageError`, naming it). Builds into one output folder take turns (a lock on it), so two
processes building the same name both succeed.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml

from dit_compiler import __version__
from dit_compiler import targets
from dit_compiler.errors import UsageError
from dit_compiler.emit.env import spec_digest
from dit_compiler.emit.torch_emitter import emit_torch
from dit_compiler.graph.ir import Graph
from dit_compiler.lower import lower
from dit_compiler.spec.model import Spec
from dit_compiler.userfiles import MAX_METADATA, read_json

TORCH_FILE = "torch_reference.py"
NNTILE_FILE = "nntile_model.py"
GRAPH_FILE = "graph.json"
SPEC_FILE = "spec.resolved.yaml"
MANIFEST_FILE = "ditc-build.json"
_TEMP_SUFFIX = ".ditc-tmp"


@dataclass(frozen=True)
class Build:
    graph: Graph
    files: dict[str, str]   # file name -> text


def graph_of(spec: Spec) -> Graph:
    """The compiled graph: lowered, with the spec's target's own tensors attached, checked."""
    graph = lower(spec)
    targets.get(spec.target).prepare(graph)
    graph.lint()
    return graph


def compile_spec(spec: Spec) -> Build:
    """Run every stage in memory; nothing touches the disk."""
    graph = graph_of(spec)
    resolved = (f"# Resolved spec \"{spec.name}\" (sha256 {spec_digest(graph)}), written by ditc {__version__}: "
                "every default filled in.\n"
                + yaml.safe_dump(spec.to_dict(), sort_keys=False, default_flow_style=False))
    return Build(graph, with_manifest(spec.name, {
        TORCH_FILE: emit_torch(graph),
        NNTILE_FILE: targets.get(spec.target).emit(graph),
        GRAPH_FILE: graph.to_json(),
        SPEC_FILE: resolved,
    }))


def with_manifest(name: str, files: dict[str, str]) -> dict[str, str]:
    """`files` and the manifest that marks their folder as ditc's: the ditc version and each file's sha256."""
    manifest = {"written_by": f"ditc {__version__}", "spec": name,
                "note": "ditc build replaces the files listed here, and nothing else in this folder",
                "files": {file: hashlib.sha256(text.encode()).hexdigest() for file, text in sorted(files.items())}}
    return files | {MANIFEST_FILE: json.dumps(manifest, indent=1) + "\n"}


def stale_files(build: Build, folder: Path) -> list[str]:
    """The files of `build` that `folder` lacks or holds with other contents (compared as bytes: a file
    edited into something that is not UTF-8 is just different; one of another size is not read)."""
    return [name for name, text in sorted(build.files.items()) if not _holds(folder / name, text.encode())]


def _holds(path: Path, data: bytes) -> bool:
    """Whether `path` is a regular file of exactly the bytes `data`."""
    try:
        if not path.is_file() or path.stat().st_size != len(data):
            return False
        with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as file:
            return file.read(len(data) + 1) == data
    except OSError:
        return False


def manifest_files(folder: Path) -> dict[str, str] | None:
    """File name -> sha256 of what ditc wrote in `folder`, from its manifest; None where it has none."""
    path = folder / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        manifest = read_json(path, MAX_METADATA, "manifest")
        files = manifest["files"]
        if not (str(manifest["written_by"]).startswith("ditc ") and isinstance(files, dict)
                and all(isinstance(k, str) and "/" not in k and isinstance(v, str) for k, v in files.items())):
            raise ValueError("unexpected contents")
    except (UsageError, ValueError, KeyError, TypeError) as error:
        error = str(error).removeprefix(f"{path}: ")
        raise UsageError(f"{path}: not a manifest ditc wrote ({error}); ditc does not write into {folder}/: "
                         "move it away, or build with another `name:` or -o") from None
    return files


def check_target(build: Build, out_root: str | os.PathLike) -> Path:
    """The folder `build` goes to, after checking ditc may write there: refuses (`UsageError`) a path that
    is not a folder, a non-empty folder without ditc's manifest, and a file the manifest does not list."""
    target = Path(out_root) / build.graph.spec.name
    _owned(build, target)
    return target


def _owned(build: Build, target: Path) -> dict[str, str] | None:
    """The files of `target` ditc wrote (name -> sha256 as written, "" where unknown), or None where
    `target` does not exist yet."""
    if not os.path.lexists(target):
        return None
    advice = "move it away, or build with another `name:` or -o"
    if target.is_symlink() or not target.is_dir():
        raise UsageError(f"{target} exists and is not a build folder; ditc replaces only folders it built: {advice}")
    listed = manifest_files(target)
    if listed is None:
        listed = {path.name: "" for path in target.iterdir()}
        if listed and not _built_before_manifests(target, set(listed), build):
            raise UsageError(f"{target}/ is a folder ditc did not build (it has no {MANIFEST_FILE}); ditc does not "
                             f"write into it: {advice}")
    owned = listed | {MANIFEST_FILE: ""}
    for name in build.files:
        path = target / name
        if os.path.lexists(path) and (name not in owned or path.is_symlink() or not path.is_file()):
            what = "a link" if path.is_symlink() else "a folder" if path.is_dir() else \
                f"not a file ditc wrote (its {MANIFEST_FILE} does not list it)" if name not in owned else "not a file"
            raise UsageError(f"{path} is {what}; ditc does not replace it: move it away and build again")
    return owned


def _built_before_manifests(folder: Path, present: set[str], build: Build) -> bool:
    """A build folder of a ditc older than manifests: only file names a build writes, and its resolved
    spec headed by ditc."""
    spec = folder / SPEC_FILE
    return present <= set(build.files) and spec.is_file() and not spec.is_symlink() \
        and spec.open(encoding="utf-8", errors="replace").readline().startswith("# Resolved spec ")


def write_atomic(path: Path, write: Callable[[Path], object], suffix: str = "") -> None:
    """Write a file whole or not at all (a reader never sees half of it): `write(tmp)` writes a temporary
    file beside it, renamed over `path` once written. `suffix` ends the temporary name where the writer
    picks a format by it (`np.savez` adds `.npz` to a name without it, `savefig` reads `.png`)."""
    tmp = path.with_name(f".{path.name}.tmp{suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_build(build: Build, out_root: str | os.PathLike) -> Path:
    """Write `out_root/<name>/`. A write that fails or is interrupted (an error, a full disk, Ctrl-C,
    SIGTERM) leaves the previous build as it was: a new folder appears whole by one rename, and an
    existing one gets each changed file written beside it first, then renamed over it with SIGINT and
    SIGTERM held back."""
    root = Path(out_root)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UsageError(f"{root}: cannot make the output folder ({error.strerror})") from None
    target = root / build.graph.spec.name
    with _locked(root):
        owned = _owned(build, target)
        if owned is None:
            _create(build, target)
        else:
            _update(build, target, owned)
    return target


def _create(build: Build, target: Path) -> None:
    staging = None
    try:
        with _signals_held():  # a signal must not land between mkdtemp's mkdir and the `finally` that removes it
            staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=_TEMP_SUFFIX, dir=target.parent))
        umask = os.umask(0)
        os.umask(umask)
        staging.chmod(0o777 & ~umask)  # mkdtemp makes 0700; a build folder is an ordinary folder
        for name, text in sorted(build.files.items()):
            (staging / name).write_text(text, encoding="utf-8")
        os.rename(staging, target)
    finally:
        if staging is not None and staging.exists():
            shutil.rmtree(staging)


def _update(build: Build, target: Path, owned: dict[str, str]) -> None:
    changed = [name for name in stale_files(build, target) if name != MANIFEST_FILE] + [MANIFEST_FILE]
    temps = {name: target / f".{name}{_TEMP_SUFFIX}" for name in changed}
    try:
        for name, temp in temps.items():
            temp.write_text(build.files[name], encoding="utf-8")
        with _signals_held():
            for name, temp in temps.items():  # the manifest last
                os.replace(temp, target / name)
            for name, digest in owned.items():  # files an older build wrote, this one does not, unedited
                if name not in build.files and file_sha256(target / name) == digest:
                    (target / name).unlink()
    finally:
        for temp in temps.values():
            temp.unlink(missing_ok=True)


def file_sha256(path: Path) -> str | None:
    """The sha256 of a regular file's bytes; None for anything else."""
    if path.is_symlink() or not path.is_file():
        return None
    with path.open("rb") as file:   # in chunks: a build file can be edited into a huge one
        return hashlib.file_digest(file, "sha256").hexdigest()


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """An exclusive lock on `folder` itself (flock on the folder: no lock file is left behind)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM wait while the block runs (a build's renames, making a staging folder), so an
    interruption never leaves a folder half old and half new, nor a staging folder no `finally` knows of;
    they arrive right after."""
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)
