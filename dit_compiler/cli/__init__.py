"""The `ditc` command line: a thin layer over the pipeline's stages. Exit codes: 0 ok, 1 check failed,
2 bad input (a spec or usage error, printed without a traceback, nothing written), 130 Ctrl-C, 143
SIGTERM (both cleaned up the same way).

The compiler's commands are in `compile`, the checks' in `checks`, the diffusion application's in `app`,
what they share in `args`; this module assembles the parser and runs a command."""
from __future__ import annotations

import argparse
import contextlib
import errno
import io
import os
import re
import signal
import sys
import warnings
from collections.abc import Iterator

from dit_compiler import __version__
from dit_compiler.cli import app, checks, compile
from dit_compiler.cli.args import runner_target
from dit_compiler.errors import SpecError, Terminated, UsageError, printed

#: An argument that starts like a negative number (-5GiB, -1,2, -.5): a value, as no flag starts so.
NEGATIVE = re.compile(r"-\.?[0-9]")


COMMANDS = ("validate", "schema", "build", "inspect", "import", "verify", "bench", "sweep", "train", "sample", "evaluate",
            "export")


def parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser and each command's own (which reports that command's mistakes)."""
    p = argparse.ArgumentParser(prog="ditc", description=__doc__.split(".")[0] if __doc__ else None)
    p.add_argument("--version", action="version", version=f"ditc {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for commands in (compile, checks, app):
        commands.add_commands(sub)
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
        args = parse_args(argv)
        settings = runner_target().settings(args)   # the target's own options, as the environment it reads
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
