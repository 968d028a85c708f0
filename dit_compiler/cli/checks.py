"""`ditc verify`, `bench`, `sweep`: the checks of a compiled model. `checks.verify` imports torch, so it is
imported when a command needs it, not when `ditc` starts."""
from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

from dit_compiler.checks.bench import bench, format_bench
from dit_compiler.checks.sweep import run_sweep
from dit_compiler.cli.args import (DEFAULT_OUT, MAX_SEED, check_file_arg, check_folder_arg, integer, memory_size,
                                   path, runner_target, spec_and_dir, workers)
from dit_compiler.cli.compile import build_one, memory_limit
from dit_compiler.compiler.build import (GRAPH_FILE, MANIFEST_FILE, NNTILE_FILE, SPEC_FILE, TORCH_FILE, Build,
                                         compile_spec, manifest_files, stale_files)
from dit_compiler.compiler.graph.ir import Graph
from dit_compiler.compiler.spec.importer import WEIGHTS_FILE, config_path, read_config
from dit_compiler.compiler.spec.sweep import MAX_POINTS
from dit_compiler.errors import UsageError
from dit_compiler.files import file_sha256, write_text_atomic
from dit_compiler.limits import check_memory, cores
from dit_compiler.userfiles import regular_size

#: The most warm-up runs, measured runs or rounds a benchmark takes.
MAX_RUNS = 1000


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add `verify`, `bench` and `sweep` to the `ditc` subparsers."""
    ncpus = integer(1, cores())
    target = runner_target()

    s = runner(sub, "verify", "run NNTile and torch on the same random weights and compare", target.WORKERS_HELP, ncpus)
    s.add_argument("--seed", type=integer(0, MAX_SEED), default=0, help=f"0 to {MAX_SEED} (default 0)")
    s.add_argument("--require-nntile", action="store_true", help="fail (exit 2) when NNTile is not importable")
    s.add_argument("--no-oracle", action="store_true", help="skip the check against diffusers")
    s.add_argument("--weights", metavar="DIR", type=path,
                   help="a diffusers model folder (as `ditc import` reads): both sides run with its weights, "
                        "compared with the diffusers model loaded from it (default: random weights)")
    s.set_defaults(func=cmd_verify)

    s = runner(sub, "bench", "time NNTile against torch: forward and an AdamW training step",
               f"{target.WORKERS_HELP}; as many torch threads", ncpus)
    s.add_argument("--warmup", type=integer(0, MAX_RUNS), default=1,
                   help="untimed forwards and training steps each side runs first, per process (default 1)")
    s.add_argument("--repeats", type=integer(1, MAX_RUNS), default=5,
                   help="timed forwards and training steps of each side, per process; the median is reported "
                        "(default 5)")
    s.add_argument("--rounds", type=integer(1, MAX_RUNS), default=1,
                   help="alternate the sides this many times, fresh processes each, and pool the times (default 1; "
                        "use 3 or more on a shared machine)")
    s.add_argument("--profile", action="store_true", help="time per op kind (NNTile layers, torch profiler)")
    s.add_argument("--memory-limit", type=memory_size, metavar="SIZE",
                   help="NNTile trains out-of-core under SIZE, e.g. 1.5GiB (default: the spec's memory_limit)")
    s.add_argument("--swap-dir", metavar="DIR", type=path,
                   help="where out-of-core swaps (default: the temporary folder)")
    s.set_defaults(func=cmd_bench)

    s = sub.add_parser("sweep", help="validate, build, inspect (and verify, bench) every point of a sweep")
    s.add_argument("sweep", metavar="SWEEP", help="a sweep file (YAML): a base spec and the keys it varies")
    s.add_argument("-o", "--out", default="sweep-results", type=path, help="results root (default: sweep-results/)")
    s.add_argument("--verify", action="store_true", help="also run ditc verify on every point")
    s.add_argument("--bench", action="store_true", help="also run ditc bench on every point")
    s.add_argument("--resume", action="store_true", help="skip points an earlier run finished")
    s.add_argument("--rounds", type=integer(1, MAX_RUNS),
                   help="with --bench: benchmark every point this many times in passes over all the points, "
                        "pooling each point's times (default 1; use 3 or more on a shared machine)")
    s.add_argument("--max-points", type=integer(1, 10**6), default=MAX_POINTS,
                   help=f"refuse a sweep of more points than this (default {MAX_POINTS})")
    s.add_argument("--ncpus", type=ncpus, help=target.WORKERS_HELP)
    s.set_defaults(func=cmd_sweep)


def runner_build(args: argparse.Namespace, check: Callable[[Graph], None] = lambda graph: None) -> tuple[Graph, Path]:
    """The graph and build folder `verify` and `bench` run: a spec is built into `args.out` when needed; a
    folder is run as it is, refused when a file is missing, with a note naming each file that differs from
    a fresh build of its spec. Either way, a model this machine cannot hold, or one `check` refuses
    (raising UsageError), is refused before anything is written."""

    check_file_arg(args.json, "--json")
    spec, build_dir = spec_and_dir(args.target)
    args.ncpus = workers(args, runner_target(spec.target))
    if build_dir is None:
        check_folder_arg(args.out, "-o")
    build = compile_spec(spec)
    check_memory(build.graph)
    _check_requests(args, build.graph)
    check(build.graph)
    if build_dir is None:
        build_dir, changed = build_one(build, args.out)
        print(f"[build] {'wrote' if changed else 'up to date'} {build_dir}/")
    else:
        _check_build_dir(build, build_dir)
    return build.graph, build_dir


def _check_requests(args: argparse.Namespace, graph: Graph) -> None:
    """The BLAS core and kernel set asked for (by flag or environment), checked as the run checks them but
    before anything is written: the core is applied now, and the kernel set chosen where the target runs."""
    from dit_compiler.checks.verify import nntile_status

    target = runner_target(graph.spec.target)
    target.apply_blas_core("--blas-core" if args.blas_core else None)
    if nntile_status(graph) == "ran":
        # under a memory limit, bench sets the runtime's own memory limits itself
        work = "verify" if args.command == "verify" else None if memory_limit(args, graph.spec)[1] else "train"
        target.check_environment(graph, work)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ditc's kernels unavailable: the run says so itself
            target.choose_kernels()


def _check_build_dir(build: Build, folder: Path) -> None:
    """A build folder to run as it is: every file present; files that differ from `build` named, and why."""
    if folder.name == build.graph.spec.name:
        rebuild = f"`ditc build {folder / SPEC_FILE} -o {folder.parent}` rebuilds it"
    else:
        rebuild = f"`ditc build {folder / SPEC_FILE}` makes a fresh build of it"
    if missing := [name for name in (TORCH_FILE, NNTILE_FILE, GRAPH_FILE) if not (folder / name).is_file()]:
        raise UsageError(f"{folder}: {', '.join(missing)} missing, so the build cannot run; {rebuild}")
    written = _manifest_or_empty(folder)
    for name in stale_files(build, folder):
        if name == MANIFEST_FILE or not (folder / name).is_file():
            continue
        why = "was written by another ditc" if written.get(name) == file_sha256(folder / name) else \
            "was edited since ditc wrote it"
        print(f"note: {folder / name} {why}: it differs from a fresh build of {folder / SPEC_FILE}; running the "
              f"files as they are; {rebuild}")


def _manifest_or_empty(folder: Path) -> dict[str, str]:
    try:
        return manifest_files(folder) or {}
    except UsageError:
        return {}


def cmd_verify(args) -> int:
    from dit_compiler.checks.verify import format_header, format_report, nntile_status, tiling_of, verify

    def require_nntile(graph) -> None:
        if args.require_nntile and (status := nntile_status(graph)) != "ran":
            raise UsageError(f"--require-nntile: {status}")
        if args.weights is not None:
            if args.no_oracle:
                raise UsageError("--weights compares with the diffusers model of the folder; drop --no-oracle")
            regular_size(config_path(args.weights).parent / WEIGHTS_FILE, None, "diffusers weights")
            read_config(args.weights)

    graph, build_dir = runner_build(args, require_nntile)
    status = nntile_status(graph)
    total = 1 + (not args.no_oracle) + (status == "ran")
    steps = iter(range(1, total + 1))
    print(format_header(graph.spec.name, tiling_of(graph)), flush=True)
    report = verify(graph, build_dir, seed=args.seed, ncpus=args.ncpus, oracle=not args.no_oracle,
                    progress=lambda line: print(f"[{next(steps)}/{total}] {line}", flush=True),
                    pretrained=None if args.weights is None else Path(args.weights))
    print(format_report(report, header=False))
    if args.json:
        write_text_atomic(Path(args.json), report.to_json())
    return 0 if report.passed else 1


def cmd_bench(args) -> int:
    from dit_compiler.checks.verify import nntile_status

    def check_limit(graph) -> None:
        """The memory limit NNTile runs out-of-core under, and --swap-dir, which only that uses."""
        limit, size = memory_limit(args, graph.spec)
        if args.swap_dir is not None:
            if limit is None:
                raise UsageError(f"--swap-dir {args.swap_dir}: needs a memory limit (only out-of-core swaps); give "
                                 "--memory-limit SIZE too, or set the spec's memory_limit")
            check_folder_arg(args.swap_dir, "--swap-dir", made=False)
        if size and (check := runner_target(graph.spec.target).check_limit(graph, size)).too_small:
            asked = "--memory-limit" if args.memory_limit else f"{graph.spec.source}: memory_limit"
            raise UsageError(f"{asked} {limit}: {check.summary()}")

    graph, build_dir = runner_build(args, check_limit)
    status = nntile_status(graph)
    sides = ("nntile", "torch") if status == "ran" else ("torch",)
    if status != "ran":
        print(f"note: {status}; timing torch alone", file=sys.stderr)
    try:
        _, limit = memory_limit(args, graph.spec)
        report = bench(graph, build_dir, ncpus=args.ncpus, warmup=args.warmup, repeats=args.repeats,
                       profile=args.profile, sides=sides, rounds=args.rounds,
                       progress=lambda line: print(f"[bench] {line}", flush=True),
                       memory_limit=limit, swap_parent=args.swap_dir)
    except RuntimeError as error:  # a side's process failed: what it printed, not a traceback of ours
        print(f"ditc bench: {error}", file=sys.stderr)
        return 1
    print(format_bench(report))
    if args.json:
        write_text_atomic(Path(args.json), report.to_json())
    return 0


def cmd_sweep(args) -> int:
    check_folder_arg(args.out, "-o")
    ncpus = workers(args) if args.verify or args.bench else 1  # the target's worker count matters only to what runs
    sweep, results, out = run_sweep(args.sweep, args.out, verify_it=args.verify, bench_it=args.bench,
                                    resume=args.resume, ncpus=ncpus, rounds=args.rounds or 1,
                                    max_points=args.max_points)
    for r in results:
        extra = f": {r.errors[0]}" if r.errors else ""
        print(f"{r.name:<40} {r.status}{extra}")
    print(f"results: {out}/results.csv, {out}/results.json, plots {out}/plot-*.png")
    return 0 if all(r.status == "ok" for r in results) else 1


def runner(sub: argparse._SubParsersAction, name: str, help_text: str, ncpus_help: str,
           ncpus: Callable[[str], int]) -> argparse.ArgumentParser:
    """A command that runs a build: its target, where a spec is built, workers, and a JSON report."""
    s = sub.add_parser(name, help=help_text)
    s.add_argument("target", metavar="SPEC_OR_BUILD_DIR",
                   help="a spec file (built into -o first) or a build folder `ditc build` wrote")
    s.add_argument("-o", "--out", default=DEFAULT_OUT, type=path, help="where a spec is built (default: generated/)")
    s.add_argument("--ncpus", type=ncpus, help=ncpus_help)
    s.add_argument("--json", metavar="FILE", type=path, help="also write the report as JSON")
    runner_target().add_arguments(s)
    return s


