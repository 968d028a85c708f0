"""Benchmark: the worst a user can make `ditc` wait, at the documented bounds (README, "Guarantees").

Run: python tests/benchmarks/bounds.py. Prints, each in a fresh process as a user runs it, the CPU and
wall time and the peak RSS of

- `ditc validate` on the most expensive files under the size limit (thousands of unknown keys or
  duplicate keys, a list of 10,000 values, brackets nested to the limit and beyond, an alias bomb);
- `ditc build` and `ditc inspect --summary` of the spec at every maximum (depth 1000, hidden_size 65536, ...):
  the largest graph a spec can ask for;
- `ditc inspect` (summary, table, JSON) of DiT-S/8 at depths 125 to 1000: the time should double with the
  depth, not quadruple (a replay of the memory plan once summed every live tensor at every op).
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LIMIT = 32 << 10
#: Depths `ditc inspect` is timed at, up to the maximum (1000).
DEPTHS = (125, 250, 500, 1000)

MAXED = """name: maxed
model:
  input_size: 1024
  in_channels: 1024
  patch_size: 1
  hidden_size: 65536
  depth: 1000
  num_heads: 1024
  mlp_ratio: 64
  num_classes: 100000
  frequency_embedding_size: 65536
batch: 4096
"""


def _fill(line: str, count: int, head: str = "") -> str:
    """`head` and as many numbered copies of `line` as fit under the size limit."""
    text = head
    for i in range(count):
        more = line.format(i=i)
        if len(text) + len(more) >= LIMIT:
            break
        text += more
    return text


FILES = {
    "unknown keys at the size limit": _fill("k{i}: 1\n", 10**5),
    "unknown model keys at the size limit": _fill("  hiden_size{i}: 1\n", 10**5, "model:\n"),
    "duplicate keys at the size limit": _fill("batch: {i}\n", 10**5),
    "a list of 10,000 values": "model: [" + ",".join(["1"] * 10_001) + "]\n",
    "brackets nested to the limit": "model: " + "[" * 64 + "]" * 64 + "\n",
    "brackets nested 16,000 deep": "model: " + "[" * 16_000 + "]" * 16_000 + "\n",
    "an alias bomb": "a0: &a0 [" + ",".join(["1"] * 30) + "]\n"
                     + "".join(f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 30) + "]\n" for i in range(1, 6)),
    "20-digit widths": "model:\n  hidden_size: 12345678901234567890\n  num_heads: 98765432109876543210\n",
}


def timed(args: list[str], cwd: Path) -> tuple[float, float, float]:
    """Wall seconds, CPU seconds and peak RSS (MiB) of `ditc ARGS` in a fresh process."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "dit_compiler.cli", *args], cwd=cwd, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=os.environ | {"PYTHONPATH": str(ROOT)})
    _, _, usage = os.wait4(proc.pid, 0)  # this child's own usage, not the peak of every child so far
    proc.returncode = 0
    return time.perf_counter() - start, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        here = Path(folder)
        wall, cpu, rss = timed(["validate", str(ROOT / "specs" / "tiny.yaml")], here)
        print(f"{'validate specs/tiny.yaml (start-up)':<48} {wall:6.2f} s wall {cpu:6.2f} s CPU {rss:7.0f} MiB")
        for label, text in FILES.items():
            path = here / "hostile.yaml"
            path.write_text(text)
            wall, cpu, rss = timed(["validate", str(path)], here)
            print(f"{'validate ' + label + f' ({len(text):,} B)':<48} {wall:6.2f} s wall {cpu:6.2f} s CPU {rss:7.0f} MiB")
        (here / "maxed.yaml").write_text(MAXED)
        for args in (["build", "maxed.yaml", "-o", "out"], ["inspect", "maxed.yaml", "--summary"]):
            wall, cpu, rss = timed(args, here)
            size = sum(p.stat().st_size for p in (here / "out").rglob("*") if p.is_file()) if args[0] == "build" else 0
            extra = f", {size / 2**20:.0f} MiB written" if size else ""
            print(f"{'ditc ' + ' '.join(args[:2]) + ' (every maximum)':<48} {wall:6.2f} s wall {cpu:6.2f} s CPU "
                  f"{rss:7.0f} MiB{extra}")
        for depth in DEPTHS:
            (here / "deep.yaml").write_text(f"preset: DiT-S/8\nname: deep\nmodel:\n  depth: {depth}\n")
            for flags in (["--summary"], [], ["--format", "json"]):
                wall, cpu, rss = timed(["inspect", "deep.yaml", *flags], here)
                label = f"ditc inspect {' '.join(flags) or '(table)'} depth {depth}"
                print(f"{label:<48} {wall:6.2f} s wall {cpu:6.2f} s CPU {rss:7.0f} MiB")


if __name__ == "__main__":
    main()
