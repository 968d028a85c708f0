"""A progress display for long loops: a tqdm bar on a terminal, plain lines elsewhere (a log file or
a pipe gets no carriage returns), both with the same fields and an ETA."""
from __future__ import annotations

import sys
import time
from typing import TextIO


def counted(n: int, noun: str) -> str:
    """`n noun`, the noun plural unless n is 1: "1 step", "2 steps"."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """`update(**fields)` after each unit of work; `close()` at the end. Off a terminal, one line every
    `every` updates and one for the last."""

    def __init__(self, total: int, desc: str, unit: str, initial: int = 0, every: int | None = None,
                 stream: TextIO | None = None):
        self.total, self.desc, self.unit, self.done = total, desc, unit, initial
        self.stream = stream or sys.stderr
        self.every = every or max(1, (total - initial) // 20)
        self.start, self.start_done = time.perf_counter(), initial
        self.bar = None
        if self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=self.stream, dynamic_ncols=True)

    def update(self, **fields: str) -> None:
        self.done += 1
        text = " ".join(f"{k} {v}" for k, v in fields.items())
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)
            self.bar.update(1)
        elif (self.done - self.start_done) % self.every == 0 or self.done == self.total:
            elapsed = time.perf_counter() - self.start
            rate = (self.done - self.start_done) / elapsed if elapsed > 0 else 0.0
            eta = (self.total - self.done) / rate if rate > 0 else 0.0
            print(f"[{self.desc}] {self.unit} {self.done}/{self.total} {text} ETA {_clock(eta)}",
                  file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
