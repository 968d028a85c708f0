"""User-facing errors: every mistake in a spec becomes one or more `Diagnostic`s, never a traceback."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

#: Longest value a message quotes: a value can be a whole file (`extends: /etc/passwd`).
MAX_SHOWN = 80


def shown(value: Any) -> str:
    """`repr(value)`, cut to `MAX_SHOWN` characters."""
    text = repr(value)
    return text if len(text) <= MAX_SHOWN else f"{text[:MAX_SHOWN - 5]}...{text[-1]} ({len(text)} characters)"


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
