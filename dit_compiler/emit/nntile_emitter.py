"""NNTile emitter: graph -> an executable NNTile 1.1.0 model (`nntile_model.py`).

Everything specific to NNTile 1.1.0 lives here and in `templates/nntile/`: a second target (NNTile
main) is another emitter beside this one, reading the same graph.
"""
from __future__ import annotations

from collections import Counter

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


def _tensor_entries(graph: Graph, tensors) -> list[dict]:
    """TENSORS rows: the graph's shapes and tiles, except that NNTile 1.1.0 keeps a bias as a
    one-column matrix, so the bias add and its gradient are GEMMs with a row of ones (see `Linear`)."""
    biases = {n.inputs[i] for n in graph.nodes if n.op in _BIAS_INPUTS for i in _BIAS_INPUTS[n.op]}
    return [{"name": t.name, "shape": t.shape + (1,) * (t.name in biases),
             "tile": t.tile + (1,) * (t.name in biases), "kind": _kind(graph, t.name)} for t in tensors]


def _call_args(node: Node) -> str:
    """Positional names then keyword attributes, in the order of the template's op methods."""
    names = [f'"{n}"' for n in node.inputs + node.outputs]
    if node.op != "attention":  # the head count is the first axis of the q weight
        names += [f"{key}={value!r}" for key, value in node.attrs.items()]
    return ", ".join(names)


#: What each layer's backward reads besides gradients (see `templates/nntile/layers.py.j2`): the
#: values of these inputs, by position, and whether the value of its output.
_BACKWARD_READS: dict[str, tuple[tuple[int, ...], bool]] = {
    "linear": ((0,), False), "attention": ((0,), False), "layer_norm": ((), True), "modulate": ((0,), False),
    "gated_residual": ((1, 2), False), "act": ((0,), False), "add": ((), False),
    "add_const_slice": ((), False), "embedding": ((0,), False),
}


def _memory_plan(graph: Graph, device_nodes: list[Node]) -> list[dict]:
    """Per device node, which activation tensors it may overwrite or release, so that neither values
    nor gradients are held longer than the model needs them:

    - `first`: the gradients its backward writes first (it is their last reader in forward order); it
      overwrites them instead of accumulating, so no gradient is zeroed ahead of backward;
    - `grads`: the gradients to release after its backward (it made them; nothing reads them again);
    - `values`: the values to release after its forward (it is their last reader, and no backward
      reads them: the residual stream, for one).
    The seeded gradient is never written by a layer, and values the host reads are never released.
    Parameter gradients are overwritten by the one layer that reads the parameter."""
    readers = Counter(name for n in device_nodes for name in n.inputs if graph.tensors[name].role == "param")
    shared = [name for name, count in readers.items() if count > 1]
    if shared:
        raise ValueError(f"parameters read by several ops: {', '.join(shared)}; their gradients would be overwritten")
    host_read = {name for n in graph.nodes if n.host for name in n.inputs}
    last_reader: dict[str, int] = {}
    backward_reads = set()
    for i, node in enumerate(device_nodes):
        if len(set(node.inputs)) != len(node.inputs):
            raise ValueError(f"{node.name}: an input appears twice; its gradient would be overwritten")
        inputs, output = _BACKWARD_READS[node.op]
        backward_reads |= {node.inputs[j] for j in inputs} | (set(node.outputs) if output else set())
        for name in node.inputs:
            if graph.tensors[name].role == "activation":
                last_reader[name] = i
    plan = [{"first": [], "grads": [o for o in n.outputs if graph.tensors[o].role == "activation"], "values": []}
            for n in device_nodes]
    for name, i in last_reader.items():
        if name not in host_read:
            plan[i]["first"].append(name)
        if name not in backward_reads and name not in host_read:
            plan[i]["values"].append(name)
    return [{key: _py_tuple(names) for key, names in row.items()} for row in plan]


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
        "nodes": [{"op": n.op, "args": _call_args(n),
                   "comment": f"{n.name} = {n.op}({', '.join(n.inputs)}) [{n.component}]"} for n in device_nodes],
        "memory_plan": _memory_plan(graph, device_nodes),
        "forward_host": forward_host,
        "output_host": f'unpatchify(self.value("{unpatch.inputs[0]}"))',
        "backward_seed": f'self.set_grad("{unpatch.inputs[0]}", unpatchify_grad(grad_out))',
        "seeded": unpatch.inputs[0],
        "input_grad": f'patchify_grad(self.grad("{patch.outputs[0]}"))',
    }


def emit_nntile(graph: Graph) -> str:
    return render("nntile/model.py.j2", **nntile_context(graph))
