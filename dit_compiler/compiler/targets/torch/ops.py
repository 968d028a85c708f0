"""The torch code of every op kind, registered under the name an op kind's `torch` gives (`TORCH_OPS`).

Each entry says how the reference's forward computes a node (`call`: a Python expression of the node's
inputs), which functions of `functions.py` that expression calls (`uses`: the emitter copies them into
the reference), and which torch module holds each of the node's parameters (`modules`: the checkpoint
layout's module at the parameter's state_dict key).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from dit_compiler.compiler.graph.ir import Graph, Node, ParamSource


class Code(Protocol):
    """What a node's torch code refers to, as the emitter names it in the code being written."""

    graph: Graph

    def value(self, tensor: str) -> str:
        """The variable holding a tensor (or the expression standing for it)."""

    def module(self, tensor: str) -> str:
        """The module holding a parameter (`self.attn.qkv`)."""

    def const(self, tensor: str) -> str:
        """The attribute holding a constant table (`self.pos_embed`)."""


@dataclass(frozen=True)
class TorchOp:
    call: Callable[[Node, Code], str]
    uses: tuple[str, ...] = ()
    modules: Callable[[Node, Graph], dict[str, str]] = lambda node, graph: {}


#: An op kind's torch code by the name its `torch` gives.
TORCH_OPS: dict[str, TorchOp] = {}


def torch_op(name: str, uses: tuple[str, ...] = (),
             modules: Callable[[Node, Graph], dict[str, str]] | None = None):
    """Register the decorated expression builder as the torch code `name`."""
    def register(call: Callable[[Node, Code], str]) -> Callable[[Node, Code], str]:
        TORCH_OPS[name] = TorchOp(call, uses, modules or (lambda node, graph: {}))
        return call
    return register


def _source(graph: Graph, node: Node, port: str) -> ParamSource:
    return graph.tensors[node.inputs[port]].source


def _linear_module(source: ParamSource, bias: bool = True) -> str:
    """The module of a linear weight: `nn.Linear` (without a bias where the node has none), or the
    `nn.Conv2d` a `conv` layout weight comes from."""
    if source.layout == "conv":
        out, channels, p, _ = source.torch_shape
        return f"nn.Conv2d({channels}, {out}, kernel_size={p}, stride={p})"
    out, inputs = source.torch_shape
    return f"nn.Linear({inputs}, {out})" if bias else f"nn.Linear({inputs}, {out}, bias=False)"


def module_path(key: str) -> str:
    """The module of a state_dict key: the key without its last part (`.weight`, `.bias`)."""
    return key.rpartition(".")[0]


def _weights(*ports: str) -> Callable[[Node, Graph], dict[str, str]]:
    """Linear modules for the weights at `ports`; their biases (port `b...` for `w...`) live in the same
    modules, where the node has them."""
    def modules(node: Node, graph: Graph) -> dict[str, str]:
        return {module_path(_source(graph, node, p).key): _linear_module(_source(graph, node, p), "b" + p[1:] in node.inputs)
                for p in ports}
    return modules


# -- host ops ---------------------------------------------------------------------------------------

@torch_op("patchify")
def _patchify(node: Node, code: Code) -> str:
    """No code of its own: the Conv2d of the projection (a `conv` layout linear) patchifies as it projects,
    so patchify's output stands for the image it reads."""
    return code.value(node.inputs["x"])


@torch_op("timestep_sinusoid", uses=("timestep_embedding",))
def _timestep_sinusoid(node: Node, code: Code) -> str:
    """Of timesteps [N]; of a value pair per item [N, 2] (PixArt's resolution), all first values, then all
    second ones (the order the graph's [frequency, 2 N] features hold them in)."""
    dim = code.graph.tensors[node.outputs["y"]].shape[0]
    a = node.attrs
    t = code.value(node.inputs["t"])
    t = f"{t}.T.reshape(-1)" if len(code.graph.tensors[node.inputs["t"]].shape) == 2 else t
    return f"timestep_embedding({t}, {dim}, max_period={a.max_period}, shift={a.shift})"


@torch_op("unpatchify", uses=("unpatchify",))
def _unpatchify(node: Node, code: Code) -> str:
    channels = code.graph.tensors[node.outputs["y"]].shape[1]
    return f"unpatchify({code.value(node.inputs['x'])}, patch_size={node.attrs.patch_size}, channels={channels})"


# -- device ops -------------------------------------------------------------------------------------

@torch_op("linear", uses=("patch_tokens",), modules=_weights("w"))
def _linear(node: Node, code: Code) -> str:
    x, module = code.value(node.inputs["x"]), code.module(node.inputs["w"])
    if _source(code.graph, node, "w").layout == "conv":
        return f"patch_tokens({module}, {x})"
    return f"{module}({x})"


@torch_op("add_const_slice")
def _add_const_slice(node: Node, code: Code) -> str:
    """The table as saved, or (`crop` layout: SD3's pos_embed_max_size) its centred crop."""
    table, x = code.const(node.inputs["table"]), code.value(node.inputs["x"])
    if _source(code.graph, node, "table").layout == "crop":
        grid = math.isqrt(code.graph.tensors[node.inputs["table"]].shape[1])
        return f"{x} + crop_pos_embed({table}, {grid})"
    return f"{x} + {table}"


def _table_module(node: Node, graph: Graph) -> dict[str, str]:
    """A bare parameter (no module around it: PixArt's `scale_shift_table`), by its own key."""
    source = _source(graph, node, "b")
    return {source.key: f"nn.Parameter(torch.zeros({', '.join(map(str, source.torch_shape))}))"}


@torch_op("add_fiber", modules=_table_module)
def _add_fiber(node: Node, code: Code) -> str:
    """x + one row of the table (the row the parameter's `rows` name)."""
    rows = _source(code.graph, node, "b").rows
    return f"{code.value(node.inputs['x'])} + {code.const(node.inputs['b'])}[{rows[0]}]"


@torch_op("add_rows", uses=("add_rows",))
def _add_rows(node: Node, code: Code) -> str:
    width = code.graph.tensors[node.outputs["y"]].shape[0]
    return f"add_rows({code.value(node.inputs['x'])}, {code.value(node.inputs['h'])}, {node.attrs.offset}, {width})"


def _embedding_module(node: Node, graph: Graph) -> dict[str, str]:
    rows, dim = _source(graph, node, "table").torch_shape
    return {module_path(_source(graph, node, "table").key): f"nn.Embedding({rows}, {dim})"}


@torch_op("embedding", uses=("label_embedding",), modules=_embedding_module)
def _embedding(node: Node, code: Code) -> str:
    a = node.attrs
    return (f"label_embedding({code.module(node.inputs['table'])}, {code.value(node.inputs['labels'])}, "
            f"{a.null_class}, {a.prob!r}, self.training)")


@torch_op("act")
def _act(node: Node, code: Code) -> str:
    x = code.value(node.inputs["x"])
    return {"silu": f"F.silu({x})", "gelutanh": f'F.gelu({x}, approximate="tanh")', "gelu": f"F.gelu({x})"}[node.attrs.fn]


@torch_op("add")
def _add(node: Node, code: Code) -> str:
    return f"{code.value(node.inputs['a'])} + {code.value(node.inputs['b'])}"


@torch_op("layer_norm", uses=("layer_norm",))
def _layer_norm(node: Node, code: Code) -> str:
    return f"layer_norm({code.value(node.inputs['x'])}, eps={node.attrs.eps!r})"


def _rms_norm_module(node: Node, graph: Graph) -> dict[str, str]:
    source = _source(graph, node, "weight")
    return {module_path(source.key): f"nn.RMSNorm({source.torch_shape[0]}, eps={node.attrs.eps!r})"}


@torch_op("rms_norm", uses=("rms_norm",), modules=_rms_norm_module)
def _rms_norm(node: Node, code: Code) -> str:
    """The weight lives in an `nn.RMSNorm` (the checkpoint layout of one); `rms_norm` computes."""
    weight = code.module(node.inputs["weight"]) + ".weight"
    return f"rms_norm({code.value(node.inputs['x'])}, {weight}, eps={node.attrs.eps!r})"


@torch_op("modulate", uses=("modulate",))
def _modulate(node: Node, code: Code) -> str:
    x, shift, scale = (code.value(node.inputs[p]) for p in ("x", "shift", "scale"))
    return f"modulate({x}, {shift}, {scale})"


@torch_op("gated_residual", uses=("gated_residual",))
def _gated_residual(node: Node, code: Code) -> str:
    x, h, gate = (code.value(node.inputs[p]) for p in ("x", "h", "gate"))
    return f"gated_residual({x}, {h}, {gate})"


def _attention_modules(*ports: str) -> Callable[[Node, Graph], dict[str, str]]:
    """The projections' Linear modules, and QK norm's `nn.LayerNorm` or `nn.RMSNorm` (over head_dim)."""
    linears = _weights(*ports)

    def modules(node: Node, graph: Graph) -> dict[str, str]:
        found = linears(node, graph)
        norm = {"layer_norm": "nn.LayerNorm", "rms_norm": "nn.RMSNorm"}.get(node.attrs.qk_norm)
        for side in "qk" if norm else ():
            source = _source(graph, node, f"{side}_norm_w")
            found[module_path(source.key)] = f"{norm}({source.torch_shape[0]}, eps={node.attrs.qk_eps!r})"
        return found
    return modules


def _qk_norm(node: Node, code: Code) -> str:
    """attention()'s QK norm arguments, if the node has QK norm."""
    if node.attrs.qk_norm == "none":
        return ""
    return "".join(f", {side}_norm={code.module(node.inputs[f'{side}_norm_w'])}" for side in "qk")


@torch_op("attention", uses=("attention",), modules=_attention_modules("w_q", "w_k", "w_v", "w_o"))
def _attention(node: Node, code: Code) -> str:
    """One fused qkv projection split in three where q, k and v are row blocks of one weight (DiT),
    three projections otherwise (diffusers)."""
    x = code.value(node.inputs["x"])
    heads = code.graph.tensors[node.inputs["w_q"]].shape[0]
    keys = {_source(code.graph, node, f"w_{z}").key for z in "qkv"}
    if len(keys) == 1:
        qkv = f"*{code.module(node.inputs['w_q'])}({x}).chunk(3, dim=-1)"
    else:
        qkv = ", ".join(f"{code.module(node.inputs[f'w_{z}'])}({x})" for z in "qkv")
    return f"{code.module(node.inputs['w_o'])}(attention({qkv}, heads={heads}{_qk_norm(node, code)}))"


@torch_op("cross_attention", uses=("attention",), modules=_attention_modules("w_q", "w_k", "w_v", "w_o"))
def _cross_attention(node: Node, code: Code) -> str:
    """Queries from the tokens, keys and values from the context, each its own projection."""
    x, context = code.value(node.inputs["x"]), code.value(node.inputs["context"])
    heads = code.graph.tensors[node.inputs["w_q"]].shape[0]
    q, k, v = (f"{code.module(node.inputs[f'w_{z}'])}({source})" for z, source in zip("qkv", (x, context, context)))
    mask = f", mask={code.value(node.inputs['mask'])}, mask_bias={node.attrs.mask_bias!r}" if "mask" in node.inputs else ""
    return f"{code.module(node.inputs['w_o'])}(attention({q}, {k}, {v}, heads={heads}{mask}{_qk_norm(node, code)}))"


@torch_op("append_tokens")
def _append_tokens(node: Node, code: Code) -> str:
    parts = ([code.value(node.inputs["x"])] if "x" in node.inputs else []) \
        + [f"{code.value(node.inputs[p])}[:, None]" for p in ("a", "b")]
    return f"torch.cat([{', '.join(parts)}], dim=1)"


@torch_op("take_tokens")
def _take_tokens(node: Node, code: Code) -> str:
    return f"{code.value(node.inputs['x'])}[:, :{code.graph.tensors[node.outputs['y']].shape[1]}]"


_JOINT_WEIGHTS = ("w_q", "w_k", "w_v", "w_o", "w_aq", "w_ak", "w_av", "w_ao")
_QK_NORMS = ("n_q", "n_k", "n_aq", "n_ak")


def _joint_modules(node: Node, graph: Graph) -> dict[str, str]:
    modules = _weights(*(p for p in _JOINT_WEIGHTS if p in node.inputs))(node, graph)
    for port in (p for p in _QK_NORMS if p in node.inputs):
        source = _source(graph, node, port)
        modules[module_path(source.key)] = f"nn.RMSNorm({source.torch_shape[0]}, eps={node.attrs.eps!r})"
    return modules


@torch_op("joint_attention", uses=("attention", "rms_norm", "joint_attention"), modules=_joint_modules)
def _joint_attention(node: Node, code: Code) -> str:
    """Both streams' projections as diffusers' JointAttnProcessor2_0 names them; the context's output
    projection is None in the last block (context_pre_only); QK norm's RMSNorms where the node has them."""
    heads = code.graph.tensors[node.inputs["w_q"]].shape[0]
    image = ", ".join(code.module(node.inputs[p]) for p in ("w_q", "w_k", "w_v", "w_o"))
    context = ", ".join(code.module(node.inputs[p]) if p in node.inputs else "None"
                        for p in ("w_aq", "w_ak", "w_av", "w_ao"))
    x, c = code.value(node.inputs["x"]), code.value(node.inputs["c"])
    norms = ""
    if "n_q" in node.inputs:
        norms = ", norms=(" + ", ".join(code.module(node.inputs[p]) for p in _QK_NORMS) + ")"
    return f"joint_attention({x}, {c}, ({image}), ({context}), heads={heads}{norms})"


@torch_op("token_slice")
def _token_slice(node: Node, code: Code) -> str:
    start = node.attrs.start
    length = code.graph.tensors[node.outputs["y"]].shape[1]
    return f"{code.value(node.inputs['x'])}[:, {start}:{start + length}]"


@torch_op("token_join")
def _token_join(node: Node, code: Code) -> str:
    return f"torch.cat([{code.value(node.inputs['a'])}, {code.value(node.inputs['b'])}], dim=1)"
