"""Benchmark: DiT-S/2 at batch 2, forward and backward on NNTile and torch, side by side.

Run: python tests/benchmarks/dit_s2_batch2.py. Builds DiT-S/2 at batch 2 (auto tiling) into a temporary
folder, checks NNTile against torch once (`ditc verify`'s comparison), then times both with `ditc bench`
(each side in its own process: median time and peak RSS).
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from dit_compiler.compiler.build import compile_spec, write_build
from dit_compiler.checks.bench import bench, format_bench
from dit_compiler.checks.verify import format_report, verify
from dit_compiler.compiler.spec import load_spec_data

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    spec = load_spec_data({"preset": "DiT-S/2", "name": "dit-s-2-batch2", "batch": 2}, source="dit-s-2-batch2")
    with tempfile.TemporaryDirectory() as out:
        built = compile_spec(spec)
        folder = write_build(built, out)
        print(format_report(verify(built.graph, folder, oracle=False, progress=lambda line: print(f"[verify] {line}"))))
        print(format_bench(bench(built.graph, folder, ncpus=2, warmup=1, repeats=3,
                                 progress=lambda line: print(f"[bench] {line}"))))


if __name__ == "__main__":
    main()
