"""argparse types every ditc command shares: bounded numbers and memory sizes. A bad value is argparse's
usage error: the command's usage, the flag, the value and what is allowed, exit 2."""
from __future__ import annotations

import argparse
import math
from collections.abc import Callable

from dit_compiler.errors import shown

#: The largest seed: numpy's seeds are 32-bit.
MAX_SEED = 2**32 - 1


def integer(lo: int, hi: int) -> Callable[[str], int]:
    """An integer from `lo` to `hi`."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{shown(text)} is not an integer from {lo} to {hi}") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"{value} is outside {lo} to {hi}")
        return value
    return parse


def number(lo: float, hi: float, above: bool = False) -> Callable[[str], float]:
    """A number from `lo` (or, with `above`, more than `lo`) to `hi`; NaN and infinities are outside."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{shown(text)} is not a number") from None
        if not (lo < value if above else lo <= value) or not value <= hi or not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{value:g} is outside {'more than ' if above else ''}{lo:g} to {hi:g}")
        return value
    return parse


def memory_size(text: str) -> str:
    """A memory size such as 1.5GiB, kept as written (as a spec's `memory_limit` is)."""
    from dit_compiler.compiler.spec.model import memory_bytes

    try:
        memory_bytes(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def path(text: str) -> str:
    """A path, never empty (`-o ''` would otherwise mean the current folder)."""
    if not text:
        raise argparse.ArgumentTypeError("an empty path; name one ('.' for the current folder)")
    return text
