"""The generated torch reference against the real diffusers `DiTTransformer2DModel`.

Every weight is randomised first: DiT zero-initialises adaLN and the output layer, so a default
initialised model outputs exactly zero and would prove nothing. diffusers is built from a config,
never downloaded.
"""
from __future__ import annotations

import ast
import sys

import pytest
import torch

from dit_compiler.compiler.targets.torch.emitter import emit_torch
from dit_compiler.compiler.designs.adaln_zero import AdaLNZero
from dit_compiler.compiler.lower import lower
from dit_compiler.checks.common import make_inputs, randomize_, rel_error
from dit_compiler.compiler.build import load_module
from dit_compiler.checks.oracle import OracleReport, check_against_diffusers, oracle_config, to_diffusers_state_dict
from dit_compiler.compiler.spec.model import PRESETS, ModelSpec, Spec

diffusers = pytest.importorskip("diffusers")

TOL = 1e-6

#: Small models (depth 2): non-square head counts, patch 2 and 4, learned sigma or not, batch 2 and 3.
SMALL = {
    "h48x3-p2-sigma-b2": (dict(hidden_size=48, num_heads=3, input_size=8, patch_size=2, learn_sigma=True), 2),
    "h96x6-p4-nosigma-b3": (dict(hidden_size=96, num_heads=6, input_size=16, patch_size=4, learn_sigma=False), 3),
    "h64x4-p2-nosigma-b3": (dict(hidden_size=64, num_heads=4, input_size=8, patch_size=2, learn_sigma=False), 3),
    "h64x2-p4-sigma-b2": (dict(hidden_size=64, num_heads=2, input_size=16, patch_size=4, learn_sigma=True,
                               in_channels=3), 2),
}
FLAVORS = ("dit", "diffusers")


def make_spec(batch: int = 2, **model) -> Spec:
    base = dict(depth=2, num_classes=10, input_size=8, patch_size=2, hidden_size=48, num_heads=3)
    return Spec(name="t", source="t.yaml", model=ModelSpec(**(base | model)), batch=batch)


def build(tmp_path, spec: Spec, seed: int | None = 0):
    """The graph, the generated source, and the reference module (eval mode, randomised unless seed is None)."""
    graph = lower(spec)
    source = emit_torch(graph)
    path = tmp_path / f"torch_reference_{spec.model.flavor}_{abs(hash(spec))}.py"
    path.write_text(source)
    model = load_module(path).Model().eval()
    if seed is not None:
        randomize_(model, seed)
    return graph, source, model


def stock_diffusers(graph, **overrides):
    config = oracle_config(graph)
    assert isinstance(config, dict), config
    return diffusers.DiTTransformer2DModel(**(config | overrides)).float().eval()


def run(model, inputs, forward):
    """Output, input gradient and parameter gradients (by key) of one forward and backward."""
    x = inputs.x.clone().requires_grad_(True)
    model.zero_grad(set_to_none=True)
    out = forward(model, x)
    out.backward(inputs.grad_out)
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    return out.detach(), x.grad.clone(), grads


def reference_forward(model, x, inputs):
    return model(x, inputs.t, inputs.y)


def diffusers_forward(model, x, inputs):
    return model(x, timestep=inputs.t, class_labels=inputs.y, return_dict=False)[0]


# -- the oracle, both flavors -------------------------------------------------------------------------

@pytest.mark.parametrize("flavor", FLAVORS)
@pytest.mark.parametrize("case", sorted(SMALL))
def test_reference_equals_diffusers(tmp_path, case, flavor):
    model_kw, batch = SMALL[case]
    graph, _, model = build(tmp_path, make_spec(batch, flavor=flavor, **model_kw))
    report = check_against_diffusers(graph, model, make_inputs(graph, seed=3))
    assert isinstance(report, OracleReport), report
    assert report.forward <= TOL
    assert report.input_grad <= TOL
    assert report.param_grad <= TOL
    assert report.worst_param_error <= TOL, report.worst_param


def test_oracle_leaves_the_reference_alone(tmp_path):
    graph, _, model = build(tmp_path, make_spec())
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = check_against_diffusers(graph, model, make_inputs(graph, seed=0))
    assert isinstance(report, OracleReport)
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("flavor", FLAVORS)
def test_oracle_catches_a_wrong_mapped_weight(tmp_path, monkeypatch, flavor):
    """The check is not vacuous: perturb one weight on its way into diffusers, and the oracle's own
    report exceeds its tolerance."""
    import dit_compiler.checks.oracle as oracle

    graph, _, model = build(tmp_path, make_spec(flavor=flavor))
    mapped = oracle.to_diffusers_state_dict

    def perturbed(graph_, state):
        out = mapped(graph_, state)
        key = next(k for k in out if k.endswith("ff.net.2.weight"))
        out[key] = out[key] * 1.01
        return out

    monkeypatch.setattr(oracle, "to_diffusers_state_dict", perturbed)
    report = check_against_diffusers(graph, model, make_inputs(graph, seed=0))
    assert isinstance(report, OracleReport), report
    assert report.forward > 1e-4 and report.param_grad > TOL


# -- flavor diffusers: stock DiTTransformer2DModel, independently of the oracle's mapping ---------------

@pytest.mark.parametrize("case", ["h48x3-p2-sigma-b2", "h96x6-p4-nosigma-b3"])
def test_diffusers_flavor_equals_stock_model(tmp_path, case):
    model_kw, batch = SMALL[case]
    graph, _, reference = build(tmp_path, make_spec(batch, flavor="diffusers", **model_kw), seed=None)
    stock = stock_diffusers(graph)
    randomize_(stock, 7)
    reference.load_state_dict(stock.state_dict(), strict=True)
    inputs = make_inputs(graph, seed=5)
    out_r, dx_r, g_r = run(reference, inputs, lambda m, x: reference_forward(m, x, inputs))
    out_s, dx_s, g_s = run(stock, inputs, lambda m, x: diffusers_forward(m, x, inputs))
    assert rel_error(out_r, out_s) <= TOL
    assert rel_error(dx_r, dx_s) <= TOL
    assert g_r.keys() == g_s.keys()
    big = max(g.norm() for g in g_s.values())
    for key in g_s:
        if g_s[key].norm() >= 1e-3 * big:
            assert rel_error(g_r[key], g_s[key]) <= TOL, key


def test_diffusers_flavor_state_dict_loads_both_ways(tmp_path):
    graph, _, reference = build(tmp_path, make_spec(flavor="diffusers"), seed=1)
    stock = stock_diffusers(graph)
    assert list(reference.state_dict()) == list(stock.state_dict())
    stock.load_state_dict(reference.state_dict(), strict=True)
    assert all(torch.equal(stock.state_dict()[k], v) for k, v in reference.state_dict().items())
    randomize_(stock, 2)
    reference.load_state_dict(stock.state_dict(), strict=True)
    assert all(torch.equal(reference.state_dict()[k], v) for k, v in stock.state_dict().items())


# -- state_dict keys and parameter counts -------------------------------------------------------------

@pytest.mark.parametrize("flavor", FLAVORS)
def test_state_dict_keys_are_the_graph_param_keys(tmp_path, flavor):
    graph, _, model = build(tmp_path, make_spec(flavor=flavor), seed=None)
    keys = {t.source.key for t in graph.params}
    extra = {"pos_embed"} if flavor == "dit" else set()  # DiT keeps the fixed table as a frozen Parameter
    assert set(model.state_dict()) == keys | extra
    assert {k for k, p in model.named_parameters() if p.requires_grad} == keys


def test_dit_weight_map_covers_diffusers_exactly(tmp_path):
    """The DiT -> diffusers mapping (convert_dit_to_diffusers.py's) fills every diffusers key, and no other."""
    graph, _, model = build(tmp_path, make_spec(), seed=0)
    mapped = to_diffusers_state_dict(graph, model.state_dict())
    assert set(mapped) == set(stock_diffusers(graph).state_dict())


def test_dit_parameter_count_is_the_papers(tmp_path):
    spec = Spec(name="s2", source="s2.yaml", model=ModelSpec(**PRESETS["DiT-S/2"]), batch=1)
    _, _, model = build(tmp_path, spec, seed=None)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable / 1e6 == pytest.approx(32.87, abs=0.01)
    assert not model.pos_embed.requires_grad


# -- the generated source -----------------------------------------------------------------------------

@pytest.mark.parametrize("flavor", FLAVORS)
def test_reference_imports_only_torch_numpy_math_and_stdlib(tmp_path, flavor):
    _, source, _ = build(tmp_path, make_spec(flavor=flavor), seed=None)
    roots = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative import"
            roots.add(node.module.split(".")[0])
    allowed = {"torch", "numpy", "math"} | set(sys.stdlib_module_names)
    assert roots <= allowed, roots - allowed
    assert {"torch", "numpy"} <= roots


# -- the two flavors really differ --------------------------------------------------------------------

def test_diffusers_defaults_differ_from_dit(tmp_path):
    """diffusers as shipped (MLP-branch eps 1e-5, frequency shift 1) is not DiT, on the same weights."""
    graph, _, dit = build(tmp_path, make_spec(hidden_size=64, num_heads=4), seed=0)
    inputs = make_inputs(graph, seed=1)
    mapped = to_diffusers_state_dict(graph, dit.state_dict())
    with torch.no_grad():
        out_dit = reference_forward(dit, inputs.x, inputs)
        stock = stock_diffusers(graph, norm_eps=1e-5)  # oracle_config's kwargs, diffusers' default eps
        stock.load_state_dict(mapped, strict=True)     # and diffusers' default shift 1 (not patched)
        assert stock.transformer_blocks[0].norm1.emb.time_proj.downscale_freq_shift == 1
        assert rel_error(diffusers_forward(stock, inputs.x, inputs), out_dit) > 1e-4
        _, _, hf_ref = build(tmp_path, make_spec(hidden_size=64, num_heads=4, flavor="diffusers",
                                                       norm_eps=1e-5), seed=None)
        hf_ref.load_state_dict(mapped, strict=True)
        assert rel_error(reference_forward(hf_ref, inputs.x, inputs), out_dit) > 1e-4


# -- what diffusers cannot express --------------------------------------------------------------------

@pytest.mark.parametrize("model_kw, reason", [
    (dict(frequency_embedding_size=128), "frequency"),
    (dict(mlp_ratio=2.0), "mlp_ratio"),
    (dict(norm_eps=1e-5), "norm_eps"),
])
def test_oracle_skips_what_diffusers_cannot_express(tmp_path, model_kw, reason):
    graph, _, model = build(tmp_path, make_spec(**model_kw), seed=0)
    assert reason in oracle_config(graph)
    result = check_against_diffusers(graph, model, make_inputs(graph, seed=0))
    assert isinstance(result, str) and reason in result


def test_oracle_config_follows_the_flavor():
    dit = oracle_config(lower(make_spec()))
    hf = oracle_config(lower(make_spec(flavor="diffusers", norm_eps=1e-5)))
    assert dit == hf | {"norm_eps": 1e-6}
    assert hf == {"num_attention_heads": 3, "attention_head_dim": 16, "in_channels": 4, "out_channels": 8,
                  "num_layers": 2, "sample_size": 8, "patch_size": 2, "num_embeds_ada_norm": 10, "norm_eps": 1e-5}


# -- every op kind's torch code; RMSNorm, an op no shipped spec uses yet ----------------------------

def test_every_op_kind_has_torch_code_and_its_functions():
    from dit_compiler.compiler.graph.ops import OPS
    from dit_compiler.compiler.targets.torch.emitter import functions
    from dit_compiler.compiler.targets.torch.ops import TORCH_OPS

    assert {kind.torch for kind in OPS.values()} == set(TORCH_OPS)
    assert {u for op in TORCH_OPS.values() for u in op.uses} <= set(functions())


@pytest.mark.parametrize("eps", [1e-6, 1e-2])
def test_rms_norm_is_torchs(eps):
    from dit_compiler.compiler.targets.torch.functions import rms_norm

    x = torch.randn(3, 5, 24, dtype=torch.float64) * 3
    norm = torch.nn.RMSNorm(24, eps=eps, dtype=torch.float64)
    torch.nn.init.normal_(norm.weight)
    with torch.no_grad():
        assert rel_error(rms_norm(x, norm.weight, eps), norm(x)) <= 1e-12


class RMSNormAfterBlocks(AdaLNZero):
    """DiT with an RMSNorm (its own weight) after every block's output."""

    def block(self, i: int, key_prefix: str, x: str, c_silu: str) -> str:
        out = super().block(i, key_prefix, x, c_silu)
        return self.norm("rms_norm", out, f"blocks.{i}.rms", 1e-5, "rms norm", f"blocks.{i}",
                         weight_key=f"{key_prefix}.norm_out")


@pytest.mark.parametrize("flavor", FLAVORS)
def test_a_lowered_rms_norm_computes_torchs(tmp_path, flavor):
    """Lowering places the op, the reference holds its weight at the flavor's key and computes nn.RMSNorm."""
    graph = lower(make_spec(flavor=flavor), RMSNormAfterBlocks)
    prefix = "blocks" if flavor == "dit" else "transformer_blocks"
    assert [n.name for n in graph.nodes if n.op == "rms_norm"] == ["blocks.0.rms", "blocks.1.rms"]
    path = tmp_path / f"rms_{flavor}.py"
    path.write_text(emit_torch(graph))
    model = load_module(path).Model().eval()
    randomize_(model, 0)
    assert f"{prefix}.1.norm_out.weight" in model.state_dict()
    inputs, trace = make_inputs(graph, seed=0), {}
    with torch.no_grad():
        model(inputs.x, inputs.t, inputs.y, trace)
    for i in range(2):
        norm = torch.nn.RMSNorm(48, eps=1e-5)
        norm.load_state_dict({"weight": model.state_dict()[f"{prefix}.{i}.norm_out.weight"]})
        with torch.no_grad():
            assert rel_error(trace[f"blocks.{i}.rms"], norm(trace[f"blocks.{i}.out"])) <= TOL
