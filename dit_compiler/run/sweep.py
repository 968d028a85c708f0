"""`ditc sweep SWEEP.yaml`: many points around a base spec, each validated, built, inspected and
optionally verified and benchmarked; results in CSV, JSON and plots; `--resume` skips finished points.

A sweep file:

    base: ../specs/dit-s-2.yaml     # the spec every point starts from (relative to the sweep file)
    name: depth-hidden              # results go to <out>/<name>/ (default: the sweep file's stem)
    grid:                           # Cartesian product of every listed value
      model.depth: [6, 12]
      model.hidden_size: [256, 384]
    zip:                            # lists of one length, varied together (crossed with the grid)
      model.hidden_size: [256, 384]
      model.num_heads: [4, 6]
    points:                         # named points (crossed with grid and zip)
      - {name: small, set: {batch: 2}}

Keys are dotted spec paths (`model.depth`, `tiling.hidden`, `batch`).
"""
from __future__ import annotations

import contextlib
import csv
import io
import itertools
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dit_compiler.build import write_text_atomic
from dit_compiler.errors import Diagnostic, SpecError, UsageError

SWEEP_KEYS = {"base", "name", "grid", "zip", "points"}


@dataclass(frozen=True)
class Point:
    name: str
    overrides: dict[str, Any]


@dataclass
class Sweep:
    name: str
    base: Path
    points: list[Point]
    swept: list[str]            # the keys that vary, for columns and plot axes


@dataclass
class PointResult:
    name: str
    overrides: dict[str, Any]
    status: str                                      # ok, invalid, failed
    errors: list[str] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    rounds: int = 0                                  # benchmark rounds done
    nntile_bench: dict[str, Any] = field(default_factory=dict)  # NNTile's times pooled over the rounds
    torch_bench: dict[str, Any] = field(default_factory=dict)   # torch's, measured interleaved with them


def _fail(path: Path, message: str) -> SpecError:
    return SpecError([Diagnostic(str(path), None, None, "", message)])


def load_sweep(path: str | os.PathLike) -> Sweep:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise UsageError(f"{path}: cannot read the sweep file ({error.strerror})") from None
    except yaml.YAMLError as error:
        raise _fail(path, f"not valid YAML: {error}") from None
    if not isinstance(data, dict) or "base" not in data:
        raise _fail(path, "a sweep file is a mapping with at least `base:` (a spec path)")
    unknown = sorted(set(data) - SWEEP_KEYS)
    if unknown:
        raise _fail(path, f"unknown keys {unknown}; allowed: {sorted(SWEEP_KEYS)}")
    grid = data.get("grid") or {}
    zipped = data.get("zip") or {}
    named = data.get("points") or [{"name": "", "set": {}}]
    lengths = {len(v) for v in zipped.values()}
    if len(lengths) > 1:
        raise _fail(path, f"zip: every list must have one length, got {sorted(lengths)}")
    if any(not isinstance(v, list) or not v for v in list(grid.values()) + list(zipped.values())):
        raise _fail(path, "grid and zip values must be non-empty lists")
    zip_rows = [dict(zip(zipped, values)) for values in zip(*zipped.values())] or [{}]
    points = []
    for entry, grid_values, zip_row in itertools.product(named, itertools.product(*grid.values()), zip_rows):
        overrides = dict(entry.get("set") or {}) | dict(zip(grid, grid_values)) | zip_row
        label = "-".join([entry.get("name") or ""] + [f"{k.split('.')[-1]}={v}" for k, v in overrides.items()
                                                        if k not in (entry.get("set") or {})])
        points.append(Point(label.strip("-") or "base", overrides))
    swept = list(dict.fromkeys([*grid, *zipped, *(k for e in named for k in (e.get("set") or {}))]))
    return Sweep(data.get("name") or path.stem, (path.parent / data["base"]).resolve(), points, swept)


def apply_overrides(base: dict, overrides: dict[str, Any], name: str) -> dict:
    data = json.loads(json.dumps(base))
    data["name"] = name
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = data
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return data


class TorchPartner:
    """The torch process a benchmarked point's NNTile runs interleave with: one at a time, kept while
    consecutive points share a model (tiling does not change torch's module), replaced when the model
    changes, ended with the sweep."""

    def __init__(self, ncpus: int):
        self.ncpus, self.key, self.process = ncpus, None, None
        self.stack = contextlib.ExitStack()

    def __enter__(self) -> "TorchPartner":
        return self

    def __exit__(self, *exc) -> None:
        self.stack.close()

    def for_model(self, graph, folder: Path):
        from dit_compiler.run.bench import WARMUP, SideProcess

        spec = graph.spec.to_dict()
        key = json.dumps({k: spec[k] for k in ("model", "batch", "precision")}, sort_keys=True)
        if key != self.key:
            self.stack.close()
            self.key, self.process = key, self.stack.enter_context(SideProcess("torch", folder, self.ncpus, WARMUP, False))
            self.process.reply()  # warmed up
        return self.process


def _bench_round(result: PointResult, graph, folder: Path, torch_partner: TorchPartner) -> None:
    """One more benchmark round of a point, pooled with its earlier rounds: a fresh NNTile process
    whose measured runs interleave with the torch partner's, so the point's ratio compares runs made
    seconds apart however the machine's speed drifts over the sweep."""
    from dit_compiler.run.bench import (REPEATS, WARMUP, BenchReport, SideProcess, SideResult, interleave, pooled,
                                        with_times)

    torch_process = torch_partner.for_model(graph, folder)
    with SideProcess("nntile", folder, torch_partner.ncpus, WARMUP, False) as nntile_process:
        nntile_process.reply()
        times = interleave([nntile_process, torch_process], REPEATS)
        nntile = with_times(SideResult(**nntile_process.ask("finish")), times["nntile"])
    torch_side = with_times(SideResult("torch", torch_partner.ncpus, [], [], torch_process.ask("rss"), {}),
                            times["torch"])
    if result.nntile_bench:
        nntile = pooled(SideResult(**result.nntile_bench), nntile)
    if result.torch_bench:
        torch_side = pooled(SideResult(**result.torch_bench), torch_side)
    result.rounds, result.nntile_bench, result.torch_bench = result.rounds + 1, asdict(nntile), asdict(torch_side)
    report = BenchReport(graph.spec.name, graph.axes["batch"].size, torch_partner.ncpus, WARMUP, REPEATS,
                         {"nntile": nntile, "torch": torch_side}, result.rounds)
    summary = report.summary()
    result.metrics.update({f"{side}_{k}": v for side in ("nntile", "torch") for k, v in summary[side].items()})
    result.metrics.update({f"ratio_{k}": v for k, v in summary["ratio"].items()})
    result.metrics["paired_step_ratio"] = report.paired_step_ratio()


def _compile_point(point: Point, base: dict, sweep: Sweep):
    from dit_compiler.build import compile_spec
    from dit_compiler.spec import load_spec_data

    name = f"{sweep.name}-{point.name}".replace("=", "").replace(".", "_").replace("/", "_")
    return compile_spec(load_spec_data(apply_overrides(base, point.overrides, name),
                                       source=f"{sweep.name}:{point.name}"))


@contextlib.contextmanager
def _reported(result: PointResult):
    """A point that crashes is reported as failed, and the sweep goes on."""
    try:
        yield
    except Exception as error:
        result.status, result.errors = "failed", [f"{type(error).__name__}: {error}"]


def run_point(point: Point, base: dict, sweep: Sweep, out: Path, *, verify_it: bool, ncpus: int,
              torch_partner: TorchPartner | None) -> PointResult:
    """Validate, build, inspect, and (when asked) verify and, given a torch partner, bench the first round
    of one point."""
    from dit_compiler.build import write_build
    from dit_compiler.graph.cost import totals

    result = PointResult(point.name, point.overrides, "ok")
    try:
        built = _compile_point(point, base, sweep)
    except SpecError as error:
        result.status, result.errors = "invalid", [str(d) for d in error.diagnostics]
        return result
    folder = write_build(built, out / "builds")
    tot = totals(built.graph)
    result.metrics.update(gmac=tot.forward_macs / 1e9, params_m=tot.params / 1e6,
                          param_mib=tot.param_bytes / 2**20, activation_mib=tot.activation_bytes / 2**20,
                          tasks=tot.tasks)
    with _reported(result):
        if verify_it:
            from dit_compiler.run.verify import verify

            report = verify(built.graph, folder, ncpus=ncpus, oracle=False, progress=lambda _: None)
            model_row = next((r for r in report.rows if r.component == "model"), None)
            if model_row:
                result.metrics.update(verify_forward=model_row.forward, verify_param_grad=model_row.param_grad)
            if not report.passed:
                result.status, result.errors = "failed", [report.breach or report.nntile]
        if torch_partner is not None:
            _bench_round(result, built.graph, folder, torch_partner)
    return result


def write_results(results: list[PointResult], sweep: Sweep, out: Path) -> None:
    rows = [{"point": r.name, "status": r.status, **{k: r.overrides.get(k, "") for k in sweep.swept},
             **r.metrics, "errors": " | ".join(r.errors)} for r in results]
    columns = list(dict.fromkeys(k for row in rows for k in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(out / "results.csv", buffer.getvalue())
    write_text_atomic(out / "results.json", json.dumps([r.__dict__ for r in results], indent=1) + "\n")


def plot_results(results: list[PointResult], sweep: Sweep, out: Path) -> list[Path]:
    """One PNG per swept key: time, memory and GMACs against its values, NNTile and torch on the same axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if r.status == "ok"]
    written = []
    panels = [("time (s)", [("nntile_step_median_s", "NNTile train step"), ("torch_step_median_s", "torch train step"),
                            ("nntile_forward_median_s", "NNTile forward"), ("torch_forward_median_s", "torch forward")]),
              ("memory (MiB)", [("nntile_peak_rss_mib", "NNTile peak RSS"), ("torch_peak_rss_mib", "torch peak RSS"),
                                ("activation_mib", "graph activations"), ("param_mib", "parameters")]),
              ("forward GMAC", [("gmac", "forward GMAC")])]
    panels = [(y, series) for y, series in panels if any(m in r.metrics for r in ok for m, _ in series)]
    for key in sweep.swept:
        points = sorted((r for r in ok if isinstance(r.overrides.get(key), (int, float))), key=lambda r: r.overrides[key])
        if not points:
            continue
        others = [k for k in sweep.swept if k != key]
        groups: dict[str, list[PointResult]] = {}
        for r in points:  # one line per value of the other swept keys
            groups.setdefault(", ".join(f"{k.split('.')[-1]}={r.overrides.get(k)}" for k in others), []).append(r)
        fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
        for ax, (ylabel, series) in zip(axes[0], panels):
            for metric, label in series:
                for group, members in groups.items():
                    pts = [(r.overrides[key], r.metrics[metric]) for r in members if metric in r.metrics]
                    if pts:
                        ax.plot(*zip(*pts), marker="o", label=f"{label} ({group})" if group else label)
            ax.set_xlabel(key)
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=6)
        fig.suptitle(f"sweep {sweep.name}: {key}")
        fig.tight_layout()
        path = out / f"plot-{key.replace('.', '_')}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written


def run_sweep(path: str | os.PathLike, out_root: str | os.PathLike, *, verify_it: bool = False,
              bench_it: bool = False, resume: bool = False, ncpus: int = 2,
              rounds: int = 1) -> tuple[Sweep, list[PointResult], Path]:
    """Every point once, then (benchmarking) `rounds - 1` more benchmark passes over all the points,
    pooled per point: a slow spell of a shared machine then spreads over every point instead of
    ranking the ones it happened to hit."""
    from tqdm import tqdm

    from dit_compiler.spec import load_spec

    sweep = load_sweep(path)
    base = load_spec(sweep.base).to_dict()
    out = Path(out_root) / sweep.name
    out.mkdir(parents=True, exist_ok=True)
    done: dict[str, PointResult] = {}
    if resume and (out / "results.json").is_file():
        done = {r["name"]: PointResult(**r) for r in json.loads((out / "results.json").read_text())}
    results: list[PointResult] = []
    rounds = rounds if bench_it else 1
    progress = tqdm(total=len(sweep.points) * rounds, desc=f"sweep {sweep.name}", unit="point")
    with TorchPartner(ncpus) as torch_partner:
        for point in sweep.points:
            previous = done.get(point.name)
            if previous is not None and previous.overrides == point.overrides and previous.status != "failed":
                results.append(previous)
            else:
                results.append(run_point(point, base, sweep, out, verify_it=verify_it, ncpus=ncpus,
                                         torch_partner=torch_partner if bench_it else None))
                write_results(results, sweep, out)  # after every point: an interrupted sweep resumes from here
            progress.update()
        for round_ in range(2, rounds + 1):
            for point, result in zip(sweep.points, results):
                if result.status == "ok" and result.rounds < round_:
                    with _reported(result):
                        built = _compile_point(point, base, sweep)
                        _bench_round(result, built.graph, out / "builds" / built.graph.spec.name, torch_partner)
                    write_results(results, sweep, out)
                progress.update()
    progress.close()
    write_results(results, sweep, out)
    plot_results(results, sweep, out)
    return sweep, results, out
