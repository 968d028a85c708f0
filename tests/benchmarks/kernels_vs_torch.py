"""Benchmark: the kernels of one DiT block where NNTile loses to torch, on the block's own tensors.

Run: python tests/benchmarks/kernels_vs_torch.py [BUILD_DIR] [--ncpus N] (default generated/dit-s-2-b8).
The sizes and tiles come from the build's graph. Each op runs on NNTile as the generated model issues it
(the kernels of `Attention.forward_async`'s softmax and of `Act`, templates/nntile/layers.py.j2, in the
same order) and on torch as the reference runs it, with as many StarPU workers
as torch threads; the two sides' runs interleave, with the StarPU workers paused while torch runs. It
prints the median time of each op on both sides, their ratio and what the op costs per training step
(times the depth). The attention scores' GEMM is there for scale: on GEMMs NNTile and torch are even.
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

from dit_compiler.run.common import load_module

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
    try:  # NNTile's ops as the generated model imports them
        nn = load_module(args.build / "nntile_model.py")
    except ImportError as exc:
        raise SystemExit(f"kernels_vs_torch: NNTile is not importable here ({exc})")

    graph = json.loads((args.build / "graph.json").read_text())
    axes, depth = graph["axes"], graph["attrs"]["depth"]
    size = {name: axis["size"] for name, axis in axes.items()}
    tile = {name: axis["tile"] for name, axis in axes.items()}
    torch.set_num_threads(args.ncpus)
    rng = np.random.default_rng(0)
    next_tag = 0

    def tensor(dims: tuple[str, ...], scale: float = 1.0):
        """An NNTile tensor over these axes, filled with normal values, and the same values in numpy."""
        nonlocal next_tag
        traits = nn.TensorTraits([size[d] for d in dims], [tile[d] for d in dims])
        value = np.asfortranarray(rng.standard_normal(traits.shape, dtype=np.float32) * scale)
        out = nn.Tensor_fp32(traits, [0] * traits.grid.nelems, next_tag)
        next_tag += traits.grid.nelems
        out.from_array(value)
        return out, value

    rows = []
    with nn.nntile_runtime(args.ncpus):
        wait, starpu = nn.wait_for_all, nn.nntile.starpu
        # [head_dim, tokens, batch, heads] as the generated attention keeps Q and K; scores [keys, queries, batch, heads]
        q, q_np = tensor(("head_dim", "tokens", "batch", "heads"))
        k, k_np = tensor(("head_dim", "tokens", "batch", "heads"))
        scores, scores_np = tensor(("tokens", "tokens", "batch", "heads"), 3.0)
        stat = nn.TensorTraits([2, size["tokens"], size["batch"], size["heads"]],
                               [2, tile["tokens"], tile["batch"], tile["heads"]])
        maxsumexp = nn.Tensor_fp32(stat, [0] * stat.grid.nelems, next_tag)
        next_tag += stat.grid.nelems
        x, x_np = tensor(("mlp", "tokens", "batch"))
        dy, dy_np = tensor(("mlp", "tokens", "batch"))
        y, _ = tensor(("mlp", "tokens", "batch"))
        dx, _ = tensor(("mlp", "tokens", "batch"))
        scale = 1.0 / np.sqrt(size["head_dim"])

        def softmax() -> None:
            nn.clear_async(maxsumexp)
            nn.maxsumexp_async(scores, maxsumexp, 0)
            nn.softmax_inplace_async(maxsumexp, 1.0, scores, 0)

        def gelu_forward() -> None:
            nn.copy_async(x, y)
            nn.gelutanh_inplace_async(y)

        def gelu_backward() -> None:
            nn.scal_async(0.0, dy, dx)
            nn.gelutanh_backward_async(x, dy, dx)

        # torch's layouts: the same memory read row-major. Its ops write into preallocated outputs, as
        # NNTile's do, so that neither side's time includes allocating
        qt, kt = (torch.from_numpy(np.ascontiguousarray(a.transpose(2, 3, 1, 0))) for a in (q_np, k_np))
        st = torch.from_numpy(np.ascontiguousarray(scores_np.transpose(2, 3, 1, 0)))
        xt, dyt = (torch.from_numpy(np.ascontiguousarray(a.T)) for a in (x_np, dy_np))
        st_out, xt_out = torch.empty_like(st), torch.empty_like(xt)
        qt3, kt3, st_out3 = (a.view(-1, *a.shape[-2:]) for a in (qt, kt, st_out))  # one GEMM per (batch, head)
        aten = torch.ops.aten
        ops = [
            ("attention scores K^T Q (GEMM)", lambda: nn.gemm_async(scale, nn.trans, k, nn.notrans, q, 0.0, scores, 1, 2),
             lambda: torch.baddbmm(st_out3, qt3, kt3.transpose(1, 2), beta=0.0, alpha=scale, out=st_out3)),
            ("attention softmax", softmax, lambda: aten._softmax.out(st, -1, False, out=st_out)),
            ("GELU-tanh forward", gelu_forward, lambda: aten.gelu.out(xt, approximate="tanh", out=xt_out)),
            ("GELU-tanh backward", gelu_backward,
             lambda: aten.gelu_backward.grad_input(dyt, xt, approximate="tanh", grad_input=xt_out)),
        ]
        for name, nntile_op, torch_op in ops:
            nntile_op()
            wait()
            starpu.pause()  # StarPU counts pauses: every resume below follows a pause

            def on_nntile(op=nntile_op) -> float:
                starpu.resume()
                seconds = timed(op, wait)
                starpu.pause()
                return seconds

            torch_op()
            sides = [([], on_nntile), ([], lambda op=torch_op: timed(op))]
            for i in range(SAMPLES):
                for times, run in (sides if i % 2 == 0 else sides[::-1]):
                    times.append(run())
            rows.append((name, *(statistics.median(times) for times, _ in sides)))
            starpu.resume()
        for t in (q, k, scores, maxsumexp, x, dy, y, dx):
            t.unregister()

    print(f"{args.build.name}: one block's tensors, {args.ncpus} StarPU workers against {args.ncpus} torch "
          f"threads, per call: median of {SAMPLES} interleaved samples of {CALLS} calls")
    print(f"{'op':32s} {'NNTile ms':>10s} {'torch ms':>10s} {'ratio':>7s} {'NNTile-torch per step':>22s}")
    for name, mine, theirs in rows:
        print(f"{name:32s} {mine * 1e3:10.2f} {theirs * 1e3:10.2f} {mine / theirs:7.2f} "
              f"{(mine - theirs) * depth:20.3f} s")


if __name__ == "__main__":
    main()
