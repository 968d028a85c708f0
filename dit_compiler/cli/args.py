"""What every ditc command shares: argparse types (bounded numbers, memory sizes: a bad value is argparse's
usage error, the command's usage, the flag, the value and what is allowed, exit 2) and the checks of the
paths and worker counts it is given, made before any work (a UsageError, exit 2)."""
from __future__ import annotations

import argparse
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

from dit_compiler.compiler import targets
from dit_compiler.compiler.build import SPEC_FILE
from dit_compiler.compiler.spec import load_spec
from dit_compiler.compiler.spec.model import Spec, memory_bytes
from dit_compiler.errors import UsageError, shown
from dit_compiler.files import check_destination

#: Where `ditc build` (and a runner given a spec) writes.
DEFAULT_OUT = "generated"
#: The largest seed: numpy's seeds are 32-bit.
MAX_SEED = 2**32 - 1


def integer(lo: int, hi: int) -> Callable[[str], int]:
    """An integer from `lo` to `hi`."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{shown(text)} is not an integer from {lo} to {hi}") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"{value} is outside {lo} to {hi}")
        return value
    return parse


def number(lo: float, hi: float, above: bool = False) -> Callable[[str], float]:
    """A number from `lo` (or, with `above`, more than `lo`) to `hi`; NaN and infinities are outside."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{shown(text)} is not a number") from None
        if not (lo < value if above else lo <= value) or not value <= hi or not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{value:g} is outside {'more than ' if above else ''}{lo:g} to {hi:g}")
        return value
    return parse


def memory_size(text: str) -> str:
    """A memory size such as 1.5GiB, kept as written (as a spec's `memory_limit` is)."""
    try:
        memory_bytes(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def path(text: str) -> str:
    """A path, never empty (`-o ''` would otherwise mean the current folder)."""
    if not text:
        raise argparse.ArgumentTypeError("an empty path; name one ('.' for the current folder)")
    return text


def spec_and_dir(target: str) -> tuple[Spec, Path | None]:
    """A spec file, or a generated build folder (its spec.resolved.yaml), -> (spec, build folder or None)."""
    path = Path(target)
    if path.is_dir():
        if not (path / SPEC_FILE).is_file():
            raise UsageError(f"{target}: a folder, but not a ditc build (no {SPEC_FILE}); run `ditc build SPEC` first")
        return load_spec(path / SPEC_FILE), path
    if not path.exists():
        raise UsageError(f"{target}: no such spec file or build folder")
    return load_spec(path), None



def runner_target(name: str = targets.DEFAULT) -> ModuleType:
    """The target package a spec's `target:` names (checked by the spec's validation)."""
    return targets.get(name)


def workers(args: argparse.Namespace, target: ModuleType | None = None) -> int:
    """--ncpus, else the count `target`'s environment sets (its `default_workers`: every core where none);
    exported as the target's worker environment, which its runtime reads here and in the processes it starts."""
    target = target or runner_target()
    ncpus = args.ncpus or target.default_workers()
    os.environ.update(target.worker_environment(ncpus))
    return ncpus


def check_folder_arg(path: str, flag: str, made: bool = True) -> None:
    """An output folder: refused before any work when it is a file, a broken link, under a file, or not
    writable; or, unless it is `made` when missing, when it does not exist."""
    folder = Path(path)
    if folder.is_symlink() and not folder.exists():
        raise UsageError(f"{flag} {path}: a link to nothing ({os.readlink(folder)}); name a folder")
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{flag} {path}: a file, not a folder; name a folder"
                         + (" (it is made when missing)" if made else ""))
    if not made and not folder.exists():
        raise UsageError(f"{flag} {path}: no such folder")
    existing = folder.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"{flag} {path}: {existing} is a file, so no folder can be made under it")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path}: {existing} is not writable by you")


def check_file_arg(path: str | None, flag: str) -> None:
    """A file to write: refused before any work when it is a folder, a link, a device, a FIFO or a socket
    (ditc replaces a regular file whole, and writes through nothing: `files.check_destination`), or when
    its folder is missing or not writable."""
    if path is None:
        return
    file = Path(path)
    if file.is_dir() and not file.is_symlink():
        raise UsageError(f"{flag} {path}: a folder; name a file")
    folder = file.absolute().parent
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{flag} {path}: {folder} is a file, not a folder")
    if not folder.is_dir():
        raise UsageError(f"{flag} {path}: the folder {folder} does not exist")
    try:
        check_destination(file)
    except UsageError as error:
        raise UsageError(f"{flag} {error}") from None
    if not os.access(folder, os.W_OK | os.X_OK) or (file.exists() and not os.access(file, os.W_OK)):
        raise UsageError(f"{flag} {path}: not writable by you")
    try:   # as the file will be written: a temporary file beside it (root may "access" /proc, not write there)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".ditc-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        raise UsageError(f"{flag} {path}: no file can be written in {folder} ({error.strerror})") from None
