"""The compiled NNTile model against the torch reference, on real NNTile (skipped without it)."""
from __future__ import annotations

import math
import re
import shutil

import pytest

from conftest import needs_nntile
from dit_compiler.build import NNTILE_FILE, compile_spec, write_build
from dit_compiler.cli import main
from dit_compiler.run.verify import FORWARD_TOL, GRAD_TOL, verify
from dit_compiler.spec.model import ModelSpec, Spec, TilingSpec

pytestmark = [needs_nntile, pytest.mark.nntile]

TINY = dict(input_size=8, patch_size=2, hidden_size=64, depth=2, num_heads=4, num_classes=10)
TILINGS = {
    "ragged": TilingSpec(batch=2, tokens=6, hidden=24, mlp=96, heads=2),
    "single-tile": TilingSpec(batch=3, tokens=16, hidden=64, mlp=256, heads=4, frequency=256),
    "fine": TilingSpec(batch=1, tokens=5, hidden=16, mlp=40, heads=1, patch_dim=7, out_dim=9, frequency=100),
}


def build(tmp_path, name="tiny", tiling="ragged", batch=3, **model):
    spec = Spec(name=name, source=f"{name}.yaml", model=ModelSpec(**(TINY | model)), batch=batch,
                tiling=TILINGS[tiling])
    built = compile_spec(spec)
    return built.graph, write_build(built, tmp_path)


def assert_passes(report):
    assert report.nntile == "ran"
    assert report.passed, report.breach
    by_name = {row.component: row for row in report.rows}
    for component in ("embeddings", "adaLN modulation", "modulate", "attention", "gated residual",
                      "pointwise MLP", "adaLN-Zero", "DiT block", "final layer", "model"):
        row = by_name[component]
        assert row.forward <= FORWARD_TOL and row.input_grad <= GRAD_TOL, row
        assert row.param_grad <= GRAD_TOL if row.params else math.isnan(row.param_grad), row
    assert by_name["model"].input_grad <= GRAD_TOL


@pytest.mark.parametrize("tiling", sorted(TILINGS))
@pytest.mark.parametrize("flavor", ["dit", "diffusers"])
def test_nntile_matches_torch(tmp_path, tiling, flavor):
    graph, folder = build(tmp_path, tiling=tiling, flavor=flavor)
    assert_passes(verify(graph, folder, oracle=False, progress=lambda _: None))


def test_every_axis_has_several_ragged_tiles_in_the_tiny_run(tmp_path):
    graph, _ = build(tmp_path)
    for axis in ("batch", "tokens", "hidden", "mlp", "heads"):
        assert graph.axes[axis].ntiles > 1, axis
    assert all(graph.axes[a].size % graph.axes[a].tile for a in ("batch", "tokens", "hidden", "mlp"))


def test_patch_4_without_learned_sigma(tmp_path):
    graph, folder = build(tmp_path, input_size=16, patch_size=4, learn_sigma=False, num_heads=2)
    assert_passes(verify(graph, folder, oracle=False, progress=lambda _: None))


def test_verify_twice_in_one_process(tmp_path):
    """StarPU starts and stops cleanly; the second run sees the same model (task order may move the last bits)."""
    graph, folder = build(tmp_path)
    first = verify(graph, folder, oracle=False, progress=lambda _: None)
    second = verify(graph, folder, oracle=False, progress=lambda _: None)
    assert first.passed and second.passed
    assert [r.forward for r in second.rows] == pytest.approx([r.forward for r in first.rows], rel=0.1)


def test_a_corrupted_op_is_caught_and_named(tmp_path, capsys):
    """Swap shift and scale of one modulate call in the generated NNTile model: verify must fail there."""
    graph, folder = build(tmp_path)
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    source = (broken / NNTILE_FILE).read_text()
    call = re.compile(r'self\.modulate\("blocks\.1\.norm2", "(blocks\.1\.shift_mlp)", "(blocks\.1\.scale_mlp)"')
    assert call.search(source), "the generated model no longer has the line this test corrupts"
    (broken / NNTILE_FILE).write_text(call.sub(r'self.modulate("blocks.1.norm2", "\2", "\1"', source))
    report = verify(graph, broken, oracle=False, progress=lambda _: None)
    assert not report.passed
    assert report.breach.startswith("modulate: forward"), report.breach
    assert main(["verify", str(broken), "--no-oracle"]) == 1
    assert "nntile_model.py was edited since ditc wrote it" in capsys.readouterr().out


def test_models_wait_with_starpus_blocking_call(tmp_path):
    """NNTile's `wait_for_all` polls every 1 ms and preempts a worker each time; the generated model
    calls StarPU's blocking `starpu_task_wait_for_all` from the libstarpu NNTile loaded."""
    import nntile

    from dit_compiler.run.common import load_module

    _, folder = build(tmp_path)
    module = load_module(folder / NNTILE_FILE)
    assert module.wait_for_all is not nntile.starpu.wait_for_all
    assert module.wait_for_all.__name__ == "starpu_task_wait_for_all"


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adamw_training_steps_match_torch(tmp_path, weight_decay):
    """Three AdamW steps on the MSE loss: the NNTile model's optimiser and torch's end on the same weights."""
    import torch

    from dit_compiler.run.common import group_error, load_module, make_inputs, randomize_

    graph, folder = build(tmp_path)
    reference = load_module(folder / "torch_reference.py").Model().eval()
    randomize_(reference, 0)
    initial = {k: v.numpy().copy() for k, v in reference.state_dict().items()}
    inputs = make_inputs(graph, 0)
    target = inputs.grad_out.numpy()
    nntile_module = load_module(folder / NNTILE_FILE)
    with nntile_module.nntile_runtime(2):
        model = nntile_module.Model()
        model.load_state_dict(reference.state_dict())
        optimizer = model.adamw(1e-3, weight_decay)
        try:
            losses = [model.train_step(inputs.x.numpy(), inputs.t.numpy(), inputs.y.numpy(), target, optimizer)
                      for _ in range(3)]
            trained = model.state_dict()
            with pytest.raises(RuntimeError, match="keep_intermediates=True"):
                model.value("blocks.0.out")  # released after use: a clear error, not a StarPU abort
        finally:
            optimizer.unregister()
            model.unregister()
    params = [p for p in reference.parameters() if p.requires_grad]
    torch_opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=weight_decay)
    torch_losses = []
    for _ in range(3):
        torch_opt.zero_grad()
        loss = torch.nn.functional.mse_loss(reference(inputs.x, inputs.t, inputs.y), inputs.grad_out)
        loss.backward()
        torch_opt.step()
        torch_losses.append(loss.item())
    assert losses == pytest.approx(torch_losses, rel=1e-4)
    assert losses[-1] < losses[0]
    state = reference.state_dict()
    # All weights as one vector: Adam turns the analytically zero key-bias gradient (rounding noise) into
    # lr-sized steps of arbitrary sign, so that one tensor differs between any two implementations.
    # Three steps move the weights by about 1e-2 of their norm; a wrong update would show at that scale.
    assert group_error([(initial[k], state[k].numpy()) for k in trained]) > 1e-3
    assert group_error([(v, state[k].numpy()) for k, v in trained.items()]) < 1e-4

