"""`ditc sweep SWEEP.yaml`: many points around a base spec (`dit_compiler.compiler.spec.sweep` reads and checks the
file), each validated, built, inspected and optionally verified and benchmarked; results in CSV, JSON and
plots in `<out>/<name>/`; `--resume` skips the points whose spec has not changed since they finished.

The results folder is the sweep's own: its `results.json` says which ditc sweep wrote it, is written
before the first point, and a folder holding anything else is refused.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import sys
import typing
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from dit_compiler import __version__
from dit_compiler.checks.bench import (REPEATS, WARMUP, BenchReport, SideProcess, SideResult, interleave, pooled,
                                       with_times)
from dit_compiler.compiler.build import compile_spec, write_build
from dit_compiler.compiler.graph.cost import totals
from dit_compiler.compiler.spec import load_spec, load_spec_data
from dit_compiler.errors import SpecError, UsageError
from dit_compiler.files import check_owned, write_atomic, write_text_atomic
from dit_compiler.compiler.spec.sweep import MAX_POINTS, Point, Sweep, data_digest, load_sweep, point_data
from dit_compiler.limits import check_memory
from dit_compiler.userfiles import MAX_RESULTS, read_json

RESULTS_KIND = "ditc sweep results"
T = TypeVar("T")
#: The kind of folder a sweep's results are (its marker, `files.OUTPUT_MARKER`, says so).
SWEEP = "sweep"
#: Statuses a resumed sweep keeps; any other point runs again.
FINISHED = ("ok", "invalid")


@dataclass
class PointResult:
    name: str
    overrides: dict[str, Any]
    status: str                                      # ok, invalid, failed, unverified, not benchmarked
    errors: list[str] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    spec_sha256: str = ""                            # of the point's spec data: a changed spec runs again
    verified: bool = False
    rounds: int = 0                                  # benchmark rounds done
    nntile_bench: dict[str, Any] = field(default_factory=dict)  # NNTile's times pooled over the rounds
    torch_bench: dict[str, Any] = field(default_factory=dict)   # torch's, measured interleaved with them


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


def _compile_point(point: Point, base: dict):
    return compile_spec(load_spec_data(point_data(base, point), source=point.build_name))


@contextlib.contextmanager
def _reported(result: PointResult):
    """A point that crashes is reported as failed, and the sweep goes on."""
    try:
        yield
    except Exception as error:
        result.status, result.errors = "failed", [f"{type(error).__name__}: {error}"]


def run_point(point: Point, base: dict, out: Path, *, verify_it: bool, ncpus: int,
              torch_partner: TorchPartner | None) -> PointResult:
    """Validate, build, inspect, and (when asked) verify and, given a torch partner, bench the first round
    of one point."""
    result = PointResult(point.name, point.overrides, "ok", spec_sha256=data_digest(point_data(base, point)))
    try:
        built = _compile_point(point, base)
    except SpecError as error:
        result.status, result.errors = "invalid", [str(d) for d in error.diagnostics]
        return result
    folder = write_build(built, out / "builds")
    tot = totals(built.graph)
    result.metrics.update(gmac=tot.forward_macs / 1e9, params_m=tot.params / 1e6,
                          param_mib=tot.param_bytes / 2**20, activation_mib=tot.activation_bytes / 2**20,
                          tasks=tot.tasks)
    with _reported(result):
        if verify_it or torch_partner is not None:
            check_memory(built.graph)
        if verify_it:
            from dit_compiler.checks.verify import verify   # imports torch

            report = verify(built.graph, folder, ncpus=ncpus, oracle=False, progress=lambda _: None)
            result.verified = True
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
    write_text_atomic(out / "results.csv", buffer.getvalue(), SWEEP)
    data = {"kind": RESULTS_KIND, "written_by": f"ditc {__version__}", "sweep": sweep.name,
            "points": [asdict(r) for r in results]}
    write_text_atomic(out / "results.json", json.dumps(data, indent=1) + "\n", SWEEP)


def read_points(out: Path, sweep: Sweep, kind: str, command: str, parse: Callable[[list], T]) -> T | None:
    """`out/results.json`'s points as `parse` makes them (it raises ValueError or TypeError on points this ditc
    does not write), None where the file is absent; refuses (UsageError) a folder ditc did not mark as a sweep's
    (`files.check_owned`) and a results file `command` did not write for `sweep`."""
    path = out / "results.json"
    check_owned(out, (SWEEP,), f"{out}/")
    if not os.path.lexists(path):
        return None
    try:
        data = read_json(path, MAX_RESULTS, "results file")
        if not isinstance(data, dict) or data.get("kind") != kind or not isinstance(data.get("points"), list):
            raise ValueError(f"not the results of {command}")
        if data.get("sweep") != sweep.name:
            raise ValueError(f"the results of sweep {data.get('sweep')!r}")
        return parse(data["points"])
    except (ValueError, TypeError, UsageError) as error:   # UsageError: not a readable regular file of JSON
        error = str(error).removeprefix(f"{path}: ")
        raise UsageError(f"{path}: not a results file {command} wrote for {sweep.name!r} ({error}); ditc does not "
                         "write into it: move it away, or choose another -o") from None


def read_results(out: Path, sweep: Sweep) -> dict[str, PointResult]:
    """The points of `out/results.json`, by name (see `read_points`)."""
    kinds = {name: typing.get_origin(kind) or kind for name, kind in typing.get_type_hints(PointResult).items()}

    def parse(points: list) -> dict[str, PointResult]:
        if not all(isinstance(r, dict) and set(r) == set(kinds) and all(
                isinstance(r[k], kind) and (kind is bool or not isinstance(r[k], bool)) for k, kind in kinds.items())
                   for r in points):
            raise ValueError("its points are not the ones this ditc writes")
        return {r["name"]: PointResult(**r) for r in points}
    return read_points(out, sweep, RESULTS_KIND, "ditc sweep", parse) or {}


def _zipped_with(sweep: Sweep, key: str) -> list[str]:
    """The keys `zip:` varies together with `key` (none where `key` is not zipped)."""
    return [k for k in sweep.zipped if k != key] if key in sweep.zipped else []


def plot_groups(points: list[PointResult], sweep: Sweep, key: str) -> dict[str, list[PointResult]]:
    """The lines of a plot against `key`: one per combination of the keys that vary independently of it,
    labelled with their values; the keys zipped with `key` move along its axis, so they make no lines."""
    others = [k for k in sweep.swept if k != key and k not in _zipped_with(sweep, key)]
    groups: dict[str, list[PointResult]] = {}
    for r in points:
        groups.setdefault(", ".join(f"{k.split('.')[-1]}={r.overrides.get(k)}" for k in others), []).append(r)
    return groups


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
        groups = plot_groups(points, sweep, key)
        together = _zipped_with(sweep, key)
        xlabel = key + (f" (with {', '.join(together)})" if together else "")
        fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
        for ax, (ylabel, series) in zip(axes[0], panels):
            for metric, label in series:
                for group, members in groups.items():
                    pts = [(r.overrides[key], r.metrics[metric]) for r in members if metric in r.metrics]
                    if pts:
                        ax.plot(*zip(*pts), marker="o", label=f"{label} ({group})" if group else label)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=6)
        fig.suptitle(f"sweep {sweep.name}: {key}")
        fig.tight_layout()
        path = out / f"plot-{key.replace('.', '_')}.png"
        write_atomic(path, lambda file: fig.savefig(file, format="png", dpi=90), SWEEP)
        plt.close(fig)
        written.append(path)
    return written


def run_sweep(path: str | os.PathLike, out_root: str | os.PathLike, *, verify_it: bool = False,
              bench_it: bool = False, resume: bool = False, ncpus: int = 2, rounds: int = 1,
              max_points: int = MAX_POINTS) -> tuple[Sweep, list[PointResult], Path]:
    """Every point once, then (benchmarking) more benchmark passes over all the points until each has
    `rounds`, pooled per point: a slow spell of a shared machine then spreads over every point instead
    of ranking the ones it happened to hit. Without NNTile, points asked to be verified or benchmarked
    are built and inspected and marked `unverified` / `not benchmarked`."""
    from dit_compiler.checks.verify import nntile_status   # its module imports torch

    sweep = load_sweep(path, max_points)
    base = load_spec(sweep.base).to_dict()
    out = Path(out_root) / sweep.name
    previous = read_results(out, sweep)
    done = previous if resume else {}
    unrun = ""
    if (verify_it or bench_it) and (status := nntile_status()) != "ran":
        unrun = "unverified" if verify_it else "not benchmarked"
        print(f"note: {status}; every point is built and inspected, and marked {unrun}", file=sys.stderr)
        verify_it = bench_it = False
    out.mkdir(parents=True, exist_ok=True)
    if not previous:
        write_results([], sweep, out)  # marks the folder as this sweep's before any build lands in it
    results: list[PointResult] = []
    rounds = rounds if bench_it else 1
    progress = _Progress(len(sweep.points) * rounds, f"sweep {sweep.name}")
    with TorchPartner(ncpus) as torch_partner:
        for point in sweep.points:
            old = done.get(point.name)
            kept = (old is not None and old.status in FINISHED and (old.verified or not verify_it)
                    and old.spec_sha256 == data_digest(point_data(base, point)))
            if kept:
                result = old
            else:
                result = run_point(point, base, out, verify_it=verify_it, ncpus=ncpus,
                                   torch_partner=torch_partner if bench_it else None)
                if unrun and result.status == "ok":
                    result.status = unrun
            if bench_it and result.status == "ok" and result.rounds == 0:  # kept from a sweep that did not bench
                _bench_again(result, point, base, out, torch_partner)
            results.append(result)
            write_results(results, sweep, out)  # after every point: an interrupted sweep resumes from here
            progress.step(f"{point.name}: {result.status}" + " (kept from the earlier run)" * kept)
        for round_ in range(2, rounds + 1):
            for point, result in zip(sweep.points, results):
                if result.status == "ok" and result.rounds < round_:
                    _bench_again(result, point, base, out, torch_partner)
                    write_results(results, sweep, out)
                progress.step(f"{point.name}: round {round_}, {result.status}")
    progress.close()
    write_results(results, sweep, out)
    plot_results(results, sweep, out)
    return sweep, results, out


def _bench_again(result: PointResult, point: Point, base: dict, out: Path, torch_partner: TorchPartner) -> None:
    """One more benchmark round of a point built earlier."""
    with _reported(result):
        built = _compile_point(point, base)
        _bench_round(result, built.graph, out / "builds" / built.graph.spec.name, torch_partner)


class _Progress:
    """A bar on a terminal; elsewhere (a log, a pipe) one plain line per step, no carriage returns."""

    def __init__(self, total: int, description: str):
        self.total, self.description, self.count = total, description, 0
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=description, unit="point")

    def step(self, line: str) -> None:
        self.count += 1
        if self.bar is not None:
            self.bar.update()
        else:
            print(f"[{self.description} {self.count}/{self.total}] {line}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
