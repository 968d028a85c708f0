"""NNTile against torch on DiT's diffusion: training parity, sampling parity and sampling time.

Run: python tests/benchmarks/nntile_vs_torch_diffusion.py [--out DIR] [--run RUN]. Prints
- training parity: specs/digits.yaml trained 20 steps on each backend from one initialisation, with the
  same data, timesteps, noise and dropped labels: the largest relative difference of a step's loss, and
  the relative error of the final weights, EMA and AdamW moments;
- sampling parity: the same initial and per-step noise through a 50-step DDPM and DDIM run, on
  specs/digits.yaml (the trained weights of --run, else the 20-step ones) and on specs/tiny.yaml (random
  weights): the relative error of the final samples;
- sampling time: 100 digits with 250 DDPM steps at the spec's guidance on each backend, and the ratio.
Takes a few minutes on 2 cores.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from dit_compiler.compiler.build import compile_spec, graph_of, write_build
from dit_compiler.app.backend import load_into, open_backend
from dit_compiler.checks.common import group_error, randomize_
from dit_compiler.compiler.build import load_module
from dit_compiler.app.sample import SampleConfig, generate, sample_labels
from dit_compiler.app.train import TrainConfig, checkpoints, train
from dit_compiler.app.weights import load_checkpoint, to_numpy
from dit_compiler.compiler.spec import load_spec

ROOT = Path(__file__).resolve().parents[2]


def _losses(run: Path) -> np.ndarray:
    rows = (run / "metrics.csv").read_text().splitlines()[1:]
    return np.array([float(r.split(",")[1]) for r in rows])


def training_parity(out: Path) -> Path:
    spec = load_spec(ROOT / "specs" / "digits.yaml")
    runs = {}
    for backend in ("nntile", "torch"):
        runs[backend] = out / f"parity-{backend}"
        train(spec, runs[backend], TrainConfig(steps=20, lr=spec.train.lr, backend=backend, ckpt_every=0),
              stream=open("/dev/null", "w"))
    a, b = (load_checkpoint(checkpoints(runs[k])[-1]) for k in ("nntile", "torch"))
    loss_a, loss_b = _losses(runs["nntile"]), _losses(runs["torch"])
    print(f"training parity, specs/digits.yaml, 20 steps: largest step loss difference "
          f"{np.max(np.abs(loss_a - loss_b) / np.abs(loss_b)):.2e} (relative; metrics.csv keeps 6 digits)")
    for part in ("model", "ema"):
        err = group_error([(a[part][k].numpy(), b[part][k].numpy()) for k in b[part]])
        print(f"  final {part} weights: relative error {err:.2e}")
    for moment in ("exp_avg", "exp_avg_sq"):
        state_a, state_b = a["opt"]["state"], b["opt"]["state"]
        err = group_error([(state_a[i][moment].numpy(), state_b[i][moment].numpy()) for i in state_b])
        print(f"  AdamW {moment}: relative error {err:.2e}")
    return runs["torch"]


def sampling_parity(spec_path: Path, weights: dict, build_root: Path, label: str) -> None:
    spec = load_spec(spec_path)
    build_dir = write_build(compile_spec(spec), build_root)
    graph = graph_of(spec)
    labels = sample_labels(graph.spec.model.num_classes, None, graph.axes["batch"].size)[:8]
    for sampler in ("ddpm", "ddim"):
        samples = {}
        for name in ("nntile", "torch"):
            backend = open_backend(name, build_dir, graph)
            try:
                load_into(backend, weights, label)
                samples[name] = generate(backend, graph, labels, SampleConfig(sampler=sampler, steps=50,
                                                                              cfg=spec.sample.cfg),
                                         stream=open("/dev/null", "w"))
            finally:
                backend.close()
        print(f"sampling parity, {spec_path.name} ({label}), 50-step {sampler.upper()}, cfg {spec.sample.cfg:g}: "
              f"relative error of the final samples {group_error([(samples['nntile'], samples['torch'])]):.2e}")


def sampling_time(run: Path) -> None:
    """`ditc sample` as a user runs it, in a fresh process per backend, alternated twice."""
    times: dict[str, list[float]] = {"nntile": [], "torch": []}
    for _ in range(2):
        for name in times:
            began = time.perf_counter()
            subprocess.run([sys.executable, "-m", "dit_compiler", "sample", str(run), "--n", "100", "--backend", name,
                            "--out", str(run / f"time-{name}")], check=True, capture_output=True)
            times[name].append(time.perf_counter() - began)
    best = {name: min(t) for name, t in times.items()}
    print(f"sampling time, 100 digits, 250 DDPM steps, `ditc sample` (best of 2, alternated): nntile "
          f"{best['nntile']:.1f} s, torch {best['torch']:.1f} s (ratio {best['nntile'] / best['torch']:.2f}; each "
          "includes starting Python, building the sampling variant and starting the backend)")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", help="where runs and builds go (default: a temporary folder)")
    p.add_argument("--run", help="a trained specs/digits.yaml run folder to sample digits from")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        out.mkdir(parents=True, exist_ok=True)
        torch_run = training_parity(out)
        run = Path(args.run) if args.run else torch_run
        digits = to_numpy(load_checkpoint(checkpoints(run)[-1])["ema"])
        sampling_parity(ROOT / "specs" / "digits.yaml", digits, out / "builds", f"EMA of {run}")
        tiny = load_spec(ROOT / "specs" / "tiny.yaml")
        model = load_module(write_build(compile_spec(tiny), out / "builds") / "torch_reference.py").Model()
        randomize_(model, 0)
        sampling_parity(ROOT / "specs" / "tiny.yaml", to_numpy(model.state_dict()), out / "builds", "random weights")
        sampling_time(run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
