"""`ditc bench`: the compiled NNTile model against the torch reference, same machine, same run.

Each side runs in a subprocess of its own, so the peak RSS of each is its own process's
(the NNTile runtime's allocations are invisible to torch's counters). Both get the same weights (the torch
reference randomised with one seed), the same inputs and the same number of threads: NNTile runs
`ncpus` NNTile CPU workers with single-threaded BLAS, torch `ncpus` intra-op threads.

A training step is forward, an MSE loss against a random target, backward and an AdamW step.
Both sides' processes live through a round, and their measured runs interleave one by one
(nntile, torch, torch, nntile, ...), so the two times of a pair are seconds apart: on a shared
machine whose speed drifts by tens of percent within a minute, a slow spell hits both sides alike.
While the torch side runs, NNTile's workers are paused (idle, they spin on both cores).
With `rounds` > 1 each round starts fresh processes, and the times of all rounds are pooled.

Each side also times one GEMM on one core, the tile GEMM of the graph's largest linear op, on the BLAS it
calls (NNTile's: the library NNTile links; torch's own), so that a slow BLAS is explained in the output:
NNTile's side names its BLAS and says what to do where it runs below the CPU, and which kernels ran.
Where NNTile ran a BLAS core the library or the machine chose and the target knows a faster one that
passes its check, a process of its own times the same GEMM on that core after the rounds, and the
report says how much faster it ran.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from types import ModuleType

import numpy as np

from dit_compiler.compiler import targets
from dit_compiler.compiler.build import GRAPH_FILE, load_module
from dit_compiler.compiler.captions import inputs_for, label_classes
from dit_compiler.compiler.graph.cost import largest_tile_gemm
from dit_compiler.compiler.graph.ir import Graph
from dit_compiler.compiler.spec.validate import build_model

MIB = 2 ** 20

LR = 1e-4
#: Warm-up runs and measured runs of each side per round, by default (a sweep's per point).
WARMUP, REPEATS = 1, 3


@dataclass
class SideResult:
    side: str
    threads: int
    forward_s: list[float]
    step_s: list[float]
    peak_rss_mib: float
    profile: dict[str, float]          # seconds per op kind (one training step), when asked
    scheduler: str = ""                # the runtime's scheduling policy (NNTile side)
    disk_read_mib: float = 0.0         # read and written per measured training step (out-of-core's swap)
    disk_written_mib: float = 0.0
    kernels: str = ""                  # which kernels ran (NNTile side)
    blas: str = ""                     # the BLAS its GEMMs call
    gemm_gflops: float = 0.0           # the representative tile GEMM on one core, best of a few timings
    blas_advice: str = ""              # what to do where that BLAS runs below this CPU (NNTile side)
    blas_core: str = ""                # the core of that BLAS, where it has cores (OpenBLAS)
    faster_core: str = ""              # a checked faster core than the one the machine chose (NNTile side)
    faster_core_gflops: float = 0.0    # the same GEMM on it, in a process of its own
    workers: str = ""                  # what its workers are, in words (NNTile side: the target's `WORKERS`)


@dataclass
class BenchReport:
    spec: str
    batch: int
    ncpus: int
    warmup: int
    repeats: int
    sides: dict[str, SideResult]
    rounds: int = 1
    memory_limit_mib: float | None = None
    out_of_core: str = ""              # what the NNTile side was set up with under the limit
    predicted_peak_mib: float | None = None  # the NNTile side's, from the graph and the limit (`ditc inspect`)
    gemm: tuple[int, int, int] | None = None   # (m, n, k) of the GEMM each side timed

    def summary(self) -> dict:
        out = {}
        for name, side in self.sides.items():
            out[name] = {"forward_median_s": statistics.median(side.forward_s),
                         "step_median_s": statistics.median(side.step_s),
                         "images_per_s_train": self.batch / statistics.median(side.step_s),
                         "peak_rss_mib": side.peak_rss_mib}
            if side.gemm_gflops:
                out[name]["gemm_gflops"] = side.gemm_gflops
        if {"nntile", "torch"} <= out.keys():
            out["ratio"] = {k: out["nntile"][k] / out["torch"][k]
                            for k in ("forward_median_s", "step_median_s", "peak_rss_mib", "gemm_gflops")
                            if k in out["nntile"] and k in out["torch"]}
        return out

    def gemm_note(self) -> str | None:
        """How much faster NNTile's GEMM ran on a checked faster core, where one was found; else why it is
        below half of torch's, where it is; else NNTile's BLAS advice, if any."""
        nntile, torch = self.sides.get("nntile"), self.sides.get("torch")
        if not (nntile and nntile.gemm_gflops):
            return None
        if nntile.faster_core:
            return (f"note: NNTile's OpenBLAS ran its {nntile.blas_core} core (as the library or this machine "
                    f"chose); its {nntile.faster_core} core, checked against float64, ran the same GEMM at "
                    f"{nntile.faster_core_gflops:.1f} GFLOP/s against {nntile.gemm_gflops:.1f}, "
                    f"{nntile.faster_core_gflops / nntile.gemm_gflops:.2f}x as fast: --blas-core "
                    f"{nntile.faster_core} runs it")
        if torch and torch.gemm_gflops and nntile.gemm_gflops < torch.gemm_gflops / 2:
            return (f"NNTile's GEMM runs at {nntile.gemm_gflops:.1f} GFLOP/s, below half of torch's "
                    f"{torch.gemm_gflops:.1f}: " + (nntile.blas_advice or f"its BLAS ({nntile.blas}) is slower than "
                                                   "torch's on this shape; README, 'BLAS', lists faster ones"))
        return f"note: {nntile.blas_advice}" if nntile.blas_advice else None

    def paired_step_ratio(self) -> float | None:
        """The median, over interleaved pairs of training steps (run seconds apart), of NNTile's time
        over torch's: what a drift of the machine's speed disturbs least."""
        if {"nntile", "torch"} <= self.sides.keys():
            nntile, torch = self.sides["nntile"].step_s, self.sides["torch"].step_s
            if len(nntile) == len(torch):
                return statistics.median(a / b for a, b in zip(nntile, torch))
        return None

    def to_json(self) -> str:
        summary = self.summary() | {"paired_step_ratio": self.paired_step_ratio()}
        return json.dumps({"report": asdict(self), "summary": summary}, indent=1) + "\n"


def _stats(times: list[float]) -> str:
    return f"{statistics.median(times):8.3f} s (min {min(times):.3f}, max {max(times):.3f})"


def format_bench(report: BenchReport) -> str:
    s = report.summary()
    lines = [f"ditc bench: {report.spec}, batch {report.batch}, {report.warmup} warm-up + {report.repeats} "
             f"measured runs" + (f" in each of {report.rounds} rounds" if report.rounds > 1 else "")
             + (", the sides' runs interleaved" if len(report.sides) > 1 else "")]
    if report.out_of_core:
        lines.append(f"nntile {report.out_of_core}")
    for name, side in report.sides.items():
        what = (f"{side.threads} {side.workers}, scheduler {side.scheduler}" if name == "nntile"
                else f"{side.threads} torch threads")
        predicted = (f" (predicted {report.predicted_peak_mib:.0f} MiB)"
                     if name == "nntile" and report.predicted_peak_mib else "")
        lines += [f"{name} ({what}):"] + ([f"  kernels     {side.kernels}"] if side.kernels else []) + [
                  f"  forward     {_stats(side.forward_s)}",
                  f"  train step  {_stats(side.step_s)}   {s[name]['images_per_s_train']:.2f} images/s",
                  f"  peak RSS    {side.peak_rss_mib:8.0f} MiB{predicted}"]
        if side.gemm_gflops and report.gemm:
            lines.append(f"  GEMM        {side.gemm_gflops:8.1f} GFLOP/s on one core, "
                         f"{'x'.join(map(str, report.gemm))} (m x n x k), {side.blas}")
        if side.disk_read_mib or side.disk_written_mib:
            lines.append(f"  disk        {side.disk_read_mib:8.0f} MiB read, {side.disk_written_mib:.0f} MiB written "
                         "a training step")
    if "ratio" in s:
        r = s["ratio"]
        lines.append(f"ratio nntile/torch: forward {r['forward_median_s']:.2f}, train step {r['step_median_s']:.2f} "
                     f"(median of paired steps {report.paired_step_ratio():.2f}), peak RSS {r['peak_rss_mib']:.2f}")
    if note := report.gemm_note():
        lines.append(note)
    for name, side in report.sides.items():
        if side.profile:
            total = sum(side.profile.values())
            lines.append(f"{name} profile (one training step, {total:.3f} s):")
            for kind, sec in sorted(side.profile.items(), key=lambda kv: -kv[1]):
                lines.append(f"  {kind:<28} {sec:8.4f} s  {100 * sec / total:5.1f}%")
    return "\n".join(lines)


def bench(graph: Graph, build_dir: Path, *, ncpus: int, warmup: int = WARMUP, repeats: int = REPEATS,
          profile: bool = False,
          sides: tuple[str, ...] = ("nntile", "torch"), rounds: int = 1, progress=print,
          memory_limit: int | None = None, swap_parent: str | None = None) -> BenchReport:
    """`memory_limit` (bytes) runs the NNTile side out-of-core under it (the target's `out_of_core`, with
    a swap folder under `swap_parent`); torch has no such thing and runs as it is."""
    runtime = targets.get(graph.spec.target)
    if "nntile" in sides:  # an unknown or unavailable kernel set is an error here, not in a worker
        runtime.choose_kernels()
    gemm = largest_tile_gemm(graph)
    results: dict[str, SideResult] = {}
    with contextlib.ExitStack() as stack:
        ooc = stack.enter_context(runtime.out_of_core(graph, memory_limit, swap_parent)) if memory_limit else None
        if ooc is not None:
            progress(ooc.describe())
        for round_ in range(rounds):
            where = f" (round {round_ + 1}/{rounds})" if rounds > 1 else ""
            progress(f"{' and '.join(sides)}: {warmup} warm-up + {repeats} measured runs"
                     + (" each, interleaved, in fresh processes" if len(sides) > 1 else " in a fresh process") + where)
            for side, result in _round(sides, build_dir, ncpus, warmup, repeats, profile and round_ == 0,
                                       ooc, gemm).items():
                results[side] = pooled(results[side], result) if side in results else result
    if "nntile" in results:
        results["nntile"] = _faster_core(results["nntile"], runtime, build_dir, gemm)
    predicted = runtime.check_limit(graph, memory_limit).held if memory_limit else runtime.predict(graph).total
    return BenchReport(graph.spec.name, graph.axes["batch"].size, ncpus, warmup, repeats, results, rounds,
                       memory_limit / MIB if memory_limit else None, ooc.describe() if ooc else "", predicted / MIB,
                       gemm)


#: How much faster a core's GEMM must run to be reported: above the spread of repeated timings.
FASTER = 1.1


def _faster_core(result: SideResult, runtime, build_dir: Path, gemm: tuple[int, int, int]) -> SideResult:
    """`result` with the faster core the target offers over the one it ran, and that core's rate on the
    same GEMM in a process of its own (`--worker gemm`), where it is `FASTER`."""
    found = runtime.faster_blas(result.blas_core) if result.blas_core and result.gemm_gflops else None
    if found is None:
        return result
    core, env = found
    cmd = [sys.executable, "-m", "dit_compiler.checks.bench", "--worker", "gemm", "--dir", str(build_dir),
           "--ncpus", "1", "--warmup", "0", "--gemm", ",".join(map(str, gemm))]
    try:
        done = subprocess.run(cmd, env=os.environ | env | {"OMP_NUM_THREADS": "1"}, capture_output=True,
                              text=True, timeout=300)
    except subprocess.TimeoutExpired:
        return result
    replies = [json.loads(line[len(_REPLY):]) for line in done.stdout.splitlines() if line.startswith(_REPLY)]
    if done.returncode != 0 or not replies or replies[-1]["core"] != core:
        return result   # the check passed a moment ago: nothing to report that the advice does not say
    gflops = replies[-1]["gflops"]
    return replace(result, faster_core=core, faster_core_gflops=gflops) if gflops > FASTER * result.gemm_gflops \
        else result


def pooled(first: SideResult, more: SideResult) -> SideResult:
    """Two runs of one side as one: all their times, the higher peak and GEMM rate, the first profile, the
    mean disk traffic."""
    return replace(first, forward_s=first.forward_s + more.forward_s, step_s=first.step_s + more.step_s,
                   peak_rss_mib=max(first.peak_rss_mib, more.peak_rss_mib),
                   gemm_gflops=max(first.gemm_gflops, more.gemm_gflops),
                   disk_read_mib=(first.disk_read_mib + more.disk_read_mib) / 2,
                   disk_written_mib=(first.disk_written_mib + more.disk_written_mib) / 2)


def _round(sides: tuple[str, ...], build_dir: Path, ncpus: int, warmup: int, repeats: int,
           profile: bool, out_of_core=None, gemm: tuple[int, int, int] | None = None) -> dict[str, SideResult]:
    """One round: a process per side, warmed up, each side's GEMM timed in turn, then their measured
    runs interleaved."""
    with contextlib.ExitStack() as stack:
        workers = [stack.enter_context(SideProcess(side, build_dir, ncpus, warmup, profile,
                                                   out_of_core if side == "nntile" else None, gemm=gemm))
                   for side in sides]
        for worker in workers:  # both warm up at once; nothing is measured until both are done
            worker.reply()
        if gemm:
            for worker in workers:
                worker.ask("gemm")
        times = interleave(workers, repeats)
        return {worker.side: with_times(SideResult(**worker.ask("finish")), times[worker.side]) for worker in workers}


def interleave(workers: list[SideProcess], repeats: int) -> dict[str, dict[str, list[float]]]:
    """`repeats` forwards, then `repeats` training steps of every worker, one by one; the side that
    goes first alternates from pair to pair, so neither always runs right after the other."""
    times: dict[str, dict[str, list[float]]] = {w.side: {"forward": [], "step": []} for w in workers}
    for what in ("forward", "step"):
        for i in range(repeats):
            for worker in (workers if i % 2 == 0 else workers[::-1]):
                times[worker.side][what].append(worker.ask(what))
    return times


def with_times(result: SideResult, times: dict[str, list[float]]) -> SideResult:
    return SideResult(**(asdict(result) | {"forward_s": times["forward"], "step_s": times["step"]}))


#: Marks the worker's replies on its stdout, which libraries may also print to.
_REPLY = "@ditc-bench "


class SideProcess:
    """One side in a subprocess (`python -m dit_compiler.checks.bench --worker SIDE`), driven over its
    stdin: `forward` and `step` run one and reply with the seconds, `gemm` times the GEMM given as `gemm`
    (m, n, k) on one core and replies with its GFLOP/s, `rss` replies with the peak RSS so far, `finish`
    replies with the side's `SideResult` (peak RSS, profile, GEMM rate) and ends it. It says `ready` once
    warmed up. `out_of_core` (the target's settings) runs NNTile out-of-core; `checkpoint` runs
    torch with activation checkpointing of every block; `preexec_fn` runs in the child before it starts
    (`tests/benchmarks/scale.py` moves it into a memory cgroup there)."""

    def __init__(self, side: str, build_dir: Path, ncpus: int, warmup: int, profile: bool, out_of_core=None,
                 checkpoint: bool = False, preexec_fn: Callable[[], None] | None = None,
                 gemm: tuple[int, int, int] | None = None):
        self.side = side
        cmd = [sys.executable, "-m", "dit_compiler.checks.bench", "--worker", side, "--dir", str(build_dir),
               "--ncpus", str(ncpus), "--warmup", str(warmup)] + (["--profile"] if profile else [])
        cmd += ["--out-of-core", json.dumps(out_of_core.to_json())] if out_of_core else []
        cmd += ["--checkpoint"] if checkpoint else []
        cmd += ["--gemm", ",".join(map(str, gemm))] if gemm else []
        env = os.environ | {"OMP_NUM_THREADS": "1"} | _target_of(build_dir).worker_environment(ncpus)
        self.stderr = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.stderr, text=True, preexec_fn=preexec_fn)

    def __enter__(self) -> "SideProcess":
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.stderr.close()

    def ask(self, command: str):
        try:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass  # the worker has ended: `reply` reports what it printed on stderr
        return self.reply()

    def reply(self):
        for line in self.proc.stdout:
            if line.startswith(_REPLY):
                return json.loads(line[len(_REPLY):])
        code = self.proc.wait()
        self.stderr.seek(0)
        raise RuntimeError(f"{self.side} benchmark failed (its process exited with {code}):\n"
                           f"{self.stderr.read()[-4000:]}")


# -- the worker: one side in its own process ---------------------------------------------------------
def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _gflops(gemm: Callable[[], None], m: int, n: int, k: int) -> float:
    """GFLOP/s of a GEMM call, the best of five timings of about 20 ms each (the least disturbed on a
    shared machine)."""
    calls = max(1, int(0.02 / max(_timed(gemm), 1e-6)))
    best = min(_timed(lambda: [gemm() for _ in range(calls)]) for _ in range(5)) / calls
    return 2 * m * n * k / best / 1e9


@dataclass
class _Side:
    """What a worker runs: one forward, one training step, the per-op-kind profile."""
    forward: Callable[[], None]
    step: Callable[[], None]
    profile: Callable[[], dict[str, float]]
    threads: int
    gemm: Callable[[int, int, int], float]       # GFLOP/s of an (m, n, k) GEMM on one core, on its BLAS
    blas: str
    scheduler: str = ""
    kernels: str = ""
    blas_advice: str = ""
    blas_core: str = ""
    idle: Callable[[], None] = lambda: None      # between its measured runs, while the other side runs
    wake: Callable[[], None] = lambda: None
    workers: str = ""


@contextlib.contextmanager
def _side(side: str, build_dir: Path, ncpus: int, out_of_core: dict | None = None,
          checkpoint: bool = False) -> Iterator[_Side]:
    import torch

    from dit_compiler.checks.common import random_weights, randomize_

    graph_data = json.loads((build_dir / GRAPH_FILE).read_text())
    shapes = {t["name"]: tuple(t["shape"]) for t in graph_data["tensors"]}
    x_shape, out_shape = shapes[graph_data["inputs"][0]], shapes[graph_data["outputs"][0]]
    n, table_rows = x_shape[0], graph_data["axes"]["classes"]["size"]
    rng = np.random.default_rng(0)
    x = rng.standard_normal(x_shape, dtype=np.float32)
    t = rng.integers(0, 1000, n).astype(np.float32)
    model_spec = build_model(graph_data["spec"]["model"])
    y = rng.integers(0, label_classes(model_spec) if model_spec.caption else table_rows, n)
    inputs = (x, t, *inputs_for(graph_data["inputs"][2:], model_spec, y))   # labels, or captions ...
    target = rng.standard_normal(out_shape, dtype=np.float32)
    torch.set_num_threads(ncpus)

    if side == "torch":
        reference = load_module(build_dir / "torch_reference.py")
        model = reference.Model().train()
        randomize_(model, 0)
        if checkpoint:
            _checkpoint_blocks(model.get_submodule(reference.BLOCKS))
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)
        inputs_t, target_t = [torch.from_numpy(a) for a in inputs], torch.from_numpy(target)

        def forward():
            with torch.no_grad():
                model(*inputs_t)

        def step():
            optimizer.zero_grad(set_to_none=True)
            loss = torch.nn.functional.mse_loss(model(*inputs_t), target_t)
            loss.backward()
            optimizer.step()

        def profile() -> dict[str, float]:
            kinds: dict[str, float] = {}
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                step()
            for event in prof.key_averages():
                if event.key.startswith("aten::") and event.self_cpu_time_total > 0:
                    kinds[event.key] = event.self_cpu_time_total / 1e6
            return dict(sorted(kinds.items(), key=lambda kv: -kv[1])[:15])

        def gemm(m: int, n: int, k: int) -> float:
            a, b, c = torch.randn(m, k), torch.randn(k, n), torch.empty(m, n)
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                return _gflops(lambda: torch.mm(a, b, out=c), m, n, k)
            finally:
                torch.set_num_threads(threads)

        mkl = "MKL" if torch.backends.mkl.is_available() else "its own BLAS"
        yield _Side(forward, step, profile, torch.get_num_threads(), gemm, f"torch {torch.__version__}, {mkl}")
        return

    runtime = targets.get(graph_data["spec"]["target"])
    module = load_module(build_dir / "nntile_model.py")
    with runtime.nntile_runtime(ncpus, runtime.OutOfCore(**out_of_core) if out_of_core else None):
        model = module.Model()
        # the torch reference's weights (`randomize_`), made one at a time: no second copy of the model
        model.load_parameters(random_weights(model.parameter_shapes(), 0))
        optimizer = model.adamw(LR)
        blas, advice, core = runtime.blas_report()

        def gemm(m: int, n: int, k: int) -> float:
            return _gflops(runtime.gemm(m, n, k), m, n, k)

        try:
            yield _Side(lambda: model.forward(*inputs), lambda: model.train_step(inputs, target, optimizer),
                        lambda: model.profile_layers(inputs, target, optimizer), ncpus, gemm, blas,
                        runtime.scheduler(), model.kernels.note, advice or "", core or "", runtime.pause,
                        runtime.resume, runtime.WORKERS)
        finally:
            optimizer.unregister()
            model.unregister()


def _checkpoint_blocks(blocks) -> None:
    """Activation checkpointing of every block of the reference's block list: backward runs a block's
    forward again instead of keeping its activations (the torch variant of `tests/benchmarks/scale.py`)."""
    from torch.utils.checkpoint import checkpoint

    for block in blocks:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def _serve(side: str, build_dir: Path, ncpus: int, warmup: int, profile: bool, out_of_core: dict | None = None,
           checkpoint: bool = False, gemm: tuple[int, int, int] | None = None) -> None:
    """The worker's loop: warm up, then answer the parent's commands (see `SideProcess`)."""
    def reply(value) -> None:
        print(_REPLY + json.dumps(value), flush=True)

    disk, steps, gflops = [0, 0], 0, 0.0
    with _side(side, build_dir, ncpus, out_of_core, checkpoint) as run:
        for _ in range(warmup):
            run.step()
        run.idle()
        reply("ready")
        for line in sys.stdin:
            command = line.strip()
            if command == "finish":
                break
            if command == "rss":
                reply(_peak_rss_mib())
                continue
            if command == "gemm":  # while idle: NNTile's workers, awake, would spin beside the GEMM
                gflops = run.gemm(*gemm)
                reply(gflops)
                continue
            run.wake()
            before = disk_bytes()
            reply(_timed(run.forward if command == "forward" else run.step))
            if command == "step":
                steps += 1
                disk = [total + after - start for total, start, after in zip(disk, before, disk_bytes())]
            run.idle()
        run.wake()
        kinds = run.profile() if profile else {}
    read, written = (total / max(steps, 1) / 2 ** 20 for total in disk)
    reply(asdict(SideResult(side, run.threads, [], [], _peak_rss_mib(), kinds, run.scheduler, read, written,
                            run.kernels, run.blas, gflops, run.blas_advice, run.blas_core, workers=run.workers)))


def _target_of(build_dir: Path) -> ModuleType:
    """The target package the build in `build_dir` was made for (its graph's spec names it)."""
    return targets.get(json.loads((build_dir / GRAPH_FILE).read_text())["spec"]["target"])


def _serve_gemm(build_dir: Path, gemm: tuple[int, int, int]) -> None:
    """`--worker gemm`: time the GEMM on the BLAS the build's target runs, with this process's environment,
    and reply with its GFLOP/s and the BLAS's core."""
    runtime = _target_of(build_dir)
    gflops = _gflops(runtime.gemm(*gemm), *gemm)
    print(_REPLY + json.dumps({"gflops": gflops, "core": runtime.blas_report()[2]}), flush=True)


def disk_bytes() -> tuple[int, int]:
    """Bytes this process has read from and written to disk (out-of-core's swap: O_DIRECT, so all of it)."""
    try:
        with open("/proc/self/io", encoding="ascii") as io:
            counters = dict(line.split(":") for line in io)
        return int(counters["read_bytes"]), int(counters["write_bytes"])
    except OSError:
        return 0, 0


def _peak_rss_mib() -> float:
    """This process's own peak RSS. Not getrusage's ru_maxrss: Linux carries the parent's peak across
    fork and exec into it, so a worker started by a large process would report that process's peak."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # where /proc is missing


def _main() -> None:
    p = argparse.ArgumentParser(description="one side of `ditc bench` (internal), driven over stdin")
    p.add_argument("--worker", choices=("nntile", "torch", "gemm"), required=True,
                   help="gemm: only time --gemm on the target's BLAS")
    p.add_argument("--dir", type=Path, required=True)
    p.add_argument("--ncpus", type=int, required=True)
    p.add_argument("--warmup", type=int, required=True)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--out-of-core", type=json.loads, help="the NNTile target's OutOfCore settings, as JSON")
    p.add_argument("--checkpoint", action="store_true", help="torch: activation checkpointing of every block")
    p.add_argument("--gemm", type=lambda text: tuple(int(v) for v in text.split(",")), help="m,n,k")
    a = p.parse_args()
    if a.worker == "gemm":
        _serve_gemm(a.dir, a.gemm)
        return
    _serve(a.worker, a.dir, a.ncpus, a.warmup, a.profile, a.out_of_core, a.checkpoint, a.gemm)


if __name__ == "__main__":
    _main()
