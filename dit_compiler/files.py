"""Writing files and folders as ditc writes every output, shared by every part of ditc: whole or not at
all (a temporary name, then a rename), never through a link or onto a device, FIFO or socket, and only
into folders that are new, empty or marked as ditc's (`OUTPUT_MARKER`); small reads with a size cap;
ditc's cache folder.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from dit_compiler import __version__
from dit_compiler.errors import UsageError
from dit_compiler.userfiles import writing

_TEMP_SUFFIX = ".ditc-tmp"


def cache_root() -> Path:
    """ditc's cache folder: $DITC_CACHE_DIR, else $XDG_CACHE_HOME/ditc, else ~/.cache/ditc. An empty or
    relative $XDG_CACHE_HOME is ignored, as the XDG spec says (a relative one would scatter caches over
    whatever folder a command runs in)."""
    if root := os.environ.get("DITC_CACHE_DIR"):
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    return (Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache") / "ditc"


def check_destination(path: Path) -> None:
    """Refuse (`UsageError`) a path ditc must not replace: a link (ditc never writes through one, nor
    replaces one), a folder, a device, a FIFO or a socket. A missing path or a regular file passes."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as error:
        raise UsageError(f"{path}: cannot be checked ({error.strerror})") from None
    if stat.S_ISLNK(mode):
        raise UsageError(f"{path} is a link; ditc never writes through a link nor replaces one: remove it, or "
                         "name another path")
    if not stat.S_ISREG(mode):
        what = ("a folder" if stat.S_ISDIR(mode) else "a character device" if stat.S_ISCHR(mode)
                else "a block device" if stat.S_ISBLK(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "a socket")
        raise UsageError(f"{path} is {what}, not a regular file; ditc writes only regular files and does not "
                         "replace it: name a file")


def stage(path: Path, write: Callable[[BinaryIO], object], digest: bool = False) -> tuple[Path, BinaryIO, str]:
    """`write(file)` into a new temporary file beside `path`: created exclusively under an unpredictable
    name (`mkstemp`: O_CREAT | O_EXCL | O_NOFOLLOW, so no link at any name is followed), written through
    its descriptor (never reopened by name), made an ordinary file's mode and synced to disk. Returns its
    path, the still-open file and, with `digest`, the sha256 of its bytes. Removed again on any error."""
    tmp = None
    try:
        with signals_held():   # a signal must not land between mkstemp and `tmp` naming what to remove
            fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=_TEMP_SUFFIX, dir=path.parent)
            tmp = Path(name)
        file = os.fdopen(fd, "w+b")
        try:
            with writing(path):   # named while the temporary file still fills the disk (`writing` looks)
                write(file)
                file.flush()
                os.fchmod(fd, 0o666 & ~current_umask())
                os.fsync(fd)
            sha = ""
            if digest:
                file.seek(0)
                sha = hashlib.file_digest(file, "sha256").hexdigest()
                file.seek(0, os.SEEK_END)
        except BaseException:
            file.close()
            raise
        return tmp, file, sha
    except BaseException:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise


def current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def write_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], object],
                 kind: str | tuple[str, ...] | None = None, keep_open: bool = False) -> BinaryIO | None:
    """Every file ditc writes goes through here: whole or not at all, never through a link.

    `write(file)` writes the bytes into a temporary file beside `path` (see `stage`), which is renamed
    over `path` once complete; a reader never sees half of it, and a failed or interrupted write leaves
    `path` as it was and no temporary file. `path` must be missing or a regular file (`check_destination`):
    a link, folder, device, FIFO or socket there is refused, never replaced or written through.

    `kind` (one kind, or the kinds accepted with the first for a new folder) makes the write one into a
    folder ditc owns by marker (`OUTPUT_MARKER`, see `check_owned`): the folder must be new, empty or
    marked as that kind, a file already at `path` must be one the marker lists, unchanged since ditc
    wrote it, and the marker records the new file's sha256 afterwards. `keep_open` returns the file,
    open at its end, for appending after the rename (metrics a run adds step by step)."""
    path = Path(path)
    check_destination(path)
    with writing(path):   # a full disk named as this file
        if kind is None:
            tmp, file, _ = stage(path, write)
            commit(tmp, file, path, keep_open)
            return file if keep_open else None
        kinds = (kind,) if isinstance(kind, str) else kind
        with locked(_made(path.parent)):
            marker = _claim(path, kinds)
            tmp, file, sha = stage(path, write, digest=not keep_open)
            commit(tmp, file, path, keep_open)
            # an appended file's later bytes are not known here: listed without a hash
            _write_marker(path.parent, marker, {path.name: sha})
        return file if keep_open else None


def commit(tmp: Path, file: BinaryIO, path: Path, keep_open: bool) -> None:
    """Rename the staged `tmp` (still open as `file`) over `path`: only the file ditc wrote, and only over
    a regular file or nothing."""
    try:
        check_destination(path)   # again: os.replace would replace a link made since, not write through it
        written, there = os.fstat(file.fileno()), os.lstat(tmp)
        if (written.st_dev, written.st_ino) != (there.st_dev, there.st_ino):
            raise UsageError(f"{tmp}: replaced by something else while ditc wrote it; {path} was not written")
        os.replace(tmp, path)
    except BaseException:
        file.close()
        tmp.unlink(missing_ok=True)
        raise
    if not keep_open:
        file.close()


def write_text_atomic(path: str | os.PathLike, text: str, kind: str | tuple[str, ...] | None = None) -> None:
    write_atomic(path, lambda file: file.write(text.encode("utf-8")), kind)


#: The marker of a folder of ditc's outputs other than a build (a training run, its checkpoints, samples,
#: an evaluation, a sweep's results): ditc's name and version, the folder's kind, and the sha256 of each
#: file ditc wrote there ("" where the file grows as ditc appends to it).
OUTPUT_MARKER = "ditc-output.json"


#: The largest marker ditc reads (a run's lists every checkpoint: 100 bytes each).
_MAX_MARKER = 64 * 2**20


def _made(folder: Path) -> Path:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UsageError(f"{folder}: cannot make the output folder ({error.strerror})") from None
    return folder


def read_small(path: Path, limit: int) -> bytes:
    """A regular file's bytes, read without following a link nor blocking on a FIFO; ValueError for
    anything but a regular file, or one over `limit` bytes (OSError where it cannot be opened)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    with open(fd, "rb") as file:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError("not a regular file")
        data = file.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"larger than {limit} bytes")
    return data


def read_marker(folder: Path) -> dict | None:
    """`folder`'s OUTPUT_MARKER as ditc wrote it ({"kind", "files", ...}), None where there is none;
    refuses (UsageError) one ditc did not write. Read without following a link and without blocking on
    a FIFO, at most `_MAX_MARKER` bytes."""
    path = folder / OUTPUT_MARKER
    if not os.path.lexists(path):
        return None
    try:
        marker = json.loads(read_small(path, _MAX_MARKER).decode("utf-8"))
        if not (isinstance(marker, dict) and str(marker.get("written_by")).startswith("ditc ")
                and isinstance(marker.get("kind"), str) and isinstance(marker.get("files"), dict)
                and all(isinstance(k, str) and k and "/" not in k and k not in (".", "..") and isinstance(v, str)
                        for k, v in marker["files"].items())):
            raise ValueError("unexpected contents")
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as error:
        why = error.strerror if isinstance(error, OSError) and error.strerror else error
        raise UsageError(f"{path}: not a marker ditc wrote ({why}); ditc does not write into {folder}/: move it "
                         "away, or choose another output folder") from None
    return marker


#: The lock `ditc train` holds in its run folder while it runs (taken before the folder is checked, so that
#: two runs never check and write one folder at once); a folder holding only it counts as empty.
RUN_LOCK = ".ditc-train.lock"


def check_owned(folder: str | os.PathLike, kinds: tuple[str, ...], what: str) -> dict | None:
    """Refuse (UsageError, starting with `what`: the flag and path) an output folder ditc may not write
    into: anything but a folder, and a folder that is neither empty nor marked by ditc as one of `kinds`
    (its OUTPUT_MARKER). A missing folder passes (ditc makes it). Returns the folder's marker, if any."""
    folder = Path(folder)
    if not os.path.lexists(folder):
        return None
    if not folder.is_dir():
        raise UsageError(f"{what}: not a folder; name a folder (it is made when missing)")
    marker = read_marker(folder)
    if marker is None:
        if any(entry.name != RUN_LOCK for entry in folder.iterdir()):
            raise UsageError(f"{what}: a folder ditc did not write (it has no {OUTPUT_MARKER}); name a new or empty "
                             "folder, so that none of your files is replaced")
        return None
    if marker["kind"] not in kinds:
        raise UsageError(f"{what}: ditc wrote it as a {marker['kind']} folder, not a {' or '.join(kinds)} folder; "
                         "name another folder")
    return marker


def _claim(path: Path, kinds: tuple[str, ...]) -> dict:
    """The marker of `path`'s folder (a new one of `kinds[0]` where it has none), after checking ditc may
    write `path` there; `path` is listed in it (with no hash yet) before it is written, so that a write
    interrupted after its rename still leaves a file ditc knows as its own."""
    folder = path.parent
    marker = check_owned(folder, kinds, str(folder)) or _new_marker(kinds[0])
    if os.path.lexists(path):
        recorded = marker["files"].get(path.name)
        if recorded is None:
            raise UsageError(f"{path}: not a file ditc wrote (its {folder / OUTPUT_MARKER} does not list it); ditc "
                             "does not replace it: move it away, or choose another output folder")
        if recorded and file_sha256(path) != recorded:
            raise UsageError(f"{path}: changed since ditc wrote it (its sha256 is not the one in "
                             f"{folder / OUTPUT_MARKER}); ditc does not replace it: move it away, or choose another "
                             "output folder")
    if path.name not in marker["files"]:
        _write_marker(folder, marker, {path.name: ""})
    return marker


def _new_marker(kind: str) -> dict:
    return {"written_by": f"ditc {__version__}", "kind": kind,
            "note": "ditc replaces the files listed here, while unchanged, and nothing else in this folder",
            "files": {}}


def mark_folder(folder: Path, kinds: tuple[str, ...]) -> None:
    """Make `folder` (where missing) and mark it as ditc's, of `kinds[0]`, before anything is written in
    it (a command that fills sub-folders first); refuses what `check_owned` refuses."""
    with locked(_made(folder)):
        if check_owned(folder, kinds, str(folder)) is None:
            _write_marker(folder, _new_marker(kinds[0]), {})


def _write_marker(folder: Path, marker: dict, files: dict[str, str]) -> None:
    marker["files"] = dict(sorted((marker["files"] | files).items()))
    text = json.dumps(marker, indent=1) + "\n"
    tmp, file, _ = stage(folder / OUTPUT_MARKER, lambda f: f.write(text.encode()))
    commit(tmp, file, folder / OUTPUT_MARKER, False)


def write_folder_atomic(target: Path, write: Callable[[Path], object]) -> None:
    """Make the folder `target` whole or not at all: `write(staging)` fills a staging folder beside it,
    renamed to `target` (which must be missing or an empty folder) once written; on any failure or
    interruption the staging folder is removed and `target` is as it was."""
    staging = None
    try:
        with signals_held():  # a signal must not land between mkdtemp's mkdir and the `finally` that removes it
            staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=_TEMP_SUFFIX, dir=target.parent))
        staging.chmod(0o777 & ~current_umask())  # mkdtemp makes 0700; the folder made is an ordinary folder
        write(staging)
        os.rename(staging, target)
    finally:
        if staging is not None and staging.exists():
            shutil.rmtree(staging)


def file_sha256(path: Path) -> str | None:
    """The sha256 of a regular file's bytes; None for anything else."""
    if path.is_symlink() or not path.is_file():
        return None
    with path.open("rb") as file:   # in chunks: a build file can be edited into a huge one
        return hashlib.file_digest(file, "sha256").hexdigest()


@contextlib.contextmanager
def locked(folder: Path) -> Iterator[None]:
    """An exclusive lock on `folder` itself (flock on the folder: no lock file is left behind)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM wait while the block runs (a build's renames, making a staging folder), so an
    interruption never leaves a folder half old and half new, nor a staging folder no `finally` knows of;
    they arrive right after."""
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)
