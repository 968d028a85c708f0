"""`ditc verify`: the NNTile model and the torch reference on identical random weights and inputs.

Both run the whole model once, forward and backward with the same output gradient; the torch side
traces every intermediate under its graph name. Each row of the report compares the tensors of one
component: its outputs (forward), the gradients of its inputs, and the gradients of its parameters,
as norm-wise relative errors of the component's tensors taken together. A second NNTile run with the
memory plan on (values and gradients released as soon as used, as training runs) is compared at the
model's boundary: output, input gradient and every parameter gradient. Where the target has several
kernel sets that run here (the NNTile target: ditc's own kernels and NNTile's), the table is the
default set's, and the model runs once more on each other set, compared the same way.

Verify fails closed: a graph activation, gradient or parameter that either side did not produce, a NaN,
or a row with nothing in it is a failure naming the tensor, never a silent gap in the table.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from dit_compiler.checks.common import Inputs, group_error, make_inputs, randomize_, rel_error
from dit_compiler.compiler import targets
from dit_compiler.compiler.build import load_module
from dit_compiler.compiler.graph.ir import Graph, Node
from dit_compiler.compiler.graph.ops import OPS
from dit_compiler.compiler.lower import groups as design_groups
from dit_compiler.errors import UsageError

FORWARD_TOL = 1e-5
GRAD_TOL = 1e-4

MODEL_ROW, PLAN_ROW = "model", "model, memory plan on"


@dataclass
class Row:
    """Errors of one component; None where it has nothing of that kind (no parameters, say)."""

    component: str
    forward: float | None
    input_grad: float | None
    param_grad: float | None
    params: dict[str, float] = field(default_factory=dict)

    def forward_breach(self) -> str | None:
        return _over(self.component, "forward", self.forward, FORWARD_TOL)

    def gradient_breach(self) -> str | None:
        return (_over(self.component, "input gradient", self.input_grad, GRAD_TOL)
                or _over(self.component, "parameter gradient", self.param_grad, GRAD_TOL))


def _over(component: str, what: str, value: float | None, tol: float) -> str | None:
    if value is None or value <= tol:
        return None
    return f"{component}: {what} error {'is NaN' if math.isnan(value) else f'{value:.3g} > {tol:g}'}"


def forward_breach(graph: Graph, nnt: _Run, ref: _Run) -> str | None:
    """The first op, in the order the model runs, whose output breaches the forward tolerance."""
    values = set(expected(graph).values)
    for node in graph.nodes:
        outputs = [o for o in node.output_names if o in values]
        error = group_error([(nnt.values[o], ref.values[o]) for o in outputs]) if outputs else None
        if breach := _over(node.component, "forward", error, FORWARD_TOL):
            return f"{breach} (at {node.name})"
    return None


def first_breach(rows: list[Row], n_components: int) -> str | None:
    """Where an error starts, by rows: the first forward breach in model order, else the first gradient
    breach in the order backward runs (the component rows reversed); aggregate rows come last either way."""
    components, aggregates = rows[:n_components], rows[n_components:]
    ordered = [r.forward_breach() for r in components + aggregates]
    ordered += [r.gradient_breach() for r in components[::-1] + aggregates]
    return next((b for b in ordered if b), None)


@dataclass
class Report:
    spec: str
    tiling: dict[str, dict[str, int]]
    nntile: str                     # "ran", or why not
    rows: list[Row]
    oracle: dict | str | None       # the torch reference against diffusers
    seconds: dict[str, float]
    breach: str | None = None
    kernels: str = ""               # which kernels the table's run used, and which others ran

    @property
    def passed(self) -> bool:
        return self.breach is None

    def to_json(self) -> str:
        return json.dumps(asdict(self) | {"passed": self.passed}, indent=1, default=_json_float) + "\n"


def _json_float(value):
    return None if isinstance(value, float) and math.isnan(value) else value


@dataclass
class _Run:
    """Values and gradients of one side, keyed by graph tensor name and torch parameter key."""

    values: dict[str, np.ndarray]
    grads: dict[str, np.ndarray]
    param_grads: dict[str, np.ndarray]


@dataclass(frozen=True)
class Expected:
    """What both sides must produce: the values of every traced activation, the gradients of those that
    take one (and of the latent), and every parameter's gradient by state_dict key."""

    values: tuple[str, ...]
    grads: tuple[str, ...]
    params: tuple[str, ...]


def expected(graph: Graph) -> Expected:
    traced = [o for n in graph.nodes if OPS[n.op].traced for o in n.output_names]
    return Expected(tuple(traced), tuple([graph.inputs[0]] + [n for n in traced if graph.tensors[n].grad]),
                    tuple(dict.fromkeys(p.source.key for p in graph.params)))


def missing(exp: Expected, side: str, run: _Run) -> list[str]:
    """What `run` lacks of what both sides must produce, each as a sentence naming the tensor."""
    return ([f"the value of {n} is missing on the {side} side" for n in exp.values if n not in run.values]
            + [f"the gradient of {n} is missing on the {side} side" for n in exp.grads if n not in run.grads]
            + [f"the gradient of parameter {k} is missing on the {side} side" for k in exp.params
               if k not in run.param_grads])


def run_torch(module, graph: Graph, inputs: Inputs, seed: int, weights: dict | None = None):
    """The reference with random weights (seeded), or with `weights` loaded strictly (every key of its
    state_dict, no other); a key mismatch is a UsageError naming the keys."""
    model = module.Model().eval()
    if weights is None:
        randomize_(model, seed)
    else:
        load_strict(model, weights)
    x = inputs.x.clone().requires_grad_(True)
    trace: dict = {}
    out = model(x, *inputs.args(graph)[1:], trace=trace)
    out.backward(inputs.grad_out)
    values = {k: v.detach().numpy() for k, v in trace.items()}
    grads = {k: v.grad.numpy() for k, v in trace.items() if v.grad is not None}
    values[graph.outputs[0]] = out.detach().numpy()
    grads[graph.outputs[0]] = inputs.grad_out.numpy()
    grads[graph.inputs[0]] = x.grad.numpy()
    params = {k: p.grad.numpy() for k, p in model.named_parameters() if p.grad is not None}
    return model, _Run(values, grads, params)


def load_strict(model, weights: dict) -> None:
    """`model.load_state_dict(weights, strict=True)`, its key mismatch said in one line."""
    missing_keys = sorted(set(model.state_dict()) - set(weights))
    unexpected = sorted(set(weights) - set(model.state_dict()))
    if missing_keys or unexpected:
        parts = [f"{len(missing_keys)} keys of the reference missing, such as {missing_keys[0]}"] if missing_keys else []
        parts += [f"{len(unexpected)} keys the reference lacks, such as {unexpected[0]}"] if unexpected else []
        raise UsageError(f"--weights: the weights do not fit this spec's torch reference ({'; '.join(parts)}); "
                         "`ditc import DIR -o SPEC.yaml` writes the spec of the folder's model")
    shapes = [k for k, v in model.state_dict().items() if tuple(v.shape) != tuple(weights[k].shape)]
    if shapes:
        raise UsageError(f"--weights: {shapes[0]} is {list(weights[shapes[0]].shape)}, this spec's torch reference "
                         f"has {list(model.state_dict()[shapes[0]].shape)}")
    model.load_state_dict(weights, strict=True)


def run_nntile(module, graph: Graph, state_dict, inputs: Inputs, names: tuple[str, ...] | None,
               kernels: str | None = None) -> _Run:
    """One forward and backward; `names`: the activations to read (kept for it), None: the memory plan on;
    `kernels`: the target's kernel set (None: its default)."""
    model = module.Model(keep_intermediates=names is not None, kernels=kernels)
    try:
        model.load_state_dict(state_dict)
        out = model.forward(*(value.numpy() for value in inputs.args(graph)))
        dx = model.backward(inputs.grad_out.numpy())
        values = {n: model.value(n) for n in names or ()}
        grads = {n: model.grad(n) for n in names or () if graph.tensors[n].grad}
        values[graph.outputs[0]], grads[graph.inputs[0]] = out, dx
        grads[graph.outputs[0]] = inputs.grad_out.numpy()
        return _Run(values, grads, model.gradients())
    finally:
        model.unregister()


def compare(graph: Graph, nnt: _Run, ref: _Run) -> list[Row]:
    """One row per component, then lowering's groups of components (adaLN-Zero), the blocks, and the
    whole model."""
    blocks = [n for n in graph.nodes if n.block is not None]
    groups: dict[str, list[Node]] = {c: [n for n in graph.nodes if n.component == c] for c in graph.components()}
    groups |= {name: [n for n in blocks if n.component in members] for name, members in design_groups(graph.spec).items()}
    groups["DiT block"] = blocks
    rows = [_row(graph, name, nodes, nnt, ref) for name, nodes in groups.items()]
    return rows + [model_row(graph, MODEL_ROW, nnt, ref)]


def model_row(graph: Graph, name: str, nnt: _Run, ref: _Run) -> Row:
    out, x = graph.outputs[0], graph.inputs[0]
    keys = expected(graph).params
    return Row(name, rel_error(nnt.values[out], ref.values[out]), rel_error(nnt.grads[x], ref.grads[x]),
               group_error([(nnt.param_grads[k], ref.param_grads[k]) for k in keys]),
               {k: rel_error(nnt.param_grads[k], ref.param_grads[k]) for k in keys})


def _row(graph: Graph, component: str, nodes: list[Node], nnt: _Run, ref: _Run) -> Row:
    exp = expected(graph)
    produced = {o for n in nodes for o in n.output_names}
    outputs = sorted(produced & set(exp.values))
    inputs = sorted({i for n in nodes for i in n.input_names if i not in produced} & set(exp.grads))
    keys = sorted({graph.tensors[i].source.key for n in nodes for i in n.input_names if graph.tensors[i].role == "param"})
    return Row(
        component,
        group_error([(nnt.values[o], ref.values[o]) for o in outputs]) if outputs else None,
        group_error([(nnt.grads[i], ref.grads[i]) for i in inputs]) if inputs else None,
        group_error([(nnt.param_grads[k], ref.param_grads[k]) for k in keys]) if keys else None,
        {k: rel_error(nnt.param_grads[k], ref.param_grads[k]) for k in keys},
    )


def nntile_status(graph: Graph | None = None) -> str:
    """'ran' if the target's runtime (NNTile) is importable here, else the reason it is not."""
    target = targets.get(graph.spec.target if graph is not None else targets.DEFAULT)
    return target.problem() or "ran"


def verify(graph: Graph, build_dir: Path, *, seed: int = 0, ncpus: int = 2, oracle: bool = True,
           progress=print, pretrained: Path | None = None) -> Report:
    """Run the generated files in `build_dir` and compare them; `progress` gets one line per step.
    `pretrained`: a diffusers model folder whose weights both sides run with (not random ones), compared
    with the diffusers model loaded from it."""
    from dit_compiler.checks.oracle import check_against_diffusers, load_pretrained

    seconds: dict[str, float] = {}
    clock = time.perf_counter()
    inputs = make_inputs(graph, seed)
    hf_model, weights = load_pretrained(pretrained) if pretrained is not None else (None, None)
    progress("torch reference: forward and backward" + (f", with the weights of {pretrained}" if weights else ""))
    torch_module = load_module(build_dir / "torch_reference.py")
    model, ref = run_torch(torch_module, graph, inputs, seed, weights)
    seconds["torch"] = time.perf_counter() - clock

    oracle_result: dict | str | None = None
    hf_values: dict[str, np.ndarray] = {}
    if oracle:
        progress("torch reference against diffusers" + (f" (loaded from {pretrained})" if pretrained else ""))
        clock = time.perf_counter()
        result = check_against_diffusers(graph, model, inputs, hf_model, hf_values)
        oracle_result = result if isinstance(result, str) else asdict(result)
        seconds["diffusers"] = time.perf_counter() - clock

    status = nntile_status(graph)
    rows: list[Row] = []
    problems = missing(expected(graph), "torch", ref)
    kernels = ""
    if status == "ran":
        target = targets.get(graph.spec.target)
        choice = target.choose_kernels()   # a bad or unavailable request fails here, before anything runs
        target.check_environment(graph, "verify")
        others = [name for name, why in target.kernel_sets().items() if why is None and name != choice.name]
        kernels = choice.note + "".join(f"; the model also ran on {target.KERNEL_SETS[name]}" for name in others)
        progress(f"NNTile model: forward and backward on {ncpus} CPU workers, all values kept, then with "
                 "the memory plan on" + "".join(f", then on {target.KERNEL_SETS[name]}" for name in others))
        clock = time.perf_counter()
        nntile_module = load_module(build_dir / "nntile_model.py")
        exp = expected(graph)
        names = tuple(n for n in exp.values if n not in graph.outputs and graph.tensors[n].role == "activation")
        with nntile_module.nntile_runtime(ncpus):
            nnt = run_nntile(nntile_module, graph, model.state_dict(), inputs, names, choice.name)
            planned = run_nntile(nntile_module, graph, model.state_dict(), inputs, None, choice.name)
            alternatives = {name: run_nntile(nntile_module, graph, model.state_dict(), inputs, None, name)
                            for name in others}
        seconds["nntile"] = time.perf_counter() - clock
        problems += missing(exp, "NNTile", nnt)
        if not problems:
            rows = compare(graph, nnt, ref) + [model_row(graph, PLAN_ROW, planned, ref)]
            rows += [model_row(graph, f"model, {target.KERNEL_SETS[name]}", run, ref)
                     for name, run in alternatives.items()]
            problems += [f"row {r.component} compares no value" for r in rows if r.forward is None]
            problems += [b for b in [forward_breach(graph, nnt, ref)] if b]
        if isinstance(oracle_result, dict) and hf_values:
            oracle_result["nntile_forward"] = rel_error(nnt.values[graph.outputs[0]], hf_values["out"])
            oracle_result["nntile_input_grad"] = rel_error(nnt.grads[graph.inputs[0]], hf_values["dx"])
    breach = problems[0] if problems else first_breach(rows, len(graph.components()))
    if breach is None and isinstance(oracle_result, dict):
        worst = max(oracle_result["forward"], oracle_result["input_grad"], oracle_result["param_grad"])
        if not worst <= 1e-5:
            breach = f"torch reference vs diffusers: error {worst:.3g} > 1e-05"
        elif oracle_result.get("nntile_forward") is not None:
            breach = (_over("NNTile vs diffusers", "forward", oracle_result["nntile_forward"], FORWARD_TOL)
                      or _over("NNTile vs diffusers", "input gradient", oracle_result["nntile_input_grad"], GRAD_TOL))
    return Report(graph.spec.name, tiling_of(graph), status, rows, oracle_result, seconds, breach, kernels)


def tiling_of(graph: Graph) -> dict[str, dict[str, int]]:
    """Each tiled axis (and the named ones): its size, tile and number of tiles."""
    return {a.name: {"size": a.size, "tile": a.tile, "tiles": a.ntiles} for a in graph.axes.values()
            if a.ntiles > 1 or a.name in ("batch", "tokens", "hidden", "mlp", "heads")}


def format_header(spec: str, tiling: dict[str, dict[str, int]]) -> str:
    """The report's first lines: what is verified (printed before the run's progress lines)."""
    return f"ditc verify: {spec}\ntiling: " + ", ".join(
        f"{k} {v['size']}/{v['tile']} ({v['tiles']} tile{'s' * (v['tiles'] > 1)})" for k, v in tiling.items())


def format_report(report: Report, header: bool = True) -> str:
    """The report; without its `header` where that was printed before the run."""
    lines = [format_header(report.spec, report.tiling)] if header else []
    if report.kernels:
        lines.append(f"kernels: {report.kernels}")
    if report.rows:
        lines.append(f"{'component':<24} {'forward':>10} {'input grad':>11} {'param grad':>11}")
        for row in report.rows:
            cells = ["-" if v is None else f"{v:.2e}" for v in (row.forward, row.input_grad, row.param_grad)]
            lines.append(f"{row.component:<24} {cells[0]:>10} {cells[1]:>11} {cells[2]:>11}")
        lines.append(f"{'tolerance':<24} {FORWARD_TOL:>10.0e} {GRAD_TOL:>11.0e} {GRAD_TOL:>11.0e}")
    elif report.nntile != "ran":
        lines.append(f"NNTile model not run: {report.nntile}")
    if isinstance(report.oracle, dict):
        o = report.oracle
        lines.append(f"diffusers {o['oracle']} ({o['source']}):")
        lines.append(f"  torch reference vs diffusers: forward {o['forward']:.2e}, input grad {o['input_grad']:.2e}, "
                     f"param grad {o['param_grad']:.2e}")
        if o.get("nntile_forward") is not None:
            lines.append(f"  NNTile vs diffusers: forward {o['nntile_forward']:.2e}, input grad "
                         f"{o['nntile_input_grad']:.2e}")
    elif report.oracle:
        lines.append(f"torch reference vs diffusers: skipped ({report.oracle})")
    lines.append("time: " + ", ".join(f"{k} {v:.1f} s" for k, v in report.seconds.items()))
    lines.append("PASS" if report.passed else f"FAIL: {report.breach}")
    return "\n".join(lines)
