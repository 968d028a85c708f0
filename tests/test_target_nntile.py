"""The NNTile 1.1 target's runtime on its own: each layer against torch on small tiled tensors (single-tile
and ragged multi-tile, the way NNTile's own layer tests do it), the memory plan, the declarations."""
from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import SPECS, needs_cc, needs_nntile
from dit_compiler.compiler.build import compile_spec
from dit_compiler.compiler.graph.ops import OPS, Activation, Heads, Norm, TokenRange
from dit_compiler.compiler.spec import load_spec
from dit_compiler.compiler.targets.nntile_1_1.layers import LAYERS, Moments
from dit_compiler.compiler.targets.nntile_1_1.plan import Step, memory_plan
from dit_compiler.compiler.targets.torch.functions import joint_attention

#: Axis -> (size, tile) for the layer tests: one tile per axis, and ragged tiles on every tiled axis.
AXES = {
    "single-tile": {"hidden": (8, 8), "tokens": (5, 5), "batch": (3, 3), "mlp": (12, 12), "heads": (2, 2),
                    "head_dim": (4, 4), "classes": (6, 6), "context": (7, 7), "patches": (3, 3), "joint": (12, 12)},
    "multi-tile": {"hidden": (8, 3), "tokens": (5, 2), "batch": (3, 2), "mlp": (12, 5), "heads": (2, 1),
                   "head_dim": (4, 4), "classes": (6, 6), "context": (7, 3), "patches": (3, 2), "joint": (12, 5)},
}
TOKENS, VECTOR = ("hidden", "tokens", "batch"), ("hidden", "batch")


def _head_norm(z, p, side: str, kind: str):
    """QK norm of z [heads, head_dim, tokens, batch] over head_dim, eps 1e-6."""
    last = z.permute(0, 2, 3, 1)
    weight, bias = p[f"{side}_norm_w"], p.get(f"{side}_norm_b")
    normed = F.layer_norm(last, last.shape[-1:], weight, bias, eps=1e-6) if kind == "layer_norm" \
        else F.rms_norm(last, last.shape[-1:], weight, eps=1e-6)
    return normed.permute(0, 3, 1, 2)


def _attention(p, kv="x", qk_norm=None):
    """Feature-first attention: q, k, v [heads, head_dim, tokens, batch]; scores over keys (axis 0); keys
    and values from `kv`, a key mask [keys, batch] adding -10000 (1 - mask) as diffusers' Attention,
    queries and keys normalised per head where `qk_norm` says."""
    q, k, v = (torch.einsum("hdi,itb->hdtb", p[f"w_{z}"], p[source]) + p[f"b_{z}"][..., None, None]
               for z, source in zip("qkv", ("x", kv, kv)))
    if qk_norm:
        q, k = _head_norm(q, p, "q", qk_norm), _head_norm(k, p, "k", qk_norm)
    scores = torch.einsum("hdkb,hdqb->kqbh", k, q) / math.sqrt(q.shape[1])
    if "mask" in p:
        scores = scores - 10000.0 * (1 - p["mask"])[:, None, :, None]
    out = torch.einsum("hdkb,kqbh->hdqb", v, scores.softmax(dim=0))
    return torch.einsum("ohd,hdqb->oqb", p["w_o"], out) + p["b_o"][:, None, None]


ATTENTION_PARAMS = tuple(f"{w}_{z}" for w in "wb" for z in "qkvo")
ATTENTION = {"x": TOKENS, **{f"w_{z}": ("heads", "head_dim", "hidden") for z in "qkv"},
             **{f"b_{z}": ("heads", "head_dim") for z in "qkv"}, "w_o": ("hidden", "heads", "head_dim"),
             "b_o": ("hidden",), "y": TOKENS}
#: QK norm's ports: weights, and biases for layer_norm; y stays last.
QK = {"rms_norm": ("q_norm_w", "k_norm_w"), "layer_norm": ("q_norm_w", "q_norm_b", "k_norm_w", "k_norm_b")}


def with_qk_norm(dims: dict, kind: str) -> dict:
    out = {p: d for p, d in dims.items() if p != "y"} | {p: ("head_dim",) for p in QK[kind]}
    return out | {"y": dims["y"]}


CROSS_ATTENTION = {"x": TOKENS, "context": ("hidden", "context", "batch"),
                   **{f"w_{z}": ("heads", "head_dim", "hidden") for z in "qkv"},
                   **{f"b_{z}": ("heads", "head_dim") for z in "qkv"}, "w_o": ("hidden", "heads", "head_dim"),
                   "b_o": ("hidden",), "y": TOKENS}
JOINT_PARAMS = ATTENTION_PARAMS + tuple(f"{w}_a{z}" for w in "wb" for z in "qkvo")
CONTEXT = ("hidden", "context", "batch")


def _joint_attention(p):
    """functions.joint_attention (the torch reference's) on the feature-first ports."""
    def proj(w, b):
        return lambda t: F.linear(t, p[w].reshape(-1, p[w].shape[-1]) if p[w].ndim == 3 and w[-1] != "o"
                                  else p[w].reshape(p[w].shape[0], -1), p[b].reshape(-1))
    image = tuple(proj(f"w_{z}", f"b_{z}") for z in "qkvo")
    context = tuple(proj(f"w_a{z}", f"b_a{z}") if f"w_a{z}" in p else None for z in "qkvo")
    # QK norm: what joint_attention reads of an nn.RMSNorm, the port itself its weight (its gradient the port's)
    norms = [SimpleNamespace(weight=p[port], eps=1e-6) for port in JOINT_QK] if "n_q" in p else None
    y = joint_attention(p["x"].permute(2, 1, 0), p["c"].permute(2, 1, 0), image, context, heads=p["w_q"].shape[0],
                        norms=norms)
    return y.permute(2, 1, 0)


JOINT_QK = ("n_q", "n_k", "n_aq", "n_ak")


def _joint_ports(pre: bool, qk_norm: bool = False) -> dict:
    ports = {"x": TOKENS, "c": CONTEXT, **{f"w_{z}": ("heads", "head_dim", "hidden") for z in "qkv"},
             **{f"b_{z}": ("heads", "head_dim") for z in "qkv"}, "w_o": ("hidden", "heads", "head_dim"),
             "b_o": ("hidden",), **{f"w_a{z}": ("heads", "head_dim", "hidden") for z in "qkv"},
             **{f"b_a{z}": ("heads", "head_dim") for z in "qkv"}}
    qk = dict.fromkeys(JOINT_QK, ("head_dim",)) if qk_norm else {}
    if pre:
        return ports | qk | {"y": TOKENS}
    return ports | {"w_ao": ("hidden", "heads", "head_dim"), "b_ao": ("hidden",)} | qk | {"y": ("hidden", "joint", "batch")}
#: layer -> (port dims, attributes, torch of the ports in the same feature-first layout, ports without a
#: gradient, parameter ports: their gradients are always overwritten)
CASES = {
    "Linear": ({"x": TOKENS, "w": ("mlp", "hidden"), "b": ("mlp",), "y": ("mlp", "tokens", "batch")}, None,
               lambda p: torch.einsum("oi,itb->otb", p["w"], p["x"]) + p["b"][:, None, None], (), ("w", "b")),
    "Linear-nobias": ({"x": TOKENS, "w": ("mlp", "hidden"), "y": ("mlp", "tokens", "batch")}, None,
                      lambda p: torch.einsum("oi,itb->otb", p["w"], p["x"]), (), ("w",)),
    "AddConstSlice": ({"x": TOKENS, "table": ("hidden", "tokens"), "y": TOKENS}, None,
                      lambda p: p["x"] + p["table"][..., None], ("table",), ()),
    "Embedding": ({"labels": ("batch",), "table": ("hidden", "classes"), "y": VECTOR}, None,
                  lambda p: p["table"][:, p["labels"]], ("labels",), ("table",)),
    "Act-silu": ({"x": TOKENS, "y": TOKENS}, Activation("silu"), lambda p: F.silu(p["x"]), (), ()),
    "Act-gelutanh": ({"x": ("mlp", "tokens", "batch"), "y": ("mlp", "tokens", "batch")}, Activation("gelutanh"),
                     lambda p: F.gelu(p["x"], approximate="tanh"), (), ()),
    "Act-gelu": ({"x": ("mlp", "tokens", "batch"), "y": ("mlp", "tokens", "batch")}, Activation("gelu"),
                 lambda p: F.gelu(p["x"]), (), ()),
    "Add": ({"a": VECTOR, "b": VECTOR, "y": VECTOR}, None, lambda p: p["a"] + p["b"], (), ()),
    "LayerNormNoAffine": ({"x": TOKENS, "y": TOKENS}, Norm(1e-6),
                          lambda p: F.layer_norm(p["x"].permute(1, 2, 0), (8,), eps=1e-6).permute(2, 0, 1), (), ()),
    "RMSNorm": ({"x": TOKENS, "weight": ("hidden",), "y": TOKENS}, Norm(1e-5),
                lambda p: F.rms_norm(p["x"].permute(1, 2, 0), (8,), p["weight"], eps=1e-5).permute(2, 0, 1),
                (), ("weight",)),
    "Modulate": ({"x": TOKENS, "shift": VECTOR, "scale": VECTOR, "y": TOKENS}, None,
                 lambda p: p["x"] * (1 + p["scale"][:, None]) + p["shift"][:, None], (), ()),
    "GatedResidual": ({"x": TOKENS, "h": TOKENS, "gate": VECTOR, "y": TOKENS}, None,
                      lambda p: p["x"] + p["gate"][:, None] * p["h"], (), ()),
    "Attention": (ATTENTION, Heads(), _attention, (), ATTENTION_PARAMS),
    "Attention-nobias": ({p: d for p, d in ATTENTION.items() if not p.startswith("b_")}, Heads(),
                         lambda p: _attention(p | {f"b_{z}": torch.zeros_like(p[f"w_{z}"][:, :, 0]) for z in "qkv"}
                                              | {"b_o": torch.zeros_like(p["w_o"][:, 0, 0])}), (),
                         tuple(p for p in ATTENTION_PARAMS if p.startswith("w_"))),
    "Attention-qk_rms_norm": (with_qk_norm(ATTENTION, "rms_norm"), Heads("rms_norm"),
                              lambda p: _attention(p, qk_norm="rms_norm"), (), ATTENTION_PARAMS + QK["rms_norm"]),
    "Attention-qk_layer_norm": (with_qk_norm(ATTENTION, "layer_norm"), Heads("layer_norm"),
                                lambda p: _attention(p, qk_norm="layer_norm"), (),
                                ATTENTION_PARAMS + QK["layer_norm"]),
    "CrossAttention-qk_layer_norm": (with_qk_norm(CROSS_ATTENTION | {"mask": ("context", "batch")}, "layer_norm"),
                                     Heads("layer_norm"), lambda p: _attention(p, "context", "layer_norm"),
                                     ("mask",), ATTENTION_PARAMS + QK["layer_norm"]),
    "CrossAttention": (CROSS_ATTENTION, Heads(), lambda p: _attention(p, "context"), (), ATTENTION_PARAMS),
    "CrossAttention-masked": (CROSS_ATTENTION | {"mask": ("context", "batch")}, Heads(),
                              lambda p: _attention(p, "context"), ("mask",), ATTENTION_PARAMS),
    "AppendTokens": ({"x": ("hidden", "patches", "batch"), "a": VECTOR, "b": VECTOR, "y": TOKENS}, None,
                     lambda p: torch.cat([p["x"], p["a"][:, None], p["b"][:, None]], dim=1), (), ()),
    "AppendTokens-pair": ({"a": VECTOR, "b": VECTOR, "y": ("hidden", 2, "batch")}, None,
                          lambda p: torch.stack([p["a"], p["b"]], dim=1), (), ()),
    "TakeTokens": ({"x": TOKENS, "y": ("hidden", "patches", "batch")}, None, lambda p: p["x"][:, :3], (), ()),
    "JointAttention": (_joint_ports(pre=False), None, _joint_attention, (), JOINT_PARAMS),
    "JointAttentionPre": (_joint_ports(pre=True), None, _joint_attention, (),
                          tuple(p for p in JOINT_PARAMS if p not in ("w_ao", "b_ao"))),
    "JointAttention-qk": (_joint_ports(pre=False, qk_norm=True), Norm(1e-6), _joint_attention, (), JOINT_PARAMS + JOINT_QK),
    "JointAttentionPre-qk": (_joint_ports(pre=True, qk_norm=True), Norm(1e-6), _joint_attention, (),
                             tuple(p for p in JOINT_PARAMS if p not in ("w_ao", "b_ao")) + JOINT_QK),
    "TokenJoin": ({"a": TOKENS, "b": CONTEXT, "y": ("hidden", "joint", "batch")}, None,
                  lambda p: torch.cat([p["a"], p["b"]], dim=1), (), ()),
    "TokenSlice-image": ({"x": ("hidden", "joint", "batch"), "y": TOKENS}, TokenRange(0),
                         lambda p: p["x"][:, :5], (), ()),
    "TokenSlice-context": ({"x": ("hidden", "joint", "batch"), "y": CONTEXT}, TokenRange(5),
                           lambda p: p["x"][:, 5:], (), ()),
}
#: Layers that write their x's gradient first always (lowering gives that x one reader).
WRITES_FIRST = {"AppendTokens": "x", "TakeTokens": "x"}


#: Every layer on NNTile's kernels, and the layers that run ditc's own kernels on those too.
KERNEL_CASES = [(case, "nntile") for case in sorted(CASES)] + [
    ("Act-gelutanh", "ditc"), ("Attention", "ditc"), ("CrossAttention-masked", "ditc"), ("Attention-qk_rms_norm", "ditc"),
    ("JointAttention", "ditc"), ("JointAttentionPre", "ditc"), ("JointAttention-qk", "ditc")]


@pytest.fixture(scope="module")
def runtime():
    from dit_compiler.compiler.targets.nntile_1_1 import nntile_runtime

    with nntile_runtime(2):
        yield


def native_or_skip():
    """ditc's kernel extension, or a skip saying why it cannot be built here."""
    from dit_compiler.compiler.targets.nntile_1_1 import native

    if why := native.problem():
        pytest.skip(f"ditc's kernels are unavailable here: {why}")
    return native.load()


def _shape(axes, dims):
    return tuple(d if isinstance(d, int) else axes[d][0] for d in dims), \
        tuple(d if isinstance(d, int) else axes[d][1] for d in dims)


def _rel(a, b, floor: float = 0.0) -> float:
    """Norm-wise relative error; `floor` stands in for a norm that is zero up to rounding (attention's key
    bias gets no gradient: softmax ignores a shift shared by all keys): a tenth of the largest gradient of the layer."""
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / max(np.linalg.norm(b), floor))


@needs_nntile
@pytest.mark.nntile
@pytest.mark.parametrize("tiling", sorted(AXES))
@pytest.mark.parametrize("case, kernels", KERNEL_CASES, ids=[f"{c}-{k}" for c, k in KERNEL_CASES])
@pytest.mark.parametrize("overwrite", [True, False], ids=["overwrite", "accumulate"])
def test_layer_matches_torch(runtime, case, kernels, tiling, overwrite):
    """Forward, and backward into every input gradient: written fresh where the layer is its first writer,
    added to what is there otherwise; parameter gradients are always overwritten. On the multi-tile
    axes attention's keys span three tiles (ditc's softmax combines them in two levels), on the
    single-tile ones they are one tile (ditc's one-pass softmax)."""
    from dit_compiler.compiler.targets.nntile_1_1 import wait_for_all
    from dit_compiler.compiler.targets.nntile_1_1.alloc import Allocator

    dims, attrs, reference, no_grad, params = CASES[case]
    cls, axes = LAYERS[case.split("-")[0]], AXES[tiling]
    kind = next(k for k in OPS.values() if k.layer == cls.__name__)
    rng = np.random.default_rng(0)
    alloc = Allocator()
    arrays, ports, tensors = {}, {}, []

    def new(dims_, dtype="fp32"):
        tensor = alloc.new(*_shape(axes, dims_), dtype)
        tensors.append(tensor)
        return tensor

    for port, port_dims in dims.items():
        shape, _ = _shape(axes, port_dims)
        if port == "labels":
            arrays[port] = rng.integers(0, axes["classes"][0], shape)
            ports[port] = new(port_dims, "int64")
            ports[port].from_array(arrays[port])
            continue
        if port == "mask":   # keys kept (1) and padded (0), at least one kept per image
            arrays[port] = (rng.random(shape) < 0.6).astype(np.float32)
            arrays[port][0] = 1.0
        else:
            arrays[port] = rng.standard_normal(shape).astype(np.float32)
        value = new(port_dims)
        if port in kind.inputs:
            value.from_array(np.asfortranarray(arrays[port]))
        ports[port] = value if port in no_grad else Moments(value, new(port_dims))
    internals = {name: new(d) for name, d in (cls.KEEPS | cls.scratch_of(attrs)).items()}
    layer = cls(ports, internals, attrs, alloc, native_or_skip() if kernels == "ditc" else None)
    inputs = [p for p in kind.inputs if p in dims and p not in no_grad]
    first = {WRITES_FIRST[cls.__name__]} & set(dims) if cls.__name__ in WRITES_FIRST else set()
    layer.overwrites = tuple(ports[p] for p in inputs if p not in params and (overwrite or p in first))
    before = {p: rng.standard_normal(arrays[p].shape).astype(np.float32) for p in inputs}
    for p in inputs:
        ports[p].grad.from_array(np.asfortranarray(before[p]))
    dy = rng.standard_normal(arrays["y"].shape).astype(np.float32)

    layer.forward_async()
    ports["y"].grad.from_array(np.asfortranarray(dy))
    layer.backward_async()
    wait_for_all()

    def read(tensor):
        out = np.zeros(tensor.shape, order="F", dtype=np.float32 if tensor.__class__.__name__.endswith("fp32")
                       else np.int64)
        tensor.to_array(out)
        return out

    torch_in = {p: torch.tensor(a, requires_grad=p in inputs) for p, a in arrays.items() if p != "y"}
    y = reference(torch_in)
    y.backward(torch.from_numpy(dy))
    assert _rel(read(ports["y"].value), y.detach().numpy()) < 1e-5
    scale = max(np.linalg.norm(torch_in[p].grad.numpy()) for p in inputs)
    for p in inputs:
        expected = torch_in[p].grad.numpy() + (0 if overwrite or p in params or p in first else before[p])
        assert _rel(read(ports[p].grad), expected, 0.1 * scale) < 1e-5, p
    for tensor in tensors:
        tensor.unregister()
    alloc.unregister()


def _tiny_steps():
    graph = compile_spec(load_spec(SPECS / "tiny.yaml")).graph
    steps = [Step(dict(n.inputs), dict(n.outputs), LAYERS[OPS[n.op].layer].BACKWARD_READS)
             for n in graph.device_nodes]
    activations = {t.name for t in graph.tensors.values() if t.role == "activation"}
    return graph, steps, activations, {p.name for p in graph.params}


def test_memory_plan_releases_each_activation_once_nothing_reads_it():
    """Backward writes an activation's gradient first at its last reader in forward order (the first in
    backward), and releases it after the layer that made it; a value is released after its last forward
    reader, and only if no backward reads it and the host does not."""
    graph, steps, activations, params = _tiny_steps()
    plan = memory_plan(steps, activations, params, {"final.out"})
    read = {name for s in steps for name in s.inputs.values() if name in activations}
    backward_reads = {({**s.inputs, **s.outputs})[p] for s in steps for p in s.backward_reads}
    for name in read:
        last = max(i for i, s in enumerate(steps) if name in s.inputs.values())
        assert [i for i, row in enumerate(plan) if name in row.first] == [last]
        released = [i for i, row in enumerate(plan) if name in row.release_values]
        assert released == ([] if name in backward_reads else [last]), name
    assert {v for row in plan for v in row.release_values} >= {"blocks.0.res_msa", "blocks.0.out"}
    assert not any("final.out" in row.release_values for row in plan)
    for step, row in zip(steps, plan):
        assert list(row.release_grads) == [o for o in step.outputs.values() if o in activations]


def test_memory_plan_releases_every_value_by_the_end_of_backward():
    """Each activation value is released once, after its last forward reader or after its last backward
    reader, so that nothing of a step's activations is held through AdamW; the host's output is kept."""
    graph, steps, activations, params = _tiny_steps()
    plan = memory_plan(steps, activations, params, {"final.out"})
    bound = {n for s in steps for n in (*s.inputs.values(), *s.outputs.values())} & activations
    released = [v for row in plan for v in (*row.release_values, *row.release_read)]
    assert sorted(released) == sorted(bound - {"final.out"})  # the host's inputs (patches) too: set each step
    for i, row in enumerate(plan):
        for name in row.release_read:  # the last backward to run that reads it is this layer's
            readers = [j for j, s in enumerate(steps) if name in {({**s.inputs, **s.outputs})[p] for p in s.backward_reads}]
            assert min(readers) == i


def test_predicted_peak_holds_every_weight_twice_more_and_one_layers_gradients():
    """A steady training step holds parameters and AdamW's two moments throughout, but parameter gradients
    only from a layer's backward to its update; the replay of the plan agrees with the graph's sizes."""
    from dit_compiler.compiler.targets.nntile_1_1.memory import BASELINE, predict, tensor_bytes

    graph = compile_spec(load_spec(SPECS / "dit-s-2-b8.yaml")).graph
    peak = predict(graph)
    weights = sum(tensor_bytes(graph, p.name) for p in graph.params)
    largest_layer = max(sum(tensor_bytes(graph, n) for n in node.input_names if graph.tensors[n].role == "param")
                        for node in graph.device_nodes)
    assert peak.parameters == weights and peak.optimizer == 2 * weights
    assert 0 < peak.gradients <= 2 * largest_layer
    assert peak.attention > 0 and peak.activations > peak.attention  # DiT-S/2 at batch 8: activations lead
    assert peak.total == peak.data + BASELINE and peak.where.startswith("backward")


def test_memory_limit_check_says_fits_swaps_or_too_small():
    from dit_compiler.compiler.targets.nntile_1_1 import check_limit

    graph = compile_spec(load_spec(SPECS / "dit-s-2-b8.yaml")).graph
    assert check_limit(graph, 8 * 2 ** 30).fits
    swapping = check_limit(graph, 2 ** 30)
    assert not swapping.fits and "out-of-core" in swapping.summary()
    assert swapping.held < swapping.peak and swapping.starpu < swapping.data
    assert "too small" in check_limit(graph, 300 * 2 ** 20).summary()


@needs_cc
def test_out_of_core_swap_folder_goes_on_sigterm(tmp_path):
    """A process holding out-of-core settings and killed with SIGTERM removes its swap folder."""
    import signal
    import subprocess
    import sys

    code = ("import sys, time; from dit_compiler.compiler.build import graph_of; from dit_compiler.compiler.spec import load_spec;"
            "from dit_compiler.compiler.targets.nntile_1_1 import out_of_core\n"
            f"with out_of_core(graph_of(load_spec({str(SPECS / 'tiny.yaml')!r})), 2 ** 30, {str(tmp_path)!r}) as s:\n"
            "    print(s.swap_dir, flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=SPECS.parent)
    folder = Path(proc.stdout.readline().strip()).parent
    assert folder.is_dir() and (folder / "libditc_pin.so").is_file()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    assert not folder.exists()


def test_memory_plan_refuses_a_parameter_two_layers_read():
    """The layers overwrite parameter gradients, which is only right while each parameter has one reader:
    a wiring where two layers share a weight is refused instead of losing a gradient."""
    _, steps, activations, params = _tiny_steps()
    first, second = [i for i, s in enumerate(steps) if "w" in s.inputs][:2]
    steps[second] = Step(dict(steps[second].inputs) | {"w": steps[first].inputs["w"]}, steps[second].outputs,
                         steps[second].backward_reads)
    with pytest.raises(ValueError, match=steps[first].inputs["w"]):
        memory_plan(steps, activations, params, set())


def test_every_device_op_kind_has_a_layer_with_its_ports():
    from dit_compiler.compiler.targets.nntile_1_1.emitter import check_layers

    check_layers()
    assert {k.layer for k in OPS.values() if not k.host} == set(LAYERS)


def test_layer_internals_are_graph_tensors():
    """Attention's q, k, v, probabilities and scratch are in the graph, so `inspect` counts them."""
    graph = compile_spec(load_spec(SPECS / "tiny.yaml")).graph
    attn = next(n for n in graph.nodes if n.op == "attention")
    assert set(attn.internals) == set(LAYERS["Attention"].KEEPS) | set(LAYERS["Attention"].SCRATCH)
    probs = graph.tensors[attn.internals["probs"]]
    assert probs.role == "kept" and probs.shape == (16, 16, 3, 4) and probs.tile == (6, 6, 2, 2)
