"""Sweep files: a base spec and what varies, read like a spec (the same YAML limits and positions, a JSON
Schema, every problem at once) and checked whole before the first point runs.

    base: ../specs/dit-s-2.yaml     # the spec every point starts from (relative to the sweep file)
    name: depth-hidden              # results go to <out>/<name>/ (default: the sweep file's stem)
    grid:                           # Cartesian product of every listed value
      model.depth: [6, 12]
    zip:                            # lists of one length, varied together (crossed with the grid)
      model.hidden_size: [256, 384]
      model.num_heads: [4, 6]
    points:                         # named points (crossed with grid and zip)
      - {name: small, set: {batch: 2}}

Keys are dotted spec keys (`model.depth`, `tiling.hidden`, `batch`); each must name a value of the spec
language, and each listed value must be one that key allows. Whether a point's values fit together
(num_heads dividing hidden_size) is checked per point: such a point is reported invalid.
"""
from __future__ import annotations

import difflib
import hashlib
import itertools
import json
import math
import os
import re
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator

from dit_compiler.errors import Diagnostic, SpecError
from dit_compiler.compiler.spec.loader import Document, KeyPath, read_yaml
from dit_compiler.compiler.spec.validate import Validator, describe, diagnostic, schema_diagnostics, sweep_keys

#: The most points a sweep may have unless `ditc sweep --max-points N` allows more.
MAX_POINTS = 1000
_NAME_LIMIT = 64


@dataclass(frozen=True)
class Point:
    name: str                    # the label results show: "b8-hidden=192-tokens=64"
    overrides: dict[str, Any]    # dotted spec key -> value
    build_name: str              # its build folder and spec name: "<sweep>-<label>", a valid spec name
    group: str = ""              # the named point (`points:`) it comes from: "" where the sweep names none


@dataclass(frozen=True)
class Sweep:
    name: str
    source: str
    base: Path
    points: list[Point]
    swept: list[str]             # the keys that vary, for columns and plot axes
    zipped: tuple[str, ...] = ()  # the keys of `zip:`, which vary together


@cache
def sweep_schema() -> dict:
    return json.loads(resources.files(__package__).joinpath("sweep.schema.json").read_text(encoding="utf-8"))


def load_sweep(path: str | os.PathLike, max_points: int = MAX_POINTS) -> Sweep:
    """The sweep in the YAML file at `path`; raises SpecError with every problem found."""
    doc = read_yaml(path, "sweep file")
    data = doc.data()
    diagnostics = schema_diagnostics(list(Validator(sweep_schema()).iter_errors(data)), doc)
    name = data.get("name", Path(doc.source).stem)
    if "name" not in data and not Draft202012Validator(sweep_schema()["properties"]["name"]).is_valid(name):
        diagnostics.append(Diagnostic(doc.source, None, None, "name", "the sweep sets no `name:`, and its file name is "
                                      "no valid name; add a `name:` line", name,
                                      describe(sweep_schema()["properties"]["name"])))
    if not diagnostics:
        diagnostics = _key_problems(data, doc)
        base = Path(doc.source).parent / data["base"]
        if not base.is_file():
            diagnostics.append(_at(doc, ("base",), f"no spec file at {base}", data["base"],
                                   "a spec file's path, relative to the sweep file"))
    if diagnostics:
        raise SpecError(sorted(diagnostics, key=lambda d: (d.line or 0, d.column or 0)))
    grid, zipped = data.get("grid", {}), data.get("zip", {})
    named = data.get("points", [{"name": ""}])
    zip_length = len(next(iter(zipped.values()))) if zipped else 1
    count = math.prod(len(values) for values in grid.values()) * zip_length * len(named)
    if count > max_points:
        raise SpecError([Diagnostic(doc.source, None, None, "", f"the sweep has {count:,} points; the limit is "
                                    f"{max_points:,} (`ditc sweep --max-points N` raises it)")])
    zip_rows = [dict(zip(zipped, values)) for values in zip(*zipped.values())] or [{}]
    points = []
    for entry, grid_values, zip_row in itertools.product(named, itertools.product(*grid.values()), zip_rows):
        varied = dict(zip(grid, grid_values)) | zip_row
        label = "-".join([entry["name"]] + [f"{key.split('.')[-1]}={value}" for key, value in varied.items()])
        label = label.strip("-") or "base"
        points.append(Point(label, entry.get("set", {}) | varied, _build_name(f"{name}-{label}"), entry["name"]))
    if len({point.build_name for point in points}) < len(points):
        raise SpecError([Diagnostic(doc.source, None, None, "", "two points get the same name; give the named "
                                    "points different names, or vary values that differ in letters or digits")])
    swept = list(dict.fromkeys([*grid, *zipped, *(key for entry in named for key in entry.get("set", {}))]))
    return Sweep(name, doc.source, base.resolve(), points, swept, tuple(zipped))


def point_data(base: dict, point: Point) -> dict:
    """The spec data of one point: the resolved base spec with the point's values set."""
    data = json.loads(json.dumps(base))
    data["name"] = point.build_name
    for key, value in point.overrides.items():
        *parents, leaf = key.split(".")
        node = data
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return data


def data_digest(data: dict) -> str:
    """The sha256 of spec data: a point whose spec changed gets another."""
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def _build_name(text: str) -> str:
    """A valid spec name from a point's label: other characters become `_`, `=` goes; a long one is cut
    and made unique by a hash of the whole."""
    name = re.sub(r"[^A-Za-z0-9_-]", "_", text.replace("=", ""))
    if len(name) > _NAME_LIMIT:
        name = f"{name[:_NAME_LIMIT - 9]}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"
    return name


def _key_problems(data: dict, doc: Document) -> list[Diagnostic]:
    """Every dotted key checked against the spec language, every value against what its key allows;
    zip's lists of one length; no key varied in two places."""
    keys = sweep_keys()
    diagnostics: list[Diagnostic] = []
    places: dict[str, list[KeyPath]] = {}
    sections = [(("grid", key), key, values) for key, values in data.get("grid", {}).items()]
    sections += [(("zip", key), key, values) for key, values in data.get("zip", {}).items()]
    sections += [(("points", i, "set", key), key, [value]) for i, point in enumerate(data.get("points", []))
                 for key, value in point.get("set", {}).items()]
    for path, key, values in sections:
        places.setdefault(key, []).append(path)
        if key not in keys:
            guess = difflib.get_close_matches(key, list(keys), n=1)
            message = f"{key!r} is no spec key a sweep can set" + (f"; did you mean {guess[0]!r}?" if guess else "")
            diagnostics.append(_at(doc, path, message, None, ", ".join(keys), key=True))
            continue
        checker = Validator(keys[key])
        diagnostics += [_at(doc, path, f"not a value {key} allows", value, describe(keys[key]))
                        for value in values if not checker.is_valid(value)]
    lengths = {len(values) for values in data.get("zip", {}).values()}
    if len(lengths) > 1:
        diagnostics.append(_at(doc, ("zip",), "every list in zip must have one length", sorted(lengths),
                               "lists of one length"))
    for key, paths in places.items():
        sections_of_key = {path[0] for path in paths}
        if len(sections_of_key) > 1:
            diagnostics.append(_at(doc, paths[-1], f"{key} is varied in both {' and '.join(sorted(sections_of_key))}",
                                   None, "each key in one of grid, zip and points"))
    names = [point["name"] for point in data.get("points", [])]
    diagnostics += [_at(doc, ("points", i, "name"), "two points have this name", name, "a name of its own")
                    for i, name in enumerate(names) if name in names[:i]]
    return diagnostics


def _at(doc: Document, path: KeyPath, message: str, value: Any, allowed: str, key: bool = False) -> Diagnostic:
    return diagnostic(doc.origin(path, key=key), path, message, value, allowed)
