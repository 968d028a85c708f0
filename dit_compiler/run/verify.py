"""`ditc verify`: the NNTile model and the torch reference on identical random weights and inputs.

Both run the whole model once, forward and backward with the same output gradient; the torch side
traces every intermediate under its graph name. Each row of the report compares the tensors of one
component: its outputs (forward), the gradients of its inputs, and the gradients of its parameters,
as norm-wise relative errors of the component's tensors taken together.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from dit_compiler.graph.ir import Graph
from dit_compiler.run.common import Inputs, group_error, load_module, make_inputs, randomize_, rel_error

FORWARD_TOL = 1e-5
GRAD_TOL = 1e-4

#: Rows made of several components (the adaLN-Zero machinery of every block).
ADALN_ZERO = ("adaLN modulation", "layer norm", "modulate", "gated residual")


@dataclass
class Row:
    component: str
    forward: float
    input_grad: float
    param_grad: float
    params: dict[str, float] = field(default_factory=dict)

    def forward_breach(self) -> str | None:
        return _over(self.component, "forward", self.forward, FORWARD_TOL)

    def gradient_breach(self) -> str | None:
        return (_over(self.component, "input gradient", self.input_grad, GRAD_TOL)
                or _over(self.component, "parameter gradient", self.param_grad, GRAD_TOL))


def _over(component: str, what: str, value: float, tol: float) -> str | None:
    return f"{component}: {what} error {value:.3g} > {tol:g}" if not math.isnan(value) and value > tol else None


def first_breach(rows: list[Row], n_components: int) -> str | None:
    """Where an error starts: the first forward breach in model order, else the first gradient breach in
    the order backward runs (the component rows reversed); aggregate rows come last either way."""
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


def run_torch(module, graph: Graph, inputs: Inputs, seed: int):
    model = module.Model().eval()
    randomize_(model, seed)
    x = inputs.x.clone().requires_grad_(True)
    trace: dict = {}
    out = model(x, inputs.t, inputs.y, trace)
    out.backward(inputs.grad_out)
    values = {k: v.detach().numpy() for k, v in trace.items()}
    grads = {k: v.grad.numpy() for k, v in trace.items() if v.grad is not None}
    values[graph.outputs[0]] = out.detach().numpy()
    grads[graph.inputs[0]] = x.grad.numpy()
    params = {k: p.grad.numpy() for k, p in model.named_parameters() if p.grad is not None}
    return model, _Run(values, grads, params)


def run_nntile(module, graph: Graph, state_dict, inputs: Inputs, names: list[str], ncpus: int) -> _Run:
    with module.nntile_runtime(ncpus):
        model = module.Model(keep_intermediates=True)
        try:
            model.load_state_dict(state_dict)
            out = model.forward(inputs.x.numpy(), inputs.t.numpy(), inputs.y.numpy())
            dx = model.backward(inputs.grad_out.numpy())
            values = {n: model.value(n) for n in names}
            grads = {n: model.grad(n) for n in names}
            values[graph.outputs[0]], grads[graph.inputs[0]] = out, dx
            return _Run(values, grads, model.gradients())
        finally:
            model.unregister()


def compare(graph: Graph, nnt: _Run, ref: _Run) -> list[Row]:
    """One row per component, then adaLN-Zero, one DiT block (all blocks), and the whole model."""
    groups: dict[str, list] = {c: [n for n in graph.nodes if n.component == c] for c in graph.components()}
    groups["adaLN-Zero"] = [n for n in graph.nodes if n.component in ADALN_ZERO and n.name.startswith("blocks.")]
    groups["DiT block"] = [n for n in graph.nodes if n.name.startswith("blocks.")]
    rows = [_row(graph, name, nodes, nnt, ref) for name, nodes in groups.items()]
    out, x = graph.outputs[0], graph.inputs[0]
    rows.append(Row("model", rel_error(nnt.values[out], ref.values[out]), rel_error(nnt.grads[x], ref.grads[x]),
                    group_error([(nnt.param_grads[k], ref.param_grads[k]) for k in ref.param_grads]),
                    {k: rel_error(nnt.param_grads[k], ref.param_grads[k]) for k in sorted(ref.param_grads)}))
    return rows


def _row(graph: Graph, component: str, nodes, nnt: _Run, ref: _Run) -> Row:
    produced = {o for n in nodes for o in n.outputs}
    outputs = [o for o in produced if o in ref.values and o in nnt.values]
    inputs = {i for n in nodes for i in n.inputs if i not in produced and graph.tensors[i].role in ("activation", "input")}
    inputs = [i for i in inputs if i in ref.grads and i in nnt.grads]
    keys = sorted({graph.tensors[i].source.key for n in nodes for i in n.inputs if graph.tensors[i].role == "param"})
    return Row(
        component,
        group_error([(nnt.values[o], ref.values[o]) for o in sorted(outputs)]),
        group_error([(nnt.grads[i], ref.grads[i]) for i in sorted(inputs)]),
        group_error([(nnt.param_grads[k], ref.param_grads[k]) for k in keys]),
        {k: rel_error(nnt.param_grads[k], ref.param_grads[k]) for k in keys},
    )


def nntile_status() -> str:
    """'ran' if NNTile imports here, else the reason it does not."""
    try:
        import nntile  # noqa: F401
    except Exception as error:  # ImportError, or a broken build that fails while importing
        return f"NNTile is not importable ({type(error).__name__}: {error})"
    return "ran"


def verify(graph: Graph, build_dir: Path, *, seed: int = 0, ncpus: int = 2, oracle: bool = True,
           progress=print) -> Report:
    """Run the generated files in `build_dir` and compare them; `progress` gets one line per step."""
    seconds: dict[str, float] = {}
    clock = time.perf_counter()
    inputs = make_inputs(graph, seed)
    progress("torch reference: forward and backward")
    torch_module = load_module(build_dir / "torch_reference.py")
    model, ref = run_torch(torch_module, graph, inputs, seed)
    seconds["torch"] = time.perf_counter() - clock

    oracle_result: dict | str | None = None
    if oracle:
        from dit_compiler.run.oracle import check_against_diffusers

        progress("torch reference against diffusers' DiTTransformer2DModel")
        clock = time.perf_counter()
        result = check_against_diffusers(graph, model, inputs)
        oracle_result = result if isinstance(result, str) else asdict(result)
        seconds["diffusers"] = time.perf_counter() - clock

    status = nntile_status()
    rows: list[Row] = []
    if status == "ran":
        progress(f"NNTile model: forward and backward on {ncpus} CPU workers")
        clock = time.perf_counter()
        nntile_module = load_module(build_dir / "nntile_model.py")
        names = sorted(ref.values.keys() - set(graph.outputs))
        nnt = run_nntile(nntile_module, graph, model.state_dict(), inputs, names, ncpus)
        seconds["nntile"] = time.perf_counter() - clock
        rows = compare(graph, nnt, ref)
    breach = first_breach(rows, len(graph.components()))
    if breach is None and isinstance(oracle_result, dict):
        worst = max(oracle_result["forward"], oracle_result["input_grad"], oracle_result["param_grad"])
        if worst > 1e-5:
            breach = f"torch reference vs diffusers: error {worst:.3g} > 1e-05"
    tiling = {a.name: {"size": a.size, "tile": a.tile, "tiles": a.ntiles} for a in graph.axes.values()
              if a.ntiles > 1 or a.name in ("batch", "tokens", "hidden", "mlp", "heads")}
    return Report(graph.spec.name, tiling, status, rows, oracle_result, seconds, breach)


def format_report(report: Report) -> str:
    lines = [f"ditc verify: {report.spec}",
             "tiling: " + ", ".join(f"{k} {v['size']}/{v['tile']} ({v['tiles']} tile{'s' * (v['tiles'] > 1)})" for k, v in report.tiling.items())]
    if report.rows:
        lines.append(f"{'component':<20} {'forward':>10} {'input grad':>11} {'param grad':>11}")
        for row in report.rows:
            cells = ["-" if math.isnan(v) else f"{v:.2e}" for v in (row.forward, row.input_grad, row.param_grad)]
            lines.append(f"{row.component:<20} {cells[0]:>10} {cells[1]:>11} {cells[2]:>11}")
        lines.append(f"tolerance            {FORWARD_TOL:>10.0e} {GRAD_TOL:>11.0e} {GRAD_TOL:>11.0e}")
    else:
        lines.append(f"NNTile model not run: {report.nntile}")
    if isinstance(report.oracle, dict):
        o = report.oracle
        lines.append(f"torch reference vs diffusers DiTTransformer2DModel: forward {o['forward']:.2e}, "
                     f"input grad {o['input_grad']:.2e}, param grad {o['param_grad']:.2e}")
    elif report.oracle:
        lines.append(f"torch reference vs diffusers: skipped ({report.oracle})")
    lines.append("time: " + ", ".join(f"{k} {v:.1f} s" for k, v in report.seconds.items()))
    lines.append("PASS" if report.passed else f"FAIL: {report.breach}")
    return "\n".join(lines)
