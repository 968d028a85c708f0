"""Two training runs' loss curves on one plot (e.g. the default specs/digits.yaml run on NNTile and on torch).

Run: python tests/benchmarks/compare_loss_curves.py RUN_A RUN_B [--window 200] [--out curves.png]. Smooths
each run's per-step loss (metrics.csv) with a moving mean over `window` steps, plots both, and prints the
largest and the median relative difference of the smoothed curves, and each run's images/s.
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np


def _read(run: Path) -> tuple[np.ndarray, np.ndarray, float, str]:
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    steps = np.array([int(r["step"]) for r in rows])
    loss = np.array([float(r["loss"]) for r in rows])
    rate = float(np.median([float(r["images_per_s"]) for r in rows]))
    return steps, loss, rate, run.name


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs=2, type=Path, metavar="RUN")
    p.add_argument("--window", type=int, default=200)
    p.add_argument("--out", type=Path, default=Path("loss-curves.png"))
    args = p.parse_args()
    kernel = np.ones(args.window) / args.window
    curves = []
    for run in args.runs:
        steps, loss, rate, name = _read(run)
        curves.append((steps[args.window - 1:], np.convolve(loss, kernel, mode="valid"), rate, name))
    (steps, a, rate_a, name_a), (_, b, rate_b, name_b) = curves
    n = min(len(a), len(b))
    diff = np.abs(a[:n] - b[:n]) / np.abs(b[:n])
    print(f"smoothed over {args.window} steps: largest relative difference {diff.max():.3f}, median "
          f"{np.median(diff):.3f}; median images/s: {name_a} {rate_a:.0f}, {name_b} {rate_b:.0f}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for steps_, curve, _, name in curves:
        ax.plot(steps_, curve, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel(f"loss (mean of {args.window} steps)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=90)
    print(f"plot: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
