"""The `ditc` command line: a thin layer over the pipeline's stages. Exit codes: 0 ok, 1 check failed,
2 bad input (a spec or usage error, printed without a traceback, nothing written), 130 Ctrl-C, 143
SIGTERM (both cleaned up the same way)."""
from __future__ import annotations

import argparse
import contextlib
import errno
import io
import os
import re
import signal
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

from dit_compiler import __version__
from dit_compiler.cli.args import MAX_SEED, integer, memory_size, path
from dit_compiler.compiler.spec.model import memory_bytes
from dit_compiler.errors import SpecError, Terminated, UsageError, printed

DEFAULT_OUT = "generated"
#: The most warm-up runs, measured runs or rounds a benchmark takes.
MAX_RUNS = 1000
#: An argument that starts like a negative number (-5GiB, -1,2, -.5): a value, as no flag starts so.
NEGATIVE = re.compile(r"-\.?[0-9]")


def _spec_and_dir(target: str):
    """A spec file, or a generated build folder (its spec.resolved.yaml), -> (spec, build folder or None)."""
    from dit_compiler.compiler.build import SPEC_FILE
    from dit_compiler.compiler.spec import load_spec

    path = Path(target)
    if path.is_dir():
        if not (path / SPEC_FILE).is_file():
            raise UsageError(f"{target}: a folder, but not a ditc build (no {SPEC_FILE}); run `ditc build SPEC` first")
        return load_spec(path / SPEC_FILE), path
    if not path.exists():
        raise UsageError(f"{target}: no such spec file or build folder")
    return load_spec(path), None


def _runner_target(args, check=lambda graph: None):
    """The graph and build folder `verify` and `bench` run: a spec is built into `args.out` when needed; a
    folder is run as it is, refused when a file is missing, with a note naming each file that differs from
    a fresh build of its spec. Either way, a model this machine cannot hold, or one `check` refuses
    (raising UsageError), is refused before anything is written."""
    from dit_compiler.compiler.build import compile_spec
    from dit_compiler.limits import check_memory

    _check_file_arg(args.json, "--json")
    args.ncpus = _ncpus(args)
    spec, build_dir = _spec_and_dir(args.target)
    if build_dir is None:
        _check_folder_arg(args.out, "-o")
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


def _check_requests(args, graph) -> None:
    """The BLAS core and kernel set asked for (by flag or environment), checked as the run checks them but
    before anything is written: the core is applied now, and the kernel set chosen where the target runs."""
    from dit_compiler.compiler import targets
    from dit_compiler.checks.verify import nntile_status

    target = targets.get(graph.spec.target)
    target.apply_blas_core("--blas-core" if args.blas_core else None)
    if nntile_status(graph) == "ran":
        # under a memory limit, bench sets StarPU's memory variables itself
        work = "verify" if args.func is cmd_verify else None if _memory_limit(args, graph.spec)[1] else "train"
        target.check_environment(graph, work)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ditc's kernels unavailable: the run says so itself
            target.choose_kernels()


def _check_build_dir(build, folder: Path) -> None:
    """A build folder to run as it is: every file present; files that differ from `build` named, and why."""
    from dit_compiler.compiler.build import (GRAPH_FILE, MANIFEST_FILE, NNTILE_FILE, SPEC_FILE, TORCH_FILE, file_sha256,
                                    stale_files)

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
    from dit_compiler.compiler.build import manifest_files

    try:
        return manifest_files(folder) or {}
    except UsageError:
        return {}


def cmd_validate(args) -> int:
    from dit_compiler.compiler.spec import load_spec

    failed = False
    for target in args.specs:
        try:
            spec = load_spec(target)
            print(f"{target}: ok ({spec.name})")
        except SpecError as error:
            failed = True
            print(*printed(error.diagnostics), sep="\n", file=sys.stderr)
    return 2 if failed else 0


def cmd_schema(args) -> int:
    from dit_compiler.compiler.spec import schema_text

    sys.stdout.write(schema_text())
    return 0


def build_one(build, out_root: str) -> tuple[Path, bool]:
    """Write `build` into `out_root/<name>/`; returns the folder and whether anything changed."""
    from dit_compiler.compiler.build import stale_files, write_build

    target = Path(out_root) / build.graph.spec.name
    if target.is_dir() and not stale_files(build, target):
        return target, False
    from dit_compiler.userfiles import writing

    with writing(target):
        return write_build(build, out_root), True


def cmd_build(args) -> int:
    from dit_compiler.compiler.build import check_target, compile_spec
    from dit_compiler.compiler.spec import load_spec

    _check_folder_arg(args.out, "-o")
    specs = [load_spec(s) for s in args.specs]  # validate every spec, and check every target, before writing
    first: dict[str, str] = {}
    for spec in specs:
        if spec.name in first:
            raise UsageError(f"{first[spec.name]} and {spec.source} both build {spec.name!r}: one command builds each "
                             "name once; give one of them another `name:`")
        first[spec.name] = spec.source
    builds = [compile_spec(spec) for spec in specs]
    for build in builds:
        check_target(build, args.out)
    for spec, build in zip(specs, builds):
        target, changed = build_one(build, args.out)
        print(f"{spec.source}: {'wrote' if changed else 'up to date'} {target}/", flush=True)
    return 0


def _memory_limit(args, spec) -> tuple[str | None, int | None]:
    """The memory limit as written (--memory-limit, else the spec's memory_limit) and in bytes; None, None
    without one."""
    text = args.memory_limit or spec.memory_limit
    return text, memory_bytes(text) if text else None


def cmd_inspect(args) -> int:
    from dit_compiler.compiler.build import graph_of
    from dit_compiler.compiler.inspect import dot, inspect_json, inspect_table

    spec, _ = _spec_and_dir(args.spec)
    graph = graph_of(spec)
    _, limit = _memory_limit(args, spec)
    if args.dot:
        sys.stdout.write(dot(graph))
    elif args.format == "json":
        sys.stdout.write(inspect_json(graph, limit))
    else:
        sys.stdout.write(inspect_table(graph, ops=not args.summary, memory_limit=limit))
    return 0


def cmd_verify(args) -> int:
    from dit_compiler.checks.verify import format_header, format_report, nntile_status, tiling_of, verify

    def require_nntile(graph) -> None:
        if args.require_nntile and (status := nntile_status(graph)) != "ran":
            raise UsageError(f"--require-nntile: {status}")

    graph, build_dir = _runner_target(args, require_nntile)
    status = nntile_status(graph)
    total = 1 + (not args.no_oracle) + (status == "ran")
    steps = iter(range(1, total + 1))
    print(format_header(graph.spec.name, tiling_of(graph)), flush=True)
    report = verify(graph, build_dir, seed=args.seed, ncpus=args.ncpus, oracle=not args.no_oracle,
                    progress=lambda line: print(f"[{next(steps)}/{total}] {line}", flush=True))
    print(format_report(report, header=False))
    if args.json:
        from dit_compiler.compiler.build import write_text_atomic

        write_text_atomic(Path(args.json), report.to_json())
    return 0 if report.passed else 1


def cmd_bench(args) -> int:
    from dit_compiler.compiler import targets
    from dit_compiler.checks.bench import bench, format_bench
    from dit_compiler.checks.verify import nntile_status

    def check_limit(graph) -> None:
        """The memory limit NNTile runs out-of-core under, and --swap-dir, which only that uses."""
        limit, size = _memory_limit(args, graph.spec)
        if args.swap_dir is not None:
            if limit is None:
                raise UsageError(f"--swap-dir {args.swap_dir}: needs a memory limit (only out-of-core swaps); give "
                                 "--memory-limit SIZE too, or set the spec's memory_limit")
            _check_folder_arg(args.swap_dir, "--swap-dir", made=False)
        if size and (check := targets.get(graph.spec.target).check_limit(graph, size)).too_small:
            asked = "--memory-limit" if args.memory_limit else f"{graph.spec.source}: memory_limit"
            raise UsageError(f"{asked} {limit}: {check.summary()}")

    graph, build_dir = _runner_target(args, check_limit)
    status = nntile_status(graph)
    sides = ("nntile", "torch") if status == "ran" else ("torch",)
    if status != "ran":
        print(f"note: {status}; timing torch alone", file=sys.stderr)
    try:
        _, limit = _memory_limit(args, graph.spec)
        report = bench(graph, build_dir, ncpus=args.ncpus, warmup=args.warmup, repeats=args.repeats,
                       profile=args.profile, sides=sides, rounds=args.rounds,
                       progress=lambda line: print(f"[bench] {line}", flush=True),
                       memory_limit=limit, swap_parent=args.swap_dir)
    except RuntimeError as error:  # a side's process failed: what it printed, not a traceback of ours
        print(f"ditc bench: {error}", file=sys.stderr)
        return 1
    print(format_bench(report))
    if args.json:
        from dit_compiler.compiler.build import write_text_atomic

        write_text_atomic(Path(args.json), report.to_json())
    return 0


def cmd_sweep(args) -> int:
    from dit_compiler.checks.sweep import run_sweep

    _check_folder_arg(args.out, "-o")
    ncpus = _ncpus(args) if args.verify or args.bench else 1  # $STARPU_NCPU matters only to what runs
    sweep, results, out = run_sweep(args.sweep, args.out, verify_it=args.verify, bench_it=args.bench,
                                    resume=args.resume, ncpus=ncpus, rounds=args.rounds or 1,
                                    max_points=args.max_points)
    for r in results:
        extra = f": {r.errors[0]}" if r.errors else ""
        print(f"{r.name:<40} {r.status}{extra}")
    print(f"results: {out}/results.csv, {out}/results.json, plots {out}/plot-*.png")
    return 0 if all(r.status == "ok" for r in results) else 1


COMMANDS = ("validate", "schema", "build", "inspect", "verify", "bench", "sweep", "train", "sample", "evaluate",
            "export")


def parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser and each command's own (which reports that command's mistakes)."""
    from dit_compiler.limits import cores
    from dit_compiler.compiler.spec.sweep import MAX_POINTS

    p = argparse.ArgumentParser(prog="ditc", description=__doc__.split(".")[0] if __doc__ else None)
    p.add_argument("--version", action="version", version=f"ditc {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    ncpus = integer(1, cores())

    s = sub.add_parser("validate", help="check spec files against the schema and the semantic rules")
    s.add_argument("specs", nargs="+", metavar="SPEC", help="spec files (YAML); every error of each is reported")
    s.set_defaults(func=cmd_validate)

    s = sub.add_parser("schema", help="print the spec language's JSON Schema (for editors)")
    s.set_defaults(func=cmd_schema)

    s = sub.add_parser("build", help="emit the NNTile model, the torch reference and the graph")
    s.add_argument("specs", nargs="+", metavar="SPEC", help="spec files (YAML), each built into OUT/<its name>/")
    s.add_argument("-o", "--out", default=DEFAULT_OUT, type=path, help="output root (default: generated/)")
    s.set_defaults(func=cmd_build)

    s = sub.add_parser("inspect", help="ops, tensors, tiles, FLOPs and memory of a spec")
    s.add_argument("spec", metavar="SPEC", help="a spec file (YAML)")
    s.add_argument("--format", choices=("table", "json"), help="the report as a table (default) or as JSON")
    s.add_argument("--summary", action="store_true", help="totals and tiling only, no per-op table")
    s.add_argument("--dot", action="store_true", help="print a Graphviz picture of the block structure")
    s.add_argument("--memory-limit", type=memory_size, metavar="SIZE",
                   help="compare a training step's predicted peak with SIZE (default: the spec's memory_limit)")
    s.set_defaults(func=cmd_inspect)

    s = _runner(sub, "verify", "run NNTile and torch on the same random weights and compare",
                "StarPU CPU workers (default: $STARPU_NCPU or all cores)", ncpus)
    s.add_argument("--seed", type=integer(0, MAX_SEED), default=0, help=f"0 to {MAX_SEED} (default 0)")
    s.add_argument("--require-nntile", action="store_true", help="fail (exit 2) when NNTile is not importable")
    s.add_argument("--no-oracle", action="store_true", help="skip the check against diffusers")
    s.set_defaults(func=cmd_verify)

    s = _runner(sub, "bench", "time NNTile against torch: forward and an AdamW training step",
                "StarPU workers and torch threads (default: $STARPU_NCPU or all cores)", ncpus)
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
    s.add_argument("--ncpus", type=ncpus, help="StarPU CPU workers (default: $STARPU_NCPU or all cores)")
    s.set_defaults(func=cmd_sweep)

    # train, sample, evaluate, export: arguments and commands in dit_compiler/run/diffusion_cli.py
    from dit_compiler.cli.app import add_commands

    add_commands(sub)
    return p, dict(sub.choices)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line, each mistake reported by the parser of the command it belongs to (exit 2)."""
    top, commands = parser()
    args, unknown = top.parse_known_args(_negatives_attached(sys.argv[1:] if argv is None else argv))
    if args.command is None:
        top.error(f"unrecognized arguments: {' '.join(unknown)}" if unknown
                  else f"choose a command: {', '.join(COMMANDS)}")
    command = commands[args.command]
    if unknown:
        command.error(f"unrecognized arguments: {' '.join(unknown)}")
    outputs = [flag for flag, on in (("--dot", getattr(args, "dot", False)), ("--summary", getattr(args, "summary", False)),
                                     (f"--format {getattr(args, 'format', None)}", getattr(args, "format", None))) if on]
    if len(outputs) > 1:
        command.error(f"{' and '.join(outputs)} ask for different outputs; choose one")
    if args.command == "sweep" and args.rounds is not None and not args.bench:
        command.error("--rounds counts benchmark passes, so it needs --bench")
    args.argv = list(sys.argv[1:] if argv is None else argv)   # what `train --nproc` starts its ranks with
    return args


def _negatives_attached(argv: list[str]) -> list[str]:
    """`--flag -5GiB` as `--flag=-5GiB`: argparse takes a value that starts with `-` and is not a plain
    number for a flag ("expected one argument"); attached, the flag's type refuses it, saying what is allowed."""
    attached: list[str] = []
    for arg in argv:
        if attached and NEGATIVE.match(arg) and attached[-1].startswith("--") and "=" not in attached[-1] \
                and attached[-1] != "--":
            attached[-1] += f"={arg}"
        else:
            attached.append(arg)
    return attached


def _runner(sub, name: str, help_text: str, ncpus_help: str, ncpus) -> argparse.ArgumentParser:
    """A command that runs a build: its target, where a spec is built, workers, and a JSON report."""
    s = sub.add_parser(name, help=help_text)
    s.add_argument("target", metavar="SPEC_OR_BUILD_DIR",
                   help="a spec file (built into -o first) or a build folder `ditc build` wrote")
    s.add_argument("-o", "--out", default=DEFAULT_OUT, type=path, help="where a spec is built (default: generated/)")
    s.add_argument("--ncpus", type=ncpus, help=ncpus_help)
    s.add_argument("--json", metavar="FILE", type=path, help="also write the report as JSON")
    s.add_argument("--kernels", choices=("auto", "ditc", "nntile"),
                   help="NNTile target: ditc's own CPU kernels or NNTile's (default: $DITC_KERNELS, else auto: "
                        "ditc's where they build)")
    s.add_argument("--blas-core", metavar="CORE",
                   help="NNTile target: run OpenBLAS's CORE kernels (OPENBLAS_CORETYPE; auto: the one for this CPU; "
                        "none: the library's or $OPENBLAS_CORETYPE's) once a GEMM check against float64 passes "
                        "(default: $DITC_BLAS_CORE; unset, with OPENBLAS_CORETYPE unset, the best checked core where the "
                        "library's is below this CPU)")
    return s


def _ncpus(args) -> int:
    """--ncpus, else $STARPU_NCPU, else every core; exported as STARPU_NCPU, which StarPU itself reads."""
    from dit_compiler.limits import default_ncpus

    ncpus = args.ncpus or default_ncpus()
    os.environ["STARPU_NCPU"] = str(ncpus)
    return ncpus


def _check_folder_arg(path: str, flag: str, made: bool = True) -> None:
    """An output folder: refused before any work when it is a file, a broken link, under a file, or not
    writable; or, unless it is `made` when missing, when it does not exist."""
    folder = Path(path)
    if folder.is_symlink() and not folder.exists():
        raise UsageError(f"{flag} {path}: a link to nothing ({os.readlink(folder)}); name a folder")
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{flag} {path}: a file, not a folder; name a folder"
                         + (" (it is made when missing)" if made else ""))
    if not made and not folder.exists():
        raise UsageError(f"{flag} {path}: no such folder")
    existing = folder.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"{flag} {path}: {existing} is a file, so no folder can be made under it")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path}: {existing} is not writable by you")


def _check_file_arg(path: str | None, flag: str) -> None:
    """A file to write: refused before any work when it is a folder, a link, a device, a FIFO or a socket
    (ditc replaces a regular file whole, and writes through nothing: `build.check_destination`), or when
    its folder is missing or not writable."""
    from dit_compiler.compiler.build import check_destination

    if path is None:
        return
    file = Path(path)
    if file.is_dir() and not file.is_symlink():
        raise UsageError(f"{flag} {path}: a folder; name a file")
    folder = file.absolute().parent
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{flag} {path}: {folder} is a file, not a folder")
    if not folder.is_dir():
        raise UsageError(f"{flag} {path}: the folder {folder} does not exist")
    try:
        check_destination(file)
    except UsageError as error:
        raise UsageError(f"{flag} {error}") from None
    if not os.access(folder, os.W_OK | os.X_OK) or (file.exists() and not os.access(file, os.W_OK)):
        raise UsageError(f"{flag} {path}: not writable by you")
    try:   # as the file will be written: a temporary file beside it (root may "access" /proc, not write there)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".ditc-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        raise UsageError(f"{flag} {path}: no file can be written in {folder} ({error.strerror})") from None


def _terminate(signum, frame) -> None:
    raise Terminated()


def _format_warning(message, category, filename, lineno, line=None, _default=warnings.formatwarning) -> str:
    """ditc's own warnings (an unavailable kernel set, a slow BLAS core) as one plain line; others as Python's."""
    if category.__module__.startswith("dit_compiler"):
        return f"warning: {message}\n"
    return _default(message, category, filename, lineno, line)


@contextlib.contextmanager
def _one_command(settings: dict[str, str]) -> Iterator[None]:
    """The environment with `settings`, and ditc's warnings as plain lines, for one command; both as they
    were afterwards (`main` also runs in-process, in the tests)."""
    saved, formatwarning = dict(os.environ), warnings.formatwarning
    os.environ.update(settings)
    warnings.formatwarning = _format_warning
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)
        warnings.formatwarning = formatwarning


def main(argv: list[str] | None = None) -> int:
    previous = signal.signal(signal.SIGTERM, _terminate)  # cleaned up like Ctrl-C, from the start
    for stream in (sys.stdout, sys.stderr):   # a path the terminal's encoding lacks is escaped, not a traceback
        if isinstance(stream, io.TextIOWrapper) and stream.errors == "strict":
            stream.reconfigure(errors="backslashreplace")
    try:
        # StarPU's banner is noise here (NNTile's runtime keeps its BLAS and torch to one thread a call itself)
        os.environ.setdefault("STARPU_SILENT", "1")
        args = parse_args(argv)
        # the NNTile target reads these where it starts (its runners' subprocesses inherit them)
        settings = {variable: getattr(args, option) for option, variable in
                    (("kernels", "DITC_KERNELS"), ("blas_core", "DITC_BLAS_CORE")) if getattr(args, option, None)}
        with _one_command(settings):
            code = args.func(args)  # a SIGTERM while its big locals are freed lands here, still in the try
        signal.signal(signal.SIGTERM, previous)
        return code
    except SpecError as error:
        print(*printed(error.diagnostics), sep="\n", file=sys.stderr)
        return 2
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:
        what = "terminated" if isinstance(stop, Terminated) else "interrupted"
        print(f"{what}; nothing half-written was kept", file=sys.stderr)
        return 143 if isinstance(stop, Terminated) else 130
    except BrokenPipeError:
        # The reader left early (`ditc inspect SPEC | head`): not an error of ours; keep Python's
        # exit-time flush of stdout from raising again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as error:
        if error.filename is not None and error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO):
            # not bad input: the disk is full (what was being written was not kept)
            print(f"error: {error.filename}: {error.strerror}; nothing half-written was kept", file=sys.stderr)
            return 1
        if error.filename is None and error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO):
            # standard output cannot be written (`> /dev/full`, a full disk): say so once, not at exit again
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            print(f"error: the output cannot be written ({error.strerror})", file=sys.stderr)
            return 1
        if error.filename is None:
            raise
        print(f"error: {error.filename}: {error.strerror}", file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
