"""ditc's own NNTile kernels (the target's native extension) straight against torch, on NNTile tensors with
ragged tiles, and the choice between them and NNTile's. The kernel tests skip, saying why, where the
extension cannot be built; the choice tests run everywhere."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import needs_nntile
from dit_compiler.errors import UsageError
from dit_compiler.compiler.targets.nntile_1_1 import native

#: Scores [keys, queries, batch, heads] and their tiles: the keys in one tile, in three ragged tiles, and
#: in more tiles than a StarPU task has static buffers (one softmax task takes all the key tiles).
SCORES = (19, 5, 3, 2)
SCORE_TILES = {"keys-one-tile": (19, 2, 2, 1), "keys-three-tiles": (7, 2, 2, 1), "keys-19-tiles": (1, 2, 3, 2)}


@pytest.fixture(scope="module")
def ext():
    from dit_compiler.compiler.targets.nntile_1_1 import nntile_runtime

    if native.problem():  # NNTile missing, or no build tree or compiler beside it
        pytest.skip(f"ditc's kernels are unavailable here: {native.problem()}")
    with nntile_runtime(2):
        yield native.load()


class Tensors:
    """NNTile fp32 tensors from numpy arrays and back, unregistered at the end."""

    def __init__(self):
        from dit_compiler.compiler.targets.nntile_1_1.alloc import Allocator

        self.alloc, self.made = Allocator(), []

    def __call__(self, array: np.ndarray, tile) -> object:
        tensor = self.alloc.new(array.shape, tile)
        tensor.from_array(np.asfortranarray(array, dtype=np.float32))
        self.made.append(tensor)
        return tensor

    @staticmethod
    def read(tensor) -> np.ndarray:
        from dit_compiler.compiler.targets.nntile_1_1 import wait_for_all

        wait_for_all()
        out = np.zeros(tensor.shape, np.float32, order="F")
        tensor.to_array(out)
        return out

    def close(self) -> None:
        for tensor in self.made:
            tensor.unregister()


@pytest.fixture
def tensors():
    made = Tensors()
    yield made
    made.close()


def masked_scores(rng) -> np.ndarray:
    """Random scores with -inf where a mask would put them: part of a column, a column's whole first tile,
    and one whole column (softmax gives NaN there, as torch's)."""
    x = (rng.standard_normal(SCORES) * 4).astype(np.float32)
    x[2:5, 2, 1, 1] = -np.inf
    x[0:7, 3, 2, 0] = -np.inf
    x[:, 1, 0, 0] = -np.inf
    return x


def assert_close(actual: np.ndarray, expected: np.ndarray, tol: float = 1e-6) -> None:
    """Same NaNs, same exact zeros, and a norm-wise relative error below `tol` elsewhere."""
    nan = np.isnan(expected)
    np.testing.assert_array_equal(np.isnan(actual), nan)
    np.testing.assert_array_equal(actual[~nan] == 0, expected[~nan] == 0)
    a, b = actual[~nan].astype(np.float64), expected[~nan].astype(np.float64)
    assert np.linalg.norm(a - b) <= tol * np.linalg.norm(b)


@needs_nntile
@pytest.mark.parametrize("tiles", sorted(SCORE_TILES))
def test_softmax_matches_torch_with_masked_rows(ext, tensors, tiles):
    x = masked_scores(np.random.default_rng(0))
    scores = tensors(x, SCORE_TILES[tiles])
    ext.softmax_async(scores)
    assert_close(tensors.read(scores), torch.softmax(torch.from_numpy(x), dim=0).numpy())


@needs_nntile
@pytest.mark.parametrize("tiles", sorted(SCORE_TILES))
def test_softmax_backward_matches_torch(ext, tensors, tiles):
    rng = np.random.default_rng(1)
    x = torch.from_numpy(masked_scores(rng)[:, 2:])   # the finite columns: NaN gradients prove nothing
    x.requires_grad_(True)
    probs = torch.softmax(x, dim=0)
    d_probs = torch.from_numpy(rng.standard_normal(probs.shape).astype(np.float32))
    probs.backward(d_probs)
    p, dp = probs.detach().numpy(), d_probs.numpy()
    tile = SCORE_TILES[tiles]
    grad = tensors(dp, tile)
    ext.softmax_backward_async(tensors(p, tile), tensors((p * dp).sum(axis=0), tile[1:]), grad)
    assert_close(tensors.read(grad), x.grad.numpy())


#: GELU-tanh inputs: normal values, and the tails where tanh saturates.
GELU_X = np.concatenate([np.random.default_rng(2).standard_normal(60) * 3,
                         [0.0, -0.0, 1e-8, -10.0, 10.0, -30.0, 30.0, -100.0, 100.0]]).astype(np.float32)


@needs_nntile
def test_gelutanh_matches_torch(ext, tensors):
    x = GELU_X.reshape(3, 23)
    y = tensors(np.full(x.shape, np.nan), (2, 5))   # written, never read
    ext.gelutanh_async(tensors(x, (2, 5)), y)
    expected = F.gelu(torch.from_numpy(x), approximate="tanh").numpy()
    assert np.linalg.norm(tensors.read(y) - expected) <= 1e-6 * np.linalg.norm(expected)


@needs_nntile
@pytest.mark.parametrize("beta", [0.0, 1.0, 0.5])
def test_gelutanh_backward_matches_torch(ext, tensors, beta):
    """dx = beta dx + dy gelu'(x); with beta 0 the old dx (NaN here) is not read."""
    rng = np.random.default_rng(3)
    x = torch.from_numpy(GELU_X.reshape(3, 23).copy()).requires_grad_(True)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    old = np.full(x.shape, np.nan, np.float32) if beta == 0 else rng.standard_normal(x.shape).astype(np.float32)
    F.gelu(x, approximate="tanh").backward(torch.from_numpy(dy))
    dx = tensors(old, (2, 5))
    ext.gelutanh_backward_async(tensors(x.detach().numpy(), (2, 5)), tensors(dy, (2, 5)), beta, dx)
    expected = x.grad.numpy() + (beta * old if beta else 0)
    assert np.linalg.norm(tensors.read(dx) - expected) <= 1e-6 * np.linalg.norm(expected)


@needs_nntile
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adamw_steps_match_torch(ext, tensors, weight_decay):
    """Three AdamW steps of the fused kernel, through the target's AdamW, on ragged tiles: the weights and
    both moments as torch.optim.AdamW's; the first step does not read the moments (NaN there)."""
    from dit_compiler.compiler.targets.nntile_1_1.layers import Moments
    from dit_compiler.compiler.targets.nntile_1_1.optim import AdamW

    rng = np.random.default_rng(4)
    weight = rng.standard_normal((7, 5)).astype(np.float32)
    grads = [rng.standard_normal(weight.shape).astype(np.float32) for _ in range(3)]
    param = Moments(tensors(weight, (3, 2)), tensors(grads[0], (3, 2)))
    optimizer = AdamW([param], tensors.alloc, 1e-2, weight_decay, native=ext)
    for m in optimizer.moments[id(param)]:
        m.from_array(np.full(weight.shape, np.nan, np.float32, order="F"))
    reference = torch.nn.Parameter(torch.from_numpy(weight.copy()))
    torch_opt = torch.optim.AdamW([reference], lr=1e-2, weight_decay=weight_decay)
    try:
        for grad in grads:
            param.grad.from_array(np.asfortranarray(grad))
            optimizer.step()
            reference.grad = torch.from_numpy(grad)
            torch_opt.step()
        state = torch_opt.state[reference]
        # the moments to fp32 rounding (torch's lerp orders the sums otherwise), as the model's test does
        for mine, theirs, tol in ((param.value, reference.detach(), 1e-6),
                                  (optimizer.moments[id(param)][0], state["exp_avg"], 1e-4),
                                  (optimizer.moments[id(param)][1], state["exp_avg_sq"], 1e-4)):
            expected = theirs.numpy()
            assert np.linalg.norm(tensors.read(mine) - expected) <= tol * np.linalg.norm(expected)
    finally:
        optimizer.unregister()


@needs_nntile
def test_mismatched_tiles_are_refused_naming_them(ext, tensors):
    probs = tensors(np.zeros(SCORES), SCORE_TILES["keys-three-tiles"])
    sums = tensors(np.zeros(SCORES[1:]), (5, 3, 2))
    with pytest.raises(ValueError, match=r"softmax backward sums: \[5,3,2\]/\[5,3,2\] is not \[19,5,3,2\]/"
                                         r"\[7,2,2,1\] without axis 0"):
        ext.softmax_backward_async(probs, sums, tensors(np.zeros(SCORES), SCORE_TILES["keys-three-tiles"]))
    with pytest.raises(ValueError, match="gelutanh: shapes and tiles differ"):
        ext.gelutanh_async(tensors(np.zeros((4, 4)), (2, 2)), tensors(np.zeros((4, 4)), (4, 2)))


def _simd_loops(source: str) -> list[tuple[int, int]]:
    """The (first, last) lines of each loop under `#pragma omp simd` in `source`, by brace matching."""
    lines, loops = source.splitlines(), []
    for number, line in enumerate(lines, 1):
        if line.strip().startswith("#pragma omp simd"):
            depth, end = 0, number
            for end in range(number + 1, len(lines) + 1):
                depth += lines[end - 1].count("{") - lines[end - 1].count("}")
                if depth == 0 and "}" in lines[end - 1]:
                    break
            loops.append((number, end))
    return loops


def test_every_simd_loop_vectorises_on_this_cpu(tmp_path):
    """GCC kept a loop scalar where it could not if-convert (GELU's on AVX2 under trapping maths: about 5x
    slower); each `omp simd` loop of kernels.cc must vectorise with the extension's own flags."""
    import subprocess

    try:
        build = native.nntile_build()
    except native.Unavailable as why:
        pytest.skip(f"no NNTile build to compile against: {why}")
    command = [build.compiler, *native.FLAGS, *(f"-I{d}" for d in build.include_dirs), "-c", str(native.SOURCE),
               "-o", str(tmp_path / "kernels.o"), "-fopt-info-vec-optimized"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    vectorised = {int(line.split(":")[1]) for line in done.stderr.splitlines()
                  if "kernels.cc:" in line and "loop vectorized" in line}
    loops = _simd_loops(native.SOURCE.read_text())
    assert len(loops) >= 6
    scalar = [first for first, last in loops if not any(first <= n <= last for n in vectorised)]
    assert not scalar, f"omp simd loops left scalar, at lines {scalar} of {native.SOURCE.name}"


# -- which kernels run -------------------------------------------------------------------------------
@pytest.fixture
def no_extension(monkeypatch):
    """A machine where the extension cannot be built (no NNTile build tree, say)."""
    def unavailable():
        raise native.Unavailable("no NNTile build tree here")

    monkeypatch.setattr(native, "_loaded", None)
    monkeypatch.setattr(native, "built_module", unavailable)
    monkeypatch.delenv(native.ENV, raising=False)


def test_without_the_extension_nntiles_kernels_run_and_say_why(no_extension):
    with pytest.warns(native.KernelWarning, match="no NNTile build tree here"):
        choice = native.kernels()
    assert (choice.name, choice.module) == ("nntile", None)
    assert "unavailable: no NNTile build tree here" in choice.note
    with pytest.raises(UsageError, match="kernel set ditc: ditc's kernels are unavailable here: no NNTile build"):
        native.kernels("ditc")


def test_the_kernel_set_comes_from_the_environment(no_extension, monkeypatch):
    monkeypatch.setenv(native.ENV, "nntile")
    assert native.kernels().name == "nntile"
    monkeypatch.setenv(native.ENV, "fast")
    with pytest.raises(UsageError, match=r"\$DITC_KERNELS kernel set 'fast': allowed are auto, ditc, nntile"):
        native.kernels()


def test_the_cache_key_follows_the_source(monkeypatch, tmp_path):
    """A changed kernel source (or compiler, CPU, NNTile build) compiles anew; the same one is reused."""
    try:
        build = native.nntile_build()
    except native.Unavailable as why:
        pytest.skip(f"no NNTile build to compile against: {why}")
    key = native._key(build)
    assert native._key(build) == key
    edited = tmp_path / "kernels.cc"
    edited.write_text(native.SOURCE.read_text() + "\n// edited\n")
    monkeypatch.setattr(native, "SOURCE", edited)
    assert native._key(build) != key


def test_a_damaged_cached_module_is_compiled_again_not_loaded(monkeypatch, tmp_path):
    """A truncated module killed every NNTile command with SIGBUS, a garbage one failed to import: the
    sha256 recorded at compile time finds both, and the module is compiled again."""
    import shutil
    import subprocess
    import sys

    try:
        original = native.built_module(progress=lambda line: None)   # the user's cache: compiled at most once
    except native.Unavailable as why:
        pytest.skip(f"ditc's kernels cannot be built here: {why}")
    monkeypatch.setenv("DITC_CACHE_DIR", str(tmp_path))
    copy = tmp_path / "nntile-1.1-kernels" / original.parent.name
    shutil.copytree(original.parent, copy)
    module = copy / original.name
    record = module.with_name(module.name + ".sha256")
    for damage in (module.read_bytes()[:4096], b"\x7fELF garbage"):
        module.write_bytes(damage)
        compiled: list[str] = []
        assert native.built_module(progress=compiled.append) == module
        assert compiled and native._intact(module, record)
    record.unlink()   # a module without its record (an older ditc's cache) is compiled again too
    compiled = []
    native.built_module(progress=compiled.append)
    assert compiled and native._intact(module, record)
    module.write_bytes(module.read_bytes()[:4096])
    loaded = subprocess.run([sys.executable, "-c", "from dit_compiler.compiler.targets.nntile_1_1 import native; native.load()"],
                            capture_output=True, text=True, env=os.environ | {"DITC_CACHE_DIR": str(tmp_path)})
    assert loaded.returncode == 0, loaded.stderr
    assert native._intact(module, record)
