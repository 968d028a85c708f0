"""Benchmark: wall time of `ditc build specs/dit-xl.yaml` (target: under 2 s on a 2-core machine).

Run: python tests/benchmarks/build_speed.py [SPEC]. Prints the median of 5 fresh-process builds, each
into an empty folder, so start-up and imports count as a user sees them.
"""
from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    spec = sys.argv[1] if len(sys.argv) > 1 else str(ROOT / "specs" / "dit-xl.yaml")
    times = []
    for _ in range(5):
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "dit_compiler.cli", "build", spec, "-o", out], cwd=ROOT,
                           check=True, capture_output=True)
            times.append(time.perf_counter() - start)
    print(f"ditc build {Path(spec).name}: median {statistics.median(times):.2f} s wall "
          f"(min {min(times):.2f}, max {max(times):.2f}, 5 fresh processes; target < 2 s)")


if __name__ == "__main__":
    main()
