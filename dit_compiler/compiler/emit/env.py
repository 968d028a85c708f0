"""The jinja2 environment shared by every emitter: strict, deterministic, one fixed header."""
from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path

import jinja2

from dit_compiler import __version__
from dit_compiler.compiler.graph.ir import Graph


def template_dir() -> Path:
    """`templates/` ships inside the installed package; in a source checkout it sits beside it."""
    package = Path(__file__).resolve().parents[2]
    installed = package / "templates"
    return installed if installed.is_dir() else package.parent / "templates"


@lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(template_dir())),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,
    )


def spec_digest(graph: Graph) -> str:
    """A short hash of the resolved spec: the same spec always gives the same header."""
    text = json.dumps(graph.spec.compiled_dict(), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def header(graph: Graph, what: str) -> dict:
    """Facts every generated file states at its top. Not the spec's path: a build folder re-verified from
    its own spec.resolved.yaml must compare equal to the build it came from."""
    return {
        "what": what,
        "spec_name": graph.spec.name,
        "spec_digest": spec_digest(graph),
        "version": __version__,
    }


def render(template: str, **context) -> str:
    return environment().get_template(template).render(**context)
