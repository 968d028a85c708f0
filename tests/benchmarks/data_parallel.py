"""Benchmark: the cost of averaging gradients in data-parallel training on NNTile, and a speed-up model.

Run: python tests/benchmarks/data_parallel.py [--presets DiT-S/2,DiT-B/2] [--batch 2] [--steps 3]
[--bandwidth-gbps 10,100] [--latency-us 50] [--compute-scale 1]

For each preset, builds it at the per-rank compiled batch and starts 2 ranks on this machine (`ditc train
--nproc 2`'s launcher: gloo on loopback, one share of the cores each). Each rank runs training steps of
the NNTile backend with random weights and inputs (forward; backward with the bucketed all-reduce
overlapping its tail; AdamW; EMA), then the all-reduce of the same buckets alone. Rank 0 reports medians:

- step: the whole training step, communication included;
- all-reduce alone: the gradient all-reduce with nothing else running (its cost if nothing overlapped);
- wait and write: the time the step spent, after backward's last gradient was read, waiting for the
  all-reduce and writing the means back into NNTile's gradients: what overlap did not hide (exposed);
- the loopback bus bandwidth, 2 (N-1)/N * gradient bytes / all-reduce time, as NCCL's tests count it.

Then the model: a ring all-reduce moves 2 (N-1)/N of the gradient bytes (`totals(graph).param_bytes`)
through each rank's link, plus 2 (N-1) latencies per bucket: T_ar(N) = 2 (N-1)/N * bytes / bandwidth +
2 (N-1) * buckets * latency. With T the step's compute (step minus exposed communication, here) and
T_b its backward, weak scaling (the global batch grows with N) gives N * T / (T + T_ar) images per step
time of one process without overlap, and N * T / (T + max(0, T_ar - T_b)) when all communication but
what outlasts backward is hidden. The script prints both for N = 2, 8 and 64; `--compute-scale K` models
ranks K times faster than a share of this machine (T and T_b divided by K).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from dit_compiler.compiler.build import SPEC_FILE, compile_spec, graph_of, write_build  # noqa: E402
from dit_compiler.app.data import ImageShape  # noqa: E402
from dit_compiler.compiler.graph.cost import totals  # noqa: E402
from dit_compiler.app.distributed import BUCKET_BYTES  # noqa: E402
from dit_compiler.compiler.spec import load_spec, load_spec_data  # noqa: E402

RANKS = (2, 8, 64)


def rank_main(build_dir: Path, steps: int, out: Path) -> None:
    """One rank: training steps with the averaged gradients, then the all-reduce alone."""
    import torch
    import torch.distributed as dist

    from dit_compiler.compiler.build import TORCH_FILE
    from dit_compiler.compiler.targets.base import OptimConfig
    from dit_compiler.checks.common import randomize_
    from dit_compiler.compiler.build import load_module
    from dit_compiler.app.distributed import joined, world_from_env
    from dit_compiler.app.weights import to_numpy
    from dit_compiler.compiler.targets.nntile_1_1.backend import NNTileBackend
    from dit_compiler.compiler.targets.nntile_1_1.runtime import wait_for_all

    world = world_from_env()
    graph = graph_of(load_spec(build_dir / SPEC_FILE))
    with joined(world, 600):
        reference = load_module(build_dir / TORCH_FILE).Model()
        randomize_(reference, 0)
        backend = NNTileBackend(build_dir, graph, OptimConfig(), world=world)
        try:
            backend.load(to_numpy(reference.state_dict()))
            del reference
            rng = np.random.default_rng(world.rank)
            shape = ImageShape.of_graph(graph)
            x = rng.standard_normal((backend.batch, shape.channels, shape.size, shape.size)).astype(np.float32)
            t = rng.integers(0, 1000, backend.batch).astype(np.float32)
            y = rng.integers(0, shape.num_classes, backend.batch)
            rows = []
            for _ in range(steps + 1):   # the first warms up
                began = time.perf_counter()
                output = backend.forward(x, t, y)
                forwarded = time.perf_counter()
                backend.backward(rng.standard_normal(output.shape).astype(np.float32) / output.size)
                backed = time.perf_counter()
                backend.step()
                backend.ema_update(0.9999)
                wait_for_all()
                dist.barrier()
                rows.append({"step_s": time.perf_counter() - began, "forward_s": forwarded - began,
                             "backward_s": backed - forwarded,
                             **backend.buckets.last})
            alone = []
            for _ in range(steps):
                tensors = [torch.from_numpy(b) for b in backend.buckets.buffers]
                dist.barrier()
                began = time.perf_counter()
                for work in [dist.all_reduce(b, async_op=True) for b in tensors]:
                    work.wait()
                alone.append(time.perf_counter() - began)
            if world.lead:
                medians = {k: statistics.median(r[k] for r in rows[1:]) for k in rows[0]}
                out.write_text(json.dumps(medians | {"allreduce_alone_s": statistics.median(alone),
                                                     "buckets": len(backend.buckets.buffers),
                                                     "gradient_bytes": backend.buckets.nbytes}))
        finally:
            backend.close()


def measure(preset: str, batch: int, steps: int, tmp: Path) -> dict:
    from dit_compiler.app.launch import launch

    spec = load_spec_data({"preset": preset, "batch": batch, "name": preset.lower().replace("/", "-") + f"-b{batch}"},
                          source=preset)
    build = compile_spec(spec)
    build_dir = write_build(build, tmp)
    out = tmp / f"{spec.name}.json"
    code = launch([sys.executable, __file__, "--rank-of", str(build_dir), "--steps", str(steps), "--out", str(out)], 2)
    if code:
        raise SystemExit(f"{preset}: a rank failed (exit {code})")
    tot = totals(build.graph)
    return json.loads(out.read_text()) | {"preset": preset, "batch": batch, "params": tot.params,
                                           "param_bytes": tot.param_bytes}


def model(r: dict, n: int, gbps: float, latency_us: float) -> tuple[float, float, float]:
    """T_ar(N) and the speed-up without and with overlap (see the module docstring)."""
    buckets = max(1, -(-r["param_bytes"] // BUCKET_BYTES))
    t_ar = 2 * (n - 1) / n * r["param_bytes"] / (gbps * 1e9 / 8) + 2 * (n - 1) * buckets * latency_us * 1e-6
    compute = r["compute_s"]
    return t_ar, n * compute / (compute + t_ar), n * compute / (compute + max(0.0, t_ar - r["backward_s"]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", default="DiT-S/2,DiT-B/2")
    p.add_argument("--batch", type=int, default=2, help="compiled batch of each rank (default 2)")
    p.add_argument("--steps", type=int, default=3, help="measured steps after one warm-up (default 3)")
    p.add_argument("--bandwidth-gbps", default="10,100", help="network bandwidths of the model, Gbit/s")
    p.add_argument("--latency-us", type=float, default=50.0, help="per-message latency of the model (default 50)")
    p.add_argument("--compute-scale", type=float, default=1.0,
                   help="model ranks this many times faster than one share of this machine (default 1)")
    p.add_argument("--rank-of", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.rank_of:
        return rank_main(args.rank_of, args.steps, args.out)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets.split(","):
            print(f"[data_parallel] {preset}: 2 ranks, batch {args.batch} each, {args.steps} steps", flush=True)
            results.append(measure(preset, args.batch, args.steps, Path(tmp)))
    print(f"\n{'preset':8} {'params':>7} {'grad MiB':>8} {'buckets':>7} {'step s':>7} {'fwd s':>6} {'bwd s':>6} "
          f"{'all-reduce s':>12} {'wait s':>7} {'write s':>7} {'exposed/step':>12} {'loopback GB/s':>13}")
    for r in results:
        r["exposed_s"] = r["wait_s"] + r["write_s"]
        bus = r["param_bytes"] / r["allreduce_alone_s"] / 1e9   # 2 (N-1)/N = 1 at N = 2
        print(f"{r['preset']:8} {r['params'] / 1e6:6.1f}M {r['param_bytes'] / 2**20:8.0f} {r['buckets']:7d} "
              f"{r['step_s']:7.2f} {r['forward_s']:6.2f} {r['backward_s']:6.2f} {r['allreduce_alone_s']:12.3f} "
              f"{r['wait_s']:7.3f} {r['write_s']:7.3f} {r['exposed_s'] / r['step_s']:11.1%} {bus:13.2f}")
    print(f"\nspeed-up model (weak scaling, ring all-reduce, {args.latency_us:g} us a message; compute per rank "
          f"{'as measured here' if args.compute_scale == 1 else f'{args.compute_scale:g} times faster than here'}): "
          "images/s over one process's, without overlap .. with overlap behind backward")
    for r in results:
        r["compute_s"] = (r["step_s"] - r["exposed_s"]) / args.compute_scale
        r["backward_s"] /= args.compute_scale
    for gbps in (float(v) for v in args.bandwidth_gbps.split(",")):
        for r in results:
            cells = []
            for n in RANKS:
                t_ar, lo, hi = model(r, n, gbps, args.latency_us)
                cells.append(f"N={n}: T_ar {t_ar:.3f} s, {lo:.1f}..{hi:.1f}x")
            print(f"{gbps:5g} Gbit/s {r['preset']:8} " + "; ".join(cells))


if __name__ == "__main__":
    main()
