"""The compiled NNTile model against the torch reference, on real NNTile (skipped without it)."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from conftest import ROOT, needs_cc, needs_nntile
from dit_compiler.compiler.build import NNTILE_FILE, TORCH_FILE, compile_spec, write_build
from dit_compiler.cli import main
from dit_compiler.errors import UsageError
from dit_compiler.checks.common import group_error
from dit_compiler.checks.verify import FORWARD_TOL, GRAD_TOL, MODEL_ROW, PLAN_ROW, verify
from dit_compiler.compiler.spec.model import ModelSpec, Spec, TilingSpec

pytestmark = [needs_nntile, pytest.mark.nntile]

TINY = dict(input_size=8, patch_size=2, hidden_size=64, depth=2, num_heads=4, num_classes=10)
TILINGS = {
    "ragged": TilingSpec(batch=2, tokens=6, hidden=24, mlp=96, heads=2),
    "single-tile": TilingSpec(batch=3, tokens=16, hidden=64, mlp=256, heads=4, frequency=256),
    "fine": TilingSpec(batch=1, tokens=5, hidden=16, mlp=40, heads=1, patch_dim=7, out_dim=9, frequency=100),
    "ooc": TilingSpec(batch=2, tokens=16, hidden=64, mlp=256, heads=2),
}
#: What the NNTile target reaches on the ragged multi-tile tiny spec once the host timestep features are
#: torch's own: the error left is NNTile's (with numpy's sinusoid the forward error was 3e-6).
TIGHT_FORWARD, TIGHT_GRAD = 1e-6, 1e-5


def build(tmp_path, name="tiny", tiling="ragged", batch=3, **model):
    spec = Spec(name=name, source=f"{name}.yaml", model=ModelSpec(**(TINY | model)), batch=batch,
                tiling=TILINGS[tiling])
    built = compile_spec(spec)
    return built.graph, write_build(built, tmp_path)


def quiet_verify(graph, folder):
    return verify(graph, folder, oracle=False, progress=lambda _: None)


def assert_passes(report, forward_tol=FORWARD_TOL, grad_tol=GRAD_TOL):
    assert report.nntile == "ran"
    assert report.passed, report.breach
    by_name = {row.component: row for row in report.rows}
    for component in ("embeddings", "adaLN modulation", "modulate", "attention", "gated residual",
                      "pointwise MLP", "adaLN-Zero", "DiT block", "final layer", MODEL_ROW, PLAN_ROW):
        row = by_name[component]
        assert row.forward <= forward_tol, row
        assert row.input_grad <= grad_tol, row
        assert (row.param_grad <= grad_tol) if row.params else row.param_grad is None, row
    assert by_name["layer norm"].param_grad is None


@pytest.mark.parametrize("tiling", sorted(TILINGS))
@pytest.mark.parametrize("flavor", ["dit", "diffusers"])
def test_nntile_matches_torch(tmp_path, tiling, flavor):
    graph, folder = build(tmp_path, tiling=tiling, flavor=flavor)
    assert_passes(quiet_verify(graph, folder))


def test_ragged_multi_tile_errors_are_nntiles_own(tmp_path):
    """Every tiled axis has several tiles, four of them ragged; the errors left are NNTile's (the host
    timestep features are bit-identical to torch's)."""
    graph, folder = build(tmp_path)
    for axis in ("batch", "tokens", "hidden", "mlp", "heads"):
        assert graph.axes[axis].ntiles > 1, axis
    assert all(graph.axes[a].size % graph.axes[a].tile for a in ("batch", "tokens", "hidden", "mlp"))
    report = quiet_verify(graph, folder)
    assert_passes(report, TIGHT_FORWARD, TIGHT_GRAD)


def test_patch_4_without_learned_sigma(tmp_path):
    graph, folder = build(tmp_path, input_size=16, patch_size=4, learn_sigma=False, num_heads=2)
    assert_passes(quiet_verify(graph, folder))


def test_verify_twice_in_one_process(tmp_path):
    """StarPU starts and stops cleanly; the second run sees the same model (task order may move the last bits)."""
    graph, folder = build(tmp_path)
    first, second = quiet_verify(graph, folder), quiet_verify(graph, folder)
    assert first.passed and second.passed
    assert [r.forward for r in second.rows] == pytest.approx([r.forward for r in first.rows], rel=0.2)


@pytest.mark.parametrize("default, other", [("ditc", "nntile"), ("nntile", "ditc")])
def test_verify_runs_both_kernel_sets(tmp_path, monkeypatch, capsys, default, other):
    """The table is the default kernel set's ($DITC_KERNELS / --kernels); the model runs again on the other
    set, whose row must pass too. The ragged tiny spec's keys span three tiles: ditc's softmax combines them."""
    from dit_compiler.compiler.targets.nntile_1_1 import KERNEL_SETS, native

    if why := native.problem():
        pytest.skip(f"ditc's kernels are unavailable here: {why}")
    monkeypatch.setenv("DITC_KERNELS", default)
    graph, folder = build(tmp_path)
    report = quiet_verify(graph, folder)
    assert_passes(report, TIGHT_FORWARD, TIGHT_GRAD)
    assert report.kernels.startswith(KERNEL_SETS[default])
    assert report.kernels.endswith(f"the model also ran on {KERNEL_SETS[other]}")
    row = next(r for r in report.rows if r.component == f"model, {KERNEL_SETS[other]}")
    assert row.forward <= TIGHT_FORWARD and row.input_grad <= TIGHT_GRAD and row.param_grad <= TIGHT_GRAD
    monkeypatch.delenv("DITC_KERNELS")
    assert main(["verify", str(folder), "--no-oracle", "--kernels", default]) == 0
    assert f"kernels: {KERNEL_SETS[default]}" in capsys.readouterr().out


def test_verify_without_ditcs_kernels_runs_nntiles_and_says_why(tmp_path, monkeypatch):
    """Where the extension cannot be built (no NNTile build tree, no compiler), the model runs NNTile's
    kernels, verify passes on them, and the report says why ditc's did not run."""
    from dit_compiler.compiler.targets.nntile_1_1 import native

    def unavailable():
        raise native.Unavailable("no NNTile build tree here")

    monkeypatch.setattr(native, "_loaded", None)
    monkeypatch.setattr(native, "built_module", unavailable)
    monkeypatch.delenv("DITC_KERNELS", raising=False)
    graph, folder = build(tmp_path)
    with pytest.warns(native.KernelWarning, match="no NNTile build tree here"):
        report = quiet_verify(graph, folder)
    assert_passes(report, TIGHT_FORWARD, TIGHT_GRAD)
    assert report.kernels == "NNTile's kernels (ditc's are unavailable: no NNTile build tree here)"
    assert not any("kernels" in row.component for row in report.rows)


def _broken_copy(tmp_path, folder, file: str, pattern: str, replacement: str):
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    source = (broken / file).read_text()
    assert re.search(pattern, source), f"the generated {file} no longer has the line this test corrupts"
    (broken / file).write_text(re.sub(pattern, replacement, source, count=1))
    return broken


def test_a_corrupted_op_is_caught_and_named(tmp_path, capsys):
    """Swap shift and scale of the MLP modulate in the generated NNTile model: verify fails there."""
    graph, folder = build(tmp_path)
    broken = _broken_copy(tmp_path, folder, NNTILE_FILE, r'shift=f"blocks\.\{i\}\.shift_mlp", scale=f"blocks\.\{i\}\.scale_mlp"',
                          'shift=f"blocks.{i}.scale_mlp", scale=f"blocks.{i}.shift_mlp"')
    report = quiet_verify(graph, broken)
    assert not report.passed
    assert report.breach.startswith("modulate: forward"), report.breach
    assert main(["verify", str(broken), "--no-oracle"]) == 1
    assert "nntile_model.py was edited since ditc wrote it" in capsys.readouterr().out


def test_a_renamed_trace_name_fails_naming_the_tensor(tmp_path):
    """A torch tap under another name leaves a graph activation uncompared: that is a failure, not a '-'."""
    graph, folder = build(tmp_path)
    broken = _broken_copy(tmp_path, folder, TORCH_FILE, r'f"blocks\.\{i\}\.norm2"', 'f"blocks.{i}.norm_2"')
    report = quiet_verify(graph, broken)
    assert report.breach == "the value of blocks.0.norm2 is missing on the torch side"


def test_a_nan_fails(tmp_path):
    graph, folder = build(tmp_path)
    broken = _broken_copy(tmp_path, folder, NNTILE_FILE, r'timestep_features\(t, GEOMETRY\)',
                          'timestep_features(t, GEOMETRY) * np.float32("nan")')
    report = quiet_verify(graph, broken)
    assert report.breach == "embeddings: forward error is NaN (at t_freq)"


def test_a_dropped_parameter_fails_naming_it(tmp_path):
    """A parameter whose gradient one side does not produce is a failure naming it."""
    graph, folder = build(tmp_path)
    broken = _broken_copy(tmp_path, folder, TORCH_FILE, r"(        self\.pos_embed = nn\.Parameter\()",
                          r"        self.final_layer.linear.bias.requires_grad_(False)\n\1")
    report = quiet_verify(graph, broken)
    assert report.breach == "the gradient of parameter final_layer.linear.bias is missing on the torch side"


def test_runtime_waits_with_starpus_blocking_call():
    """NNTile's `wait_for_all` polls every 1 ms and preempts a worker each time; the runtime calls StarPU's
    blocking `starpu_task_wait_for_all` from the libstarpu NNTile loaded."""
    from dit_compiler.compiler.targets.nntile_1_1 import runtime

    assert runtime._starpu_wait().__name__ == "starpu_task_wait_for_all"


def test_generated_model_refuses_another_runtime_version(tmp_path):
    from dit_compiler.compiler.build import load_module

    _, folder = build(tmp_path)
    path = folder / NNTILE_FILE
    path.write_text(path.read_text().replace("require(1)", "require(99)"))
    with pytest.raises(UsageError, match="nntile_model.py: cannot be imported .*version 99 of ditc's nntile-1.1 "
                                         "runtime.*rebuild it with `ditc build SPEC`\\)$"):
        load_module(path)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adamw_training_steps_match_torch(tmp_path, weight_decay):
    """Three AdamW steps on the MSE loss: the NNTile model's optimiser and torch's end on the same weights."""
    from dit_compiler.checks.common import make_inputs, randomize_
    from dit_compiler.compiler.build import load_module

    graph, folder = build(tmp_path)
    reference = load_module(folder / TORCH_FILE).Model().eval()
    randomize_(reference, 0)
    initial = {k: v.numpy().copy() for k, v in reference.state_dict().items()}
    inputs = make_inputs(graph, 0)
    target = inputs.grad_out.numpy()
    nntile_module = load_module(folder / NNTILE_FILE)
    with nntile_module.nntile_runtime(2):
        model = nntile_module.Model()
        model.load_state_dict(reference.state_dict())
        optimizer = model.adamw(1e-3, weight_decay)
        ema = model.ema()
        try:
            losses = []
            for _ in range(3):
                losses.append(model.train_step((inputs.x.numpy(), inputs.t.numpy(), inputs.y.numpy()), target,
                                               optimizer))
                ema.update(0.9)
            trained, moments, averaged = model.state_dict(), model.adamw_state(optimizer), model.to_torch(ema.shadow)
            with pytest.raises(RuntimeError, match="keep_intermediates=True"):
                model.value("blocks.0.out")  # released after use: a clear error, not a StarPU abort
        finally:
            ema.unregister()
            optimizer.unregister()
            model.unregister()
    torch_opt, states = assert_trains_like_torch(reference, inputs, losses, trained, initial, 1e-3, weight_decay)
    expected_ema = {k: v.copy() for k, v in initial.items()}
    for state in states:
        expected_ema = {k: 0.9 * expected_ema[k] + 0.1 * v for k, v in state.items()}
    assert group_error([(v, expected_ema[k]) for k, v in averaged.items()]) < 1e-5
    # The moments convert to torch's AdamW state as they are (keys in the reference's parameter order); the
    # fused qkv bias holds the key bias, whose gradient is rounding noise (see below).
    keys = [k for k, p in reference.named_parameters() if p.requires_grad]
    torch_state = torch_opt.state_dict()["state"]
    assert moments["step"] == 3
    for name in ("exp_avg", "exp_avg_sq"):
        assert group_error([(moments[name][k], torch_state[i][name].numpy()) for i, k in enumerate(keys)
                            if not k.endswith("qkv.bias")]) < 1e-4, name


def assert_trains_like_torch(reference, inputs, losses, trained, initial, lr, weight_decay):
    """torch's AdamW on `reference` for as many steps gives `losses` and ends on `trained` (weights that moved);
    returns torch's optimiser and the weights after each step."""
    import torch

    params = [p for p in reference.parameters() if p.requires_grad]
    torch_opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    torch_losses, states = [], []
    for _ in losses:
        torch_opt.zero_grad()
        loss = torch.nn.functional.mse_loss(reference(inputs.x, inputs.t, inputs.y), inputs.grad_out)
        loss.backward()
        torch_opt.step()
        torch_losses.append(loss.item())
        states.append({k: v.numpy().copy() for k, v in reference.state_dict().items()})
    assert losses == pytest.approx(torch_losses, rel=1e-4)
    assert losses[-1] < losses[0]
    state = reference.state_dict()
    # All weights as one vector: Adam turns the analytically zero key-bias gradient (rounding noise) into
    # lr-sized steps of arbitrary sign, so that one tensor differs between any two implementations.
    # Three steps move the weights by about 1e-2 of their norm; a wrong update would show at that scale.
    assert group_error([(initial[k], state[k].numpy()) for k in trained]) > 1e-3
    assert group_error([(v, state[k].numpy()) for k, v in trained.items()]) < 1e-4
    return torch_opt, states


@needs_cc
def test_out_of_core_training_matches_torch(tmp_path):
    """Two AdamW steps with StarPU allowed a third of the model's tensors in memory: tiles go to disk and back
    (O_DIRECT, the small ones pinned), and the weights still end where torch's AdamW puts them."""
    import dataclasses
    import json
    import os
    import subprocess
    import sys

    import numpy as np

    from dit_compiler.checks.common import make_inputs, randomize_

    from dit_compiler.compiler.build import load_module
    from dit_compiler.compiler.targets.nntile_1_1 import out_of_core, unmovable_bytes
    from dit_compiler.compiler.targets.nntile_1_1.memory import MIB, all_bytes

    # every large tile a whole number of pages, so that they can move: [256, 64] weights, [64, 16, 2] tokens
    graph, folder = build(tmp_path, tiling="ooc", batch=2, hidden_size=128, mlp_ratio=4.0)
    reference = load_module(folder / TORCH_FILE).Model().eval()
    randomize_(reference, 0)
    initial = {k: v.numpy().copy() for k, v in reference.state_dict().items()}
    inputs = make_inputs(graph, 0)
    lr, weight_decay, steps = 1e-3, 0.1, 2
    data = tmp_path / "data.npz"
    np.savez(data, x=inputs.x.numpy(), t=inputs.t.numpy(), y=inputs.y.numpy(), target=inputs.grad_out.numpy(),
             lr=lr, weight_decay=weight_decay, steps=steps)
    with out_of_core(graph, 2 ** 30, tmp_path) as settings:
        starpu = max(1, (unmovable_bytes(graph) + all_bytes(graph) // 3) // MIB)
        settings = dataclasses.replace(settings, starpu_mib=starpu, swaps=True)
        assert starpu * MIB < all_bytes(graph) / 2
        result = tmp_path / "result.npz"
        subprocess.run([sys.executable, str(ROOT / "tests" / "ooc_train.py"), str(folder),
                        json.dumps(settings.to_json()), str(data), str(result)], check=True,
                       env=os.environ | {"PYTHONPATH": str(ROOT)})
        swap = Path(settings.swap_dir)
    assert not swap.parent.exists()  # the swap folder goes at exit
    out = np.load(result)
    read, written, pinned = out["disk"]
    assert read > 0 and written > 0 and pinned > 0
    trained = {key.split(":", 1)[1]: out[key] for key in out.files if key.startswith("weight:")}
    assert_trains_like_torch(reference, inputs, list(out["losses"]), trained, initial, lr, weight_decay)


def test_blocks_written_out_when_they_do_not_fold(tmp_path, monkeypatch):
    """Where blocks differ the emitter writes every block out; that code is the same model."""
    import dit_compiler.compiler.targets.nntile_1_1.emitter as emitter

    monkeypatch.setattr(emitter, "folds", lambda *args: False)
    graph, folder = build(tmp_path)
    source = (folder / NNTILE_FILE).read_text()
    assert "def block(" not in source and 'y="blocks.1.out"' in source
    assert_passes(quiet_verify(graph, folder))


def test_inference_model_matches_torch_holding_no_gradients(tmp_path):
    """The forward-only model sampling runs: the same output, no gradient tensors, values released."""
    import torch

    from dit_compiler.checks.common import make_inputs, randomize_, rel_error

    from dit_compiler.compiler.build import load_module

    graph, folder = build(tmp_path)
    reference = load_module(folder / TORCH_FILE).Model().eval()
    randomize_(reference, 0)
    inputs = make_inputs(graph, 0)
    with torch.no_grad():
        expected = reference(inputs.x, inputs.t, inputs.y).numpy()
    module = load_module(folder / NNTILE_FILE)
    with module.nntile_runtime(2):
        model = module.Model(inference=True)
        try:
            model.load_state_dict(reference.state_dict())
            outs = [model.forward(inputs.x.numpy(), inputs.t.numpy(), inputs.y.numpy()) for _ in range(2)]
            assert all(t.grad is None for t in model.tensors.values() if hasattr(t, "grad"))
            with pytest.raises(RuntimeError, match="released once used"):
                model.value("blocks.0.norm1")
        finally:
            model.unregister()
    assert max(rel_error(out, expected) for out in outs) < 1e-6


def test_an_rms_norm_graph_verifies(tmp_path):
    """An op no shipped spec uses yet, end to end: lowered after every block on ragged multi-tile axes,
    both targets emitted from the graph, NNTile against the torch reference within verify's tolerances."""
    from dit_compiler.compiler import targets
    from dit_compiler.compiler.lower import lower
    from dit_compiler.compiler.targets.torch.emitter import emit_torch
    from test_torch_reference import RMSNormAfterBlocks

    spec = Spec(name="rms", source="rms.yaml", model=ModelSpec(**TINY), batch=3, tiling=TILINGS["ragged"])
    graph = lower(spec, RMSNormAfterBlocks)
    target = targets.get(spec.target)
    target.prepare(graph)
    graph.lint()
    (tmp_path / TORCH_FILE).write_text(emit_torch(graph))
    (tmp_path / NNTILE_FILE).write_text(target.emit(graph))
    report = quiet_verify(graph, tmp_path)
    assert_passes(report)
    row = next(r for r in report.rows if r.component == "rms norm")
    assert row.forward <= FORWARD_TOL and row.input_grad <= GRAD_TOL and row.param_grad <= GRAD_TOL, row
