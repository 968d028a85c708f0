"""The NNTile 1.1 emitter: graph -> `nntile_model.py`, the model's tensors, tiles and wiring over this
target's runtime (`dit_compiler.compiler.targets.nntile_1_1`), blocks folded into a loop where they are identical."""
from __future__ import annotations

import json
import math
from dataclasses import asdict

from dit_compiler.compiler.emit.blocks import Blocks, Render, after_renderer, block_renderer, folds, literal, split_blocks
from dit_compiler.compiler.emit.env import header, render
from dit_compiler.compiler.graph.ir import Graph, Node, Tensor
from dit_compiler.compiler.graph.ops import OPS
from dit_compiler.compiler.naming import TRACE
from dit_compiler.compiler.posembed import pos_scale
from dit_compiler.compiler.targets.nntile_1_1.layers import LAYERS
from dit_compiler.compiler.targets.nntile_1_1.memory import held_tensors
from dit_compiler.compiler.targets.nntile_1_1.runtime import NNTILE_VERSION, RUNTIME_VERSION

#: Host ops: the line of `forward` (or `backward`) that runs each on the host, by op kind.
_FORWARD_HOST = {
    "patchify": "self.set_value({y}, patchify({x}, GEOMETRY))",
    "timestep_sinusoid": "self.set_value({y}, timestep_features({t}, GEOMETRY))",
}
#: The graph's constants and how the host computes them (in the graph's layout).
_CONSTS = {TRACE.pos_embed: "sincos_pos_embed(GEOMETRY.hidden, GEOMETRY.grid{scale}).T"}
#: The same with a `crop` layout (SD3's pos_embed_max_size): the centred crop of the larger table.
_CROPPED = {TRACE.pos_embed: "crop_pos_embed(sincos_pos_embed(GEOMETRY.hidden, GEOMETRY.grid, max_size={size}), "
                             "GEOMETRY.grid).T"}


def _const(t: Tensor, scale: str) -> str:
    if t.source.layout == "crop":
        return _CROPPED[t.name].format(size=math.isqrt(t.source.torch_shape[1]))
    return _CONSTS[t.name].format(scale=scale)


#: The torch-layout shape of each graph input, for the generated docstrings.
_INPUT_SHAPES = {TRACE.x: "[N, C, H, W]", TRACE.t: "[N]", TRACE.y: "[N]", TRACE.caption: "[N, L, W]",
                 TRACE.caption_mask: "[N, L]", TRACE.resolution: "[N, 2]", TRACE.aspect_ratio: "[N]",
                 TRACE.pooled: "[N, E_pool]"}


def _host_input(graph: Graph, name: str) -> str:
    """A host op's input as set_inputs holds it: a value pair per item [N, 2] is read all first values,
    then all second ones (the torch reference's order, see its `timestep_sinusoid`)."""
    return f"np.asarray({name}).T.reshape(-1)" if len(graph.tensors[name].shape) == 2 else name


#: Generated lines longer than this continue on the next line, aligned after the opening parenthesis.
WIDTH = 112


def wrap(head: str, args: list[str], tail: str) -> str:
    """`head` + the comma-separated `args` + `tail`; where that is longer than WIDTH (after the template's
    indentation, 12 at most), the arguments go on continuation lines indented by four."""
    line = head + ", ".join(args) + tail
    if len(line) <= WIDTH - 12:
        return line
    lines, current = [head], "    "
    for k, arg in enumerate(args):
        piece = arg + (", " if k < len(args) - 1 else tail)
        if current.strip() and len(current) + len(piece.rstrip()) > WIDTH - 12:
            lines.append(current.rstrip())
            current = "    "
        current += piece
    return "\n".join(lines + [current])


def _dims(dims: tuple) -> str:
    items = [json.dumps(d) for d in dims]
    return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"


def _decl(t: Tensor, name: Render) -> str:
    if t.role == "param":
        s = t.source
        args = [_dims(t.dims), name(s.key), repr(s.torch_shape)]
        args += [f"rows={s.rows!r}"] if s.rows else []
        args += [f"layout={json.dumps(s.layout)}"] if s.layout != "same" else []
        return wrap(f"{name(t.name)}: param(", args, "),")
    args = [_dims(t.dims)]
    args += [json.dumps(t.role)] if t.role != "activation" else []
    args += ["grad=False"] if t.role == "activation" and not t.grad else []
    args += [f"dtype={json.dumps(t.dtype)}"] if t.dtype != "fp32" else []
    return wrap(f"{name(t.name)}: Decl(", args, "),")


def _op(node: Node, name: Render) -> str:
    args = [json.dumps(node.op)] + [f"{port}={name(t)}" for port, t in (node.inputs | node.outputs).items()]
    args += [f"{key}={json.dumps(value)}" for key, value in asdict(node.attrs).items()] if node.attrs else []
    return wrap("op(", args, ")")


def _ops(nodes: list[Node], name: Render) -> list[str]:
    """Op lines, each run of one component headed by a comment naming it."""
    lines, component = [], None
    for node in nodes:
        if node.component != component:
            component = node.component
            lines.append(f"# {component}")
        lines.append(_op(node, name))
    return lines


def model_context(graph: Graph) -> dict:
    bound = set(held_tensors(graph))   # host-only tensors stay numpy
    blocks: Blocks = split_blocks(graph)
    tensors = [t for t in graph.tensors.values() if t.name in bound]

    def block_decls(i: int, name: Render) -> list[str]:
        return [_decl(t, name) for t in tensors if t.block == i]

    def block_ops(i: int, name: Render) -> list[str]:
        return _ops(blocks.blocks[i], name)

    folded = folds(block_decls, graph, blocks) and folds(block_ops, graph, blocks)
    host = {n.op: n for n in graph.nodes if n.host}
    patches, output = host["patchify"].outputs["y"], host["unpatchify"].inputs["x"]
    ax = graph.axes
    patch, sinusoid = graph.first("patchify").attrs, graph.first("timestep_sinusoid").attrs
    scale = f", {pos_scale(graph.spec.model)}" if pos_scale(graph.spec.model) != 1 else ""
    context = {
        "header": header(graph, f"NNTile {NNTILE_VERSION} model"),
        "flavor": graph.spec.model.flavor,
        "nntile_version": NNTILE_VERSION,
        "runtime_version": RUNTIME_VERSION,
        "host_ops": [n.op for n in graph.nodes if n.host],
        "axes": [(a.name, a.size, a.tile) for a in ax.values()],
        "geometry": {
            "patch_size": patch.patch_size, "grid": ax["height"].size // patch.patch_size,
            "in_channels": ax["in_channels"].size, "out_channels": ax["out_channels"].size,
            "hidden": ax["hidden"].size, "frequency": ax["frequency"].size,
            "frequency_shift": sinusoid.shift, "max_period": sinusoid.max_period,
        },
        "depth": graph.depth,
        "output": literal(output),
        "folded": folded,
        "input_args": ", ".join(f"{name}: np.ndarray" for name in graph.inputs),
        "input_doc": ", ".join(f"{name} {_INPUT_SHAPES.get(name, '')}".rstrip() for name in graph.inputs),
        "forward_host": [_FORWARD_HOST[n.op].format(**{p: literal(v) for p, v in n.outputs.items()},
                                                    **{p: _host_input(graph, v) for p, v in n.inputs.items()})
                         for n in graph.nodes if n.op in _FORWARD_HOST]
                        + [f"self.set_labels({literal(t.name)}, {t.name})" if t.dtype == "int64"
                           else f"self.set_value({literal(t.name)}, {t.name})" for t in tensors if t.role == "input"],
        "patches": literal(patches),
        "consts": [f"self.set_const({literal(t.name)}, {_const(t, scale)})" for t in tensors if t.role == "const"],
    }
    if folded:
        after = after_renderer(graph, blocks)
        context |= {
            "outside_decls": [_decl(t, literal) for t in tensors if t.block is None],
            "block_decls": block_decls(0, block_renderer(graph, blocks, 0)),
            "before_ops": _ops(blocks.before, literal),
            "block_ops": block_ops(0, block_renderer(graph, blocks, 0)),
            "after_ops": _ops(blocks.after, after),
            "chain_in": literal(blocks.chain_in) if blocks.chain_in else None,
            "chain_out": f'f"{blocks.chain_out}"' if blocks.chain_out else None,
        }
    else:
        context |= {"outside_decls": [_decl(t, literal) for t in tensors],
                    "before_ops": _ops(graph.device_nodes, literal)}
    return context


def emit_model(graph: Graph) -> str:
    return render("nntile-1.1/model.py.j2", **model_context(graph))


def check_layers() -> None:
    """Every device op kind has a layer here whose ports are the kind's (see `tests/test_targets.py`)."""
    for kind in OPS.values():
        if kind.host:
            continue
        cls = LAYERS.get(kind.layer)
        if cls is None:
            raise ValueError(f"op kind {kind.name}: no layer {kind.layer!r} in the NNTile 1.1 target")
        ports = tuple(name for name in cls.__annotations__ if not name.isupper())
        if ports != kind.inputs + kind.outputs:
            raise ValueError(f"{cls.__name__}: ports {ports}, op kind {kind.name} has {kind.inputs + kind.outputs}")
