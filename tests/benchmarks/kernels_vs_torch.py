"""Benchmark: the kernels of one DiT block where NNTile loses to torch, on the block's own tensors:
NNTile 1.1.0's kernels, ditc's own (the NNTile target's native extension) and torch's.

Run: python tests/benchmarks/kernels_vs_torch.py [BUILD_DIR] [--ncpus N] (default generated/dit-s-2-b8, which
`ditc build specs/dit-s-2-b8.yaml` writes).
The sizes and tiles come from the build's graph. Each op runs as the target's layers issue it
(`Attention`'s softmax and its backward, `Act`'s GELU-tanh, in `dit_compiler/targets/nntile_1_1/layers.py`):
with NNTile's kernels, with ditc's (where the extension builds here) and on torch as the reference runs
it, with as many StarPU workers as torch threads; the sides' runs interleave, the side going first
rotating, with the StarPU workers paused while torch runs. The softmax runs on the build's tiling (keys
in several tiles: one ditc task takes all the key tiles of a query tile) and once more with the keys in
one tile. It prints the median time of each op per side, the ratios to torch, and what
the op costs per training step beyond torch's (times the depth) with the faster NNTile-side kernels.
The attention scores' GEMM is there for scale.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
#: Samples per side, and calls per sample (back to back: one wait, on NNTile, per sample).
SAMPLES, CALLS = 10, 5


def timed(fn: Callable[[], None], wait: Callable[[], None] = lambda: None) -> float:
    """Seconds per call of `fn`, over CALLS calls in a row."""
    start = time.perf_counter()
    for _ in range(CALLS):
        fn()
    wait()
    return (time.perf_counter() - start) / CALLS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("build", nargs="?", type=Path, default=ROOT / "generated" / "dit-s-2-b8")
    parser.add_argument("--ncpus", type=int, default=int(os.environ.get("STARPU_NCPU", os.cpu_count() or 1)))
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("STARPU_SILENT", "1")
    from dit_compiler.compiler.targets.nntile_1_1 import native, nntile_runtime, pause, problem, resume, wait_for_all
    from dit_compiler.compiler.targets.nntile_1_1 import kernels as nt
    from dit_compiler.compiler.targets.nntile_1_1.alloc import Allocator

    if why := problem():
        raise SystemExit(f"kernels_vs_torch: {why}")
    ext_problem = native.problem()
    ext = None if ext_problem else native.load()

    if not (args.build / "graph.json").is_file():
        raise SystemExit(f"kernels_vs_torch: {args.build} holds no build; `ditc build` its spec first")
    graph = json.loads((args.build / "graph.json").read_text())
    axes, depth = graph["axes"], graph["spec"]["model"]["depth"]
    size = {name: axis["size"] for name, axis in axes.items()}
    tile = {name: axis["tile"] for name, axis in axes.items()}
    torch.set_num_threads(args.ncpus)
    rng = np.random.default_rng(0)

    rows = []
    with nntile_runtime(args.ncpus):
        alloc, made = Allocator(), []

        def tensor(dims: tuple[str | int, ...], scale: float = 1.0, whole: tuple[int, ...] = ()):
            """An NNTile tensor over these axes (those in `whole` in one tile), filled with normal values,
            and the same values in numpy."""
            shape = [d if isinstance(d, int) else size[d] for d in dims]
            tiles = [s if isinstance(d, int) or i in whole else tile[d] for i, (d, s) in enumerate(zip(dims, shape))]
            value = np.asfortranarray(rng.standard_normal(shape, dtype=np.float32) * scale)
            made.append(alloc.new(shape, tiles))
            made[-1].from_array(value)
            return made[-1], value

        # [head_dim, tokens, batch, heads] as the attention layer keeps Q and K; scores [keys, queries, batch, heads]
        scores_dims = ("tokens", "tokens", "batch", "heads")
        q, q_np = tensor(("head_dim", "tokens", "batch", "heads"))
        k, k_np = tensor(("head_dim", "tokens", "batch", "heads"))
        scores, scores_np = tensor(scores_dims, 3.0)
        stats, _ = tensor((2, "tokens", "batch", "heads"))         # NNTile's softmax's (max, sum) pairs
        scores1, _ = tensor(scores_dims, 3.0, whole=(0,))         # keys in one tile
        # softmax backward runs in place, d = p * (d - sum), again and again: with p = 1 and sum = 0 the
        # values stay put (no denormals creep in) and the arithmetic is the same
        probs, probs_np = tensor(scores_dims, 0.0)
        nt.fill_async(1.0, probs)
        probs_np = probs_np + 1.0
        d_scores, d_np = tensor(scores_dims)
        sumprod, _ = tensor(("tokens", "batch", "heads"), 0.0)
        x, x_np = tensor(("mlp", "tokens", "batch"))
        dy, dy_np = tensor(("mlp", "tokens", "batch"))
        y, _ = tensor(("mlp", "tokens", "batch"))
        dx, _ = tensor(("mlp", "tokens", "batch"))
        scale = 1.0 / np.sqrt(size["head_dim"])

        def nntile_softmax(s, st) -> Callable[[], None]:
            def run() -> None:
                nt.clear_async(st)
                nt.maxsumexp_async(s, st, 0)
                nt.softmax_inplace_async(st, 1.0, s, 0)
            return run

        def nntile_softmax_backward() -> None:
            nt.add_slice_async(-1.0, sumprod, 1.0, d_scores, 0)
            nt.prod_async(probs, d_scores)

        def nntile_gelu() -> None:
            nt.copy_async(x, y)
            nt.gelutanh_inplace_async(y)

        def nntile_gelu_backward() -> None:
            nt.scal_async(0.0, dy, dx)
            nt.gelutanh_backward_async(x, dy, dx)

        # torch's layouts: the same memory read row-major. Its ops write into preallocated outputs, as
        # NNTile's do, so that neither side's time includes allocating
        def rowmajor(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(a.transpose(*range(a.ndim - 1, -1, -1))))

        qt, kt, st, pt, dt, xt, dyt = map(rowmajor, (q_np, k_np, scores_np, probs_np, d_np, x_np, dy_np))
        st_out, xt_out = torch.empty_like(st), torch.empty_like(xt)
        qt3, kt3, st_out3 = (a.view(-1, *a.shape[-2:]) for a in (qt, kt, st_out))  # one GEMM per (batch, head)
        aten = torch.ops.aten
        ops = [  # name, NNTile's, ditc's (None: NNTile's kernel is the one the layer runs), torch's
            ("attention scores K^T Q (GEMM)", lambda: nt.gemm_async(scale, nt.trans, k, nt.notrans, q, 0.0, scores, 1, 2),
             None, lambda: torch.baddbmm(st_out3, qt3, kt3.transpose(1, 2), beta=0.0, alpha=scale, out=st_out3)),
            ("attention softmax", nntile_softmax(scores, stats), ext and (lambda: ext.softmax_async(scores)),
             lambda: aten._softmax.out(st, -1, False, out=st_out)),
            ("  the same, keys in one tile", nntile_softmax(scores1, stats),
             ext and (lambda: ext.softmax_async(scores1)), lambda: aten._softmax.out(st, -1, False, out=st_out)),
            ("attention softmax backward", nntile_softmax_backward,
             ext and (lambda: ext.softmax_backward_async(probs, sumprod, d_scores)),
             lambda: aten._softmax_backward_data.out(dt, pt, -1, torch.float32, grad_input=st_out)),
            ("GELU-tanh forward", nntile_gelu, ext and (lambda: ext.gelutanh_async(x, y)),
             lambda: aten.gelu.out(xt, approximate="tanh", out=xt_out)),
            ("GELU-tanh backward", nntile_gelu_backward, ext and (lambda: ext.gelutanh_backward_async(x, dy, 0.0, dx)),
             lambda: aten.gelu_backward.grad_input(dyt, xt, approximate="tanh", grad_input=xt_out)),
        ]
        def on_nntile(op) -> float:
            resume()
            seconds = timed(op, wait_for_all)
            pause()
            return seconds

        wait_for_all()
        pause()  # StarPU counts pauses: every resume below follows a pause
        for name, nntile_op, ditc_op, torch_op in ops:
            sides = [([], lambda op=op: on_nntile(op)) for op in (nntile_op, ditc_op) if op]
            sides.append(([], lambda: timed(torch_op)))
            for _, run in sides:  # warm up
                run()
            for i in range(SAMPLES):
                for times, run in sides[i % len(sides):] + sides[:i % len(sides)]:
                    times.append(run())
            medians = [statistics.median(times) for times, _ in sides]
            rows.append((name, medians[0], medians[1] if ditc_op else None, medians[-1]))
        resume()
        for t in made:
            t.unregister()
        alloc.unregister()

    print(f"{args.build.name}: one block's tensors, {args.ncpus} StarPU workers against {args.ncpus} torch "
          f"threads, per call: median of {SAMPLES} interleaved samples of {CALLS} calls")
    print("ditc's kernels: " + (f"unavailable ({ext_problem})" if ext_problem else "built"))
    print(f"{'op':32s} {'NNTile ms':>10s} {'ditc ms':>8s} {'torch ms':>9s} {'NNTile/torch':>13s} {'ditc/torch':>11s} "
          f"{'over torch per step':>20s}")
    for name, theirs_nntile, ours, torch_s in rows:
        best = min(t for t in (theirs_nntile, ours) if t is not None)
        ditc_cells = ((f"{ours * 1e3:8.2f}", f"{ours / torch_s:11.2f}") if ours is not None
                      else (f"{'-':>8s}", f"{'-':>11s}"))
        print(f"{name:32s} {theirs_nntile * 1e3:10.2f} {ditc_cells[0]} {torch_s * 1e3:9.2f} "
              f"{theirs_nntile / torch_s:13.2f} {ditc_cells[1]} {(best - torch_s) * depth:18.3f} s")


if __name__ == "__main__":
    main()
