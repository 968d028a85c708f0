"""`ditc inspect`: the graph as a table, JSON, or a Graphviz picture of its block structure."""
from __future__ import annotations

import json
from dataclasses import asdict

from dit_compiler.compiler import targets
from dit_compiler.compiler.graph.cost import gflops, node_cost, totals
from dit_compiler.compiler.graph.ir import Graph
from dit_compiler.compiler.spec.model import PAPER, PRESETS
from dit_compiler.compiler.spec.validate import build_model

#: The rows of a training step's predicted peak (the target's `StepMemory`), in print order: label, note.
STEP_ROWS = {
    "parameters": ("parameters", ""),
    "gradients": ("parameter gradients", "each layer's, until AdamW updates its parameters"),
    "optimizer": ("AdamW moments", ""),
    "activations": ("activations", "values and gradients"),
    "attention": ("attention internals", "q, k, v, probabilities, output"),
    "kept": ("other kept tensors", "norm statistics, 1 + scale"),
    "scratch": ("scratch", "the running layer's"),
    "inputs": ("inputs, constants", ""),
    "baseline": ("runtime baseline", "Python, torch and the NNTile runtime before the model allocates"),
}

def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def _shape(values: tuple[int, ...]) -> str:
    return "x".join(map(str, values))


def inspect_table(graph: Graph, ops: bool = True, memory_limit: int | None = None) -> str:
    lines = [f"spec {graph.spec.name}: {graph.spec.model.flavor} flavor, batch {graph.axes['batch'].size}, "
             f"{len(graph.nodes)} ops, {len(graph.tensors)} tensors", "",
             f"{'axis':<12} {'size':>6} {'tile':>6} {'tiles':>6}"]
    lines += [f"{a.name:<12} {a.size:>6} {a.tile:>6} {a.ntiles:>6}" for a in graph.axes.values()]
    if ops:
        lines += ["", f"{'op':<44} {'kind':<18} {'output shape / tile':<28} {'tasks':>6} {'GMAC':>9} where"]
        for node in graph.nodes:
            cost = node_cost(graph, node)
            out = graph.tensors[node.output_names[0]]
            lines.append(f"{node.name:<44} {node.op:<18} {_shape(out.shape) + ' / ' + _shape(out.tile):<28} "
                         f"{cost.tiles:>6} {gflops(cost.macs):>9.4f} {'host' if node.host else 'nntile'}")
        lines += ["", f"{'tensor':<52} {'role':<10} {'shape / tile':<28} {'tiles':>6} {'bytes':>12}"]
        for t in graph.tensors.values():
            lines.append(f"{t.name:<52} {t.role:<10} {_shape(t.shape) + ' / ' + _shape(t.tile):<28} "
                         f"{t.ntiles:>6} {_mib(t.numel * 4):>12}")
    tot = totals(graph)
    lines += ["", "totals:",
              f"  forward            {gflops(tot.forward_macs):.2f} GMAC ('GFlops' as in the DiT paper)",
              *_paper(graph, tot.forward_macs, tot.params),
              f"  parameters         {tot.params / 1e6:.2f} M trainable, {_mib(tot.param_bytes)}",
              f"  activations        {_mib(tot.activation_bytes)} (graph activations "
              f"{_mib(tot.activation_bytes - tot.kept_bytes)}, the layers' kept tensors {_mib(tot.kept_bytes)})",
              f"  scratch            {_mib(tot.scratch_bytes)} (shared by all layers within a pass)",
              f"  gradients          {_mib(tot.gradient_bytes)} (parameters and activations)",
              f"  optimizer state    {_mib(tot.optimizer_bytes)} (AdamW, two moments)",
              f"  NNTile tasks       {tot.tasks} forward (output tiles of every op)"]
    return "\n".join(lines + _step_memory(graph, memory_limit)) + "\n"


def preset_of(graph: Graph) -> str | None:
    """The preset whose model the graph's is (any batch, tiling and run settings), if any."""
    return next((name for name, values in PRESETS.items() if build_model(values) == graph.spec.model), None)


def _paper(graph: Graph, macs: int, params: int) -> list[str]:
    """The paper's figures beside ditc's, where the model is a preset's (GMACs per image, at batch 1)."""
    name = preset_of(graph)
    if name is None or name not in PAPER:
        return []
    f, batch = PAPER[name], graph.axes["batch"].size
    gmacs = f"{f.gmacs:.2f} GMAC per image" if f.gmacs is not None else "no GMACs"
    counted = f"{f.params_m:.2f} M parameters" if f.params_m is not None else "no parameter count"
    return [f"  paper              {name}: {gmacs}, {counted} (ditc: {gflops(macs) / batch:.2f} GMAC per image, "
            f"{params / 1e6:.2f} M); {f.source}"]


def _step_memory(graph: Graph, memory_limit: int | None) -> list[str]:
    """A training step's predicted peak by kind (the target's replay of its memory plan), and the limit."""
    target = targets.get(graph.spec.target)
    peak = target.predict(graph)
    lines = ["", f"training step, predicted peak ({peak.where}):"]
    lines += [f"  {label:<20} {_mib(getattr(peak, key)):>14}  {note}".rstrip()
              for key, (label, note) in STEP_ROWS.items()]
    lines.append(f"  {'total':<20} {_mib(peak.total):>14}")
    if memory_limit:
        lines.append(target.check_limit(graph, memory_limit, peak).summary())
    return lines


def inspect_json(graph: Graph, memory_limit: int | None = None) -> str:
    data = {
        "spec": graph.spec.name,
        "axes": {a.name: {"size": a.size, "tile": a.tile, "tiles": a.ntiles} for a in graph.axes.values()},
        "ops": [{"name": n.name, "op": n.op, "component": n.component, "host": n.host,
                 **asdict(node_cost(graph, n))} for n in graph.nodes],
        "tensors": [{"name": t.name, "role": t.role, "shape": t.shape, "tile": t.tile, "tiles": t.ntiles}
                    for t in graph.tensors.values()],
        "totals": asdict(totals(graph)),
        "preset": preset_of(graph),
        "paper": asdict(PAPER[preset_of(graph)]) if preset_of(graph) in PAPER else None,
    }
    target = targets.get(graph.spec.target)
    peak = target.predict(graph)
    data["training_step"] = asdict(peak)
    if memory_limit:
        check = target.check_limit(graph, memory_limit, peak)
        data["memory_limit"] = asdict(check) | {"fits": check.fits, "summary": check.summary()}
    return json.dumps(data, indent=1) + "\n"


def dot(graph: Graph) -> str:
    """Embeddings, block 0 (standing for every block) and the final layer, ops linked by tensors."""
    shown = [n for n in graph.nodes if n.block in (None, 0)]
    producer = {o: n.name for n in shown for o in n.output_names}
    lines = ["digraph ditc {", '  rankdir=TB; node [shape=box, fontname="Helvetica", fontsize=10];',
             f'  label="{graph.spec.name}: blocks.0 stands for {graph.depth} blocks"; labelloc=t;',
             '  subgraph cluster_block { label="DiT block (x depth)"; style=dashed;']
    lines += [f'    "{n.name}";' for n in shown if n.block == 0]
    lines.append("  }")
    for n in shown:
        style = ", style=dashed" if n.host else ""
        lines.append(f'  "{n.name}" [label="{n.name}\\n{n.op}"{style}];')
        for i in n.input_names:
            if i in producer:
                t = graph.tensors[i]
                lines.append(f'  "{producer[i]}" -> "{n.name}" [label="{_shape(t.shape)}", fontsize=8];')
    lines.append("}")
    return "\n".join(lines) + "\n"
