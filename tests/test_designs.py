"""The DiT paper's Figure 5 block designs (`model.conditioning`): each lowered, its torch reference against
diffusers (the whole DiTTransformer2DModel, or block 0 against BasicTransformerBlock), and NNTile against
the reference on tiny specs whose every tiled axis, the context included, is ragged and multi-tile."""
from __future__ import annotations

import pytest
import torch

from conftest import needs_nntile
from dit_compiler.app.weights import initialize_dit_weights
from dit_compiler.checks import oracle as oracle_module
from dit_compiler.checks.common import group_error, make_inputs, randomize_, rel_error
from dit_compiler.checks.oracle import check_against_diffusers
from dit_compiler.checks.verify import FORWARD_TOL, GRAD_TOL, MODEL_ROW, verify
from dit_compiler.compiler.build import compile_spec, load_module, write_build
from dit_compiler.compiler.spec import SpecError, load_spec_data
from dit_compiler.compiler.spec.model import AttentionSpec, MlpSpec, ModelSpec, Spec, TilingSpec

pytest.importorskip("diffusers")

DESIGNS = ("adaln_zero", "adaln", "in_context", "cross_attention")
TINY = dict(input_size=8, patch_size=2, hidden_size=64, depth=2, num_heads=4, num_classes=10)
#: Ragged tiles on every tiled axis: tokens 16 (in_context 18) by 6, hidden 64 by 24, MLP 256 by 96,
#: batch 3 by 2, the context's 2 tokens by 1.
RAGGED = TilingSpec(batch=2, tokens=6, hidden=24, mlp=96, heads=2)


#: The block options besides QK norm, off their defaults.
OPTIONS = dict(attention=AttentionSpec(bias=False), mlp=MlpSpec(activation="gelu", bias=False))


def spec_of(design: str, tiling: TilingSpec = RAGGED, qk_norm: str = "none", **options) -> Spec:
    if design == "cross_attention" and tiling.context == "auto":
        tiling = TilingSpec(**{**tiling.__dict__, "context": 1})
    options.setdefault("attention", AttentionSpec())
    options["attention"] = AttentionSpec(qk_norm=qk_norm, bias=options["attention"].bias)
    model = ModelSpec(**TINY, conditioning=design, **options)
    return Spec(name=f"t-{design}", source="t.yaml", model=model, batch=3, tiling=tiling)


def reference_of(tmp_path, design: str, **options):
    built = compile_spec(spec_of(design, **options))
    folder = write_build(built, tmp_path)
    model = load_module(folder / "torch_reference.py").Model()
    randomize_(model, 0)
    return built.graph, model


@pytest.mark.parametrize("design, options", [(d, {}) for d in DESIGNS]
                         + [("in_context", OPTIONS), ("cross_attention", OPTIONS)])
def test_the_reference_matches_diffusers(tmp_path, design, options):
    """Every weight random (adaln's gates are 1 by definition: weight 0, bias 1 in diffusers' rows);
    BasicTransformerBlock also without projection and MLP biases, with exact GELU."""
    graph, model = reference_of(tmp_path, design, **options)
    report = check_against_diffusers(graph, model, make_inputs(graph, seed=0))
    assert not isinstance(report, str), report
    expected = "BasicTransformerBlock (block 0)" if design in ("in_context", "cross_attention") \
        else "DiTTransformer2DModel"
    assert report.oracle == expected
    assert max(report.forward, report.input_grad, report.param_grad) < 1e-6, report


def test_the_block_oracle_can_fail(tmp_path, monkeypatch):
    """The cross-attention's keys mapped onto diffusers' values: the block check sees it."""
    graph, model = reference_of(tmp_path, "cross_attention")
    swapped = oracle_module._BLOCK_KEYS | {"cross_attn.k": ("attn2.to_v",), "cross_attn.v": ("attn2.to_k",)}
    monkeypatch.setattr(oracle_module, "_BLOCK_KEYS", swapped)
    report = check_against_diffusers(graph, model, make_inputs(graph, seed=0))
    assert report.forward > 1e-2


def test_the_designs_differ_where_the_paper_says(tmp_path):
    """adaln: 4 modulation chunks, no gates; in_context: 2 more tokens, dropped before the output;
    cross_attention: a 2-token context every block attends to with its own projections."""
    for design in DESIGNS:
        graph = compile_spec(spec_of(design)).graph
        ops = [n.op for n in graph.nodes if n.block == 0]
        if design == "adaln":
            assert "gated_residual" not in ops and ops.count("modulate") == 2
            assert graph.tensors["blocks.0.adaLN_modulation.1.weight.shift_msa"].source.torch_shape == (4 * 64, 64)
        if design == "in_context":
            assert graph.axes["tokens"].size == 18 and graph.axes["patches"].size == 16
            assert "modulate" not in ops and graph.tensors["final.patches"].shape == (16 * 2, 16, 3)
        if design == "cross_attention":
            assert ops.count("cross_attention") == 1 and graph.tensors["context"].shape == (64, 2, 3)
            assert graph.axes["context"].tile == 1


def test_flavor_diffusers_has_no_dit_only_design():
    with pytest.raises(SpecError) as caught:
        load_spec_data({"model": {"conditioning": "in_context", "flavor": "diffusers"}})
    [problem] = caught.value.diagnostics
    assert problem.key_path == "model.flavor" and "in_context" in problem.message


@pytest.mark.parametrize("kind", ["layer_norm", "rms_norm"])
def test_qk_norm_normalises_each_heads_queries_and_keys_as_diffusers_attention(kind):
    """The reference's attention with nn.LayerNorm / nn.RMSNorm over head_dim against diffusers'
    Attention(qk_norm=...) with the same random weights (its norms included), forward."""
    from dit_compiler.compiler.targets.torch import import_diffusers
    from dit_compiler.compiler.targets.torch.functions import attention

    import_diffusers()
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    hf = Attention(query_dim=32, heads=4, dim_head=8, qk_norm=kind, eps=1e-6, bias=True, out_bias=True).eval()
    norms = {}
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_()
        for side in "qk":
            theirs = getattr(hf, f"norm_{side}")
            ours = torch.nn.LayerNorm(8, eps=1e-6) if kind == "layer_norm" else torch.nn.RMSNorm(8, eps=1e-6)
            ours.load_state_dict(theirs.state_dict())
            norms[f"{side}_norm"] = ours
        x = torch.randn(2, 5, 32)
        ours = hf.to_out[0](attention(hf.to_q(x), hf.to_k(x), hf.to_v(x), heads=4, **norms))
        plain = hf.to_out[0](attention(hf.to_q(x), hf.to_k(x), hf.to_v(x), heads=4))
        expected = hf(x)
    assert rel_error(ours.numpy(), expected.numpy()) < 1e-6
    assert rel_error(plain.numpy(), expected.numpy()) > 1e-2     # the norms matter here


@needs_nntile
@pytest.mark.nntile
@pytest.mark.parametrize("design, qk_norm, options", [(d, "none", {}) for d in DESIGNS]
                         + [("adaln_zero", "rms_norm", {}), ("cross_attention", "layer_norm", OPTIONS)])
def test_nntile_matches_the_reference(tmp_path, design, qk_norm, options):
    """Forward and backward, per component and end to end, within 1e-6 and 1e-5 (verify's tolerances are
    1e-5 and 1e-4); the model row also with the memory plan on. QK norm in self- and cross-attention,
    and the block without biases, with exact GELU."""
    built = compile_spec(spec_of(design, qk_norm=qk_norm, **options))
    report = verify(built.graph, write_build(built, tmp_path), oracle=False, progress=lambda _: None)
    assert report.nntile == "ran" and report.passed, report.breach
    for row in report.rows:
        assert row.forward <= FORWARD_TOL / 10 and row.input_grad <= GRAD_TOL / 10, row
        assert row.param_grad is None or row.param_grad <= GRAD_TOL / 10, row
    components = {row.component for row in report.rows}
    assert MODEL_ROW in components
    assert {"in_context": "conditioning tokens", "cross_attention": "cross-attention", "adaln": "adaLN",
            "adaln_zero": "adaLN-Zero"}[design] in components


@needs_nntile
@pytest.mark.nntile
@pytest.mark.parametrize("design", DESIGNS)
def test_twenty_training_steps_match_torch(tmp_path, design):
    """20 AdamW steps on the MSE loss (every weight random at the start): NNTile's losses equal torch's
    within 1e-4 relative. The weights end within 1e-3 of torch's (they moved by far more): Adam turns
    the key bias's rounding-noise gradient into lr-sized steps, so after 20 steps the weights of any two
    implementations differ by about 1e-4 (1.04e-4 seen), more than test_nntile's 3-step bound."""
    import torch

    built = compile_spec(spec_of(design))
    folder = write_build(built, tmp_path)
    reference = load_module(folder / "torch_reference.py").Model().eval()
    randomize_(reference, 0)
    initial = {k: v.numpy().copy() for k, v in reference.state_dict().items()}
    inputs = make_inputs(built.graph, 0)
    nntile_module = load_module(folder / "nntile_model.py")
    with nntile_module.nntile_runtime(2):
        model = nntile_module.Model()
        model.load_state_dict(reference.state_dict())
        optimizer = model.adamw(1e-3, 0.0)
        try:
            losses = [model.train_step(tuple(v.numpy() for v in inputs.args(built.graph)), inputs.grad_out.numpy(),
                                       optimizer) for _ in range(20)]
            trained = model.state_dict()
        finally:
            optimizer.unregister()
            model.unregister()
    torch_opt = torch.optim.AdamW([p for p in reference.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
    expected = []
    for _ in losses:
        torch_opt.zero_grad()
        loss = torch.nn.functional.mse_loss(reference(inputs.x, inputs.t, inputs.y), inputs.grad_out)
        loss.backward()
        torch_opt.step()
        expected.append(loss.item())
    assert losses == pytest.approx(expected, rel=1e-4)
    assert losses[-1] < 0.9 * losses[0]
    state = reference.state_dict()
    assert group_error([(initial[k], state[k].numpy()) for k in trained]) > 1e-2
    assert group_error([(v, state[k].numpy()) for k, v in trained.items()]) < 1e-3


@pytest.mark.parametrize("design", ["adaln_zero", "cross_attention"])
def test_dits_initialisation_takes_a_model_without_projection_and_mlp_biases(tmp_path, design):
    """`ditc train` starts every design with DiT's initialisation, the block options' bias-less linears
    included: xavier-uniform weights, the zero-initialised output layer still zero."""
    graph, model = reference_of(tmp_path, design, **OPTIONS)
    assert any(isinstance(m, torch.nn.Linear) and m.bias is None for m in model.modules())
    initialize_dit_weights(model, "dit", graph.depth, seed=0, conditioning=design)
    state = model.state_dict()
    assert not state["final_layer.linear.weight"].any() and state["blocks.0.mlp.fc1.weight"].std() > 0
