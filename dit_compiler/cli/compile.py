"""`ditc validate`, `schema`, `build`, `inspect`: the compiler's commands."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from dit_compiler.cli.args import DEFAULT_OUT, check_file_arg, check_folder_arg, memory_size, path, spec_and_dir
from dit_compiler.compiler.build import Build, check_target, compile_spec, graph_of, stale_files, write_build
from dit_compiler.compiler.inspect import dot, inspect_json, inspect_table
from dit_compiler.compiler.spec import load_spec, load_spec_data, schema_text
from dit_compiler.compiler.spec.importer import import_model
from dit_compiler.compiler.spec.model import Spec, memory_bytes
from dit_compiler.errors import SpecError, UsageError, printed
from dit_compiler.files import write_text_atomic
from dit_compiler.userfiles import writing


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add `validate`, `schema`, `build` and `inspect` to the `ditc` subparsers."""
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

    s = sub.add_parser("import", help="write the spec of a diffusers model folder (DiT, PixArt-alpha)")
    s.add_argument("source", metavar="DIR", help="a diffusers model folder, or its config.json")
    s.add_argument("-o", "--out", required=True, type=path, metavar="SPEC", help="the spec file to write (YAML)")
    s.set_defaults(func=cmd_import)


def cmd_validate(args) -> int:
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
    sys.stdout.write(schema_text())
    return 0


def build_one(build: Build, out_root: str) -> tuple[Path, bool]:
    """Write `build` into `out_root/<name>/`; returns the folder and whether anything changed."""
    target = Path(out_root) / build.graph.spec.name
    if target.is_dir() and not stale_files(build, target):
        return target, False
    with writing(target):
        return write_build(build, out_root), True


def cmd_build(args) -> int:
    check_folder_arg(args.out, "-o")
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


def memory_limit(args: argparse.Namespace, spec: Spec) -> tuple[str | None, int | None]:
    """The memory limit as written (--memory-limit, else the spec's memory_limit) and in bytes; None, None
    without one."""
    text = args.memory_limit or spec.memory_limit
    return text, memory_bytes(text) if text else None


def cmd_inspect(args) -> int:
    spec, _ = spec_and_dir(args.spec)
    graph = graph_of(spec)
    _, limit = memory_limit(args, spec)
    if args.dot:
        sys.stdout.write(dot(graph))
    elif args.format == "json":
        sys.stdout.write(inspect_json(graph, limit))
    else:
        sys.stdout.write(inspect_table(graph, ops=not args.summary, memory_limit=limit))
    return 0




def cmd_import(args) -> int:
    """The spec is validated and lowered before it is written: a config ditc reads but cannot build is
    refused (exit 2) with nothing written."""
    check_file_arg(args.out, "-o")
    data, class_name = import_model(args.source)
    try:
        spec = load_spec_data(data, args.out)
    except SpecError as error:
        raise UsageError(f"{args.source}: the spec of this {class_name} does not validate: "
                         f"{printed(error.diagnostics)[0]}; nothing written") from None
    graph = graph_of(spec)
    header = (f"# Imported by `ditc import` from {args.source} ({class_name}); `ditc verify {args.out} --weights "
              f"{args.source}` checks it against the folder's weights.\n")
    write_text_atomic(args.out, header + yaml.safe_dump(data, sort_keys=False))
    params = sum(t.numel for t in graph.params)
    print(f"wrote {args.out}: {spec.name}, {class_name}, {params / 1e6:.2f} M parameters")
    return 0
