"""Reading spec files: YAML whose every key and value keeps its position, with `extends` and `preset`
merged in.

A file's layer is `extends` target <- `preset` <- the file's own keys, merged key by key (nested
mappings per key). Every value stays an `Entry` that remembers the file, line and column it came from,
so a problem found after merging still points into the right file.
"""
from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from yaml.reader import ReaderError

from dit_compiler.errors import Diagnostic, SpecError
from dit_compiler.compiler.spec.model import PRESETS

#: The largest spec or sweep file (a spec is a few hundred bytes): any file under it validates in a
#: fraction of a second.
MAX_BYTES = 32 << 10
#: Values one file may expand to; stops alias bombs ("billion laughs") and recursive aliases.
MAX_VALUES = 10_000
#: Brackets one file may nest: PyYAML's scanner slows down quadratically with flow nesting (16,000
#: levels took half a second before its recursion limit stopped it); a spec nests three.
MAX_NESTING = 64
#: Files one `extends` chain may hold, the first one included.
MAX_EXTENDS = 16
EMPTY_SPEC = "the spec is empty; `preset: DiT-XL/2` selects the defaults"
_KEY_TAGS = ("tag:yaml.org,2002:str", "tag:yaml.org,2002:merge")
_COLLECTION_TAGS = ("tag:yaml.org,2002:map", "tag:yaml.org,2002:seq")


class _Loader(yaml.SafeLoader):
    """SafeLoader (libyaml's where PyYAML has it: it parses a file at the size limit in a tenth of the
    time) that also reads `1e-5` as a float (YAML 1.1 wants `1.0e-5`; users write `1e-5`)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"), list("-+0123456789")
)


@dataclass(frozen=True)
class Origin:
    """Where something is written; line and column are 1-based, None for in-memory data."""

    file: str
    line: int | None = None
    column: int | None = None

    @classmethod
    def of(cls, file: str, mark: yaml.Mark) -> Origin:
        return cls(file, mark.line + 1, mark.column + 1)


@dataclass(frozen=True)
class Entry:
    """One key's value (a `Mapping` when it is a mapping) and where the key and the value are written."""

    value: Any
    key: Origin
    at: Origin


Mapping = dict[str, Entry]
KeyPath = tuple[Any, ...]


class Document:
    """Merged spec data that can say where each of its keys and values is written."""

    def __init__(self, root: Mapping, source: str):
        self.root = root
        self.source = source

    def data(self) -> dict:
        """The merged data as plain Python values."""
        return _plain(self.root)

    def has(self, path: KeyPath) -> bool:
        return self._entries(path)[1] == len(path)

    def origin(self, path: KeyPath, key: bool = False) -> Origin:
        """Where the value (or with `key`, the key) at `path` is written, else its nearest written parent's key."""
        entry, depth = self._entries(path)
        if entry is None:
            return Origin(self.source)
        return entry.at if depth == len(path) and not key else entry.key

    def _entries(self, path: KeyPath) -> tuple[Entry | None, int]:
        """The deepest entry along `path` and how many parts of `path` lead to it (a list item has no
        entry of its own: a path through one stays at the list's entry, or the item's keys below it)."""
        entry, node = None, self.root
        for depth, part in enumerate(path):
            if isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
                node = node[part]
            elif isinstance(node, dict) and part in node:
                entry = node[part]
                node = entry.value
            else:
                return entry, depth
        return entry, len(path)


def load_document(path: str | os.PathLike) -> Document:
    """Read, parse and merge the spec at `path`; raise SpecError with every problem found on the way."""
    shown = os.fspath(path)
    diagnostics: list[Diagnostic] = []
    root = _load_file(Path(shown), None, (), diagnostics)
    if diagnostics:
        raise SpecError(diagnostics)
    return Document(root, shown)


def read_yaml(path: str | os.PathLike, what: str) -> Document:
    """One YAML file (a `what`, e.g. "sweep file") read with the spec's limits and positions; no `extends`
    or `preset` merging."""
    shown = os.fspath(path)
    diagnostics: list[Diagnostic] = []
    text = _read(Path(shown), None, diagnostics, what)
    own = None if text is None else _parse(text, shown, diagnostics, what)
    if diagnostics:
        raise SpecError(diagnostics)
    return Document(own or {}, shown)


def document_from_data(data: Any, source: str) -> Document:
    """A Document from in-memory data: no positions; `extends` is relative to the current directory."""
    if not isinstance(data, dict):
        message = "the top level must be a mapping of spec keys"
        raise SpecError([Diagnostic(source, None, None, "", message, shown_value(data))])
    origin = Origin(source)
    diagnostics: list[Diagnostic] = []
    root = _layer(_wrap(data, origin), Path("."), (), diagnostics)
    if diagnostics:
        raise SpecError(diagnostics)
    return Document(root, source)


def merge(base: Mapping, over: Mapping) -> Mapping:
    """`over` on top of `base`, key by key; mappings on both sides merge per key."""
    merged = dict(base)
    for key, entry in over.items():
        old = merged.get(key)
        if old is not None and isinstance(old.value, dict) and isinstance(entry.value, dict):
            entry = Entry(merge(old.value, entry.value), entry.key, entry.at)
        merged[key] = entry
    return merged


def _entries(values: Mapping, at: Entry) -> dict:
    """A preset's values as entries at its `preset:` line (sections such as `caption` too)."""
    return {key: Entry(_entries(value, at) if isinstance(value, dict) else value, at.key, at.at)
            for key, value in values.items()}


#: The files an `extends` chain has read so far: (resolved path, path as written, bytes).
Chain = tuple[tuple[Path, str, int], ...]


def _load_file(path: Path, named_at: Entry | None, chain: Chain, diagnostics: list[Diagnostic]) -> Mapping:
    """One file's merged layer; `named_at` is the `extends` entry that names it, if any. A chain of files
    shares one size limit, so it validates as fast as one file."""
    found = len(diagnostics)
    text = _read(path, named_at, diagnostics, "spec", sum(size for *_, size in chain))
    own = None if text is None else _parse(text, str(path), diagnostics, "spec")
    if own == {} and len(diagnostics) == found:  # empty, only comments, or `{}`: never a request for the defaults
        diagnostics.append(Diagnostic(str(path), None, None, "", EMPTY_SPEC))
    if not own:
        return {}
    return _layer(own, path.parent, chain + ((path.resolve(), str(path), len(text.encode())),), diagnostics)


def _layer(own: Mapping, here: Path, chain: Chain,
           diagnostics: list[Diagnostic]) -> Mapping:
    """`own` on top of its preset on top of its `extends` target (which must not extend back)."""
    base: Mapping = {}
    extends = own.get("extends")
    if extends is not None and isinstance(extends.value, str):
        target = here / extends.value
        if (problem := path_problem(extends.value)) is not None:
            diagnostics.append(_at(extends, "extends", f"not a path a file can have: {problem}", extends.value))
        elif any(_resolved(target) == seen for seen, *_ in chain):
            names = " -> ".join([shown for _, shown, _ in chain] + [str(target)])
            diagnostics.append(_at(extends, "extends", f"extends cycle: {names}", extends.value))
        elif len(chain) >= MAX_EXTENDS:
            message = (f"extends chain longer than {MAX_EXTENDS} files, from this file to {extends.at.file}, whose "
                       f"line {extends.at.line} extends {extends.value!r}")
            diagnostics.append(Diagnostic(chain[0][1], None, None, "extends", message))
        else:
            base = _load_file(target, extends, chain, diagnostics)
            base.pop("name", None)
    preset = own.get("preset")
    if preset is not None and isinstance(preset.value, str) and preset.value in PRESETS:
        filled = _entries(PRESETS[preset.value], preset)
        base = merge(base, {"model": Entry(filled, preset.key, preset.at)})
    return merge(base, own)


def _resolved(path: Path) -> Path | None:
    """`path` resolved, or None where it cannot be: a symlink loop (RuntimeError before Python 3.13, OSError
    since), which reading it then reports."""
    try:
        return path.resolve()
    except (OSError, RuntimeError):
        return None


def path_problem(text: str) -> str | None:
    """Why `text` cannot name a file (a NUL byte, a lone surrogate the file system cannot encode), or None."""
    if "\0" in text:
        return "it holds a NUL byte"
    try:
        os.fsencode(text)
    except UnicodeEncodeError as error:
        return f"character {error.object[error.start]!r} cannot be encoded"
    return None


def _read(path: Path, named_at: Entry | None, diagnostics: list[Diagnostic], what: str,
          used: int = 0) -> str | None:
    """The file's text, or None after a diagnostic; the size (with the `used` bytes of the files that
    extend it) is checked before anything is read."""
    try:
        # O_NONBLOCK: a named pipe opens at once (and is refused) instead of waiting for a writer forever
        with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as file:
            info = os.fstat(file.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise ValueError("not a regular file (a folder, a pipe or a device)")
            size = info.st_size
            raw = b"" if used + size > MAX_BYTES else file.read(MAX_BYTES - used + 1)
    except (OSError, ValueError) as error:
        reason = getattr(error, "strerror", None) or str(error)
        if named_at is None:
            diagnostics.append(Diagnostic(str(path), None, None, "", f"cannot read the {what}: {reason}"))
        else:
            message = f"cannot read the extended spec {str(path)!r}: {reason}"
            diagnostics.append(_at(named_at, "extends", message, named_at.value))
        return None
    size = max(size, len(raw))
    if used + size > MAX_BYTES:
        together = f", and the files extending it {used} bytes" if used else ""
        diagnostics.append(Diagnostic(str(path), None, None, "", f"{what} is {size} bytes{together}; the limit is "
                                      f"{MAX_BYTES // 1024} KiB"))
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line_start = raw.rfind(b"\n", 0, error.start) + 1
        message = f"not UTF-8 text: byte 0x{raw[error.start]:02x} at offset {error.start}"
        diagnostics.append(Diagnostic(str(path), raw.count(b"\n", 0, error.start) + 1,
                                      error.start - line_start + 1, "", message))
        return None


def _parse(text: str, file: str, diagnostics: list[Diagnostic], what: str) -> Mapping | None:
    """The top-level mapping of one file's YAML ({} for an empty file), or None after a diagnostic."""
    if _nesting(text) > MAX_NESTING:
        diagnostics.append(Diagnostic(file, None, None, "", f"{what} is nested too deeply (more than {MAX_NESTING} "
                                      "levels of [ ] or { })"))
        return None
    try:
        loader = _Loader(text)
        node = loader.get_single_node()
        if node is None or node.tag == "tag:yaml.org,2002:null":  # no document, or an empty one
            return {}
        if not isinstance(node, MappingNode):
            diagnostics.append(Diagnostic(file, node.start_mark.line + 1, node.start_mark.column + 1, "",
                                          f"the top level must be a mapping of {what} keys", _node_kind(node)))
            return None
        return _Walker(loader, file, diagnostics).mapping(node, ())
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        problem = (error.problem or "") + (f" ({error.context})" if error.context else "")
        line, column = (mark.line + 1, mark.column + 1) if mark else (None, None)
        diagnostics.append(Diagnostic(file, line, column, "", f"YAML syntax error: {problem}"))
    except ReaderError as error:
        line = text.count("\n", 0, error.position) + 1
        message = f"character {chr(error.character)!r} is not allowed in YAML"
        diagnostics.append(Diagnostic(file, line, None, "", message))
    except _TooManyValues:
        diagnostics.append(Diagnostic(file, None, None, "", f"{what} expands to more than {MAX_VALUES} values"))
    except RecursionError:
        diagnostics.append(Diagnostic(file, None, None, "", f"{what} is nested too deeply"))
    return None


def _nesting(text: str) -> int:
    """How deep `text`'s brackets nest, counting those in strings and comments too (a bound: no spec has
    dozens of brackets in a string)."""
    depth = deepest = 0
    for char in re.sub(r"[^][{}]", "", text):
        depth = depth + 1 if char in "[{" else max(depth - 1, 0)
        deepest = max(deepest, depth)
    return deepest


class _TooManyValues(Exception):
    pass


class _Walker:
    """Turns a composed YAML node tree into Entries, checking keys once per mapping node."""

    def __init__(self, loader: _Loader, file: str, diagnostics: list[Diagnostic]):
        self.loader = loader
        self.file = file
        self.diagnostics = diagnostics
        self.budget = MAX_VALUES
        self.checked: set[int] = set()  # mapping nodes already checked (an alias revisits its node)

    def value(self, node: Node, path: KeyPath) -> Any:
        self.budget -= 1
        if self.budget < 0:
            raise _TooManyValues
        if not isinstance(node, ScalarNode) and node.tag not in _COLLECTION_TAGS:
            # Scalars with unknown tags fail in construct_object; collections are walked here instead.
            self.report(node, path, f"unsupported YAML tag {node.tag}")
            return None
        if isinstance(node, MappingNode):
            return self.mapping(node, path)
        if isinstance(node, SequenceNode):
            return [self.value(item, path + (index,)) for index, item in enumerate(node.value)]
        try:
            return self.loader.construct_object(node)
        except (ValueError, OverflowError) as error:  # an integer of more than 4300 digits, a bad date
            if "int_max_str_digits" in str(error):   # Python's advice to raise its limit is not the user's
                digits = sum(c.isdigit() for c in node.value)
                self.report(node, path, f"an integer of {digits} digits; no spec number has more than a few")
            else:
                self.report(node, path, f"cannot read this value: {error}")
            return None

    def mapping(self, node: MappingNode, path: KeyPath) -> Mapping:
        check = id(node) not in self.checked
        self.checked.add(id(node))
        entries: Mapping = {}
        for key_node, value_node in node.value:
            # `<<` is no merge key here: the spec has no mapping to merge, so it is just an unknown key.
            if not (isinstance(key_node, ScalarNode) and key_node.tag in _KEY_TAGS):
                if check:
                    self.report(key_node, path, "keys must be strings", _node_kind(key_node))
                continue
            key = key_node.value
            if key in entries and check:
                lines = f"first on line {entries[key].key.line}, again on line {key_node.start_mark.line + 1}"
                self.report(key_node, path + (key,), f"duplicate key {key!r}: {lines}")
            entries[key] = Entry(self.value(value_node, path + (key,)), Origin.of(self.file, key_node.start_mark),
                                 Origin.of(self.file, value_node.start_mark))
        return entries

    def report(self, node: Node, path: KeyPath, message: str, value: Any = None) -> None:
        mark = node.start_mark
        self.diagnostics.append(Diagnostic(self.file, mark.line + 1, mark.column + 1, dotted(path), message, value))


def dotted(path: KeyPath) -> str:
    """A key path as users write it: `model.hidden_size`, `tiling.heads`."""
    return ".".join(str(part) for part in path)


def _at(entry: Entry, key_path: str, message: str, value: Any) -> Diagnostic:
    return Diagnostic(entry.at.file, entry.at.line, entry.at.column, key_path, message, value)


def _node_kind(node: Node) -> str:
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    return node.value


def shown_value(value: Any) -> Any:
    """A value to show in a message: scalars as they are, containers by kind (they can be huge)."""
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    return value


def _wrap(value: Any, origin: Origin) -> Any:
    if isinstance(value, dict):
        return {key: Entry(_wrap(item, origin), origin, origin) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_wrap(item, origin) for item in value]
    return value


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _plain(entry.value) for key, entry in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return value
