"""PixArt-alpha (conditioning adaln_single) and the import / verify-against-real-weights machinery: the presets'
parameter counts equal diffusers' own class, the torch reference equals `PixArtTransformer2DModel` on random
weights (every one, the scale_shift_tables included), `ditc import` writes specs of diffusers folders or
refuses naming the config key, and `ditc verify --weights` runs a folder's own weights."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import NNTILE_PROBLEM, SPECS
from dit_compiler.checks.common import make_inputs, randomize_
from dit_compiler.checks.oracle import OracleReport, check_against_diffusers, pixart_config
from dit_compiler.cli import main
from dit_compiler.compiler.build import TORCH_FILE, compile_spec, graph_of, load_module
from dit_compiler.compiler.spec import load_spec, load_spec_data
from dit_compiler.compiler.spec.model import PRESETS
from dit_compiler.compiler.targets.torch import import_diffusers

PIXART = [name for name in PRESETS if name.startswith("PixArt")]
#: A tiny PixArtTransformer2DModel: odd caption length, size conditioning as the 1024 model has it.
TINY_PIXART = {"num_attention_heads": 4, "attention_head_dim": 12, "in_channels": 4, "out_channels": 8,
               "num_layers": 2, "sample_size": 8, "patch_size": 2, "cross_attention_dim": 48,
               "caption_channels": 40, "use_additional_conditions": True}
TINY_DIT = {"num_attention_heads": 4, "attention_head_dim": 16, "in_channels": 4, "out_channels": 8, "num_layers": 2,
            "sample_size": 8, "patch_size": 2, "num_embeds_ada_norm": 10}


def params(graph) -> int:
    return sum(t.numel for t in graph.params)


@pytest.mark.parametrize("preset", PIXART)
def test_pixart_presets_have_exactly_diffusers_parameter_count(preset):
    graph = graph_of(load_spec_data({"name": "p", "preset": preset}))
    with torch.device("meta"):   # shapes only: XL's 611 M weights are never allocated
        model = import_diffusers().PixArtTransformer2DModel(**pixart_config(graph))
    assert params(graph) == sum(p.numel() for p in model.parameters())
    assert params(graph) == {"PixArt-alpha-XL/2-256": 610_856_096, "PixArt-alpha-XL/2-1024": 611_349_152}[preset]


def _reference(spec, tmp_path):
    build = compile_spec(spec)
    (tmp_path / TORCH_FILE).write_text(build.files[TORCH_FILE])
    return build.graph, load_module(tmp_path / TORCH_FILE).Model().eval()


@pytest.mark.parametrize("model", [{}, {"size_conditioning": False},
                                   # 1024's positional table: positions halved (interpolation_scale 2)
                                   {"input_size": 128, "patch_size": 16}])
def test_tiny_pixart_reference_equals_diffusers_pixart(tmp_path, model):
    spec = load_spec_data({"extends": str(SPECS / "tiny-pixart.yaml"), "model": model}, str(tmp_path / "t.yaml"))
    graph, model = _reference(spec, tmp_path)
    assert any(k.endswith("scale_shift_table") for k, _ in model.named_parameters())
    randomize_(model, seed=4)
    inputs = make_inputs(graph, seed=4)
    assert 0 < inputs.context["caption_mask"].sum() < inputs.context["caption_mask"].numel()  # tokens masked
    report = check_against_diffusers(graph, model, inputs)
    assert isinstance(report, OracleReport), report
    assert report.model_class == "PixArtTransformer2DModel"
    assert report.forward <= 1e-6 and report.input_grad <= 1e-5 and report.param_grad <= 1e-5, report


def test_the_mask_changes_the_output(tmp_path):
    """Dropping caption tokens changes what the model computes (the mask reaches the cross-attention)."""
    graph, model = _reference(load_spec(SPECS / "tiny-pixart.yaml"), tmp_path)
    randomize_(model, seed=1)
    inputs = make_inputs(graph, seed=1)
    args = list(inputs.args(graph))
    with torch.no_grad():
        masked = model(*args)
        args[graph.inputs.index("caption_mask")] = torch.ones_like(inputs.context["caption_mask"])
        assert not torch.allclose(masked, model(*args))


def _save(tmp_path, name: str, class_name: str, config: dict):
    model = getattr(import_diffusers(), class_name)(**config)
    randomize_(model, seed=7)
    folder = tmp_path / name
    model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("name, class_name, config", [("tiny-pixart-hf", "PixArtTransformer2DModel", TINY_PIXART),
                                                       ("tiny-dit-hf", "DiTTransformer2DModel", TINY_DIT)])
def test_import_then_verify_with_the_folders_weights(tmp_path, capsys, name, class_name, config):
    folder = _save(tmp_path, name, class_name, config)
    spec_file = tmp_path / "imported.yaml"
    assert main(["import", str(folder), "-o", str(spec_file)]) == 0
    spec = load_spec(spec_file)
    hf = json.loads((folder / "config.json").read_text())
    assert spec.model.hidden_size == 48 if class_name.startswith("PixArt") else 64
    assert spec.model.depth == hf["num_layers"] and spec.model.flavor == "diffusers"
    capsys.readouterr()
    code = main(["verify", str(spec_file), "-o", str(tmp_path / "gen"), "--weights", str(folder), "--json",
                 str(tmp_path / "v.json")])
    out = capsys.readouterr().out
    assert code == 0, out
    report = json.loads((tmp_path / "v.json").read_text())
    assert report["oracle"]["source"] == "loaded from the model folder with its own weights"
    assert report["oracle"]["forward"] <= 1e-6
    if NNTILE_PROBLEM is None:
        assert report["oracle"]["nntile_forward"] <= 1e-5
        assert "NNTile vs diffusers: forward" in out
    else:
        assert "NNTile model not run" in out


def test_verify_weights_of_another_model_is_refused_naming_a_key(tmp_path, capsys):
    folder = _save(tmp_path, "dit", "DiTTransformer2DModel", TINY_DIT)
    code = main(["verify", str(SPECS / "tiny-pixart.yaml"), "-o", str(tmp_path / "gen"), "--weights", str(folder)])
    err = capsys.readouterr().err
    assert code == 2 and "do not fit this spec's torch reference" in err and "such as" in err


@pytest.mark.parametrize("key, value, why", [
    ("dropout", 0.1, "no dropout"),
    ("norm_type", "ada_norm_zero", "ada_norm_single"),
    ("cross_attention_dim", 32, "hidden_size (48)"),
    ("caption_channels", None, "caption_projection"),
    ("upcast_softmax", True, "does not know"),
])
def test_import_refuses_naming_the_key_and_value(tmp_path, capsys, key, value, why):
    config = {"_class_name": "PixArtTransformer2DModel", **TINY_PIXART, key: value}
    (tmp_path / "config.json").write_text(json.dumps(config))
    out = tmp_path / "s.yaml"
    assert main(["import", str(tmp_path), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{key} = {json.dumps(value)}" in err and why in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("text, message", [("{not json", "not JSON"), ("[1, 2]", "not a JSON object"),
                                           ('{"_class_name": "UNet2DConditionModel"}', "_class_name")])
def test_import_refuses_configs_it_cannot_read(tmp_path, capsys, text, message):
    (tmp_path / "config.json").write_text(text)
    assert main(["import", str(tmp_path / "config.json"), "-o", str(tmp_path / "s.yaml")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and not (tmp_path / "s.yaml").exists()


@pytest.mark.parametrize("preset, paper", [("DiT-XL/2", "DiT-XL/2: 118.64 GMAC per image, 674.83 M parameters"),
                                           ("PixArt-alpha-XL/2-256", "PixArt-alpha-XL/2-256: no GMACs, 600.00 M")])
def test_inspect_prints_the_papers_figures_beside_its_own(tmp_path, capsys, preset, paper):
    spec = tmp_path / "p.yaml"
    spec.write_text(f"preset: {preset}\nbatch: 4\n")
    assert main(["inspect", str(spec), "--summary"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("  paper"))
    assert paper in line and "(ditc: " in line


TINY_PIXART_DIGITS = """\
name: tiny-pixart-digits
model: {input_size: 8, in_channels: 1, patch_size: 2, hidden_size: 24, depth: 1, num_heads: 2, num_classes: 0,
        learn_sigma: false, conditioning: adaln_single, flavor: diffusers, caption: {width: 12, length: 5},
        size_conditioning: true}
batch: 4
tiling: {context: 2, caption: 5}
"""


def _train_pixart(folder, backend: str):
    from dit_compiler.app.train import TrainConfig, train
    from train_helpers import tiny_spec

    run = folder / "run"
    assert train(tiny_spec(folder, TINY_PIXART_DIGITS), run, TrainConfig(steps=20, lr=1e-3, backend=backend)) == 0
    return [float(line.split(",")[1]) for line in (run / "metrics.csv").read_text().splitlines()[1:]]


def test_caption_table_drives_a_pixart_on_digits(tmp_path):
    """Digits' class labels reach a caption model through the fixed caption table: label c's caption is the
    same every time, differs between labels, masks 1 + c mod length tokens; the null label is empty."""
    from dit_compiler.compiler.captions import CAPTION_CLASSES, caption, label_inputs

    graph = graph_of(load_spec_data({"extends": str(SPECS / "tiny-pixart.yaml")}, str(tmp_path / "t.yaml")))
    captions, masks, resolution, aspect = label_inputs(graph, np.array([3, 3, CAPTION_CLASSES]))
    assert np.array_equal(captions[0], captions[1]) and not captions[2].any()
    assert masks[0].tolist() == [1, 1, 1, 1, 0, 0, 0] and masks[2].tolist() == [1, 0, 0, 0, 0, 0, 0]
    assert not np.array_equal(caption(4, 7, 40)[0], captions[0])
    assert resolution.tolist() == [[64, 64]] * 3 and aspect.tolist() == [1.0] * 3
    losses = _train_pixart(tmp_path, "torch")
    assert len(losses) == 20 and all(np.isfinite(losses))


@pytest.mark.skipif(NNTILE_PROBLEM is not None, reason=NNTILE_PROBLEM or "")
def test_pixart_trains_on_nntile_as_on_torch(tmp_path):
    """20 digits steps of a PixArt (captions from the table, label dropout, size conditioning): every step's
    loss within 1e-4 of torch's."""
    assert _train_pixart(tmp_path / "n", "nntile") == pytest.approx(_train_pixart(tmp_path / "t", "torch"), rel=1e-4)
