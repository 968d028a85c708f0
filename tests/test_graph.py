"""The operation graph: the paper's cost table, tiling rules and the `auto` rule."""
from __future__ import annotations

import dataclasses
import json

import pytest

from dit_compiler.compiler.graph.cost import totals
from dit_compiler.compiler.lower import lower
from dit_compiler.compiler.spec.model import PAPER, PRESETS, ModelSpec, Spec, TilingSpec
from dit_compiler.compiler.spec.validate import build_model
from dit_compiler.compiler.tiling import AUTO_RULE, axis_sizes, resolve_tiles

# DiT paper, Table 4: forward GFlops at batch 1 and trainable parameters (millions, pos-embed excluded).
PAPER_GFLOPS = {name: f.gmacs for name, f in PAPER.items() if name.startswith("DiT")}
PAPER_PARAMS_M = {name: f.params_m for name, f in PAPER.items() if name.startswith("DiT") and f.params_m}


def preset_spec(name: str, batch: int = 1, **model) -> Spec:
    return Spec(name="p", source="p.yaml", model=ModelSpec(**(PRESETS[name] | model)), batch=batch)


@pytest.mark.parametrize("preset", sorted(PAPER_GFLOPS))
def test_forward_macs_reproduce_paper_table(preset):
    assert totals(lower(preset_spec(preset))).forward_macs / 1e9 == pytest.approx(PAPER_GFLOPS[preset], abs=0.03)


@pytest.mark.parametrize("preset", sorted(PAPER_PARAMS_M))
def test_parameter_counts_reproduce_paper(preset):
    assert totals(lower(preset_spec(preset))).params / 1e6 == pytest.approx(PAPER_PARAMS_M[preset], abs=0.01)


def test_diffusers_flavor_has_per_block_embedders():
    dit = totals(lower(preset_spec("DiT-S/2"))).params
    hf = totals(lower(preset_spec("DiT-S/2", flavor="diffusers"))).params
    assert hf / 1e6 == pytest.approx(39.8, abs=0.1) and hf > dit


def test_every_tensor_tile_follows_its_axes():
    graph = lower(preset_spec("DiT-S/2", batch=8))
    for t in graph.tensors.values():
        assert t.tile == tuple(graph.axes[d].tile for d in t.dims), t.name


def test_lint_rejects_a_mismatched_tile():
    graph = lower(preset_spec("DiT-S/2", batch=8))
    name = "blocks.0.mod_msa"
    graph.tensors[name] = dataclasses.replace(graph.tensors[name], tile=(96, 128, 4))
    with pytest.raises(ValueError, match="blocks.0.mod_msa"):
        graph.lint()


def test_lint_rejects_use_before_definition():
    graph = lower(preset_spec("DiT-S/8"))
    graph.nodes.insert(0, graph.nodes.pop(5))
    with pytest.raises(ValueError, match="before it is produced"):
        graph.lint()


def test_graph_marks_host_ops_and_is_json():
    graph = lower(preset_spec("DiT-S/8"))
    data = json.loads(graph.to_json())
    host = {n["op"] for n in data["nodes"] if n["host"]}
    assert host == {"patchify", "timestep_sinusoid", "unpatchify"}
    assert len(data["nodes"]) == len(graph.nodes)


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("batch", [1, 8])
def test_auto_tiling_is_legal_and_bounded(preset, batch):
    model = build_model(PRESETS[preset])
    sizes = axis_sizes(model, batch)
    tiles = resolve_tiles(model, batch, TilingSpec())
    assert model.num_heads % tiles["heads"] == 0
    ntiles = {axis: -(-sizes[axis] // tiles[axis]) for axis in sizes}
    for axis, (cap, n_min) in AUTO_RULE.items():
        assert 1 <= tiles[axis] <= min(cap, sizes[axis])
        assert ntiles[axis] >= min(n_min, sizes[axis])
    # both workers of a 2-core machine get a tile of every token tensor
    assert ntiles["hidden"] * ntiles["tokens"] * ntiles["batch"] >= 2
    lower(Spec(name="p", source="p.yaml", model=model, batch=batch)).lint()


def test_ragged_tiles_are_kept():
    spec = Spec(name="t", source="t.yaml", model=ModelSpec(input_size=8, hidden_size=64, depth=1, num_heads=4),
                batch=3, tiling=TilingSpec(batch=2, tokens=6, hidden=24, mlp=96, heads=2))
    graph = lower(spec)
    assert graph.tensors["blocks.0.fc1"].shape == (256, 16, 3)
    assert graph.tensors["blocks.0.fc1"].tile == (96, 6, 2)
    assert graph.axes["hidden"].ntiles == 3


def test_lint_rejects_an_unknown_kind_wrong_ports_and_a_kind_without_a_rule(monkeypatch):
    from dit_compiler.compiler.graph import ops

    graph = lower(preset_spec("DiT-S/8"))
    i = next(k for k, n in enumerate(graph.nodes) if n.op == "modulate")
    node = graph.nodes[i]
    graph.nodes[i] = dataclasses.replace(node, op="frobnicate")
    with pytest.raises(ValueError, match="unknown op kind 'frobnicate'"):
        graph.lint()
    graph.nodes[i] = dataclasses.replace(node, inputs={"x": node.inputs["x"], "scale": node.inputs["scale"],
                                                       "shift": node.inputs["shift"]})
    with pytest.raises(ValueError, match="ports"):
        graph.lint()
    graph.nodes[i] = node
    monkeypatch.setitem(ops.OPS, "modulate", dataclasses.replace(ops.OPS["modulate"], rule=None))
    with pytest.raises(ValueError, match="has no tiling rule"):
        graph.lint()


def test_every_op_kind_is_fully_defined():
    """One registry entry per kind: ports, a rule, its torch code; device kinds name their layer."""
    from dit_compiler.compiler.graph.ops import OPS

    for kind in OPS.values():
        assert kind.inputs and kind.outputs and callable(kind.rule) and kind.torch and kind.doc, kind.name
        assert kind.host == (kind.layer is None)


def test_graph_nodes_use_named_ports_and_typed_attributes():
    from dit_compiler.compiler.graph.ops import Norm

    graph = lower(preset_spec("DiT-S/8"))
    attn = next(n for n in graph.nodes if n.op == "attention")
    assert attn.inputs["w_o"] == "blocks.0.attn.proj.weight" and attn.block == 0
    norm = next(n for n in graph.nodes if n.op == "layer_norm")
    assert norm.attrs == Norm(1e-6)
    data = json.loads(graph.to_json())
    assert next(n for n in data["nodes"] if n["op"] == "layer_norm")["attrs"] == {"eps": 1e-6}


@pytest.mark.parametrize("model, batch, expected", [
    (dict(PRESETS["DiT-S/2"]), 8, {"batch": 4, "hidden": 384, "tokens": 128}),       # the measured point
    (dict(input_size=8, in_channels=1, patch_size=2, hidden_size=128, depth=4, num_heads=4), 64,
     {"batch": 32, "hidden": 128, "tokens": 16}),                                      # digits: 2 large tiles
    (dict(PRESETS["DiT-S/8"]), 1, {"batch": 1, "hidden": 192, "tokens": 16, "heads": 3}),  # one image: split hidden
])
def test_auto_batch_tile_fills_the_token_tile_budget(model, batch, expected):
    from dit_compiler.compiler.tiling import TOKEN_TILE_BUDGET

    tiles = resolve_tiles(ModelSpec(**model), batch, TilingSpec())
    assert {k: tiles[k] for k in expected} == expected
    assert tiles["hidden"] * tiles["tokens"] * tiles["batch"] <= TOKEN_TILE_BUDGET
