"""Checking merged spec data (JSON Schema, then what the schema cannot say) and building the `Spec`.

Every problem becomes a `Diagnostic` located at the key it is about; all of them are reported at once.
"""
from __future__ import annotations

import difflib
import json
import math
from functools import cache
from importlib import resources
from typing import Any

from jsonschema import Draft202012Validator, ValidationError, validators

from dit_compiler.errors import MAX_SHOWN, Diagnostic, shown
from dit_compiler.compiler.spec.loader import Document, KeyPath, Origin, dotted, shown_value
from dit_compiler.compiler.spec.designs import SET, combination_problems, refused, refusals
from dit_compiler.compiler.spec.model import (DEFAULT_SAMPLE_STEPS, DIFFUSERS_NORM_EPS, MODEL_SECTIONS, SAMPLERS, SIZE_FORM,
                                              SIZE_RANGE, TILE_AXES, CaptionSpec, DiffusionSpec, ModelSpec, SampleSpec, Spec,
                                              TilingSpec, TrainSpec, memory_bytes)
from dit_compiler.compiler.tiling import tile_problems

_PROBLEMS = {
    "type": "wrong type",
    "enum": "not one of the allowed values",
    "const": "not the allowed value",
    "minimum": "too small",
    "exclusiveMinimum": "too small",
    "maximum": "too large",
    "exclusiveMaximum": "too large",
    "multipleOf": "not a multiple of {}",
    "pattern": "not of the allowed form",
    "maxLength": "too long",
    "minLength": "too short",
    "anyOf": "not an allowed value",
    "minItems": "too few items",
    "uniqueItems": "a value is listed twice",
}
_BOUNDS = (("minimum", ">="), ("exclusiveMinimum", ">"), ("maximum", "<="), ("exclusiveMaximum", "<"))
_KINDS = {"integer": "an integer", "number": "a number", "string": "a string", "boolean": "true or false",
          "object": "a mapping", "array": "a list", "null": "null"}
#: Relative rounding error up to which hidden_size * mlp_ratio still counts as whole (100 * 1.1 is
#: 110.00000000000001 in binary floating point).
_WHOLE_TOLERANCE = 1e-9
_MAX_SHOWN_DIVISORS = 24


def _finite_number(checker, instance: Any) -> bool:
    """JSON Schema's "number", finite: YAML's `.nan` and `.inf` are floats, and NaN passes every bound
    (each comparison with NaN is false), so a plain schema would let `lr: .nan` through."""
    return Draft202012Validator.TYPE_CHECKER.is_type(instance, "number") and math.isfinite(instance)


#: The validator of spec and sweep files: Draft 2020-12 whose numbers are finite.
Validator = validators.extend(Draft202012Validator,
                              type_checker=Draft202012Validator.TYPE_CHECKER.redefine("number", _finite_number))


@cache
def schema_text() -> str:
    return resources.files(__package__).joinpath("schema.json").read_text(encoding="utf-8")


@cache
def _validator() -> Draft202012Validator:
    return Validator(json.loads(schema_text()))


def _name_rule() -> str:
    return _subschema(())["properties"]["name"]["pattern"]


def check(doc: Document, default_name: str | None = None) -> list[Diagnostic]:
    """Every problem in `doc`: schema errors, then the model's and the tiles' semantic checks.
    `default_name` (a file's stem) must be a valid `name` where the spec sets none."""
    data = doc.data()
    errors = list(_validator().iter_errors(data))
    diagnostics = schema_diagnostics(errors, doc)
    name_schema = _subschema(())["properties"]["name"]
    if default_name is not None and "name" not in data and not Draft202012Validator(name_schema).is_valid(default_name):
        message = "the spec sets no `name:`, and its file name is no valid build name; add a `name:` line"
        diagnostics.append(Diagnostic(doc.source, None, None, "name", message, default_name, describe(name_schema)))
    # Values the schema rejected; unknown keys are reported but do not stop the checks of the others.
    invalid = {tuple(error.path)[:2] for error in errors if error.validator != "additionalProperties"}
    if not any(path[:1] == ("model",) for path in invalid):
        model = build_model(data.get("model", {}))
        model_problems = _model_problems(model, doc) + _design_problems(model, doc)
        diagnostics += model_problems
        if not model_problems and ("batch",) not in invalid:
            diagnostics += _tile_problems(model, data, doc, invalid)
    if isinstance(data.get("memory_limit"), str):
        diagnostics += _memory_limit_problems(data["memory_limit"], doc)
    diagnostics += _diffusion_problems(data, doc, invalid)
    return sorted(diagnostics, key=lambda d: (d.file, d.line or 0, d.column or 0))


def sweep_keys() -> dict[str, dict]:
    """Dotted key -> schema of every spec value a sweep may set: `batch`, `precision`, `model.*` (the
    block sections' keys too: `model.attention.qk_norm`), `tiling.*` (not `name`, which a sweep gives
    each point, nor `preset` or `extends`, which the resolved base spec has already applied)."""
    def leaves(prefix: str, properties: dict) -> dict[str, dict]:
        keys = {}
        for key, value in properties.items():
            if "properties" in value:
                keys.update(leaves(f"{prefix}{key}.", value["properties"]))
            else:
                keys[prefix + key] = value
        return keys
    return {key: value for key, value in leaves("", _subschema(())["properties"]).items()
            if key not in ("name", "preset", "extends")}


def section_problems(section: str, values: dict) -> list[str]:
    """What the schema refuses in `values`, keys of the spec's `section` (`train`, `sample`) that ditc
    also records elsewhere (a run's `run.json`): one line per problem, `key: problem (got value); allowed`."""
    schema = _subschema((section,))
    return [f"{dotted(tuple(error.path)) or section}: "
            f"{_problem(error)} (got {shown(shown_value(error.instance))}); allowed: {describe(error.schema)}"
            for error in Validator(schema).iter_errors(values)]


def build_spec(data: dict, default_name: str, source: str) -> Spec:
    """The frozen Spec of valid data; keys it does not set take their defaults."""
    top = {key: data[key] for key in ("batch", "precision", "target", "memory_limit") if key in data}
    diffusion = DiffusionSpec(**_coerce(("diffusion",), data.get("diffusion", {})))
    sample = {"sampler": SAMPLERS[diffusion.objective][0], "steps": DEFAULT_SAMPLE_STEPS[diffusion.objective]} \
        | _coerce(("sample",), data.get("sample", {}))
    return Spec(name=data.get("name", default_name), source=source, model=build_model(data.get("model", {})),
                tiling=_build_tiling(data.get("tiling", {})), diffusion=diffusion,
                train=TrainSpec(**_coerce(("train",), data.get("train", {}))), sample=SampleSpec(**sample),
                **_coerce((), top))


def build_model(values: dict) -> ModelSpec:
    """The ModelSpec of valid model keys; flavor diffusers changes the default norm_eps to its class's
    (DiTTransformer2DModel 1e-5; PixArtTransformer2DModel, conditioning adaln_single, 1e-6 as DiT)."""
    values = _coerce(("model",), values)
    if "norm_eps" not in values and values.get("flavor") == "diffusers" and values.get("conditioning") != "adaln_single":
        values["norm_eps"] = DIFFUSERS_NORM_EPS
    for section, cls in MODEL_SECTIONS.items():
        if isinstance(values.get(section), dict):
            values[section] = cls(**_coerce(("model", section), values[section]))
    return ModelSpec(**values)


def _build_tiling(values: dict) -> TilingSpec:
    return TilingSpec(**{axis: size if size == "auto" else int(size) for axis, size in values.items()})


def _coerce(path: KeyPath, values: dict) -> dict:
    """The known keys' values in the types the dataclasses declare (the schema lets `2.0` be an integer
    and `4` a number); unknown keys, reported elsewhere, are left out."""
    types = {"integer": int, "number": float}
    properties = _subschema(path)["properties"]
    return {key: types.get(properties[key].get("type"), lambda v: v)(value)
            for key, value in values.items() if key in properties}


def _subschema(path: KeyPath) -> dict:
    """The schema of the mapping at `path`; a nullable mapping's (`model.caption`) is its object form."""
    schema = _validator().schema
    for key in path:
        schema = schema["properties"][key]
        schema = next((option for option in schema.get("anyOf", ()) if "properties" in option), schema)
    return schema


def schema_diagnostics(errors: list[ValidationError], doc: Document) -> list[Diagnostic]:
    """The JSON Schema errors of `doc`'s data as Diagnostics located in its file."""
    return [found for error in errors for found in _schema_diagnostics(error, doc)]


def _schema_diagnostics(error: ValidationError, doc: Document) -> list[Diagnostic]:
    path = tuple(error.path)
    if error.validator == "required":
        missing = [key for key in error.validator_value if key not in error.instance]
        return [diagnostic(doc.origin(path), path, f"missing key {key!r}", None, describe(error.schema))
                for key in missing]
    if error.validator == "additionalProperties":
        unknown = [key for key in error.instance if key not in error.schema["properties"]]
        return [_unknown_key(path + (key,), list(error.schema["properties"]), doc, guess=i < MAX_SHOWN)
                for i, key in enumerate(unknown)]
    problem = _problem(error)
    if error.validator == "uniqueItems" and (index := _repeated(error.instance)) is not None:
        problem = f"the value {shown(error.instance[index])} is listed twice"
    elif error.instance is None:
        problem += ": the value is empty"
    elif isinstance(error.instance, (dict, list)):
        problem += f": got {shown_value(error.instance)}"
    value = None if isinstance(error.instance, (dict, list)) else error.instance
    return [diagnostic(doc.origin(path), path, problem, value, describe(error.schema))]


def _problem(error: ValidationError) -> str:
    """What is wrong with the value `error` is about, in words."""
    if isinstance(error.instance, float) and not math.isfinite(error.instance):
        return "must be a finite number"
    return _PROBLEMS.get(error.validator, "not allowed").format(error.validator_value)


def _repeated(items: list) -> int | None:
    """The index of the first item equal to an earlier one, as JSON Schema compares scalars (1 and 1.0 are
    equal, 1 and true are not), in one pass (a list can be 10,000 values long); None where none is."""
    seen = set()
    for index, item in enumerate(items):
        key = json.dumps(item, sort_keys=True) if isinstance(item, (dict, list)) else (isinstance(item, bool), item)
        if key in seen:
            return index
        seen.add(key)
    return None


def _unknown_key(path: KeyPath, allowed: list[str], doc: Document, guess: bool = True) -> Diagnostic:
    guess = difflib.get_close_matches(str(path[-1]), allowed, n=1) if guess else []
    message = f"unknown key; did you mean {guess[0]!r}?" if guess else "unknown key"
    return diagnostic(doc.origin(path, key=True), path, message, None, ", ".join(allowed))


def describe(schema: dict) -> str:
    """What a (sub)schema allows, in words: `an integer >= 1`, `one of 'dit', 'diffusers'`."""
    if "anyOf" in schema:
        return " or ".join(describe(option) for option in schema["anyOf"])
    if "enum" in schema:
        return "one of " + ", ".join(repr(value) for value in schema["enum"])
    if "const" in schema:
        return repr(schema["const"])
    if schema.get("type") == "object" and "properties" in schema:
        return "a mapping of " + ", ".join(schema["properties"])
    if schema.get("type") == "array":
        return (f"a list of at least {schema.get('minItems', 0)} values, each {describe(schema['items'])}"
                + ", none twice" * schema.get("uniqueItems", False))
    kinds = schema.get("type", [])
    kinds = [_KINDS[k] for k in ([kinds] if isinstance(kinds, str) else kinds)]
    kind = " or ".join([", ".join(kinds[:-1]), kinds[-1]] if len(kinds) > 2 else kinds)
    bounds = [key for key, _ in _BOUNDS if key in schema]
    if "minimum" in bounds and "maximum" in bounds:
        bounds = [key for key in bounds if key not in ("minimum", "maximum")]
        conditions = [f"from {schema['minimum']} to {schema['maximum']}"]
    else:
        conditions = []
    conditions += [f"{sign} {schema[key]}" for key, sign in _BOUNDS if key in bounds]
    if "multipleOf" in schema:
        conditions.append(f"divisible by {schema['multipleOf']}")
    if "minLength" in schema:
        conditions.append(f"at least {schema['minLength']} character long")
    if schema.get("pattern") == _name_rule():
        conditions.append(f"of 1 to {schema.get('maxLength')} letters, digits, '.', '_' or '-', starting with a "
                          "letter or digit")
    elif "pattern" in schema:
        conditions.append(f"matching {schema['pattern']}")
    return " ".join([kind, " and ".join(conditions)]).strip()


def _model_problems(model: ModelSpec, doc: Document) -> list[Diagnostic]:
    """What the schema cannot check about a schema-valid model."""
    diagnostics = _divisibility(model, doc, "hidden_size", "num_heads")
    diagnostics += _divisibility(model, doc, "input_size", "patch_size")
    product = model.hidden_size * model.mlp_ratio
    if math.isfinite(product) and (abs(product - model.mlp_size) > _WHOLE_TOLERANCE * product or model.mlp_size < 1):
        message = f"hidden_size * mlp_ratio = {product:g} is not a whole number of at least 1"
        diagnostics.append(_at_key(doc, "mlp_ratio", message, model.mlp_ratio,
                                   f"a ratio that makes hidden_size={model.hidden_size} * mlp_ratio a whole number"))
    return diagnostics


def _design_problems(model: ModelSpec, doc: Document) -> list[Diagnostic]:
    """Block-language values ditc does not compile yet, and combinations no model family has
    (`dit_compiler.compiler.spec.designs`), each at its key."""
    found = [diagnostic(doc.origin(("model",) + path), ("model",) + path, message,
                        None if isinstance(value, CaptionSpec) else value, _lowered(path))
             for path, value, message in refusals(model)]
    found += [diagnostic(doc.origin(("model",) + path), ("model",) + path, message, _shown_value(model, path), allowed)
              for path, message, allowed in combination_problems(model)]
    return found


def _lowered(path: tuple[str, ...]) -> str:
    """What this version lowers at `model.<path>`, in words."""
    schema, not_lowered = _subschema(("model",) + path[:-1])["properties"][path[-1]], refused(path)
    if SET in not_lowered:
        return f"{json.dumps(schema.get('default', 0))} (the default)"
    values = schema["enum"] if "enum" in schema else [True, False] if schema.get("type") == "boolean" else []
    lowered = [v for v in values if not any(v == r and type(v) is type(r) for r in not_lowered)]
    if not lowered:    # an integer (num_classes 0)
        return describe(schema) + " but " + ", ".join(map(repr, not_lowered))
    return ("only " if len(lowered) == 1 else "one of ") + ", ".join(map(repr, lowered))


def _shown_value(model: ModelSpec, path: tuple[str, ...]) -> Any:
    value = getattr(model, path[0])
    return None if isinstance(value, (dict, CaptionSpec)) else value


def _divisibility(model: ModelSpec, doc: Document, whole: str, part: str) -> list[Diagnostic]:
    """`whole` must be divisible by `part`; reported at `part` unless only `whole` is written."""
    total, size = getattr(model, whole), getattr(model, part)
    if total % size == 0:
        return []
    message = f"{whole}={total} is not divisible by {part}={size}"
    if doc.has(("model", part)) or not doc.has(("model", whole)):
        divisors = _divisors(total)
        shown = divisors if len(divisors) <= _MAX_SHOWN_DIVISORS else divisors[:_MAX_SHOWN_DIVISORS - 1] + ["...", total]
        allowed = f"a divisor of {whole}={total}: " + ", ".join(map(str, shown))
        return [_at_key(doc, part, message, size, allowed)]
    return [_at_key(doc, whole, message, total, f"a multiple of {part}={size}")]


def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return small + [n // d for d in reversed(small) if d * d != n]


def _tile_problems(model: ModelSpec, data: dict, doc: Document, invalid: set[KeyPath]) -> list[Diagnostic]:
    """Tile sizes the model cannot run; axes the schema already rejected count as auto."""
    written = data.get("tiling", {})
    if not isinstance(written, dict):
        return []
    tiling = _build_tiling({axis: size for axis, size in written.items()
                            if axis in TILE_AXES and ("tiling", axis) not in invalid})
    return [diagnostic(doc.origin(("tiling", axis)), ("tiling", axis), f"tile size does not fit the {axis} axis",
                        value, allowed)
            for axis, value, allowed in tile_problems(model, int(data.get("batch", 1)), tiling)]


def _memory_limit_problems(text: str, doc: Document) -> list[Diagnostic]:
    try:
        memory_bytes(text)
    except ValueError:
        return [diagnostic(doc.origin(("memory_limit",)), ("memory_limit",), "not an allowed memory size", text,
                           f"{SIZE_FORM}, {SIZE_RANGE}; or null")]
    return []


#: Keys of the `diffusion:` section that only rectified flow reads, and those only its logit-normal reads.
_FLOW_KEYS = ("timestep_sampling", "logit_mean", "logit_std", "shift")
_LOGIT_NORMAL_KEYS = ("logit_mean", "logit_std")
_DEFAULT_DIFFUSION = DiffusionSpec()


def _diffusion_problems(data: dict, doc: Document, invalid: set[KeyPath]) -> list[Diagnostic]:
    """Settings that do not fit the objective: flow keys under ddpm, logit-normal keys under uniform
    sampling (each unless at its default), learned sigma under rectified flow (a velocity has no variance), another objective's sampler.
    Values the schema already rejected are not judged again."""
    section = data.get("diffusion", {})
    if not isinstance(section, dict) or ("diffusion", "objective") in invalid:
        return []
    objective = section.get("objective", "ddpm")
    found = []

    def at(path: KeyPath, message: str, allowed: str) -> None:
        value = data.get(path[0], {}).get(path[1])
        found.append(diagnostic(doc.origin(path), path, message, value, allowed))

    def ignored(key: str) -> bool:   # set, not to its default (as a resolved spec has it), and unread
        return ("diffusion", key) not in invalid and section.get(key, getattr(_DEFAULT_DIFFUSION, key)) \
            != getattr(_DEFAULT_DIFFUSION, key)

    if objective == "ddpm":
        for key in _FLOW_KEYS:
            if ignored(key):
                at(("diffusion", key), "rectified flow's setting; the objective here is ddpm",
                   "only with diffusion.objective: rectified_flow (or drop the key)")
    else:
        if section.get("timestep_sampling", "uniform") == "uniform":
            for key in _LOGIT_NORMAL_KEYS:
                if ignored(key):
                    at(("diffusion", key), "the logit-normal's setting; timestep_sampling here is uniform",
                       "only with diffusion.timestep_sampling: logit_normal (or drop the key)")
        model = data.get("model", {})
        if isinstance(model, dict) and ("model", "learn_sigma") not in invalid and model.get("learn_sigma", True) is True:
            if doc.has(("model", "learn_sigma")):
                at(("model", "learn_sigma"), "rectified_flow predicts a velocity, which has no variance to learn",
                   "false with diffusion.objective: rectified_flow")
            else:
                at(("diffusion", "objective"), "rectified_flow needs model.learn_sigma: false (its default is true)",
                   "add `learn_sigma: false` under model:, or objective ddpm")
    sample = data.get("sample", {})
    sampler = sample.get("sampler") if isinstance(sample, dict) and ("sample", "sampler") not in invalid else None
    if sampler is not None and sampler not in SAMPLERS[objective]:
        at(("sample", "sampler"), f"not a sampler of the objective {objective}",
           "one of " + ", ".join(repr(s) for s in SAMPLERS[objective]))
    return found


def _at_key(doc: Document, key: str, message: str, value: Any, allowed: str) -> Diagnostic:
    path = ("model", key)
    return diagnostic(doc.origin(path), path, message, value, allowed)


def diagnostic(origin: Origin, path: KeyPath, message: str, value: Any, allowed: str) -> Diagnostic:
    return Diagnostic(origin.file, origin.line, origin.column, dotted(path), message, value, allowed)
