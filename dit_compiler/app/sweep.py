"""`ditc sweep SWEEP --train`: every valid point of a sweep trained, sampled and scored at checkpoints along
its training, so that a point gives a quality curve beside its cost (the DiT paper's Figures 5, 6 and 8).

Each point (and each of `--seeds N` seeds) is a training run of its spec (`app.train.train`, its `train:`
section with the sweep's flags on top) in `<out>/<name>/runs/<point>-seed<S>/`, trained in parts of
`--every` steps: `train(..., stop_at=step)` ends each part with a checkpoint and the next part resumes it,
so the learning-rate schedule is the whole run's. At each checkpoint its EMA weights sample the spec's
`sample:` section (`app.sample`; `samples/NNNNNNN/grid.png` in the run) and are scored as `ditc evaluate`
scores them (`app.evaluate.make_scorer`: classifier accuracy, FD-digits and FD/floor; FID with Inception
weights and a reference). `results.json` and `results.csv` are written after every checkpoint: a row per
(point, seed, checkpoint) with quality and cost side by side. `--resume` keeps the rows written, evaluates
the checkpoints a run has but the results lack, and resumes training from a run's last checkpoint; Ctrl-C
(or SIGTERM) during training stops at the next step with a checkpoint, and at any time leaves the results
of the finished checkpoints.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from dit_compiler import __version__
from dit_compiler.app.evaluate import make_scorer
from dit_compiler.app.sample import open_sampler, run_sample, sample_config, sample_labels
from dit_compiler.app.train import METRICS_FILE, checkpoints, read_metrics, resolve_config, run_build_dir, train
from dit_compiler.app.weights import load_checkpoint, load_weights
from dit_compiler.checks.sweep import SWEEP, read_points
from dit_compiler.compiler.build import compile_spec, write_build
from dit_compiler.compiler.graph.cost import totals
from dit_compiler.compiler.spec import load_spec, load_spec_data
from dit_compiler.compiler.spec.sweep import MAX_POINTS, Point, Sweep, data_digest, load_sweep, point_data
from dit_compiler.errors import SpecError, Terminated, UsageError
from dit_compiler.files import write_atomic, write_text_atomic

RESULTS_KIND = "ditc sweep --train results"
RUNS = "runs"
#: Evaluations along a point's training when `--every` is not given.
DEFAULT_EVALUATIONS = 4
#: The quality columns a row may hold, from `ditc evaluate`'s scores.
QUALITY = ("accuracy", "fd_digits", "floor", "fd_over_floor", "fid")


@dataclass(frozen=True)
class TrainOptions:
    """The flags of `ditc sweep --train`; None: the point's spec decides."""

    steps: int | None = None          # training steps of every point (default: its train.steps)
    every: int | None = None          # evaluate every N steps (default: a quarter of the steps)
    budget_s: float | None = None     # a point stops at the first checkpoint past this many training seconds
    backend: str = "auto"
    seeds: int = 1
    seed: int | None = None           # the first seed (default: train.seed); seeds are seed, seed + 1, ...
    n: int = 500                      # samples per evaluation
    nproc: int = 1                    # data-parallel ranks of each training part
    ncpus: int | None = None
    inception: Path | None = None
    ref: str | None = None
    cache: Path | None = None


@dataclass
class PointRun:
    """One point trained with one seed: its cost, and a row of quality and cost per evaluated checkpoint."""

    name: str
    seed: int
    overrides: dict[str, Any]
    group: str
    status: str                       # ok, invalid, failed, stopped (interrupted: --resume goes on)
    errors: list[str] = field(default_factory=list)
    train_sha256: str = ""            # of the point's spec and training settings: another trains afresh
    eval_sha256: str = ""             # of the evaluation settings: another scores the checkpoints again
    cost: dict[str, float] = field(default_factory=dict)
    rows: list[dict[str, float]] = field(default_factory=list)

    @property
    def run_name(self) -> str:
        return f"{self.name}-seed{self.seed}"


def _sha(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def plan(steps: int, every: int | None) -> list[int]:
    """The steps a point is evaluated at: every `every` steps, and the last."""
    every = every or max(1, math.ceil(steps / DEFAULT_EVALUATIONS))
    return sorted({*range(every, steps, every), steps})


def point_spec_data(base: dict, point: Point, options: TrainOptions, seed: int) -> dict:
    """The point's spec data with the sweep's training flags set: what its run trains."""
    data = point_data(base, point)
    data["train"] |= {"seed": seed, "ckpt_every": 0} | ({"steps": options.steps} if options.steps else {})
    return data


def cost_of(graph) -> dict[str, float]:
    """A point's cost from its graph: parameters, forward GMACs per image (the paper's 'Gflops'), and the
    memory a training step holds (parameters, gradients, AdamW's moments, activations and scratch)."""
    tot = totals(graph)
    batch = graph.axes["batch"].size
    held = tot.param_bytes + tot.gradient_bytes + tot.optimizer_bytes + tot.activation_bytes + tot.scratch_bytes
    return {"params_m": tot.params / 1e6, "gmac_per_image": tot.forward_macs / batch / 1e9,
            "train_memory_mib": held / 2**20}


def write_results(runs: list[PointRun], sweep: Sweep, out: Path) -> None:
    """results.json (every run and its rows) and results.csv (a row per run and checkpoint)."""
    data = {"kind": RESULTS_KIND, "written_by": f"ditc {__version__}", "sweep": sweep.name,
            "points": [asdict(r) for r in runs]}
    write_text_atomic(out / "results.json", json.dumps(data, indent=1) + "\n", SWEEP)
    table = []
    for r in runs:
        head = {"point": r.name, **{k: r.overrides.get(k, "") for k in sweep.swept}, "seed": r.seed,
                "status": r.status}
        table += [head | r.cost | row for row in r.rows] or [head | r.cost | {"errors": " | ".join(r.errors)}]
    columns = list(dict.fromkeys(k for row in table for k in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in row.items()} for row in table)
    write_text_atomic(out / "results.csv", buffer.getvalue(), SWEEP)


def read_results(out: Path, sweep: Sweep) -> dict[tuple[str, int], PointRun]:
    """The runs of `out/results.json` by (point, seed) (see `checks.sweep.read_points`: a `ditc sweep` without
    --train's results are refused too)."""
    names = {f.name for f in fields(PointRun)}

    def parse(points: list) -> dict[tuple[str, int], PointRun]:
        runs = []
        for r in points:
            if not isinstance(r, dict) or set(r) != names:
                raise ValueError("its points are not the ones this ditc writes")
            run = PointRun(**r)
            if not (isinstance(run.name, str) and isinstance(run.seed, int) and isinstance(run.rows, list)
                    and all(isinstance(row, dict) and isinstance(row.get("step"), int) for row in run.rows)
                    and isinstance(run.cost, dict) and isinstance(run.errors, list)):
                raise ValueError(f"point {run.name!r} is not one this ditc writes")
            runs.append(run)
        return {(r.name, r.seed): r for r in runs}
    return read_points(out, sweep, RESULTS_KIND, "`ditc sweep --train`", parse) or {}


class TrainedSweep:
    """The state of one `ditc sweep --train` run: its results folder, the runs so far, the scorer."""

    def __init__(self, sweep: Sweep, out: Path, options: TrainOptions, stream: TextIO):
        self.sweep, self.out, self.options, self.stream = sweep, out, options, stream
        self.runs: list[PointRun] = []
        self.scorer = None
        self.started = time.perf_counter()

    def say(self, line: str) -> None:
        print(f"[sweep {self.sweep.name} {time.perf_counter() - self.started:7.0f}s] {line}", file=self.stream,
              flush=True)

    def save(self) -> None:
        write_results(self.runs, self.sweep, self.out)

    def score(self, images: np.ndarray, labels: np.ndarray) -> dict:
        if self.scorer is None:   # the classifier (or Inception) once, when the first checkpoint is scored
            o = self.options
            self.scorer = make_scorer(o.inception, o.ref, o.cache, say=self.say)
        return self.scorer(images, labels)

    def run_point(self, run: PointRun, data: dict, steps: list[int]) -> None:
        """Train `run` to each step of `steps` in turn, evaluating its checkpoint there; rows already in
        `run` (of the same evaluation settings) are kept, checkpoints already in its folder not trained again."""
        run_dir = self.out / RUNS / run.run_name
        spec = load_spec_data(data, source=str(run_dir / data["name"]))   # the build `ditc train` writes there
        for target in steps:
            if any(row["step"] == target for row in run.rows):
                continue
            if self.options.budget_s is not None and run.rows and run.rows[-1]["train_s"] >= self.options.budget_s:
                self.say(f"{run.run_name}: training budget {self.options.budget_s:g} s reached at step "
                         f"{run.rows[-1]['step']}")
                break
            have = checkpoints(run_dir) if run_dir.is_dir() else []
            began = time.perf_counter()
            if not have or int(have[-1].stem) < target:
                self.say(f"{run.run_name}: training to step {target} of {steps[-1]}")
                self._train(spec, run_dir, bool(have), steps[-1], target)
            part_s = time.perf_counter() - began
            run.rows.append(self._evaluate(run, spec, run_dir, target) | {"part_s": part_s})
            run.rows.sort(key=lambda row: row["step"])
            self.save()
            self.say(f"{run.run_name}: step {target}: " + ", ".join(
                f"{k} {run.rows[-1][k]:.4g}" for k in QUALITY if k in run.rows[-1]))

    def _train(self, spec, run_dir: Path, resume: bool, steps: int, stop_at: int) -> None:
        o = self.options
        if o.nproc == 1:
            config = resolve_config(run_dir, {"backend": o.backend}, resume, spec)
            code = train(spec, run_dir, config, resume=resume, stream=self.stream, stop_at=stop_at)
        else:   # `ditc train --nproc`, which starts and watches the ranks, on the point's build
            build = write_build(compile_spec(spec), self.out / "builds")
            command = [sys.executable, "-m", "dit_compiler.cli", "train", str(build), "--out", str(run_dir),
                       "--steps", str(steps), "--stop-at", str(stop_at), "--backend", o.backend,
                       "--seed", str(spec.train.seed), "--ckpt-every", "0", "--nproc", str(o.nproc)]
            command += ["--resume"] * resume + (["--ncpus", str(o.ncpus)] if o.ncpus else [])
            code = subprocess.run(command).returncode
        if code in (130, 143):   # stopped by Ctrl-C or SIGTERM, after a checkpoint
            raise Terminated() if code == 143 else KeyboardInterrupt()
        if code != 0:
            raise RuntimeError(f"training stopped with exit code {code} (its error is above)")

    def _evaluate(self, run: PointRun, spec, run_dir: Path, step: int) -> dict:
        """Sample the EMA weights of the run's checkpoint at `step` with the spec's `sample:` section and
        score them; the row: quality, the training cost so far, and the time each part took."""
        path = run_dir / "checkpoints" / f"{step:07d}.pt"
        state = load_checkpoint(path)["train_state"]
        weights, entry = load_weights(path, ema=True)
        metrics = read_metrics(run_dir / METRICS_FILE, step)
        earlier = max((row["step"] for row in run.rows if row["step"] < step), default=0)
        part = [r for r in metrics if r["step"] > earlier]
        global_batch = state.get("global_batch", spec.batch)
        labels = sample_labels(spec.model.num_classes, None, self.options.n)
        config = sample_config(spec.sample, seed=run.seed)
        began = time.perf_counter()
        graph, backend = open_sampler(spec, run_build_dir(run_dir), weights, f"{path} ({entry})", self.options.backend,
                                      self.options.n * (2 if config.cfg != 1 else 1), run_dir)
        try:
            images, _ = run_sample(backend, graph, labels, config, run_dir / "samples" / f"{step:07d}", None,
                                          {"checkpoint": f"{path} ({entry})", "spec": spec.name})
        finally:
            backend.close()
        sample_s = time.perf_counter() - began   # the sampler's build and start included
        began = time.perf_counter()
        scores = self.score(images, labels)
        eval_s = time.perf_counter() - began
        images_seen = step * global_batch
        step_times = [global_batch / r["images_per_s"] for r in part if r["images_per_s"]]
        usage = resource.getrusage(resource.RUSAGE_SELF if self.options.nproc == 1 else resource.RUSAGE_CHILDREN)
        return {"step": step, **{k: float(v) for k, v in scores.items() if k in QUALITY},
                "images": images_seen, "train_gflop": 6 * run.cost["gmac_per_image"] * images_seen,
                "step_s": float(np.median(step_times)) if step_times else float("nan"),
                "train_s": float(state["wall_s"]), "sample_s": sample_s, "eval_s": eval_s,
                "peak_rss_mib": usage.ru_maxrss / 1024}


def run_train_sweep(path: str | os.PathLike, out_root: str | os.PathLike, options: TrainOptions, *,
                    resume: bool = False, max_points: int = MAX_POINTS,
                    stream: TextIO | None = None) -> tuple[Sweep, list[PointRun], Path]:
    """Train, sample and score every point of the sweep at `path` (see the module's docstring)."""
    stream = stream or sys.stderr
    sweep = load_sweep(path, max_points)
    base = load_spec(sweep.base).to_dict()
    out = Path(out_root) / sweep.name
    previous = read_results(out, sweep)
    if not resume and (previous or (out / RUNS).exists()):
        raise UsageError(f"{out}/: holds the results of an earlier `ditc sweep --train` of {sweep.name!r}; pass "
                         "--resume to go on with them, or choose another -o")
    out.mkdir(parents=True, exist_ok=True)
    if not previous:
        write_results([], sweep, out)   # marks the folder as this sweep's before any run lands in it
    state = TrainedSweep(sweep, out, options, stream)
    eval_sha = _sha({"n": options.n, "inception": str(options.inception), "ref": options.ref,
                     "backend": options.backend})
    first = options.seed if options.seed is not None else base["train"]["seed"]
    jobs = [(point, seed) for point in sweep.points for seed in range(first, first + options.seeds)]
    for number, (point, seed) in enumerate(jobs, 1):
        data = point_spec_data(base, point, options, seed)
        train_sha = _sha({"spec": data_digest(data), "backend": options.backend})
        run = PointRun(point.name, seed, point.overrides, point.group, "ok", train_sha256=train_sha,
                       eval_sha256=eval_sha)
        old = previous.get((point.name, seed))
        if old is not None and old.train_sha256 == train_sha:
            run.cost = old.cost
            run.rows = [row for row in old.rows if old.eval_sha256 == eval_sha]
        elif (out / RUNS / run.run_name).exists():
            raise UsageError(f"{out / RUNS / run.run_name}: trained with another spec or training settings than "
                             f"point {point.name!r} seed {seed} has now; move it away to train it afresh, or choose "
                             "another -o")
        state.runs.append(run)
        state.say(f"point {number}/{len(jobs)}: {run.run_name}")
        try:
            if not run.cost:
                run.cost = cost_of(compile_spec(load_spec_data(data, source=point.build_name)).graph)
            state.run_point(run, data, plan(data["train"]["steps"], options.every))
        except SpecError as error:
            run.status, run.errors = "invalid", [str(d) for d in error.diagnostics]
        except KeyboardInterrupt:   # Ctrl-C or SIGTERM (in training: after a checkpoint)
            run.status = "stopped"
            state.save()
            raise
        except Exception as error:   # a point that fails is reported, and the sweep goes on
            run.status, run.errors = "failed", [f"{type(error).__name__}: {error}"]
        state.save()
    state.save()
    plot_results(state.runs, sweep, out)
    return sweep, state.runs, out


def quality_key(runs: list[PointRun]) -> str:
    """The score the plots and the summary rank by: FID where the sweep scored it, else FD-digits."""
    return "fid" if any("fid" in row for r in runs for row in r.rows) else "fd_digits"


@dataclass(frozen=True)
class Series:
    """A point's curve over its seeds: the mean of `key` at each step and the spread (min, max)."""

    point: str
    colour: str
    style: str
    cost: dict[str, float]
    steps: list[int]
    mean: dict[str, list[float]]
    low: dict[str, list[float]]
    high: dict[str, list[float]]
    seeds: int


def series_of(runs: list[PointRun], sweep: Sweep) -> list[Series]:
    """One series per point, its seeds pooled at the steps every seed reached. A point's colour is its
    design or size: the named point it comes from where the sweep names points, else its value of the
    first swept key; its line style the values of the other keys that vary within that colour."""
    by_point: dict[str, list[PointRun]] = {}
    for r in runs:
        if r.rows:
            by_point.setdefault(r.name, []).append(r)
    named = any(r.group for r in runs)
    colour_key = None if named or not sweep.swept else sweep.swept[0]

    def colour(r: PointRun) -> str:
        return r.group if named else f"{colour_key.split('.')[-1]}={r.overrides.get(colour_key)}" if colour_key else ""

    groups: dict[str, list[PointRun]] = {}
    for r in runs:
        groups.setdefault(colour(r), []).append(r)
    varying = [k for k in sweep.swept if k != colour_key and any(
        len({json.dumps(m.overrides.get(k)) for m in members}) > 1 for members in groups.values())]
    result = []
    for name, members in by_point.items():
        steps = sorted(set.intersection(*({row["step"] for row in r.rows} for r in members)))
        rows = [{row["step"]: row for row in r.rows} for r in members]
        keys = [k for k in (*QUALITY, "train_gflop") if all(k in by_step[s] for by_step in rows for s in steps)]
        values = {k: np.array([[by_step[s][k] for s in steps] for by_step in rows], dtype=float) for k in keys}
        first = members[0]
        result.append(Series(name, colour(first), ", ".join(f"{k.split('.')[-1]}={first.overrides.get(k)}"
                                                            for k in varying),
                             first.cost, steps, {k: list(v.mean(axis=0)) for k, v in values.items()},
                             {k: list(v.min(axis=0)) for k, v in values.items()},
                             {k: list(v.max(axis=0)) for k, v in values.items()}, len(members)))
    return result


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rank correlation (ties get their mean rank); nan for fewer than 3 pairs."""
    from scipy.stats import spearmanr

    return float(spearmanr(x, y).statistic) if len(x) >= 3 else float("nan")


def summary(runs: list[PointRun], sweep: Sweep) -> dict:
    """Each point's final score (mean and spread over seeds) beside its cost; the rank correlation of the
    final score with GMACs per image; the seconds spent training, sampling and evaluating."""
    key = quality_key(runs)
    points = []
    for s in series_of(runs, sweep):
        if key in s.mean:
            points.append({"point": s.point, "seeds": s.seeds, "step": s.steps[-1], key: s.mean[key][-1],
                           f"{key}_min": s.low[key][-1], f"{key}_max": s.high[key][-1],
                           "accuracy": s.mean.get("accuracy", [float("nan")])[-1], **s.cost})
    return {"quality": key, "points": points,
            f"spearman_{key}_gmac": spearman([p["gmac_per_image"] for p in points], [p[key] for p in points]),
            "train_s": sum(row["part_s"] for r in runs for row in r.rows),
            "sample_s": sum(row["sample_s"] for r in runs for row in r.rows),
            "eval_s": sum(row["eval_s"] for r in runs for row in r.rows)}


def plot_results(runs: list[PointRun], sweep: Sweep, out: Path) -> list[Path]:
    """plot-steps.png (quality and accuracy against training steps, a line per point: the paper's Figure 5),
    plot-gmacs.png (final quality against forward GMACs per image, log x: Figure 6) and plot-compute.png
    (quality against training GFLOPs, log x: Figure 8). A colour per design or size, a line style per
    value of the other keys, each listed once in the legend; shading: the spread over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    all_series = series_of(runs, sweep)
    key = quality_key(runs)
    all_series = [s for s in all_series if key in s.mean]
    if not all_series:
        return []
    label = {"fd_digits": "FD-digits (lower is better)", "fid": "FID (lower is better)"}[key]
    colours = {c: plt.cm.tab10(i % 10) for i, c in enumerate(dict.fromkeys(s.colour for s in all_series))}
    styles = {st: (["-", "--", ":", "-."][i % 4], "osD^v<>"[i % 7])
              for i, st in enumerate(dict.fromkeys(s.style for s in all_series))}

    def legend(ax) -> None:
        handles = [Line2D([], [], color=c, lw=2, label=name) for name, c in colours.items() if name]
        if len(styles) > 1:
            handles += [Line2D([], [], color="0.3", ls=ls, marker=m, label=name) for name, (ls, m) in styles.items()]
        if handles:
            ax.legend(handles=handles, fontsize=7, ncol=2 if len(handles) > 8 else 1)

    def curve(ax, s: Series, x: list[float], metric: str) -> None:
        ls, marker = styles[s.style]
        ax.plot(x, s.mean[metric], ls=ls, marker=marker, ms=3, color=colours[s.colour])
        if s.seeds > 1:
            ax.fill_between(x, s.low[metric], s.high[metric], color=colours[s.colour], alpha=0.15)

    def save(fig, name: str) -> Path:
        fig.tight_layout()
        path = out / name
        write_atomic(path, lambda file: fig.savefig(file, format="png", dpi=100), SWEEP)
        plt.close(fig)
        return path

    seeds = max(s.seeds for s in all_series)
    spread = f"; shaded: min to max over {seeds} seeds" if seeds > 1 else ""
    written = []
    panels = [key] + ["accuracy"] * any("accuracy" in s.mean for s in all_series)
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False)
    for ax, metric in zip(axes[0], panels):
        for s in all_series:
            curve(ax, s, s.steps, metric)
        ax.set(xlabel="training steps", ylabel=label if metric == key else "classifier accuracy",
               yscale="log" if metric == key else "linear")
        ax.grid(alpha=0.3)
    legend(axes[0, 0])
    fig.suptitle(f"sweep {sweep.name}: quality over training{spread}")
    written.append(save(fig, "plot-steps.png"))

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for s in all_series:
        ls, marker = styles[s.style]
        y = s.mean[key][-1]
        ax.errorbar([s.cost["gmac_per_image"]], [y], yerr=[[y - s.low[key][-1]], [s.high[key][-1] - y]],
                    marker=marker, color=colours[s.colour], capsize=3, ls="none")
    rho = spearman([s.cost["gmac_per_image"] for s in all_series], [s.mean[key][-1] for s in all_series])
    ax.set(xscale="log", yscale="log", xlabel="forward GMACs per image", ylabel=label,
           title=f"at each point's last evaluation; Spearman rho {rho:.2f}")
    ax.grid(alpha=0.3, which="both")
    legend(ax)
    written.append(save(fig, "plot-gmacs.png"))

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for s in all_series:
        if "train_gflop" in s.mean:
            curve(ax, s, s.mean["train_gflop"], key)
    ax.set(xscale="log", yscale="log", xlabel="training GFLOPs (6 x forward MACs x images)", ylabel=label,
           title=f"sweep {sweep.name}: quality against training compute")
    ax.grid(alpha=0.3, which="both")
    legend(ax)
    written.append(save(fig, "plot-compute.png"))
    return written
