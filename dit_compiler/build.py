"""`ditc build`: spec -> graph -> every emitter -> `generated/<name>/`, atomically and deterministically."""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from dit_compiler import __version__
from dit_compiler import targets
from dit_compiler.emit.env import spec_digest
from dit_compiler.emit.torch_emitter import emit_torch
from dit_compiler.graph.ir import Graph
from dit_compiler.lower import lower
from dit_compiler.spec.model import Spec

TORCH_FILE = "torch_reference.py"
NNTILE_FILE = "nntile_model.py"
GRAPH_FILE = "graph.json"
SPEC_FILE = "spec.resolved.yaml"


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
    return Build(graph, {
        TORCH_FILE: emit_torch(graph),
        NNTILE_FILE: targets.get(spec.target).emit(graph),
        GRAPH_FILE: graph.to_json(),
        SPEC_FILE: resolved,
    })


def stale_files(build: Build, folder: Path) -> list[str]:
    """The files of `build` that `folder` lacks or holds with other contents."""
    return [name for name, text in sorted(build.files.items())
            if not (folder / name).is_file() or (folder / name).read_text(encoding="utf-8") != text]


def write_text_atomic(path: Path, text: str) -> None:
    """Write a file whole or not at all (a reader never sees half of it)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_build(build: Build, out_root: str | os.PathLike) -> Path:
    """Write `out_root/<name>/` atomically: a failed write leaves the previous build untouched."""
    root = Path(out_root)
    root.mkdir(parents=True, exist_ok=True)
    target = root / build.graph.spec.name
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=root))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp makes 0700; a build folder is an ordinary folder
    try:
        for name, text in sorted(build.files.items()):
            (staging / name).write_text(text, encoding="utf-8")
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=root))
            os.replace(target, old / target.name)
            os.replace(staging, target)
            shutil.rmtree(old)
        else:
            os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return target
