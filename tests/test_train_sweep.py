"""`ditc sweep SWEEP --train` as a user runs it: points trained, sampled and scored at checkpoints, results
that survive an interruption, plots by design and size, and clean refusals."""
from __future__ import annotations

import csv
import io
import json

import pytest

from conftest import SPECS, needs_nntile
from dit_compiler.app.sweep import PointRun, TrainOptions, plan, run_train_sweep, series_of, spearman
from dit_compiler.app.train import TrainConfig, train
from dit_compiler.cli import main
from dit_compiler.compiler.spec import load_spec
from dit_compiler.compiler.spec.sweep import load_sweep

TINY = """\
name: tinydig
model: {input_size: 8, in_channels: 1, patch_size: 4, hidden_size: 32, depth: 1, num_heads: 2, num_classes: 10}
batch: 8
train: {steps: 4, lr: 0.001}
sample: {sampler: ddim, steps: 3, cfg: 1.0}
"""
#: Samples per evaluation: as many as the classifier's features, so FD-digits warns of nothing.
N = 64


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def write_sweep(folder, body: str, base: str = TINY):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tiny.yaml").write_text(base)
    path = folder / "sweep.yaml"
    path.write_text("base: tiny.yaml\nname: s\n" + body)
    return path


def sweep_args(path, out, cache, *extra: str) -> list[str]:
    return ["sweep", str(path), "--train", "--every", "2", "--n", str(N), "--backend", "torch", "--cache", str(cache),
            "-o", str(out), *extra]


def test_every_point_is_trained_and_scored_along_training_with_its_cost(tmp_path, cache, capsys):
    # 44 is no multiple of 8 heads: that point is invalid
    path = write_sweep(tmp_path, """
points:
  - {name: a, set: {model.hidden_size: 32}}
  - {name: b, set: {model.hidden_size: 48}}
  - {name: bad, set: {model.hidden_size: 44, model.num_heads: 8}}
""")
    out = tmp_path / "out"
    assert main(sweep_args(path, out, cache)) == 1   # a point is invalid: reported, the others run
    text = capsys.readouterr().out
    assert "Spearman rank correlation of fd_digits with GMACs per image" in text
    assert "time: training" in text and "bad-seed0" in text and "invalid" in text
    folder = out / "s"
    data = json.loads((folder / "results.json").read_text())
    runs = {r["name"]: r for r in data["points"]}
    bad = runs["bad"]
    assert bad["status"] == "invalid" and bad["rows"] == [] and "num_heads" in bad["errors"][0]
    for name in ("a", "b"):
        assert runs[name]["status"] == "ok"
        assert [row["step"] for row in runs[name]["rows"]] == [2, 4]
        # the compute so far grows with the steps: 3 x (forward and backward) x 2 FLOPs a MAC x images seen
        first, last = runs[name]["rows"]
        assert last["train_gflop"] == pytest.approx(2 * first["train_gflop"])
        assert last["train_gflop"] == pytest.approx(6 * runs[name]["cost"]["gmac_per_image"] * 4 * 8)
        assert (folder / "runs" / f"{name}-seed0" / "samples" / "0000002" / "grid.png").is_file()
    assert runs["b"]["cost"]["gmac_per_image"] > runs["a"]["cost"]["gmac_per_image"]
    rows = list(csv.DictReader(io.StringIO((folder / "results.csv").read_text())))
    assert len(rows) == 2 * 2 + 1
    ok = [r for r in rows if r["status"] == "ok"]
    for column in ("accuracy", "fd_digits", "fd_over_floor", "params_m", "gmac_per_image", "train_gflop", "step_s",
                   "peak_rss_mib", "train_memory_mib", "seed", "model.hidden_size", "train_s", "part_s", "sample_s", "eval_s"):
        assert all(r[column] != "" for r in ok), column
    for plot in ("plot-steps.png", "plot-gmacs.png", "plot-compute.png"):
        assert (folder / plot).stat().st_size > 1000


def test_an_interrupted_sweep_resumes_without_training_or_scoring_again_what_finished(tmp_path, cache, capsys):
    """Ctrl-C before the second point's second part: its first checkpoint and the first point are kept, and
    --resume trains only from the second point's checkpoint at step 2 on."""
    path = write_sweep(tmp_path, "grid:\n  model.hidden_size: [32, 48]\n")
    out = tmp_path / "out"

    class CtrlC(io.StringIO):
        def write(self, text: str) -> int:
            if "hidden_size=48-seed0: training to step 4" in text:
                raise KeyboardInterrupt
            return super().write(text)

    options = TrainOptions(every=2, n=N, backend="torch", cache=cache)
    with pytest.raises(KeyboardInterrupt):
        run_train_sweep(path, out, options, stream=CtrlC())
    folder = out / "s"
    before = {r["name"]: r for r in json.loads((folder / "results.json").read_text())["points"]}
    assert [row["step"] for row in before["hidden_size=48"]["rows"]] == [2] and \
        before["hidden_size=48"]["status"] == "stopped"
    kept = folder / "runs" / "hidden_size=32-seed0" / "checkpoints" / "0000004.pt"
    stamp = kept.stat().st_mtime_ns
    assert main(sweep_args(path, out, cache)) == 2   # an earlier sweep's results: --resume or another -o
    assert "pass --resume" in capsys.readouterr().err
    assert main(sweep_args(path, out, cache, "--resume")) == 0
    log = capsys.readouterr().err
    assert "hidden_size=32-seed0: training" not in log and "training to step 2" not in log
    assert "hidden_size=48-seed0: training to step 4" in log
    assert "resuming" in log and "at step 2" in log
    assert kept.stat().st_mtime_ns == stamp
    after = {r["name"]: r for r in json.loads((folder / "results.json").read_text())["points"]}
    assert after["hidden_size=32"]["rows"] == before["hidden_size=32"]["rows"]
    assert after["hidden_size=48"]["rows"][0] == before["hidden_size=48"]["rows"][0]
    assert [row["step"] for row in after["hidden_size=48"]["rows"]] == [2, 4]
    assert after["hidden_size=48"]["status"] == "ok"


def test_seeds_give_a_spread_and_named_points_one_colour_each(tmp_path, cache):
    path = write_sweep(tmp_path, """
points:
  - {name: S, set: {model.hidden_size: 32}}
  - {name: B, set: {model.hidden_size: 48}}
grid:
  model.patch_size: [2, 4]
""")
    sweep = load_sweep(path)

    def run(point, seed: int, fd: float) -> PointRun:
        gmac = point.overrides["model.hidden_size"] / point.overrides["model.patch_size"]
        return PointRun(point.name, seed, point.overrides, point.group, "ok", cost={"gmac_per_image": gmac},
                        rows=[{"step": 2, "fd_digits": fd + 10, "accuracy": 0.1, "train_gflop": gmac},
                              {"step": 4, "fd_digits": fd, "accuracy": 0.2, "train_gflop": 2 * gmac}])

    runs = [run(p, seed, 10 * i + seed) for i, p in enumerate(sweep.points) for seed in (0, 1)]
    series = series_of(runs, sweep)
    assert len(series) == 4 and all(s.seeds == 2 for s in series)
    assert {s.colour for s in series} == {"S", "B"}                      # a colour per size...
    assert {s.style for s in series} == {"patch_size=2", "patch_size=4"}  # ...a line style per patch size
    first = next(s for s in series if s.point == "S-patch_size=2")
    assert (first.low["fd_digits"][-1], first.mean["fd_digits"][-1], first.high["fd_digits"][-1]) == (0, 0.5, 1)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1)


def test_a_part_of_a_run_follows_the_whole_runs_schedule(tmp_path):
    """train(stop_at=2) then a resume to 4: the cosine learning rate and the losses of one 4-step run."""
    (tmp_path / "tiny.yaml").write_text(TINY)
    spec = load_spec(tmp_path / "tiny.yaml")
    config = TrainConfig(steps=4, lr=1e-3, lr_schedule="cosine", backend="torch", ckpt_every=0)
    assert train(spec, tmp_path / "whole", config) == 0
    assert train(spec, tmp_path / "parts", config, stop_at=2) == 0
    assert train(spec, tmp_path / "parts", config, resume=True, stop_at=4) == 0
    whole, parts = ((tmp_path / run / "metrics.csv").read_text().splitlines() for run in ("whole", "parts"))
    column = lambda lines, key: [line.split(",")[lines[0].split(",").index(key)] for line in lines[1:]]
    for key in ("lr", "loss"):
        assert column(parts, key) == column(whole, key)


@pytest.mark.parametrize("body, flags, message", [
    ("grid:\n  model.hiden_size: [32]\n", [], "did you mean 'model.hidden_size'"),
    ("grid:\n  model.hidden_size: [32]\n", ["--bench"], "--verify, --bench and --rounds"),
    ("grid:\n  model.hidden_size: [-1]\n", [], "not a value model.hidden_size allows"),
])
def test_bad_sweeps_and_flags_are_refused_before_any_work(tmp_path, cache, capsys, body, flags, message):
    path = write_sweep(tmp_path, body)
    assert main(sweep_args(path, tmp_path / "out", cache, *flags)) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out" / "s" / "runs").exists()


def test_training_flags_without_train_are_refused(tmp_path, capsys):
    path = write_sweep(tmp_path, "grid:\n  model.hidden_size: [32]\n")
    assert main(["sweep", str(path), "--seeds", "2", "-o", str(tmp_path / "out")]) == 2
    assert "--seeds: a training sweep's flags; add --train" in capsys.readouterr().err


def test_the_shipped_sweeps_read():
    scaling = load_sweep(SPECS / "sweeps" / "digits-scaling.yaml")
    assert len(scaling.points) == 9 and {p.group for p in scaling.points} == {"S", "B", "L"}
    assert plan(load_spec(SPECS / "sweeps" / "digits-small.yaml").train.steps, None) == [120, 240, 360, 480]


def test_the_conditioning_sweep_holds_the_four_figure_5_designs():
    points = load_sweep(SPECS / "sweeps" / "digits-conditioning.yaml").points
    assert sorted(p.overrides["model.conditioning"] for p in points) == ["adaln", "adaln_zero", "cross_attention", "in_context"]


@needs_nntile
def test_a_sweep_trains_and_scores_on_nntile(tmp_path, cache):
    path = write_sweep(tmp_path, "grid:\n  model.hidden_size: [32]\n")
    options = TrainOptions(every=2, n=N, backend="nntile", cache=cache)
    _, runs, out = run_train_sweep(path, tmp_path / "out", options, stream=io.StringIO())
    assert runs[0].status == "ok" and [row["step"] for row in runs[0].rows] == [2, 4]
    assert json.loads((out / "runs" / "hidden_size=32-seed0" / "samples" / "0000004" / "settings.json").read_text()
                      )["backend"] == "nntile"
