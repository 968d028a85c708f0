"""The peak memory of a training step on this target, predicted from the graph and the memory plan.

Pure Python, so `ditc inspect` can say what a spec needs without NNTile. It replays what
`Model.train_step` holds and releases, tensor by tensor, over two steps (the second is the steady one:
AdamW's moments exist from its start):

- forward: each layer's outputs and kept tensors appear; values no backward reads go after their last
  reader (`plan.memory_plan`);
- backward, in reverse: each layer writes its inputs' gradients, then releases the gradients it made,
  the values no earlier backward reads and its kept tensors; AdamW then updates the layer's parameters
  and releases their gradients, so parameter gradients are never all held at once;
- scratch tensors live within one layer's pass: each layer adds its own at the moment it runs.

StarPU allocates a tile when a task first writes it and frees it when the tensor is released (on CPU
workers it keeps no allocation cache), so the bytes held follow this replay; `ditc bench` measures the
process's peak RSS (VmHWM) to compare with.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, fields

from dit_compiler.compiler.graph.cost import DTYPE_BYTES
from dit_compiler.compiler.graph.cost import nbytes as tensor_bytes
from dit_compiler.compiler.graph.ir import Graph, Node, Tensor
from dit_compiler.compiler.graph.ops import OPS
from dit_compiler.compiler.targets.nntile_1_1.layers import LAYERS
from dit_compiler.compiler.targets.nntile_1_1.plan import PlanRow, Step, memory_plan

MIB = 2 ** 20
#: The torch code of the op kinds whose kept tensors are attention's (q, k, v, probabilities, output).
ATTENTION_CODE = frozenset({"attention", "cross_attention", "joint_attention"})
#: What a process running a model holds before the model allocates anything: Python, numpy, torch (NNTile
#: imports transformers, which imports torch), NNTile, StarPU's workers and ditc. `ditc bench`'s NNTile
#: worker peaked at 290-291 MiB on specs/tiny.yaml (2.7 MiB of tensors), 2 workers, NNTile 1.1.0, torch 2.13.
BASELINE = 288 * MIB
#: O_DIRECT moves whole pages: a tile of another size never goes to disk (see `ooc`).
PAGE = 4096


@dataclass(frozen=True)
class StepMemory:
    """Bytes held at the peak of a training step, by kind, and where in the step the peak falls."""

    where: str
    parameters: int
    gradients: int      # parameter gradients: each layer's, from its backward to its parameters' update
    optimizer: int      # AdamW's two moments per parameter
    activations: int    # values and gradients of graph activations
    attention: int      # attention's kept tensors: q, k, v, probabilities, merged output
    kept: int           # the other layers' kept tensors (norm statistics, 1 + scale)
    scratch: int        # the running layer's scratch tensors
    inputs: int         # patches, timestep features, labels, constants
    baseline: int = BASELINE

    @property
    def data(self) -> int:
        """What StarPU holds: everything but the baseline."""
        return self.total - self.baseline

    @property
    def total(self) -> int:
        return sum(getattr(self, f.name) for f in fields(self) if f.name != "where")

    def parts(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "where"}


def held_tensors(graph: Graph) -> list[str]:
    """The graph tensors NNTile holds: those its layers bind, ports and internals (host-only ones stay numpy)."""
    names = dict.fromkeys(n for node in graph.device_nodes
                          for n in (*node.input_names, *node.output_names, *node.internals.values()))
    return list(names)


def _copies(t: Tensor) -> int:
    """How many tensors of its shape a training step holds for `t`: a parameter's value, gradient and AdamW's
    two moments; an activation's value and gradient; else the value."""
    return 4 if t.role == "param" else 2 if t.grad and t.role == "activation" else 1


def all_bytes(graph: Graph) -> int:
    """Everything a training step ever allocates, at once: values, gradients, AdamW's moments."""
    return sum(_copies(graph.tensors[name]) * tensor_bytes(graph, name) for name in held_tensors(graph))


def unmovable_bytes(graph: Graph) -> int:
    """Bytes in tiles that are not a whole number of pages (with their gradients and moments): under
    out-of-core they stay in memory."""
    total = 0
    for name in held_tensors(graph):
        t = graph.tensors[name]
        for tile_bytes, count in _tile_sizes(t.shape, t.tile, DTYPE_BYTES[t.dtype]):
            if tile_bytes % PAGE:
                total += _copies(t) * tile_bytes * count
    return total


def _tile_sizes(shape: tuple[int, ...], tile: tuple[int, ...], itemsize: int) -> Iterator[tuple[int, int]]:
    """(bytes of a tile, how many tiles have that size): full and edge tiles along every axis."""
    sizes: dict[int, int] = {itemsize: 1}
    for size, t in zip(shape, tile):
        full, edge = divmod(size, t)
        extents = {t: full} if not edge else {t: full, edge: 1}
        sizes = _combine(sizes, extents)
    yield from sizes.items()


def _combine(sizes: dict[int, int], extents: dict[int, int]) -> dict[int, int]:
    out: dict[int, int] = {}
    for b, n in sizes.items():
        for e, m in extents.items():
            out[b * e] = out.get(b * e, 0) + n * m
    return out


def steps_of(graph: Graph) -> list[Step]:
    """The memory plan's steps: one per device node, as `Model.op` records them."""
    return [Step(dict(n.inputs), dict(n.outputs), LAYERS[OPS[n.op].layer].BACKWARD_READS)
            for n in graph.device_nodes]


def host_reads(graph: Graph) -> set[str]:
    """Device tensors the host reads: the output patches (their gradient is the host's to set)."""
    produced = {o for n in graph.device_nodes for o in n.output_names}
    return {i for n in graph.nodes if n.host for i in n.input_names} & produced


def plan_of(graph: Graph) -> list[PlanRow]:
    """The memory plan the generated model computes, from the graph."""
    activations = {t.name for t in graph.tensors.values() if t.role == "activation"}
    params = {t.name for t in graph.params}
    return memory_plan(steps_of(graph), activations, params, host_reads(graph))


def predict(graph: Graph) -> StepMemory:
    """The peak of a steady training step (see the module docstring)."""
    return _Replay(graph).run()


class _Replay:
    """Bytes live per (tensor, part) over two training steps; the largest total seen is the peak."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self.nodes = graph.device_nodes
        self.plan = plan_of(graph)
        self.held = held_tensors(graph)
        self.attention_kept = {n for node in self.nodes if OPS[node.op].torch in ATTENTION_CODE
                               for n in node.internals.values()}
        self.live: dict[tuple[str, str], tuple[int, str]] = {}
        # bytes live per kind, kept as tensors come and go: summing `live` at every check made the replay
        # quadratic in depth (depth 500 took 113 s)
        self.by_kind: dict[str, int] = {}
        self.peak: tuple[int, dict[str, int], str] = (-1, {}, "")

    def kind(self, name: str, part: str) -> str:
        role = self.graph.tensors[name].role
        if role == "param":
            return {"value": "parameters", "grad": "gradients"}.get(part, "optimizer")
        if role == "kept":
            return "attention" if name in self.attention_kept else "kept"
        return {"activation": "activations", "scratch": "scratch"}.get(role, "inputs")

    def hold(self, name: str, part: str) -> None:
        if (name, part) not in self.live:
            size, kind = self.live[(name, part)] = (tensor_bytes(self.graph, name), self.kind(name, part))
            self.by_kind[kind] = self.by_kind.get(kind, 0) + size

    def drop(self, name: str, part: str) -> None:
        if (held := self.live.pop((name, part), None)) is not None:
            size, kind = held
            self.by_kind[kind] -= size

    def check(self, where: str, extra: tuple[str, ...] = ()) -> None:
        """Record the bytes held now (plus `extra` scratch tensors, live only within the running layer)."""
        scratch = sum(tensor_bytes(self.graph, n) for n in extra)
        total = sum(self.by_kind.values()) + scratch
        if total > self.peak[0]:
            by_kind = dict(self.by_kind)
            by_kind["scratch"] = by_kind.get("scratch", 0) + scratch
            self.peak = (total, by_kind, where)

    def run(self) -> StepMemory:
        tensors = self.graph.tensors
        host_made = {o for n in self.graph.nodes if n.host for o in n.output_names}
        for name in self.held:
            if tensors[name].role in ("param", "const"):
                self.hold(name, "value")
        inputs = [name for name in self.held if name in host_made or tensors[name].role == "input"]
        for _ in range(2):
            for name in inputs:
                self.hold(name, "value")
            for node, row in zip(self.nodes, self.plan):
                self.forward(node, row)
            for name in host_reads(self.graph):
                self.hold(name, "grad")
            for node, row in zip(reversed(self.nodes), reversed(self.plan)):
                self.backward(node, row)
        _, by_kind, where = self.peak
        return StepMemory(where, **{f.name: by_kind.get(f.name, 0) for f in fields(StepMemory)
                                    if f.name not in ("where", "baseline")})

    def internals(self, node: Node, role: str) -> tuple[str, ...]:
        return tuple(n for n in node.internals.values() if self.graph.tensors[n].role == role)

    def forward(self, node: Node, row: PlanRow) -> None:
        for name in (*node.output_names, *self.internals(node, "kept")):
            self.hold(name, "value")
        self.check(f"forward, {node.name}", self.internals(node, "scratch"))
        for name in row.release_values:
            self.drop(name, "value")

    def backward(self, node: Node, row: PlanRow) -> None:
        for name in node.input_names:
            if self.graph.tensors[name].grad:
                self.hold(name, "grad")
        self.check(f"backward, {node.name}", self.internals(node, "scratch"))
        for name in row.release_grads:
            self.drop(name, "grad")
        for name in (*row.release_read, *self.internals(node, "kept")):
            self.drop(name, "value")
        params = [n for n in node.input_names if self.graph.tensors[n].role == "param"]
        for name in params:  # AdamW's update of this layer's parameters: moments in, gradients out
            self.hold(name, "m")
            self.hold(name, "v")
        if params:
            self.check(f"AdamW update after {node.name}")
        for name in params:
            self.drop(name, "grad")
