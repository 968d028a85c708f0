"""`ditc build`: spec -> graph -> every emitter -> `generated/<name>/`, deterministically, replacing only
what ditc wrote.

A build folder holds a manifest, `ditc-build.json`, naming the files ditc wrote there (with their
sha256) and the ditc version. A build writes into a folder only if the folder is missing, empty or
has a manifest, and replaces only files its manifest lists; any other folder or file at those paths
is refused (`UsageError`, naming it). Builds into one output folder take turns (a lock on it), so two
processes building the same name both succeed.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import yaml

from dit_compiler import __version__
from dit_compiler.compiler import targets
from dit_compiler.compiler.emit.env import spec_digest
from dit_compiler.compiler.graph.ir import Graph
from dit_compiler.compiler.lower import lower
from dit_compiler.compiler.spec.model import Spec
from dit_compiler.compiler.targets.torch.emitter import emit_torch
from dit_compiler.errors import UsageError
from dit_compiler.files import (commit, file_sha256, locked, signals_held, stage, write_folder_atomic,
                                write_text_atomic)
from dit_compiler.userfiles import MAX_METADATA, read_json

TORCH_FILE = "torch_reference.py"
NNTILE_FILE = "nntile_model.py"
GRAPH_FILE = "graph.json"
SPEC_FILE = "spec.resolved.yaml"
MANIFEST_FILE = "ditc-build.json"


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
    with locked(root):
        owned = _owned(build, target)
        if owned is None:
            _create(build, target)
        else:
            _update(build, target, owned)
    return target


def _create(build: Build, target: Path) -> None:
    def write(staging: Path) -> None:
        for name, text in sorted(build.files.items()):
            write_text_atomic(staging / name, text)

    write_folder_atomic(target, write)


def _update(build: Build, target: Path, owned: dict[str, str]) -> None:
    changed = [name for name in stale_files(build, target) if name != MANIFEST_FILE] + [MANIFEST_FILE]
    staged: dict[str, tuple[Path, BinaryIO]] = {}
    try:
        for name in changed:
            text = build.files[name]
            tmp, file, _ = stage(target / name, lambda f: f.write(text.encode("utf-8")))
            staged[name] = (tmp, file)
        with signals_held():
            for name, (tmp, file) in staged.items():  # the manifest last
                commit(tmp, file, target / name, False)
            for name, digest in owned.items():  # files an older build wrote, this one does not, unedited
                if name not in build.files and file_sha256(target / name) == digest:
                    (target / name).unlink()
    finally:
        for tmp, file in staged.values():
            file.close()
            tmp.unlink(missing_ok=True)


def load_module(path: str | Path, name: str | None = None) -> types.ModuleType:
    """Import a generated file under a unique module name (several builds can live in one process)."""
    path = Path(path).resolve()
    name = name or f"ditc_generated_{abs(hash(str(path)))}_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except (SyntaxError, ImportError, OSError) as error:   # a build file edited into something Python cannot run
        del sys.modules[name]
        where = f", line {error.lineno}" if isinstance(error, SyntaxError) and error.lineno else ""
        why = str(getattr(error, "msg", None) or error)
        raise UsageError(f"{path}: cannot be imported ({type(error).__name__}{where}: {why})"
                         + ("" if "rebuild it" in why else "; rebuild it with `ditc build`")) from None
    return module
