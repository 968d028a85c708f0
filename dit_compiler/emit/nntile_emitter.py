"""NNTile emitter: graph -> an executable NNTile 1.1.0 model (`nntile_model.py`).

Everything specific to NNTile 1.1.0 lives here and in `templates/nntile/`: a second target (NNTile
main) is another emitter beside this one, reading the same graph.
"""
from __future__ import annotations

from dit_compiler.emit.env import header, render
from dit_compiler.graph.ir import Graph, Node

NNTILE_VERSION = "1.1.0"

#: Host op -> the line of `Model.forward` that feeds NNTile from it.
_HOST_INPUT = {
    "patchify": 'self.set_value("{out}", patchify(x))',
    "timestep_sinusoid": 'self.set_value("{out}", timestep_sinusoid(t))',
}


def _kind(graph: Graph, name: str) -> str:
    t = graph.tensors[name]
    return "labels" if t.dtype == "int64" else t.role


#: Ops whose bias inputs (by position) NNTile 1.1.0 adds as rank-1 GEMMs.
_BIAS_INPUTS = {"linear": (2,), "attention": (4, 5, 6, 8)}


def _ones_name(graph: Graph, node: Node) -> str:
    """The constant row of ones a node's bias GEMMs multiply: [1, <the output's batch axes>]."""
    return "ones[" + ",".join(graph.tensors[node.outputs[0]].dims[1:]) + "]"


def _tensor_entries(graph: Graph, tensors) -> list[dict]:
    """TENSORS rows: the graph's shapes and tiles, except that NNTile 1.1.0 keeps a bias as a
    one-column matrix, beside rows of ones, so the bias add and its gradient are GEMMs (see `Linear`)."""
    with_bias = [n for n in graph.nodes if n.op in _BIAS_INPUTS]
    biases = {n.inputs[i] for n in with_bias for i in _BIAS_INPUTS[n.op]}
    rows = [{"name": t.name, "shape": t.shape + (1,) * (t.name in biases),
             "tile": t.tile + (1,) * (t.name in biases), "kind": _kind(graph, t.name)} for t in tensors]
    for node in with_bias:
        y = graph.tensors[node.outputs[0]]
        row = {"name": _ones_name(graph, node), "shape": (1,) + y.shape[1:], "tile": (1,) + y.tile[1:], "kind": "ones"}
        if row not in rows:
            rows.append(row)
    return rows


def _call_args(graph: Graph, node: Node) -> str:
    """Positional names then keyword attributes, in the order of the template's op methods."""
    names = [f'"{n}"' for n in node.inputs + node.outputs]
    if node.op in _BIAS_INPUTS:
        names.append(f'"{_ones_name(graph, node)}"')
    if node.op != "attention":  # the head count is the first axis of the q weight
        names += [f"{key}={value!r}" for key, value in node.attrs.items()]
    return ", ".join(names)


def _grad_plan(graph: Graph, device_nodes: list[Node]) -> list[dict]:
    """Per device node, the activation gradients its backward writes first (it is their last reader in
    forward order), which it overwrites instead of accumulating, and those to release after it (it made
    them; backward never reads them again). A gradient lives only between the two, so StarPU reuses its
    memory instead of holding every activation's gradient at once. The seeded gradient is never written."""
    seeded = {n.inputs[0] for n in graph.nodes if n.host and n.op == "unpatchify"}
    last_reader: dict[str, int] = {}
    for i, node in enumerate(device_nodes):
        if len(set(node.inputs)) != len(node.inputs):
            raise ValueError(f"{node.name}: an input appears twice; its gradient would be overwritten")
        for name in node.inputs:
            if graph.tensors[name].role == "activation" and name not in seeded:
                last_reader[name] = i
    first: list[list[str]] = [[] for _ in device_nodes]
    for name, i in last_reader.items():
        first[i].append(name)
    release = [[o for o in n.outputs if graph.tensors[o].role == "activation"] for n in device_nodes]
    return [{"first": _py_tuple(f), "release": _py_tuple(r)} for f, r in zip(first, release)]


def _py_tuple(names: list[str]) -> str:
    return "(" + "".join(f'"{n}", ' for n in names).rstrip(" ") + ")"


def nntile_context(graph: Graph) -> dict:
    host_nodes = [n for n in graph.nodes if n.host]
    device_nodes = [n for n in graph.nodes if not n.host]
    host_tensors = {n.inputs[0] for n in host_nodes if n.op != "unpatchify"} | set(graph.outputs)
    nntile_tensors = [t for t in graph.tensors.values() if t.name not in host_tensors]
    label_inputs = [t.name for t in graph.tensors.values() if t.role == "input" and t.dtype == "int64"]
    unpatch = next(n for n in host_nodes if n.op == "unpatchify")
    patch = next(n for n in host_nodes if n.op == "patchify")
    ax, a = graph.axes, graph.attrs
    forward_host = [_HOST_INPUT[n.op].format(out=n.outputs[0]) for n in host_nodes if n.op in _HOST_INPUT]
    forward_host += [f'self.set_labels("{name}", {name})' for name in label_inputs]
    return {
        "header": header(graph, f"NNTile {NNTILE_VERSION} model"),
        "nntile_version": NNTILE_VERSION,
        "flavor": a["flavor"],
        "patch_size": a["patch_size"],
        "grid": ax["height"].size // a["patch_size"],
        "out_channels": ax["out_channels"].size,
        "hidden": ax["hidden"].size,
        "frequency": ax["frequency"].size,
        "frequency_shift": a["frequency_shift"],
        "max_period": a["max_period"],
        "host_nodes": host_nodes,
        "tensors": _tensor_entries(graph, nntile_tensors),
        "params": [{"name": p.name, "key": p.source.key, "rows": p.source.rows, "layout": p.source.layout}
                   for p in graph.params],
        "consts": [t.name for t in graph.tensors.values() if t.role == "const"],
        "nodes": [{"op": n.op, "args": _call_args(graph, n),
                   "comment": f"{n.name} = {n.op}({', '.join(n.inputs)}) [{n.component}]"} for n in device_nodes],
        "grad_plan": _grad_plan(graph, device_nodes),
        "forward_host": forward_host,
        "output_host": f'unpatchify(self.value("{unpatch.inputs[0]}"))',
        "backward_seed": f'self.set_grad("{unpatch.inputs[0]}", unpatchify_grad(grad_out))',
        "seeded": unpatch.inputs[0],
        "input_grad": f'patchify_grad(self.grad("{patch.outputs[0]}"))',
    }


def emit_nntile(graph: Graph) -> str:
    return render("nntile/model.py.j2", **nntile_context(graph))
