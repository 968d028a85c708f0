"""`ditc sweep` and `ditc bench` as a user runs them."""
from __future__ import annotations

import csv
import json
import shutil

import pytest

from conftest import ROOT, SPECS, needs_nntile
from dit_compiler.cli import main
from dit_compiler.compiler.spec.sweep import load_sweep


def write_sweep(tmp_path, body: str):
    path = tmp_path / "sweep.yaml"
    path.write_text(f"base: {SPECS / 'tiny.yaml'}\nname: s\n" + body)
    return path


def test_grid_zip_and_points_cross(tmp_path):
    sweep = load_sweep(write_sweep(tmp_path, """
grid:
  model.depth: [1, 2]
zip:
  model.hidden_size: [32, 64]
  model.num_heads: [2, 4]
points:
  - {name: a, set: {batch: 1}}
  - {name: b, set: {batch: 2}}
"""))
    assert len(sweep.points) == 2 * 2 * 2
    assert {"model.depth", "model.hidden_size", "model.num_heads", "batch"} == set(sweep.swept)
    assert sweep.points[0].overrides == {"batch": 1, "model.depth": 1, "model.hidden_size": 32, "model.num_heads": 2}


def test_plots_draw_a_line_per_combination_of_the_independent_keys(tmp_path):
    """Zipped keys move together along a plot's axis: against hidden_size (zipped with num_heads), a line per
    depth and batch, each through both zipped values, not a line per point."""
    from dit_compiler.checks.sweep import PointResult, plot_groups, plot_results

    sweep = load_sweep(write_sweep(tmp_path, """
grid:
  model.depth: [1, 2, 3]
zip:
  model.hidden_size: [32, 64, 96]
  model.num_heads: [2, 4, 6]
points:
  - {name: a, set: {batch: 1}}
  - {name: b, set: {batch: 2}}
"""))
    results = [PointResult(p.name, p.overrides, "ok", metrics={"gmac": float(i)}) for i, p in enumerate(sweep.points)]
    for key in ("model.hidden_size", "model.num_heads"):
        groups = plot_groups(results, sweep, key)
        assert sorted(groups) == sorted(f"depth={d}, batch={b}" for b in (1, 2) for d in (1, 2, 3))
        assert all(len(members) == 3 for members in groups.values())
    groups = plot_groups(results, sweep, "model.depth")   # a grid key: a line per zipped row and batch
    assert len(groups) == 6 and "hidden_size=64, num_heads=4, batch=2" in groups
    assert all(len(members) == 3 for members in groups.values())
    plots = plot_results(results, sweep, tmp_path / "results")   # a new folder: the sweep file is in tmp_path
    assert {p.name for p in plots} == {"plot-model_depth.png", "plot-model_hidden_size.png",
                                       "plot-model_num_heads.png", "plot-batch.png"}


def test_zip_lists_of_different_lengths_are_an_error(tmp_path):
    assert main(["sweep", str(write_sweep(tmp_path, "zip:\n  model.depth: [1, 2]\n  batch: [1]\n"))]) == 2


def test_invalid_point_is_reported_and_the_sweep_goes_on_then_resumes(tmp_path, capsys):
    sweep = write_sweep(tmp_path, "grid:\n  model.num_heads: [4, 5]\n  model.depth: [1, 2]\n")
    out = tmp_path / "out"
    assert main(["sweep", str(sweep), "-o", str(out)]) == 1  # a point failed validation
    printed = capsys.readouterr().out
    assert "num_heads=5-depth=1" in printed and "invalid" in printed
    rows = list(csv.DictReader((out / "s" / "results.csv").open()))
    assert [r["status"] for r in rows] == ["ok", "ok", "invalid", "invalid"]
    assert "not divisible" in rows[2]["errors"]
    assert float(rows[1]["gmac"]) > float(rows[0]["gmac"])
    assert (out / "s" / "plot-model_depth.png").stat().st_size > 0

    finished = json.loads((out / "s" / "results.json").read_text())["points"]
    build = out / "s" / "builds" / "s-num_heads4-depth1" / "nntile_model.py"
    stamp = build.stat().st_mtime_ns
    assert main(["sweep", str(sweep), "-o", str(out), "--resume"]) == 1
    assert build.stat().st_mtime_ns == stamp  # finished points were skipped, not rebuilt
    assert json.loads((out / "s" / "results.json").read_text())["points"][:2] == finished[:2]


@needs_nntile
@pytest.mark.nntile
def test_bench_prints_both_sides_and_a_ratio_pooling_interleaved_rounds(tmp_path, capsys):
    report = tmp_path / "bench.json"
    assert main(["bench", str(SPECS / "tiny.yaml"), "-o", str(tmp_path), "--warmup", "1", "--repeats", "1",
                 "--rounds", "2", "--json", str(report)]) == 0
    printed = capsys.readouterr().out
    assert "ratio nntile/torch: forward" in printed and "2 StarPU CPU workers" in printed
    assert "  kernels     " in printed  # which kernels the NNTile side ran
    gemm = "96x12x24 (m x n x k)"  # a tile GEMM of tiny's largest linear op, timed on each side's BLAS
    assert printed.count(gemm) == 2 and "GFLOP/s on one core" in printed
    assert "in each of 2 rounds, the sides' runs interleaved" in printed and "median of paired steps" in printed
    data = json.loads(report.read_text())
    assert all(len(data["report"]["sides"][side]["step_s"]) == 2 for side in ("nntile", "torch"))
    assert data["summary"]["paired_step_ratio"] > 0
    summary = data["summary"]
    assert summary["nntile"]["peak_rss_mib"] > 0 and summary["torch"]["step_median_s"] > 0
    assert summary["ratio"]["step_median_s"] > 0
    assert summary["nntile"]["gemm_gflops"] > 0 and summary["torch"]["gemm_gflops"] > 0


@needs_nntile
@pytest.mark.nntile
def test_bench_names_the_side_whose_process_died(tmp_path, capsys):
    build = tmp_path / "tiny"
    shutil.copytree(ROOT / "generated" / "tiny", build)
    with (build / "nntile_model.py").open("a") as module:
        module.write("\nimport os\nos._exit(3)\n")
    assert main(["bench", str(build), "--warmup", "1", "--repeats", "1"]) == 1
    assert "ditc bench: nntile benchmark failed (its process exited with 3)" in capsys.readouterr().err


@needs_nntile
@pytest.mark.nntile
def test_bench_rounds_pass_over_every_point_and_pool_its_times(tmp_path):
    """`--bench --rounds 2`: every point is benchmarked twice, in two passes over the sweep, its times
    pooled (3 measured steps a round), each interleaved with as many torch steps; a resumed sweep that
    has its rounds runs nothing again."""
    sweep = write_sweep(tmp_path, "grid:\n  tiling.tokens: [6, 16]\n")
    out = tmp_path / "out"
    assert main(["sweep", str(sweep), "-o", str(out), "--bench", "--rounds", "2", "--ncpus", "2"]) == 0
    results = json.loads((out / "s" / "results.json").read_text())["points"]
    assert [r["rounds"] for r in results] == [2, 2]
    assert all(len(r[f"{side}_bench"]["step_s"]) == 6 for r in results for side in ("nntile", "torch"))
    rows = list(csv.DictReader((out / "s" / "results.csv").open()))
    assert all(float(row["ratio_step_median_s"]) > 0 and float(row["torch_step_median_s"]) > 0 for row in rows)
    assert all(float(row["paired_step_ratio"]) > 0 for row in rows)
    assert "nntile_bench" not in rows[0]  # raw times stay in the JSON
    assert main(["sweep", str(sweep), "-o", str(out), "--bench", "--rounds", "2", "--resume"]) == 0
    assert json.loads((out / "s" / "results.json").read_text())["points"] == results
