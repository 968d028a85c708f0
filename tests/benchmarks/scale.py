"""Benchmark: the largest DiT one AdamW training step fits under one memory cap, torch against NNTile.

Run (as root, where memory cgroups can be made): python tests/benchmarks/scale.py [--cap 1.5GiB]

Over a ladder of DiT sizes at a fixed batch (width, heads, patch and batch fixed, depth growing), every
attempt runs in a process of its own (`ditc bench`'s worker) inside a memory cgroup of its own capped at
CAP, made under this process's own cgroup (cgroup v2 `memory.max`, or v1 `memory.limit_in_bytes`) and
removed afterwards. Four variants climb the ladder until a size does not fit:
- torch: the torch reference, plain;
- torch-checkpoint: the same with activation checkpointing of every block;
- nntile: the NNTile model, in memory;
- nntile-ooc: the NNTile model out-of-core under CAP (`ditc bench --memory-limit CAP`).
An attempt is one warm-up step and `--steps` timed ones. A process the cgroup's OOM killer ends, or that
fails, "does not fit"; nothing else is killed or capped. Printed: each attempt's parameters, step times,
peak RSS (the worker's VmHWM), the cgroup's peak and the MiB read and written to disk a step (swap); the largest size of each variant; the ratio of the
largest NNTile model to the largest torch model (both torch variants); and the largest out-of-core
model's step time under the cap against its step time in memory (in a cgroup at twice its predicted peak).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from dit_compiler.compiler import targets
from dit_compiler.compiler.build import compile_spec, write_build
from dit_compiler.compiler.graph.cost import totals
from dit_compiler.compiler.graph.ir import Graph
from dit_compiler.checks.bench import SideProcess
from dit_compiler.compiler.spec import load_spec_data
from dit_compiler.compiler.spec.model import memory_bytes

MIB = 2 ** 20
#: variant -> (side, torch activation checkpointing, NNTile out-of-core)
VARIANTS = {"torch": ("torch", False, False), "torch-checkpoint": ("torch", True, False),
            "nntile": ("nntile", False, False), "nntile-ooc": ("nntile", False, True)}


class MemoryCgroup:
    """A child memory cgroup of this process's own cgroup, capped at `limit` bytes. A child process moves
    itself in before it starts (`enter`, a `preexec_fn`); `remove` deletes the group once it is empty."""

    def __init__(self, limit: int, name: str):
        self.path, self.v2 = _child_cgroup(name)
        self.path.mkdir()
        try:
            if self.v2:
                (self.path / "memory.max").write_text(str(limit))
                with contextlib.suppress(OSError):  # no swap accounting: nothing to turn off
                    (self.path / "memory.swap.max").write_text("0")
            else:
                (self.path / "memory.limit_in_bytes").write_text(str(limit))
        except OSError:
            self.remove()
            raise

    def enter(self) -> None:
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def peak_mib(self) -> float:
        name = "memory.peak" if self.v2 else "memory.max_usage_in_bytes"
        with contextlib.suppress(OSError):
            return int((self.path / name).read_text()) / MIB
        return float("nan")  # cgroup v2 before Linux 5.19 keeps no peak

    def oom_kills(self) -> int:
        text = (self.path / ("memory.events" if self.v2 else "memory.oom_control")).read_text()
        counts = dict(line.split() for line in text.splitlines())
        return int(counts.get("oom_kill", 0))

    def remove(self) -> None:
        for _ in range(50):  # the last process may still be leaving
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.1)


def _child_cgroup(name: str) -> tuple[Path, bool]:
    """Where a child of this process's memory cgroup goes: v2 where its memory controller is enabled for
    children, else v1's memory hierarchy."""
    lines = Path("/proc/self/cgroup").read_text().splitlines()
    v1 = next((line.split(":", 2)[2] for line in lines if line.split(":")[1] == "memory"), None)
    v2 = next((line.split(":", 2)[2] for line in lines if line.startswith("0::")), None)
    for mount in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified")):
        if v2 is not None and (mount / "cgroup.controllers").is_file():
            own = mount / v2.lstrip("/")
            if "memory" in (own / "cgroup.subtree_control").read_text().split():
                return own / name, True
    if v1 is not None and Path("/sys/fs/cgroup/memory").is_dir():
        return Path("/sys/fs/cgroup/memory") / v1.lstrip("/") / name, False
    sys.exit("scale.py: no memory cgroup to make here: it needs cgroup v2 with the memory controller enabled "
             "for this process's children, or cgroup v1's memory hierarchy, and the right to write there (root)")


@dataclass
class Attempt:
    variant: str
    depth: int
    params: int
    fits: bool
    step_s: list[float]
    peak_rss_mib: float = float("nan")
    cgroup_peak_mib: float = float("nan")
    disk_mib: tuple[float, float] = (0.0, 0.0)   # read, written a step (out-of-core's swap)
    note: str = ""


def attempt(variant: str, graph: Graph, build_dir: Path, cap: int, args, tag: str) -> Attempt:
    """One warm-up and `args.steps` timed AdamW steps of `variant` in its own process, in a cgroup capped at `cap`."""
    side, checkpoint, ooc = VARIANTS[variant]
    runtime = targets.get(graph.spec.target)
    group = MemoryCgroup(cap, f"ditc-scale-{os.getpid()}-{tag}")
    result = Attempt(variant, graph.depth, totals(graph).params, False, [])
    try:
        with contextlib.ExitStack() as stack:
            settings = stack.enter_context(runtime.out_of_core(graph, cap, args.swap_dir)) if ooc else None
            worker = stack.enter_context(SideProcess(side, build_dir, args.ncpus, 1, False, settings, checkpoint,
                                                     group.enter))
            stack.enter_context(_deadline(args.timeout))
            worker.reply()  # warmed up: one step done
            result.step_s = [worker.ask("step") for _ in range(args.steps)]
            side_result = worker.ask("finish")
            result.peak_rss_mib = side_result["peak_rss_mib"]
            result.disk_mib = (side_result["disk_read_mib"], side_result["disk_written_mib"])
            result.fits = True
    except RuntimeError as error:  # the worker died: OOM-killed, or failed
        result.note = "OOM-killed" if group.oom_kills() else _last_line(str(error))
    except TimeoutError:
        result.note = f"no step within {args.timeout} s"
    finally:
        result.cgroup_peak_mib = group.peak_mib()
        group.remove()
    return result


@contextlib.contextmanager
def _deadline(seconds: int) -> Iterator[None]:
    def expire(signum, frame):
        raise TimeoutError
    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1][:100] if lines else "failed"


def ladder(args, root: Path) -> list[tuple[Graph, Path]]:
    builds = []
    for depth in args.depths:
        data = {"name": f"scale-d{depth}", "batch": args.batch, "tiling": args.tiling,
                "model": {"hidden_size": args.hidden, "num_heads": args.heads, "patch_size": args.patch,
                          "depth": depth}}
        built = compile_spec(load_spec_data(data))
        builds.append((built.graph, write_build(built, root)))
    return builds


def _row(a: Attempt) -> str:
    steps = (f"{statistics.median(a.step_s):7.2f} s ({min(a.step_s):.2f}-{max(a.step_s):.2f})"
             if a.step_s else f"{'-':>7}")
    disk = f"{a.disk_mib[0]:.0f}/{a.disk_mib[1]:.0f}" if any(a.disk_mib) else ""
    return (f"{a.variant:<17} {a.depth:>5} {a.params / 1e6:>8.1f}M  {'fits' if a.fits else 'no':<4} {steps:<24} "
            f"{a.peak_rss_mib:>8.0f} {a.cgroup_peak_mib:>8.0f} {disk:>11}  {a.note}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cap", type=memory_bytes, default=memory_bytes("1.5GiB"), help="the cgroup cap (default 1.5GiB)")
    p.add_argument("--depths", type=lambda s: [int(d) for d in s.split(",")], default=[1, 2, 3, 4, 5, 6, 8, 10, 12, 14, 16])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--patch", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--tiling", type=lambda s: {k: int(v) for k, v in (kv.split("=") for kv in s.split(","))},
                   default={}, help="tile sizes, e.g. hidden=1024,mlp=4096 (default: auto)")
    p.add_argument("--ncpus", type=int, default=2)
    p.add_argument("--steps", type=int, default=2, help="timed steps per attempt, after one warm-up step")
    p.add_argument("--timeout", type=int, default=1200, help="seconds an attempt may take")
    p.add_argument("--variants", type=lambda s: s.split(","), default=list(VARIANTS))
    p.add_argument("--swap-dir", help="where out-of-core swaps (default: the temporary folder)")
    args = p.parse_args()
    cap = args.cap
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # clean up as on Ctrl-C
    print(f"scale: DiT width {args.hidden}, {args.heads} heads, patch {args.patch}, batch {args.batch}, depths "
          f"{args.depths}; every attempt in its own process and memory cgroup capped at {cap / MIB:.0f} MiB, "
          f"{args.ncpus} CPU workers or threads", flush=True)
    print(f"{'variant':<17} {'depth':>5} {'params':>9}  {'':<4} {'step (median, range)':<24} {'RSS MiB':>8} "
          f"{'cgroup':>8} {'disk r/w':>11}", flush=True)
    largest: dict[str, Attempt] = {}
    with tempfile.TemporaryDirectory(prefix="ditc-scale-") as root:
        builds = ladder(args, Path(root))
        for variant in args.variants:
            for graph, folder in builds:
                result = attempt(variant, graph, folder, cap, args, f"{variant}-{graph.depth}")
                print(_row(result), flush=True)
                if not result.fits:
                    break
                largest[variant] = result
        summary(largest, builds, cap, args)


def summary(largest: dict[str, Attempt], builds, cap: int, args) -> None:
    print("\nlargest that fits under the cap:")
    for variant in args.variants:
        best = largest.get(variant)
        print(f"  {variant:<17} " + (f"depth {best.depth}, {best.params / 1e6:.1f}M parameters" if best else "none"))
    for nntile in ("nntile", "nntile-ooc"):
        for torch in ("torch", "torch-checkpoint"):
            if nntile in largest and torch in largest:
                print(f"  {nntile} / {torch}: {largest[nntile].params / largest[torch].params:.2f}x parameters")
    ooc = largest.get("nntile-ooc")
    if ooc is None:
        return
    graph, folder = next(b for b in builds if b[0].depth == ooc.depth)
    room = 2 * targets.get(graph.spec.target).predict(graph).total
    free = attempt("nntile", graph, folder, room, args, f"uncapped-{ooc.depth}")
    print(f"\n{_row(free)}  (in memory, cgroup at {room / MIB:.0f} MiB)")
    if free.fits:
        ratio = statistics.median(ooc.step_s) / statistics.median(free.step_s)
        print(f"nntile-ooc depth {ooc.depth}: step {statistics.median(ooc.step_s):.2f} s under {cap / MIB:.0f} MiB "
              f"against {statistics.median(free.step_s):.2f} s in memory: {ratio:.2f}x")


if __name__ == "__main__":
    main()
