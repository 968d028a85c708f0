"""The spec language: load a YAML spec (or in-memory data) into a validated, frozen `Spec`.

`load_spec` raises `SpecError` carrying a `Diagnostic` for every problem, each located at its file,
line, column and key path.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from dit_compiler.errors import SpecError
from dit_compiler.compiler.spec.loader import Document, document_from_data, load_document
from dit_compiler.compiler.spec.model import Spec
from dit_compiler.compiler.spec.validate import build_spec, check, schema_text

__all__ = ["SpecError", "load_spec", "load_spec_data", "schema", "schema_text"]


def load_spec(path: str | os.PathLike) -> Spec:
    """The spec in the YAML file at `path`, with `extends`, `preset` and defaults applied."""
    return _finish(load_document(path), Path(os.fspath(path)).stem, from_file=True)


def load_spec_data(data: dict, source: str = "<data>") -> Spec:
    """The spec in `data` (as a spec file would hold it), validated the same way; diagnostics have no line."""
    return _finish(document_from_data(data, source), Path(source).stem, from_file=False)


def schema() -> dict:
    """The JSON Schema (draft 2020-12) of a spec file; a fresh copy each call."""
    return json.loads(schema_text())


def _finish(doc: Document, default_name: str, from_file: bool) -> Spec:
    """The Spec of `doc`; a default name that a file's stem gives must be a valid name like any other."""
    diagnostics = check(doc, default_name if from_file else None)
    if diagnostics:
        raise SpecError(diagnostics)
    return build_spec(doc.data(), default_name, doc.source)
