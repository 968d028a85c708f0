"""Rectified flow's parity tables (specs/digits-flow.yaml), NNTile against torch and diffusers.

Run: python tests/benchmarks/flow_parity.py [--steps 20]. Prints
- training: 20 steps of the flow loss on each backend from one initialisation with the same draws: the
  largest relative difference of a step's loss, and the final weights' and EMA's relative error;
- sampling: random weights (every one), the same noise: the largest relative error over the trajectory
  (every latent a model call sees, and the samples) of ditc's Euler (50 steps) and Heun (25 steps) at the
  spec's guidance against diffusers' FlowMatchEulerDiscreteScheduler / FlowMatchHeunDiscreteScheduler
  driving the torch reference, with ditc on torch and on NNTile;
- accumulation: 10 steps at batch 32 x accumulation 2 against batch 64 on NNTile (warm-up 3, cosine,
  clipping at 1), the weights' relative error, next to two identical NNTile runs at batch 64 (its
  run-to-run noise) and torch's accumulation against one batch.
Takes a few minutes on 2 cores.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

from diffusers import FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler  # noqa: E402

from dit_compiler.compiler.build import TORCH_FILE, compile_spec, write_build  # noqa: E402
from dit_compiler.app.backend import load_into, open_backend  # noqa: E402
from dit_compiler.checks.common import group_error, randomize_, rel_error  # noqa: E402
from dit_compiler.compiler.build import load_module  # noqa: E402
from dit_compiler.app.sample import FixedBatch  # noqa: E402
from dit_compiler.app.train import TrainConfig, checkpoints, train  # noqa: E402
from dit_compiler.app.weights import load_checkpoint  # noqa: E402
from dit_compiler.compiler.spec import load_spec  # noqa: E402
from test_flow import diffusers_trajectory, ditc_trajectory  # noqa: E402

SPEC = ROOT / "specs" / "digits-flow.yaml"


def _losses(run: Path) -> np.ndarray:
    return np.array([float(r.split(",")[1]) for r in (run / "metrics.csv").read_text().splitlines()[1:]])


def _weights(run: Path, part: str = "model") -> dict:
    return load_checkpoint(checkpoints(run)[-1])[part]


def _error(a: Path, b: Path, part: str = "model") -> float:
    x, y = _weights(a, part), _weights(b, part)
    return group_error([(x[k].numpy(), y[k].numpy()) for k in y])


def training(tmp: Path, steps: int) -> None:
    spec = load_spec(SPEC)
    runs = {}
    for name in ("nntile", "torch"):
        runs[name] = tmp / f"train-{name}"
        train(spec, runs[name], TrainConfig(**vars(spec.train) | {"steps": steps, "backend": name, "ckpt_every": 0}))
    loss = np.max(np.abs(_losses(runs["nntile"]) / _losses(runs["torch"]) - 1))
    print(f"training, {steps} steps of the flow loss, NNTile vs torch: largest loss difference {loss:.1e}, "
          f"weights {_error(runs['nntile'], runs['torch']):.1e}, EMA {_error(runs['nntile'], runs['torch'], 'ema'):.1e}")


def sampling(tmp: Path) -> None:
    spec = load_spec(SPEC)
    spec = replace(spec, batch=20, tiling=replace(spec.tiling, batch="auto"))   # 10 labels, guided: 20 rows
    build = compile_spec(spec)
    build_dir = write_build(build, tmp)
    module = load_module(build_dir / TORCH_FILE).Model()
    randomize_(module, seed=3)
    weights = {k: v.numpy() for k, v in module.state_dict().items()}
    labels = np.arange(10, dtype=np.int64)
    backends = {name: open_backend(name, build_dir, build.graph, inference=True) for name in ("torch", "nntile")}
    try:
        for backend in backends.values():
            load_into(backend, weights, "random")
        torch_model = FixedBatch(backends["torch"].predict, spec.batch)
        for sampler, scheduler, steps in (("euler", FlowMatchEulerDiscreteScheduler, 50),
                                          ("heun", FlowMatchHeunDiscreteScheduler, 25)):
            for name, backend in backends.items():
                mine, _ = ditc_trajectory(backend, build.graph, labels, sampler, steps, spec.sample.cfg, seed=0)
                noise = np.random.default_rng(0).standard_normal(mine[0].shape)
                theirs, _ = diffusers_trajectory(scheduler(shift=spec.diffusion.shift), torch_model, noise, labels,
                                                 steps, spec.sample.cfg, spec.model.num_classes)
                worst = max(rel_error(a, b) for a, b in zip(mine, theirs))
                print(f"sampling, {sampler} {steps} steps, cfg {spec.sample.cfg}, ditc on {name} vs diffusers' "
                      f"{scheduler.__name__} on torch: trajectory {worst:.1e}, samples {rel_error(mine[-1], theirs[-1]):.1e}")
    finally:
        for backend in backends.values():
            backend.close()


def accumulation(tmp: Path) -> None:
    settings = {"steps": 10, "lr": 1e-3, "warmup_steps": 3, "lr_schedule": "cosine", "grad_clip": 1.0,
                "ckpt_every": 0}
    base = load_spec(SPEC)
    half = replace(base, batch=32, tiling=replace(base.tiling, batch="auto"))
    runs = {}
    for name, spec, backend, acc in (("acc", half, "nntile", 2), ("big", base, "nntile", 1),
                                     ("big2", base, "nntile", 1), ("tacc", half, "torch", 2),
                                     ("tbig", base, "torch", 1)):
        runs[name] = tmp / f"acc-{name}"
        train(spec, runs[name], TrainConfig(backend=backend, accumulation=acc, **settings))
    print(f"accumulation, 10 steps, batch 32 x 2 vs 64: NNTile {_error(runs['acc'], runs['big']):.1e} (two NNTile "
          f"runs at 64: {_error(runs['big2'], runs['big']):.1e}), torch {_error(runs['tacc'], runs['tbig']):.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        sampling(Path(tmp))
        training(Path(tmp), args.steps)
        accumulation(Path(tmp))


if __name__ == "__main__":
    main()
