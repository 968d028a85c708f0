"""Reading the files a user hands ditc, or that sit in a folder ditc reads (a run's `run.json` and
`metrics.csv`, a sweep's `results.json`, datasets, samples, the classifier cache): each must be a
regular file under a size limit, checked before a byte is read, so that a named pipe is never waited
on and a huge (sparse) file never reaches a parser. Every failure is one `UsageError` naming the file.

Limits (README, "Guarantees"): metadata files (`run.json`, manifests) 1 MiB, a sweep's
`results.json` 256 MiB, `metrics.csv` 1 GiB; array files (`.npz`) are read member by member, each
member's declared shape checked against the bytes it holds and against the machine's memory before
anything is allocated. `writing` makes errors of writing a file (a full disk) name it.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from dit_compiler.errors import UsageError

#: `run.json`, a build's manifest: a few hundred bytes as ditc writes them.
MAX_METADATA = 1 << 20
#: A sweep's `results.json`: about 1 KiB a point, so some 250,000 points.
MAX_RESULTS = 256 << 20
#: `metrics.csv`: about 70 bytes a step, so 1 GiB is some 15 million steps.
MAX_METRICS = 1 << 30


def _mib(size: int) -> str:
    return f"{size / 2**20:,.0f} MiB" if size >= 2**20 else f"{size:,} bytes"


def regular_size(path: Path, limit: int | None, what: str) -> int:
    """The size of `path`, a regular file of at most `limit` bytes (None: any size), else a UsageError.
    A pipe or device is refused without opening it for reading (which would wait for a writer)."""
    try:
        info = os.stat(path)
    except OSError as error:
        raise UsageError(f"{path}: cannot read the {what} ({error.strerror})") from None
    if not stat.S_ISREG(info.st_mode):
        raise UsageError(f"{path}: the {what} is not a regular file (a folder, a pipe or a device); ditc reads "
                         "only regular files")
    if limit is not None and info.st_size > limit:
        raise UsageError(f"{path}: the {what} is {_mib(info.st_size)}; the limit is {_mib(limit)}, so it is not "
                         f"one ditc wrote")
    return info.st_size


def read_bytes(path: Path, limit: int, what: str) -> bytes:
    """The bytes of `path`, a regular file of at most `limit` bytes (checked on the open file too: it may
    grow or be swapped between the check and the read)."""
    regular_size(path, limit, what)
    try:
        with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as file:
            if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
                raise UsageError(f"{path}: the {what} is not a regular file")
            data = file.read(limit + 1)
    except OSError as error:
        raise UsageError(f"{path}: cannot read the {what} ({error.strerror})") from None
    if len(data) > limit:
        raise UsageError(f"{path}: the {what} is more than {_mib(limit)}, the limit")
    return data


def read_text(path: Path, limit: int, what: str) -> str:
    """`read_bytes` decoded as UTF-8; other bytes are refused, naming the offset."""
    data = read_bytes(path, limit, what)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise UsageError(f"{path}: the {what} is not UTF-8 text (byte 0x{data[error.start]:02x} at offset "
                         f"{error.start})") from None


def read_json(path: Path, limit: int, what: str) -> Any:
    """The JSON value in `path`; not JSON (NaN and Infinity included, which JSON does not have) is refused."""
    def constant(name: str) -> None:
        raise ValueError(f"{name} is not JSON")

    try:
        return json.loads(read_text(path, limit, what), parse_constant=constant)
    except (ValueError, RecursionError) as error:
        reason = str(error) or type(error).__name__
        if "int_max_str_digits" in reason:   # Python's advice to raise its limit is not the user's
            reason = f"an integer of more than {sys.get_int_max_str_digits()} digits"
        raise UsageError(f"{path}: the {what} is not JSON ({reason})") from None


def available_memory() -> int:
    """Bytes this machine can give one array: its physical memory."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def load_npz(path: Path, names: tuple[str, ...], what: str, optional: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """The arrays `names` (and those of `optional` it has) of the .npz at `path`, read without pickles.
    Before an array is allocated its header is read: object arrays are refused, and so is a shape whose
    bytes the member does not hold or the machine's memory cannot; a member whose CRC does not match is
    refused as it is read. A missing name is refused naming what the file has."""
    regular_size(path, None, what)
    if not zipfile.is_zipfile(path):
        raise UsageError(f"{path}: the {what} is not an .npz file (a zip of .npy arrays, as numpy.savez writes)")
    try:
        with zipfile.ZipFile(path) as archive:
            members = {name.removesuffix(".npy"): name for name in archive.namelist()}
            missing = [name for name in names if name not in members]
            if missing:
                raise UsageError(f"{path}: the {what} has no {' and no '.join(missing)} array (it has: "
                                 f"{', '.join(sorted(members)) or 'nothing'})")
            return {name: _member(archive, members[name], path, what)
                    for name in (*names, *(n for n in optional if n in members))}
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, NotImplementedError) as error:
        raise UsageError(f"{path}: the {what} is not a readable .npz file ({str(error) or type(error).__name__})") \
            from None


def _member(archive: zipfile.ZipFile, member: str, path: Path, what: str) -> np.ndarray:
    info = archive.getinfo(member)
    with archive.open(info) as file:
        version = np.lib.format.read_magic(file)
        if version not in ((1, 0), (2, 0), (3, 0)):
            raise ValueError(f"{member}: .npy format version {version}")
        reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = reader(file, max_header_size=10_000)
        if dtype.hasobject:
            raise UsageError(f"{path}: {member} in the {what} holds Python objects; ditc reads only numeric arrays "
                             "(it never loads pickles)")
        nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
        if nbytes != info.file_size - file.tell():
            raise UsageError(f"{path}: {member} in the {what} declares shape {shape} of {dtype} ({_mib(nbytes)}) "
                             f"but holds {_mib(max(info.file_size - file.tell(), 0))}")
        if nbytes > available_memory():
            raise UsageError(f"{path}: {member} in the {what} is {_mib(nbytes)}, more than this machine's memory")
        array = np.empty(shape[::-1] if fortran else shape, dtype)
        if file.readinto(memoryview(array.reshape(-1)).cast("B")) != nbytes or file.read(1):   # the CRC at the end
            raise ValueError(f"{member} is not as long as its header says")
    return array.T if fortran else array


@contextlib.contextmanager
def writing(path: Path | str) -> Iterator[None]:
    """Errors while the block writes `path` name it: a full disk reaches ditc as an OSError without a file
    name (numpy, a file's write) or as torch's and safetensors' own errors; each becomes an OSError naming
    `path`, which `ditc` reports in one line (exit 1)."""
    try:
        yield
    except OSError as error:
        if error.filename is not None and Path(error.filename).name == Path(path).name:
            raise
        raise OSError(error.errno, error.strerror or str(error), str(path)) from None
    except Exception as error:   # torch.save's "[enforce fail at inline_container.cc...]", a SafetensorError
        if isinstance(error, UsageError) or type(error).__name__ not in ("RuntimeError", "SafetensorError"):
            raise
        code = errno.ENOSPC if "No space left" in str(error) or _full(path) else errno.EIO
        raise OSError(code, os.strerror(code), str(path)) from None


def _full(path: Path | str) -> bool:
    """Whether the file system `path` is written to has no room left (torch's error does not say why)."""
    try:
        return os.statvfs(Path(path).parent).f_bavail == 0
    except OSError:
        return False
