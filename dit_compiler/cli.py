"""The `ditc` command line: a thin layer over the pipeline's stages. Exit codes: 0 ok, 1 check failed,
2 bad input (a spec or usage error, printed without a traceback)."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from dit_compiler import __version__
from dit_compiler.errors import SpecError, UsageError

DEFAULT_OUT = "generated"


def _spec_and_dir(target: str):
    """A spec file, or a generated build folder (its spec.resolved.yaml), -> (spec, build folder or None)."""
    from dit_compiler.build import SPEC_FILE
    from dit_compiler.spec import load_spec

    path = Path(target)
    if path.is_dir():
        if not (path / SPEC_FILE).is_file():
            raise UsageError(f"{target}: a folder, but not a ditc build (no {SPEC_FILE}); run `ditc build SPEC` first")
        return load_spec(path / SPEC_FILE), path
    if not path.exists():
        raise UsageError(f"{target}: no such spec file or build folder")
    return load_spec(path), None


def _runner_target(args):
    """The spec and build folder `verify` and `bench` run: a spec is built into `args.out` when needed; a
    folder is run as it is, with a note when its files differ from a fresh build of its spec."""
    from dit_compiler.build import compile_spec, stale_files

    spec, build_dir = _spec_and_dir(args.target)
    if build_dir is None:
        build_dir, changed = build_one(spec, args.out)
        print(f"[build] {'wrote' if changed else 'up to date'} {build_dir}/")
    elif stale := stale_files(compile_spec(spec), build_dir):
        print(f"note: {build_dir}: {', '.join(stale)} differ from a fresh build of its spec "
              "(edited by hand, or built by another ditc); running the files as they are")
    return spec, build_dir


def cmd_validate(args) -> int:
    from dit_compiler.spec import load_spec

    failed = False
    for target in args.specs:
        try:
            spec = load_spec(target)
            print(f"{target}: ok ({spec.name})")
        except SpecError as error:
            failed = True
            for diagnostic in error.diagnostics:
                print(diagnostic, file=sys.stderr)
    return 2 if failed else 0


def cmd_schema(args) -> int:
    from dit_compiler.spec import schema_text

    sys.stdout.write(schema_text())
    return 0


def build_one(spec, out_root: str) -> tuple[Path, bool]:
    """Build `spec` into `out_root/<name>/`; returns the folder and whether anything changed."""
    from dit_compiler.build import compile_spec, stale_files, write_build

    build = compile_spec(spec)
    target = Path(out_root) / spec.name
    if target.is_dir() and not stale_files(build, target):
        return target, False
    return write_build(build, out_root), True


def cmd_build(args) -> int:
    from dit_compiler.spec import load_spec

    specs = [load_spec(s) for s in args.specs]  # validate every spec before writing anything
    for spec in specs:
        target, changed = build_one(spec, args.out)
        print(f"{spec.source}: {'wrote' if changed else 'up to date'} {target}/")
    return 0


def cmd_inspect(args) -> int:
    from dit_compiler.build import graph_of
    from dit_compiler.inspect import dot, inspect_json, inspect_table

    spec, _ = _spec_and_dir(args.spec)
    graph = graph_of(spec)
    limit = args.memory_limit or spec.memory_limit_bytes
    if args.dot:
        sys.stdout.write(dot(graph))
    elif args.format == "json":
        sys.stdout.write(inspect_json(graph, limit))
    else:
        sys.stdout.write(inspect_table(graph, ops=not args.summary, memory_limit=limit))
    return 0


def cmd_verify(args) -> int:
    from dit_compiler.build import graph_of
    from dit_compiler.run.verify import format_report, nntile_status, verify

    spec, build_dir = _runner_target(args)
    graph = graph_of(spec)
    status = nntile_status(graph)
    if args.require_nntile and status != "ran":
        print(f"error: --require-nntile: {status}", file=sys.stderr)
        return 2
    total = 1 + (not args.no_oracle) + (status == "ran")
    steps = iter(range(1, total + 1))
    report = verify(graph, build_dir, seed=args.seed, ncpus=args.ncpus, oracle=not args.no_oracle,
                    progress=lambda line: print(f"[{next(steps)}/{total}] {line}", flush=True))
    print(format_report(report))
    if args.json:
        from dit_compiler.build import write_text_atomic

        write_text_atomic(Path(args.json), report.to_json())
    return 0 if report.passed else 1


def cmd_bench(args) -> int:
    from dit_compiler.build import graph_of
    from dit_compiler.run.bench import bench, format_bench
    from dit_compiler.run.verify import nntile_status

    spec, build_dir = _runner_target(args)
    graph = graph_of(spec)
    status = nntile_status(graph)
    sides = ("nntile", "torch") if status == "ran" else ("torch",)
    if status != "ran":
        print(f"note: {status}; timing torch alone", file=sys.stderr)
    try:
        report = bench(graph, build_dir, ncpus=args.ncpus, warmup=args.warmup, repeats=args.repeats,
                       profile=args.profile, sides=sides, rounds=args.rounds,
                       progress=lambda line: print(f"[bench] {line}", flush=True),
                       memory_limit=args.memory_limit or spec.memory_limit_bytes, swap_parent=args.swap_dir)
    except RuntimeError as error:  # a side's process failed: what it printed, not a traceback of ours
        print(f"ditc bench: {error}", file=sys.stderr)
        return 1
    print(format_bench(report))
    if args.json:
        from dit_compiler.build import write_text_atomic

        write_text_atomic(Path(args.json), report.to_json())
    return 0


def cmd_sweep(args) -> int:
    from dit_compiler.run.sweep import run_sweep

    sweep, results, out = run_sweep(args.sweep, args.out, verify_it=args.verify, bench_it=args.bench,
                                    resume=args.resume, ncpus=args.ncpus, rounds=args.rounds)
    for r in results:
        extra = f": {r.errors[0]}" if r.errors else ""
        print(f"{r.name:<40} {r.status}{extra}")
    print(f"results: {out}/results.csv, {out}/results.json, plots {out}/plot-*.png")
    return 0 if all(r.status == "ok" for r in results) else 1


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ditc", description=__doc__.split(".")[0] if __doc__ else None)
    p.add_argument("--version", action="version", version=f"ditc {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("validate", help="check spec files against the schema and the semantic rules")
    s.add_argument("specs", nargs="+", metavar="SPEC")
    s.set_defaults(func=cmd_validate)

    s = sub.add_parser("schema", help="print the spec language's JSON Schema (for editors)")
    s.set_defaults(func=cmd_schema)

    s = sub.add_parser("build", help="emit the NNTile model, the torch reference and the graph")
    s.add_argument("specs", nargs="+", metavar="SPEC")
    s.add_argument("-o", "--out", default=DEFAULT_OUT, help="output root (default: generated/)")
    s.set_defaults(func=cmd_build)

    s = sub.add_parser("inspect", help="ops, tensors, tiles, FLOPs and memory of a spec")
    s.add_argument("spec", metavar="SPEC")
    s.add_argument("--format", choices=("table", "json"), default="table")
    s.add_argument("--summary", action="store_true", help="totals and tiling only, no per-op table")
    s.add_argument("--dot", action="store_true", help="print a Graphviz picture of the block structure")
    s.add_argument("--memory-limit", type=_size, metavar="SIZE",
                   help="compare a training step's predicted peak with SIZE (default: the spec's memory_limit)")
    s.set_defaults(func=cmd_inspect)

    s = _runner(sub, "verify", "run NNTile and torch on the same random weights and compare",
                "StarPU CPU workers (default: $STARPU_NCPU or all cores)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--require-nntile", action="store_true", help="fail (exit 2) when NNTile is not importable")
    s.add_argument("--no-oracle", action="store_true", help="skip the check against diffusers")
    s.set_defaults(func=cmd_verify)

    s = _runner(sub, "bench", "time NNTile against torch: forward and an AdamW training step",
                "StarPU workers and torch threads (default: $STARPU_NCPU or all cores)")
    s.add_argument("--warmup", type=_count(0), default=1)
    s.add_argument("--repeats", type=_count(1), default=5)
    s.add_argument("--rounds", type=_count(1), default=1,
                   help="alternate the sides this many times, fresh processes each, and pool the times")
    s.add_argument("--profile", action="store_true", help="time per op kind (NNTile layers, torch profiler)")
    s.add_argument("--memory-limit", type=_size, metavar="SIZE",
                   help="NNTile trains out-of-core under SIZE, e.g. 1.5GiB (default: the spec's memory_limit)")
    s.add_argument("--swap-dir", metavar="DIR", help="where out-of-core swaps (default: the temporary folder)")
    s.set_defaults(func=cmd_bench)

    s = sub.add_parser("sweep", help="validate, build, inspect (and verify, bench) every point of a sweep")
    s.add_argument("sweep", metavar="SWEEP")
    s.add_argument("-o", "--out", default="sweep-results", help="results root (default: sweep-results/)")
    s.add_argument("--verify", action="store_true", help="also run ditc verify on every point")
    s.add_argument("--bench", action="store_true", help="also run ditc bench on every point")
    s.add_argument("--resume", action="store_true", help="skip points an earlier run finished")
    s.add_argument("--rounds", type=_count(1), default=1,
                   help="with --bench: benchmark every point this many times in passes over all the points, "
                        "pooling each point's times (use 2 or more on a shared machine)")
    s.add_argument("--ncpus", type=_count(1), default=_default_ncpus())
    s.set_defaults(func=cmd_sweep)
    return p


def _runner(sub, name: str, help_text: str, ncpus_help: str) -> argparse.ArgumentParser:
    """A command that runs a build: its target, where a spec is built, workers, and a JSON report."""
    s = sub.add_parser(name, help=help_text)
    s.add_argument("target", metavar="SPEC_OR_BUILD_DIR")
    s.add_argument("-o", "--out", default=DEFAULT_OUT, help="where a spec is built (default: generated/)")
    s.add_argument("--ncpus", type=_count(1), default=_default_ncpus(), help=ncpus_help)
    s.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    return s


def _count(minimum: int):
    """An argparse type: an integer of at least `minimum` (argparse turns the error into exit 2)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is below the minimum {minimum}")
        return value
    return parse


def _size(text: str) -> int:
    """An argparse type: a memory size such as 1.5GiB, in bytes."""
    from dit_compiler.spec.model import memory_bytes

    try:
        return memory_bytes(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _default_ncpus() -> int:
    return int(os.environ.get("STARPU_NCPU", os.cpu_count() or 1))


def main(argv: list[str] | None = None) -> int:
    # NNTile's tasks must not spawn BLAS threads of their own; StarPU's banner is noise here.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("STARPU_SILENT", "1")
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except SpecError as error:
        for diagnostic in error.diagnostics:
            print(diagnostic, file=sys.stderr)
        return 2
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; nothing half-written was kept", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader left early (`ditc inspect SPEC | head`): not an error of ours; keep Python's
        # exit-time flush of stdout from raising again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
