"""Knowing the BLAS NNTile's GEMMs run on: which library and OpenBLAS core, the advice where the core is
below the CPU, the checked opt-in to another core, and how `ditc bench` explains a slow GEMM."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import ROOT, needs_nntile
from dit_compiler.build import compile_spec
from dit_compiler.errors import UsageError
from dit_compiler.graph.cost import largest_tile_gemm
from dit_compiler.run.bench import BenchReport, SideResult, format_bench
from dit_compiler.spec import load_spec
from dit_compiler.targets.nntile_1_1 import blas


def openblas_or_skip() -> blas.Blas:
    found = blas.nntile_blas()
    if found is None or found.vendor != "OpenBLAS":
        pytest.skip(f"NNTile's BLAS here is {found.describe() if found else 'not found'}, not OpenBLAS")
    return found


@pytest.fixture
def avx512_intel(monkeypatch):
    monkeypatch.setattr(blas, "cpu", lambda: ("AVX-512", "GenuineIntel"))
    monkeypatch.delenv("OPENBLAS_CORETYPE", raising=False)


def test_a_generic_core_on_an_avx512_cpu_gets_the_fix(avx512_intel, monkeypatch):
    slow = blas.Blas("/usr/lib/libopenblas.so.0", "OpenBLAS", "OpenBLAS 0.3.21", "Prescott")
    text = blas.advice(slow)
    assert "runs its generic Prescott core (SSE) on a CPU with AVX-512, as it does not recognise this CPU" in text
    assert "Fix: --blas-core SkylakeX (or DITC_BLAS_CORE=SkylakeX)" in text
    monkeypatch.setenv("OPENBLAS_CORETYPE", "Haswell")
    text = blas.advice(blas.Blas("/usr/lib/libopenblas.so.0", "OpenBLAS", "OpenBLAS 0.3.21", "Haswell"))
    assert "runs its Haswell core (AVX2) on a CPU with AVX-512, because OPENBLAS_CORETYPE=Haswell is set" in text


def test_no_advice_where_the_core_fits_the_cpu_or_the_blas_is_not_openblas(avx512_intel, monkeypatch):
    assert blas.advice(blas.Blas("x.so", "OpenBLAS", "OpenBLAS 0.3.21", "SkylakeX")) is None
    assert blas.advice(blas.Blas("x.so", "MKL", "Intel MKL 2024", None)) is None
    assert blas.advice(None) is None
    monkeypatch.setattr(blas, "cpu", lambda: ("AVX2", "AuthenticAMD"))
    assert blas.advice(blas.Blas("x.so", "OpenBLAS", "OpenBLAS 0.3.21", "Zen")) is None
    assert "--blas-core Zen" in blas.advice(blas.Blas("x.so", "OpenBLAS", "OpenBLAS 0.3.21", "Core2"))


@needs_nntile
def test_the_blas_found_is_the_one_nntile_links_not_numpys():
    """numpy bundles an OpenBLAS of its own; the symbols are looked up through NNTile's module."""
    import numpy

    found = blas.nntile_blas()
    assert found is not None and os.path.isfile(found.library)
    assert not found.library.startswith(os.path.dirname(os.path.dirname(numpy.__file__)) + "/numpy")
    with open("/proc/self/maps") as maps:
        assert found.library in maps.read()


@needs_nntile
def test_a_core_is_checked_in_a_subprocess_before_use():
    openblas_or_skip()
    assert blas.check_core("Prescott") is None   # every x86-64 OpenBLAS has it, and it computes right
    why = blas.check_core("NoSuchCore")
    assert "OpenBLAS ran its" in why and "may not know NoSuchCore" in why


@needs_nntile
def test_the_requested_core_is_applied_only_before_nntile_loads(monkeypatch, capsys):
    openblas_or_skip()
    monkeypatch.setenv(blas.ENV, "NoSuchCore")
    with pytest.raises(UsageError, match="DITC_BLAS_CORE=NoSuchCore: NNTile is loaded already"):
        blas.apply_requested_core()   # this process has loaded NNTile already: refused, never half-applied
    monkeypatch.delenv("OPENBLAS_CORETYPE", raising=False)
    monkeypatch.delitem(sys.modules, "nntile")
    with pytest.raises(UsageError, match="core NoSuchCore not applied: OpenBLAS ran its"):
        blas.apply_requested_core()
    assert "OPENBLAS_CORETYPE" not in os.environ
    with pytest.raises(UsageError, match="--blas-core NoSuchCore: core NoSuchCore not applied: .*; allowed: auto, "
                                         "or an OpenBLAS core such as skylakex, cooperlake"):
        blas.apply_requested_core("--blas-core")   # the flag that set the variable is named
    monkeypatch.setenv(blas.ENV, "Prescott")
    assert blas.apply_requested_core() == "Prescott" and os.environ["OPENBLAS_CORETYPE"] == "Prescott"
    assert "NNTile's OpenBLAS runs its Prescott core (OPENBLAS_CORETYPE=Prescott)" in capsys.readouterr().err


@needs_nntile
def test_the_runtime_applies_the_requested_core_before_loading_nntile():
    openblas_or_skip()
    env = os.environ | {blas.ENV: "Prescott", "PYTHONPATH": str(ROOT)}
    env.pop("OPENBLAS_CORETYPE", None)
    code = ("from dit_compiler.targets.nntile_1_1 import blas, problem\n"
            "assert problem() is None\nprint(blas.nntile_blas().core)")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-1] == "Prescott"


def test_bench_times_the_tile_gemm_of_the_largest_linear():
    """DiT-S/2 at batch 8: the MLP's first layer, W [768 of 1536, 384] x X [384, 128 tokens x 4 images]."""
    graph = compile_spec(load_spec(ROOT / "specs" / "dit-s-2-b8.yaml")).graph
    assert largest_tile_gemm(graph) == (768, 512, 384)


def _report(nntile_gflops: float, advice: str) -> BenchReport:
    def side(name: str, gflops: float, **more) -> SideResult:
        return SideResult(name, 2, [1.0], [2.0], 100.0, {}, gemm_gflops=gflops, blas=f"{name}'s BLAS", **more)

    return BenchReport("dit-s-2-b8", 8, 2, 1, 1, {
        "nntile": side("nntile", nntile_gflops, kernels="ditc's kernels", blas_advice=advice),
        "torch": side("torch", 84.0)}, gemm=(768, 512, 384))


def test_bench_explains_a_gemm_below_half_of_torchs():
    printed = format_bench(_report(15.0, "NNTile's OpenBLAS runs its generic Prescott core"))
    assert "GEMM            15.0 GFLOP/s on one core, 768x512x384 (m x n x k), nntile's BLAS" in printed
    assert ("NNTile's GEMM runs at 15.0 GFLOP/s, below half of torch's 84.0: NNTile's OpenBLAS runs its generic "
            "Prescott core") in printed
    assert "is slower than torch's on this shape" in format_bench(_report(15.0, ""))
    assert "below half" not in format_bench(_report(60.0, "a core below the CPU"))
    assert "note: a core below the CPU" in format_bench(_report(60.0, "a core below the CPU"))
