"""SD3's MMDiT (conditioning `joint`): the preset's parameter count against diffusers' SD3Transformer2DModel,
the torch reference against that class with the same random weights, the NNTile model against both on
a ragged multi-tile spec (skipped without NNTile), and what validation refuses."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import NNTILE_PROBLEM, SPECS, needs_nntile
from dit_compiler.checks.common import make_inputs, randomize_
from dit_compiler.checks.oracle import OracleReport, check_against_diffusers, sd3_config
from dit_compiler.checks.verify import FORWARD_TOL, GRAD_TOL, verify
from dit_compiler.compiler.build import compile_spec, load_module, write_build
from dit_compiler.compiler.graph.cost import totals
from dit_compiler.compiler.lower import lower
from dit_compiler.compiler.spec import load_spec
from dit_compiler.compiler.spec.model import PRESETS, Spec
from dit_compiler.compiler.spec.validate import build_model
from dit_compiler.compiler.targets.torch.emitter import emit_torch
from dit_compiler.cli import main
from dit_compiler.errors import SpecError

diffusers = pytest.importorskip("diffusers")

TINY = SPECS / "tiny-mmdit.yaml"
#: The tiny MMDiT, and with SD3.5's QK norm.
TINY_SPECS = ("tiny-mmdit.yaml", "tiny-mmdit-qk.yaml")
#: diffusers' SD3Transformer2DModel config of stabilityai/stable-diffusion-3-medium-diffusers.
SD3_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                  num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                  pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192, qk_norm=None)


def reference(tmp_path, spec: Spec, seed: int = 0):
    graph = lower(spec)
    path = tmp_path / "torch_reference.py"
    path.write_text(emit_torch(graph))
    model = load_module(path).Model().eval()
    randomize_(model, seed)
    return graph, model


def test_sd3_medium_has_diffusers_parameters_exactly():
    """The preset against diffusers' class with the same config, counted on the meta device (no memory)."""
    graph = lower(Spec(name="sd3", source="sd3.yaml", model=build_model(PRESETS["SD3-medium"])))
    assert sd3_config(graph) == SD3_MEDIUM
    with torch.device("meta"):
        theirs = diffusers.SD3Transformer2DModel(**SD3_MEDIUM)
    assert totals(graph).params == sum(p.numel() for p in theirs.parameters()) == 2_028_328_000
    assert {t.source.key for t in graph.params} == set(dict(theirs.named_parameters()))


def test_the_last_block_is_context_pre_only():
    graph = lower(load_spec(TINY))
    keys = {t.source.key for t in graph.params}
    assert "transformer_blocks.1.attn.to_add_out.weight" in keys and "transformer_blocks.1.ff_context.net.2.bias" in keys
    assert not any(k.startswith(("transformer_blocks.2.attn.to_add_out", "transformer_blocks.2.ff_context"))
                   for k in keys)
    assert "transformer_blocks.2.attn.add_q_proj.weight" in keys   # diffusers keeps it, its output unused
    assert [n.op for n in graph.nodes if n.op.startswith("joint")] == ["joint_attention"] * 2 + ["joint_attention_pre"]


@pytest.mark.parametrize("spec", TINY_SPECS)
def test_reference_equals_diffusers_sd3(tmp_path, spec):
    """Every weight random (QK norm's too); the state_dict loads into SD3Transformer2DModel strictly;
    random latents, timesteps, captions and pooled vectors."""
    graph, model = reference(tmp_path, load_spec(SPECS / spec))
    assert sd3_config(graph)["qk_norm"] == ("rms_norm" if "qk" in spec else None)
    theirs = diffusers.SD3Transformer2DModel(**sd3_config(graph))
    theirs.load_state_dict(model.state_dict(), strict=True)
    report = check_against_diffusers(graph, model, make_inputs(graph, seed=5))
    assert isinstance(report, OracleReport), report
    assert report.oracle == "SD3Transformer2DModel"
    assert max(report.forward, report.input_grad, report.param_grad, report.worst_param_error) <= 1e-6, report


def test_oracle_catches_a_wrong_weight(tmp_path):
    """The comparison can fail: diffusers' copy differs in one context-stream weight by 1%."""
    graph, model = reference(tmp_path, load_spec(TINY))
    theirs = diffusers.SD3Transformer2DModel(**sd3_config(graph)).eval()
    theirs.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        theirs.transformer_blocks[0].attn.add_k_proj.weight.mul_(1.01)
    report = check_against_diffusers(graph, model, make_inputs(graph, seed=5), pretrained=theirs)
    assert report.forward > 1e-4


@needs_nntile
@pytest.mark.nntile
@pytest.mark.parametrize("spec", TINY_SPECS)
def test_nntile_matches_torch_and_diffusers(tmp_path, spec):
    """The ragged multi-tile tiny MMDiT (every tiled axis, the context and joint axes included, has a
    ragged edge tile), with and without QK norm: forward and backward against the reference, and against
    diffusers."""
    built = compile_spec(load_spec(SPECS / spec))
    graph = built.graph
    assert all(graph.axes[a].size % graph.axes[a].tile for a in ("tokens", "context", "joint", "caption", "hidden"))
    report = verify(graph, write_build(built, tmp_path), progress=lambda _: None)
    assert report.nntile == "ran" and report.passed, report.breach
    rows = {row.component: row for row in report.rows}
    row = rows["joint attention"]
    assert row.forward <= FORWARD_TOL and row.input_grad <= GRAD_TOL and row.param_grad <= GRAD_TOL
    assert report.oracle["nntile_forward"] <= 1e-5 and report.oracle["forward"] <= 1e-6


def _problems(tmp_path, text: str) -> dict[str, str]:
    path = tmp_path / "j.yaml"
    path.write_text(text)
    with pytest.raises(SpecError) as caught:
        load_spec(path)
    return {d.key_path: d.allowed for d in caught.value.diagnostics}


def test_joint_refuses_what_sd3_has_not_naming_each_key(tmp_path):
    found = _problems(tmp_path, "model:\n  conditioning: joint\n  num_classes: 10\n  pos_embed_max_size: 2\n"
                      "  caption: {width: 8, length: 3, pooled_width: 0}\n")
    assert set(found) == {"model.num_classes", "model.flavor", "model.caption.pooled_width", "model.caption.mask",
                          "model.pos_embed_max_size"}
    assert found["model.flavor"] == "diffusers" and found["model.caption.mask"] == "false"
    found = _problems(tmp_path, "model:\n  conditioning: joint\n  flavor: diffusers\n  num_classes: 0\n")
    assert set(found) == {"model.conditioning", "model.num_classes"}   # no caption: nothing to condition on
    found = _problems(tmp_path, "model:\n  pos_embed_max_size: 64\n")
    assert set(found) == {"model.pos_embed_max_size"}
    found = _problems(tmp_path, "model:\n  conditioning: joint\n  flavor: diffusers\n  num_classes: 0\n"
                      "  caption: {width: 8, length: 3, pooled_width: 4, mask: false}\n"
                      "  attention: {qk_norm: layer_norm, bias: false}\n  mlp: {activation: gelu}\n")
    assert found == {"model.attention.qk_norm": "none or rms_norm", "model.attention.bias": "true",
                     "model.mlp.activation": "gelu_tanh"}


#: A tiny SD3Transformer2DModel config: odd sizes, a cropped table.
TINY_SD3 = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=3,
                joint_attention_dim=20, caption_projection_dim=24, pooled_projection_dim=12, out_channels=4,
                pos_embed_max_size=6)


def test_import_then_verify_with_the_folders_weights(tmp_path, capsys):
    """`ditc import` of a saved SD3Transformer2DModel folder (every weight random), then `ditc verify
    --weights`: the reference loads its safetensors strictly and matches diffusers loaded from it."""
    model = diffusers.SD3Transformer2DModel(**TINY_SD3)
    randomize_(model, seed=7)
    folder = tmp_path / "tiny-sd3-hf"
    model.save_pretrained(folder)
    spec_file = tmp_path / "imported.yaml"
    assert main(["import", str(folder), "-o", str(spec_file)]) == 0
    m = load_spec(spec_file).model
    assert (m.conditioning, m.hidden_size, m.depth, m.pos_embed_max_size) == ("joint", 24, 2, 6)
    assert (m.caption.width, m.caption.length, m.caption.pooled_width, m.caption.mask) == (20, 333, 12, False)
    capsys.readouterr()
    code = main(["verify", str(spec_file), "-o", str(tmp_path / "gen"), "--weights", str(folder), "--json",
                 str(tmp_path / "v.json")])
    out = capsys.readouterr().out
    assert code == 0, out
    oracle = json.loads((tmp_path / "v.json").read_text())["oracle"]
    assert oracle["oracle"] == "SD3Transformer2DModel" and oracle["forward"] <= 1e-6
    if NNTILE_PROBLEM is None:
        assert oracle["nntile_forward"] <= 1e-5
    else:
        assert "NNTile model not run" in out


@pytest.mark.parametrize("key, value, why", [
    ("dual_attention_layers", [0], "dual attention"),
    ("qk_norm", "layer_norm", "QK norm, rms_norm"),
    ("caption_projection_dim", 32, "= 24 wide"),
    ("pos_embed_max_size", 3, "at least sample_size / patch_size = 4"),
])
def test_import_refuses_sd3_configs_naming_the_key(tmp_path, capsys, key, value, why):
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "SD3Transformer2DModel", **TINY_SD3, key: value}))
    out = tmp_path / "s.yaml"
    assert main(["import", str(tmp_path), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{key} = {json.dumps(value)}" in err and why in err and "Traceback" not in err
    assert not out.exists()


def test_import_reads_sd35s_qk_norm(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "SD3Transformer2DModel", **TINY_SD3,
                                                      "qk_norm": "rms_norm"}))
    assert main(["import", str(tmp_path), "-o", str(tmp_path / "s.yaml")]) == 0
    graph = lower(load_spec(tmp_path / "s.yaml"))
    assert sd3_config(graph) == TINY_SD3 | {"qk_norm": "rms_norm"}


TINY_MMDIT_DIGITS = """\
name: tiny-mmdit-digits
model: {input_size: 8, in_channels: 1, patch_size: 2, hidden_size: 24, depth: 2, num_heads: 2, num_classes: 0,
        learn_sigma: false, conditioning: joint, flavor: diffusers, pos_embed_max_size: 6,
        caption: {width: 12, length: 5, pooled_width: 8, mask: false}}
batch: 4
tiling: {context: 2, caption: 5}
"""


def _train_mmdit(folder, backend: str) -> list[float]:
    from dit_compiler.app.train import TrainConfig, train
    from train_helpers import tiny_spec

    run = folder / "run"
    assert train(tiny_spec(folder, TINY_MMDIT_DIGITS), run, TrainConfig(steps=20, lr=1e-3, backend=backend)) == 0
    return [float(line.split(",")[1]) for line in (run / "metrics.csv").read_text().splitlines()[1:]]


def test_caption_table_gives_an_mmdit_pooled_vectors(tmp_path):
    """Digits' labels reach SD3's pooled input through the caption table: fixed per label, different between
    labels, zeros for the null label; 20 torch steps train."""
    from dit_compiler.compiler.captions import CAPTION_CLASSES, label_inputs

    graph = lower(load_spec(TINY))
    captions, pooled = label_inputs(graph, np.array([3, 3, 4, CAPTION_CLASSES]))
    assert captions.shape == (4, 7, 40) and pooled.shape == (4, 24)
    assert np.array_equal(pooled[0], pooled[1]) and not np.array_equal(pooled[0], pooled[2]) and not pooled[3].any()
    losses = _train_mmdit(tmp_path, "torch")
    assert len(losses) == 20 and all(np.isfinite(losses))


@needs_nntile
@pytest.mark.nntile
def test_mmdit_trains_on_nntile_as_on_torch(tmp_path):
    """20 digits steps (captions and pooled vectors from the table, label dropout): every step's loss within
    1e-4 of torch's."""
    assert _train_mmdit(tmp_path / "n", "nntile") == pytest.approx(_train_mmdit(tmp_path / "t", "torch"), rel=1e-4)


def test_inspect_prints_sd3_mediums_figures_beside_the_papers(tmp_path, capsys):
    spec = tmp_path / "sd3.yaml"
    spec.write_text("preset: SD3-medium\n")
    assert main(["inspect", str(spec), "--summary"]) == 0
    out = capsys.readouterr().out
    assert "forward            4452.17 GMAC" in out and "parameters         2028.33 M" in out
    line = next(x for x in out.splitlines() if x.startswith("  paper"))
    assert "SD3 paper (arXiv:2403.03206)" in line and "no GMACs" in line and "(ditc: 4452.17 GMAC per image" in line
