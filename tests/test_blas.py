"""Knowing the BLAS NNTile's GEMMs run on: which library and OpenBLAS core, the advice where the core is
below the CPU, the checked opt-in to another core, the checked core applied by default where the
library's is below the CPU (and its cache), and how `ditc bench` explains a slow GEMM."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest

from conftest import ROOT, needs_nntile
from dit_compiler.compiler.build import compile_spec
from dit_compiler.errors import UsageError
from dit_compiler.compiler.graph.cost import largest_tile_gemm
from dit_compiler.checks import bench
from dit_compiler.checks.bench import BenchReport, SideResult, format_bench
from dit_compiler.compiler.spec import load_spec
from dit_compiler.compiler.targets.nntile_1_1 import blas


#: /proc/cpuinfo lines of real CPUs: this project's AMD EPYC (family 25, AVX2, no AVX-512), and an Intel
#: Xeon Platinum 8124M (Skylake-SP, AVX-512) of an AWS c5 instance.
EPYC_AVX2 = """vendor_id\t: AuthenticAMD
cpu family\t: 25
model name\t: AMD EPYC
flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ht \
syscall nx mmxext fxsr_opt pdpe1gb rdtscp lm constant_tsc rep_good nopl xtopology nonstop_tsc cpuid extd_apicid \
tsc_known_freq pni pclmulqdq ssse3 fma cx16 pcid sse4_1 sse4_2 x2apic movbe popcnt tsc_deadline_timer aes xsave avx \
f16c rdrand hypervisor lahf_lm cmp_legacy cr8_legacy abm sse4a misalignsse 3dnowprefetch osvw topoext cpuid_fault \
vmmcall fsgsbase tsc_adjust bmi1 avx2 smep bmi2 erms invpcid rdseed adx smap clflushopt clwb sha_ni xsaveopt xsavec \
xgetbv1 xsaves clzero xsaveerptr arat umip vaes vpclmulqdq rdpid fsrm
"""
XEON_AVX512 = """vendor_id\t: GenuineIntel
cpu family\t: 6
model name\t: Intel(R) Xeon(R) Platinum 8124M CPU @ 3.00GHz
flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ss ht \
syscall nx pdpe1gb rdtscp lm constant_tsc rep_good nopl xtopology nonstop_tsc cpuid aperfmperf tsc_known_freq pni \
pclmulqdq ssse3 fma cx16 pcid sse4_1 sse4_2 x2apic movbe popcnt tsc_deadline_timer aes xsave avx f16c rdrand \
hypervisor lahf_lm abm 3dnowprefetch invpcid_single pti fsgsbase tsc_adjust bmi1 hle avx2 smep bmi2 erms invpcid \
rtm mpx avx512f avx512dq rdseed adx smap clflushopt clwb avx512cd avx512bw avx512vl xsaveopt xsavec xgetbv1 xsaves \
ida arat pku ospke
"""


def test_the_cores_tried_instead_of_the_librarys_are_those_above_it_within_the_cpu():
    """The decision `apply_requested_core` makes by default, on the cores Debian's OpenBLAS 0.3.21 reports."""
    epyc, xeon = blas.cpu(blas.cpuinfo(EPYC_AVX2)), blas.cpu(blas.cpuinfo(XEON_AVX512))
    assert epyc == ("AVX2", "AuthenticAMD") and xeon == ("AVX-512", "GenuineIntel")
    # the Xeon of the issue: OpenBLAS did not know it and ran Prescott; AVX-512 first, then AVX2, then AVX
    assert blas.candidates("Prescott", *xeon) == ["SkylakeX", "Cooperlake", "Haswell", "Zen", "SandyBridge"]
    assert blas.candidates("Haswell", *xeon) == ["SkylakeX", "Cooperlake"]   # AVX2 on an AVX-512 CPU
    assert blas.candidates("SkylakeX", *xeon) == blas.candidates("Cooperlake", *xeon) == []
    # this EPYC: OpenBLAS picks Zen (the library's choice is kept); a generic core gets Zen first on AMD
    assert blas.candidates("Zen", *epyc) == blas.candidates("Haswell", *epyc) == []
    assert blas.candidates("Core2", *epyc) == blas.candidates("Prescott", *epyc) == ["Zen", "Haswell", "SandyBridge"]
    assert blas.candidates("SkylakeX", *epyc) == []   # above the CPU: nothing better to try
    assert blas.suggested_core(*xeon) == "SkylakeX" and blas.suggested_core(*epyc) == "Zen"
    assert blas.suggested_core("AVX2", "GenuineIntel") == "Haswell" and blas.suggested_core("SSE", "") is None


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
    monkeypatch.setenv("OPENBLAS_CORETYPE", "")   # recorded, so that what the test applies is undone
    monkeypatch.delenv("OPENBLAS_CORETYPE")
    monkeypatch.delitem(sys.modules, "nntile")
    with pytest.raises(UsageError, match="core NoSuchCore not applied: OpenBLAS ran its"):
        blas.apply_requested_core()
    assert "OPENBLAS_CORETYPE" not in os.environ
    with pytest.raises(UsageError, match="--blas-core NoSuchCore: core NoSuchCore not applied: .*; allowed: auto, none, "
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
    code = ("from dit_compiler.compiler.targets.nntile_1_1 import blas, problem\n"
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


def _without_blas_variables(**more: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", blas.ENV, blas.TEST_LIBRARY_CORE)}
    return env | {"PYTHONPATH": str(ROOT)} | more


#: In a fresh process: apply the default (`problem` does, as every NNTile command does), then print
#: OPENBLAS_CORETYPE and the core NNTile's OpenBLAS runs.
APPLY_AND_LOAD = ("import os, sys\nfrom dit_compiler.compiler.targets.nntile_1_1 import blas, problem\n"
                  "if len(sys.argv) > 1: import subprocess; subprocess.run = None   # no subprocess may run\n"
                  "assert problem() is None\nprint(os.environ.get('OPENBLAS_CORETYPE'), blas.nntile_blas().core)")


def _apply_and_load(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-c", APPLY_AND_LOAD, *args], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    return result


@needs_nntile
def test_a_core_below_the_cpu_is_replaced_by_default_with_the_best_checked_one(tmp_path):
    """End to end: the library's pick made generic by the documented test hook (OpenBLAS picks a core of this
    CPU here), then everything real: the probe, the checks, OPENBLAS_CORETYPE, NNTile loading that core."""
    openblas_or_skip()
    isa, vendor = blas.cpu()
    if isa == "SSE":
        pytest.skip("this CPU has no vector instructions above a generic core's")
    env = _without_blas_variables(DITC_CACHE_DIR=str(tmp_path), **{blas.TEST_LIBRARY_CORE: "Prescott"})
    first = _apply_and_load(env)
    core = first.stdout.split()[-1]
    assert core in blas.candidates("Prescott", isa, vendor) and first.stdout.split() == [core, core]
    line = (f"ditc: NNTile's OpenBLAS picks its Prescott core (SSE) on this {isa} CPU; running its {core} core "
            "instead, its GEMMs checked against float64")
    assert first.stderr.count("ditc: ") == 1 and line in first.stderr and "(--blas-core none keeps Prescott)" in first.stderr
    # cached: the next run starts no subprocess at all, and applies the same core
    second = _apply_and_load(env, "no-subprocess")
    assert second.stdout.split() == [core, core] and line in second.stderr
    # --blas-core none (the variable it sets) keeps the library's choice (its real one), and says nothing
    kept = _apply_and_load(env | {blas.ENV: "none"})
    assert kept.stdout.split()[0] == "None" and "ditc: " not in kept.stderr
    # a machine that sets OPENBLAS_CORETYPE itself keeps it
    kept = _apply_and_load(env | {"OPENBLAS_CORETYPE": "Prescott"})
    assert kept.stdout.split() == ["Prescott", "Prescott"] and "ditc: " not in kept.stderr


@needs_nntile
def test_where_the_librarys_core_fits_the_cpu_nothing_is_switched(tmp_path):
    openblas_or_skip()
    result = _apply_and_load(_without_blas_variables(DITC_CACHE_DIR=str(tmp_path)))
    entry = json.loads(next((tmp_path / "openblas-cores").glob("*.json")).read_text())
    if blas.candidates(entry["core"], *blas.cpu()):
        pytest.skip(f"NNTile's OpenBLAS picks a core below this CPU here ({entry['core']})")
    assert "ditc: " not in result.stderr and result.stdout.split() == ["None", entry["core"]]
    assert entry["verdicts"] == {}   # probed once, nothing checked


@needs_nntile
def test_the_cache_is_per_library_written_whole_never_through_a_link_and_a_bad_entry_is_redone(tmp_path,
                                                                                               monkeypatch):
    openblas_or_skip()
    monkeypatch.setenv("DITC_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv(blas.TEST_LIBRARY_CORE, "Prescott")
    cache = blas._cache()
    assert cache.entry is None and cache.library_core() == "Prescott"
    core, failed = cache.first_passing(["NoSuchCore", *blas.candidates("Prescott", *blas.cpu())])
    assert "may not know NoSuchCore" in failed["NoSuchCore"] and core is not None
    assert cache.save() is None
    assert [p.name for p in cache.path.parent.iterdir()] == [cache.path.name]   # no temporary file left
    again = blas._cache()
    assert again.entry == cache.entry and again.entry["verdicts"] == {"NoSuchCore": failed["NoSuchCore"], core: None}
    assert again.first_passing(["NoSuchCore", core]) == (core, failed) and not again.changed   # no check ran
    monkeypatch.setenv(blas.TEST_LIBRARY_CORE, "Core2")   # another key: another entry
    assert blas._cache().path != cache.path
    monkeypatch.setenv(blas.TEST_LIBRARY_CORE, "Prescott")
    # the library replaced (its size, mtime or inode differ): found anew
    entry = json.loads(cache.path.read_text())
    entry["library"]["stat"][1] += 1
    cache.path.write_text(json.dumps(entry))
    assert blas._cache().entry is None
    for bad in ("{", "[]", json.dumps(entry | {"verdicts": {core: 5}}), "\x00" * 10, "[" * 60000):
        cache.path.write_text(bad)
        assert blas._cache().entry is None
    # a link in the entry's place: never read, written through nor replaced (as every file ditc writes); the
    # verdicts are found anew and saving says why it could not
    victim = tmp_path / "victim"
    victim.write_text(json.dumps(again.entry))
    cache.path.unlink()
    cache.path.symlink_to(victim)
    redone = blas._cache()
    assert redone.entry is None and redone.library_core() == "Prescott"
    assert "is a link" in redone.save()
    assert victim.read_text() == json.dumps(again.entry) and cache.path.is_symlink()


def test_bench_says_how_much_faster_a_checked_core_ran_the_gemm():
    report = _report(80.0, "")
    report.sides["nntile"] = replace(report.sides["nntile"], blas_core="Haswell", faster_core="SkylakeX",
                                     faster_core_gflops=240.0)
    assert ("note: NNTile's OpenBLAS ran its Haswell core (as the library or this machine chose); its SkylakeX "
            "core, checked against float64, ran the same GEMM at 240.0 GFLOP/s against 80.0, 3.00x as fast: "
            "--blas-core SkylakeX runs it") in format_bench(report)


@needs_nntile
def test_bench_times_the_faster_core_only_where_the_machine_chose_the_core(tmp_path, monkeypatch):
    """`ditc bench`'s step after its rounds, on the core a machine setting OPENBLAS_CORETYPE=Prescott ran."""
    openblas_or_skip()
    if not blas.candidates("Prescott", *blas.cpu()):
        pytest.skip("this CPU has no vector instructions above a generic core's")
    from dit_compiler.compiler import targets

    monkeypatch.setenv("DITC_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    monkeypatch.delenv(blas.ENV, raising=False)
    runtime = targets.get("nntile-1.1")
    ran = SideResult("nntile", 2, [1.0], [2.0], 100.0, {}, gemm_gflops=1e-3, blas_core="Prescott")
    found = bench._faster_core(ran, runtime, ROOT / "generated" / "tiny", (64, 64, 64))
    assert found.faster_core == blas.faster_core("Prescott") and found.faster_core_gflops > 0
    monkeypatch.setenv(blas.ENV, "Prescott")   # asked for by --blas-core: nothing to offer
    assert bench._faster_core(ran, runtime, ROOT / "generated" / "tiny", (64, 64, 64)) == ran
