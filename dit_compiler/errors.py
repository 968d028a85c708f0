"""User-facing errors: every mistake in a spec becomes one or more `Diagnostic`s, never a traceback."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

#: Longest value a message quotes: a value can be a whole file (`extends: /etc/passwd`).
MAX_QUOTED = 80


def shown(value: Any) -> str:
    """`repr(value)`, cut to `MAX_QUOTED` characters."""
    text = repr(value)
    return text if len(text) <= MAX_QUOTED else f"{text[:MAX_QUOTED - 5]}...{text[-1]} ({len(text)} characters)"


@dataclass(frozen=True)
class Diagnostic:
    """One problem in a spec, located as precisely as the input allows."""

    file: str
    line: int | None
    column: int | None
    key_path: str
    message: str
    value: Any = None
    allowed: str | None = None

    def __str__(self) -> str:
        where = self.file
        if self.line is not None:
            where += f":{self.line}"
            if self.column is not None:
                where += f":{self.column}"
        text = f"{where}: {self.key_path or '<top level>'}: {self.message}"
        if self.value is not None:
            text += f" (got {shown(self.value)})"
        if self.allowed:
            text += f"; allowed: {self.allowed}"
        return text


#: Problems printed for one command; a file of thousands of mistakes gets a count of the rest.
MAX_SHOWN = 50


def printed(diagnostics: list[Diagnostic]) -> list[str]:
    """The lines a command prints for `diagnostics`: at most MAX_SHOWN, then how many more there are."""
    lines = [str(d) for d in diagnostics[:MAX_SHOWN]]
    if len(diagnostics) > MAX_SHOWN:
        lines.append(f"... and {len(diagnostics) - MAX_SHOWN} more problems")
    return lines


class SpecError(Exception):
    """Raised with every problem found in a spec at once. The CLI prints them and exits 2."""

    def __init__(self, diagnostics: list[Diagnostic]):
        self.diagnostics = list(diagnostics)
        super().__init__("\n".join(str(d) for d in self.diagnostics))


class UsageError(Exception):
    """A bad command line or path that is not a spec problem; the CLI prints it and exits 2."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (what `timeout` and service managers send), handled like Ctrl-C: every `finally` and
    `except KeyboardInterrupt` cleans up the same way."""
