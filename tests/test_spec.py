"""The spec language as a user meets it: files, merging, and the diagnostics of every mistake."""
from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator

from dit_compiler.errors import Diagnostic
from dit_compiler.compiler.spec import SpecError, load_spec, load_spec_data, schema, schema_text
from dit_compiler.compiler.spec.model import PRESETS, TILE_AXES, CaptionSpec, ModelSpec, TilingSpec

SPECS = Path(__file__).resolve().parent.parent / "specs"


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def problems(path: Path) -> list[Diagnostic]:
    with pytest.raises(SpecError) as caught:
        load_spec(path)
    return caught.value.diagnostics


def only(path: Path) -> Diagnostic:
    [diagnostic] = problems(path)
    return diagnostic


@pytest.mark.parametrize("path", sorted(SPECS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_specs_load(path):
    assert load_spec(path).name == path.stem


def test_preset_only_file_is_complete(tmp_path):
    spec = load_spec(write(tmp_path, "xl.yaml", "preset: DiT-XL/2\n"))
    assert (spec.model.depth, spec.model.hidden_size, spec.model.num_heads, spec.model.patch_size) == (28, 1152, 16, 2)
    assert spec.name == "xl" and spec.batch == 1 and spec.tiling == TilingSpec() and spec.precision == "fp32"


@pytest.mark.parametrize("text", ["", "# only a comment\n", "{}\n", "---\n...\n"])
def test_an_empty_spec_is_an_error_not_the_defaults(tmp_path, text):
    diagnostic = only(write(tmp_path, "empty.yaml", text))
    assert diagnostic.message == "the spec is empty; `preset: DiT-XL/2` selects the defaults"
    assert diagnostic.file == str(tmp_path / "empty.yaml")


def test_own_keys_override_the_preset_key_by_key(tmp_path):
    spec = load_spec(write(tmp_path, "s.yaml", "preset: DiT-S/4\nmodel:\n  depth: 3\n  norm_eps: 1e-5\n"
                                               "tiling:\n  heads: 2\nbatch: 2.0\nname: small-one\n"))
    assert (spec.model.depth, spec.model.hidden_size, spec.model.patch_size) == (3, 384, 4)
    assert spec.model.norm_eps == 1e-5 and type(spec.batch) is int and spec.name == "small-one"
    assert spec.tiling == TilingSpec(heads=2)


def test_extends_chain_merges_key_by_key_relative_to_each_file(tmp_path):
    write(tmp_path, "sub/base.yaml", "name: base\npreset: DiT-S/2\nmodel:\n  depth: 2\ntiling:\n  heads: 2\n")
    write(tmp_path, "sub/mid.yaml", "extends: base.yaml\nmodel:\n  hidden_size: 768\n  num_heads: 12\nbatch: 4\n")
    top = write(tmp_path, "top.yaml", "extends: sub/mid.yaml\nmodel:\n  depth: 3\ntiling:\n  tokens: 16\n")
    spec = load_spec(top)
    assert (spec.model.depth, spec.model.hidden_size, spec.model.num_heads, spec.model.patch_size) == (3, 768, 12, 2)
    assert spec.batch == 4 and spec.tiling == TilingSpec(heads=2, tokens=16)
    assert spec.name == "top" and spec.source == str(top)


def test_a_preset_fills_its_own_layer_over_the_extended_file(tmp_path):
    write(tmp_path, "base.yaml", "model:\n  depth: 2\n  in_channels: 3\n")
    spec = load_spec(write(tmp_path, "top.yaml", "extends: base.yaml\npreset: DiT-B/8\n"))
    assert (spec.model.depth, spec.model.hidden_size, spec.model.in_channels) == (12, 768, 3)


def test_an_error_in_an_extended_file_points_into_that_file(tmp_path):
    base = write(tmp_path, "base.yaml", "model:\n  depth: -1\n")
    diagnostic = only(write(tmp_path, "top.yaml", "extends: base.yaml\nbatch: 2\n"))
    assert (diagnostic.file, diagnostic.line, diagnostic.key_path) == (str(base), 2, "model.depth")


def test_extends_cycle_names_the_chain(tmp_path):
    write(tmp_path, "b.yaml", "batch: 2\nextends: a.yaml\n")
    a = write(tmp_path, "a.yaml", "extends: b.yaml\n")
    diagnostic = only(a)
    assert "cycle" in diagnostic.message and "a.yaml -> " in diagnostic.message
    assert diagnostic.message.count("a.yaml") == 2 and "b.yaml" in diagnostic.message
    assert diagnostic.line == 2 and diagnostic.file.endswith("b.yaml")


def test_extends_into_a_symlink_loop_is_a_located_error(tmp_path, capsys):
    from dit_compiler.cli import main

    (tmp_path / "a.yaml").symlink_to("b.yaml")
    (tmp_path / "b.yaml").symlink_to("a.yaml")
    top = write(tmp_path, "top.yaml", "batch: 2\nextends: a.yaml\n")
    diagnostic = only(top)
    assert (diagnostic.file, diagnostic.line, diagnostic.key_path) == (str(top), 2, "extends")
    assert "Too many levels of symbolic links" in diagnostic.message
    assert main(["validate", str(top)]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_missing_extends_target_names_the_extends_line(tmp_path):
    top = write(tmp_path, "top.yaml", "batch: 2\nextends: nowhere/base.yaml\n")
    diagnostic = only(top)
    assert (diagnostic.file, diagnostic.line, diagnostic.key_path) == (str(top), 2, "extends")
    assert "base.yaml" in diagnostic.message and "No such file" in diagnostic.message


def test_diagnostic_carries_file_line_column_key_value_and_allowed(tmp_path):
    path = write(tmp_path, "s.yaml", "model:\n  hidden_size: big\n")
    diagnostic = only(path)
    assert diagnostic == Diagnostic(str(path), 2, 16, "model.hidden_size", "wrong type", "big",
                                    "an integer from 1 to 65536 and divisible by 4")
    assert str(diagnostic) == (f"{path}:2:16: model.hidden_size: wrong type (got 'big'); "
                               "allowed: an integer from 1 to 65536 and divisible by 4")


def test_every_error_is_reported_at_once(tmp_path):
    path = write(tmp_path, "s.yaml", "precision: fp16\nmodel:\n  flavor: torch\n  class_dropout_prob: 1\n"
                                     "  frequency_embedding_size: 255\ntiling:\n  mlp: Auto\nname: bad name\n")
    diagnostics = problems(path)
    found = {d.key_path: d for d in diagnostics}
    assert set(found) == {"precision", "model.flavor", "model.class_dropout_prob",
                          "model.frequency_embedding_size", "tiling.mlp", "name"}
    assert found["model.flavor"].allowed == "one of 'dit', 'diffusers'"
    assert found["model.class_dropout_prob"].allowed == "a number >= 0 and < 1"
    assert found["tiling.mlp"].allowed == "an integer >= 1 or 'auto'"
    assert [d.line for d in diagnostics] == sorted(d.line for d in diagnostics)


def test_unknown_keys_suggest_the_close_one(tmp_path):
    path = write(tmp_path, "s.yaml", "tilling:\n  heads: 2\nmodel:\n  hiden_size: 384\n  num_heads: 6\n")
    model_key, top_key = sorted(problems(path), key=lambda d: d.key_path)
    assert str(model_key).startswith(f"{path}:4:3: model.hiden_size: unknown key; did you mean 'hidden_size'?")
    assert (top_key.key_path, top_key.line, top_key.column) == ("tilling", 1, 1)
    assert "did you mean 'tiling'?" in top_key.message and "precision" in top_key.allowed


def test_duplicate_keys_name_both_lines(tmp_path):
    diagnostic = only(write(tmp_path, "s.yaml", "model:\n  depth: 2\n  hidden_size: 64\n  depth: 3\n"))
    assert diagnostic.key_path == "model.depth" and diagnostic.line == 4
    assert "first on line 2, again on line 4" in diagnostic.message


def test_yaml_syntax_error_has_yamls_position(tmp_path):
    diagnostic = only(write(tmp_path, "s.yaml", "model:\n  depth: [2\nbatch: 1\n"))
    assert "YAML syntax error" in diagnostic.message and diagnostic.line == 3


def test_top_level_must_be_a_mapping(tmp_path):
    diagnostic = only(write(tmp_path, "s.yaml", "- preset: DiT-S/2\n"))
    assert "top level must be a mapping" in diagnostic.message and diagnostic.line == 1


def test_non_string_keys_are_refused(tmp_path):
    diagnostic = only(write(tmp_path, "s.yaml", "model:\n  12: depth\n"))
    assert (diagnostic.line, diagnostic.key_path, diagnostic.message) == (2, "model", "keys must be strings")


@pytest.mark.parametrize("text", ["model: !!python/object:os.system {}\n", "name: !!python/name:os.system\n"])
def test_python_tags_are_refused(tmp_path, text):
    assert only(write(tmp_path, "s.yaml", text)).line == 1


def test_unreadable_files(tmp_path):
    assert "cannot read" in only(tmp_path / "missing.yaml").message
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(b"name: caf\xe9\n")
    assert "not UTF-8" in only(bad).message and only(bad).line == 1


def test_ten_megabyte_file_is_refused_before_parsing(tmp_path):
    huge = tmp_path / "huge.yaml"
    with open(huge, "wb") as file:
        file.truncate(10 * 2**20)
    start = time.perf_counter()
    diagnostic = only(huge)
    assert time.perf_counter() - start < 0.5
    assert diagnostic.message == f"spec is {10 * 2**20} bytes; the limit is 32 KiB"


def test_alias_bombs_are_refused(tmp_path):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    assert "more than" in only(write(tmp_path, "bomb.yaml", "\n".join(lines) + "\n")).message


def test_anchors_and_aliases_work(tmp_path):
    spec = load_spec(write(tmp_path, "s.yaml", "model:\n  hidden_size: 64\n  num_heads: 4\n"
                                               "tiling:\n  hidden: &h 32\n  mlp: *h\n"))
    assert spec.tiling.hidden == spec.tiling.mlp == 32


@pytest.mark.parametrize("text", ["batch: true\n", "model:\n  depth: yes\n"])
def test_bool_is_not_an_integer(tmp_path, text):
    assert only(write(tmp_path, "s.yaml", text)).message == "wrong type"


@pytest.mark.parametrize("text, key_path, allowed", [
    ("model:\n  hidden_size: 100\n  num_heads: 3\n", "model.num_heads", "a divisor of hidden_size=100: 1, 2, 4, 5"),
    ("model:\n  hidden_size: 100\n", "model.hidden_size", "a multiple of num_heads=16"),
    ("model:\n  input_size: 30\n  patch_size: 4\n", "model.patch_size", "a divisor of input_size=30: 1, 2, 3"),
    ("model:\n  mlp_ratio: 2.3\n", "model.mlp_ratio", "a ratio that makes hidden_size=1152"),
    ("model:\n  norm_eps: .inf\n", "model.norm_eps", "a number > 0"),
    ("preset: DiT-S/2\ntiling:\n  heads: 5\n", "tiling.heads", "a divisor of num_heads=6"),
    ("preset: DiT-XL/2\ntiling:\n  tokens: 1000\n", "tiling.tokens", "an integer from 1 to the axis size 256"),
    ("memory_limit: 1.5 gigs\n", "memory_limit", "a size such as 1.5GiB"),
    ("memory_limit: 0MiB\n", "memory_limit", "a size such as 1.5GiB"),
])
def test_semantic_checks_point_at_the_key(tmp_path, text, key_path, allowed):
    diagnostic = only(write(tmp_path, "s.yaml", text))
    assert diagnostic.key_path == key_path and diagnostic.allowed.startswith(allowed)
    assert diagnostic.line == text.count("\n")


def test_semantic_checks_run_beside_unknown_keys(tmp_path):
    found = problems(write(tmp_path, "s.yaml", "model:\n  hidden_size: 100\n  num_heads: 3\n  dept: 2\n"))
    assert [d.key_path for d in found] == ["model.num_heads", "model.dept"]


def test_memory_limit_is_a_binary_size_kept_as_written(tmp_path):
    spec = load_spec(write(tmp_path, "s.yaml", "memory_limit: 1.5GiB\n"))
    assert spec.memory_limit == "1.5GiB" and spec.memory_limit_bytes == 3 * 2 ** 29
    assert spec.to_dict()["memory_limit"] == "1.5GiB"
    assert load_spec(write(tmp_path, "t.yaml", "memory_limit: 1536M\n")).memory_limit_bytes == 3 * 2 ** 29
    assert load_spec(write(tmp_path, "u.yaml", "batch: 2\n")).memory_limit_bytes is None
    diagnostic = only(write(tmp_path, "v.yaml", "memory_limit: 1536\n"))  # MiB? bytes? ambiguous: refused
    assert diagnostic.key_path == "memory_limit" and diagnostic.allowed == "a string or null"


def test_diffusers_flavor_defaults_norm_eps_unless_set(tmp_path):
    assert load_spec(write(tmp_path, "a.yaml", "model:\n  flavor: diffusers\n")).model.norm_eps == 1e-5
    explicit = write(tmp_path, "b.yaml", "model:\n  flavor: diffusers\n  norm_eps: 1e-6\n")
    assert load_spec(explicit).model.norm_eps == 1e-6
    assert load_spec(write(tmp_path, "c.yaml", "model:\n  flavor: dit\n")).model.norm_eps == 1e-6


def test_in_memory_data_is_validated_the_same_way():
    spec = load_spec_data({"preset": "DiT-B/4", "model": {"depth": 2}, "batch": 8}, source="sweep.yaml")
    assert (spec.name, spec.model.depth, spec.model.hidden_size, spec.batch) == ("sweep", 2, 768, 8)
    assert load_spec_data(spec.to_dict(), source="sweep.yaml") == spec
    with pytest.raises(SpecError) as caught:
        load_spec_data({"model": {"num_heads": 5}, "batch": 0})
    assert [(d.key_path, d.line) for d in caught.value.diagnostics] == [("batch", None), ("model.num_heads", None)]


def test_schema_is_valid_and_in_step_with_the_model():
    Draft202012Validator.check_schema(schema())
    properties = schema()["properties"]
    assert properties["preset"]["enum"] == list(PRESETS)
    model = properties["model"]["properties"]
    assert asdict(ModelSpec()) == {key: value["default"] if "properties" not in value else {
        inner: v["default"] for inner, v in value["properties"].items()} for key, value in model.items()}
    assert asdict(CaptionSpec()) == {key: value["default"] for key, value in
                                     model["caption"]["anyOf"][0]["properties"].items()}
    assert list(properties["tiling"]["properties"]) == list(TILE_AXES) == list(asdict(TilingSpec()))
    every = list(properties.values()) + list(model.values()) + list(properties["tiling"]["properties"].values()) \
        + [v for section in ("attention", "mlp", "norm") for v in model[section]["properties"].values()] \
        + list(model["caption"]["anyOf"][0]["properties"].values())
    assert all(p.get("title") and p.get("description") for p in every)


def test_schema_text_is_the_shipped_file():
    shipped = (Path(__file__).resolve().parent.parent / "dit_compiler/compiler/spec/schema.json").read_text()
    assert schema_text() == shipped == json.dumps(schema(), indent=2) + "\n"


def test_block_language_values_not_lowered_yet_are_refused_naming_key_and_value(tmp_path):
    """Every design and option of the block language is spec language; one ditc does not compile yet is a
    validation error at its key, all of them at once, never a build failure."""
    path = write(tmp_path, "b.yaml", "model:\n  mlp: {activation: swiglu}\n  norm: {type: rms_norm}\n")
    found = {(d.key_path, d.line): d for d in problems(path)}
    assert set(found) == {("model.mlp.activation", 2), ("model.norm.type", 3)}
    refused = found[("model.mlp.activation", 2)]
    assert refused.value == "swiglu" and "not supported yet" in refused.message
    assert "'gelu_tanh'" in refused.allowed and "'swiglu'" not in refused.allowed


def test_block_language_keys_get_positions_and_did_you_mean(tmp_path):
    diagnostics = problems(write(tmp_path, "c.yaml", "model:\n  conditioning: cross_atention\n"
                                 "  attention:\n    qk_nrom: layer_norm\n  norm: {type: rms}\ntiling:\n  contxt: 2\n"))
    assert [(d.key_path, d.line, d.message) for d in diagnostics] == [
        ("model.conditioning", 2, "not one of the allowed values"),
        ("model.attention.qk_nrom", 4, "unknown key; did you mean 'qk_norm'?"),
        ("model.norm.type", 5, "not one of the allowed values"),
        ("tiling.contxt", 7, "unknown key; did you mean 'context'?")]


def test_combinations_no_model_family_has_are_refused(tmp_path):
    diagnostics = problems(write(tmp_path, "d.yaml", "model:\n  flavor: diffusers\n  caption: {width: 8}\n"
                                 "tiling:\n  caption: 4\n"))
    messages = {d.key_path: d.message for d in diagnostics}
    assert "no way to read a caption" in messages["model.caption"]   # adaln_zero reads no caption
    only_context = only(write(tmp_path, "e.yaml", "tiling:\n  context: 2\n"))
    assert (only_context.key_path, only_context.value) == ("tiling.context", 2)
    assert "the model has no context axis" in only_context.allowed


def test_block_sections_resolve_to_their_dataclasses_and_round_trip(tmp_path):
    spec = load_spec(write(tmp_path, "f.yaml", "model:\n  attention: {bias: true}\n"))
    assert spec.model.attention.qk_norm == "none" and spec.model.mlp.activation == "gelu_tanh"
    assert spec.model.conditioning == "adaln_zero" and spec.model.caption is None
    assert load_spec_data(spec.to_dict(), source=spec.source) == spec
