"""Torch emitter: graph -> a standalone reference `nn.Module` (imports only torch and numpy)."""
from __future__ import annotations

from dit_compiler.emit.env import header, render
from dit_compiler.graph.ir import Graph


def torch_context(graph: Graph) -> dict:
    """Everything the torch templates print, read off the graph (never re-derived from the spec)."""
    ax, a = graph.axes, graph.attrs
    return {
        "header": header(graph, "Reference PyTorch module"),
        "input_size": ax["height"].size,
        "in_channels": ax["in_channels"].size,
        "out_channels": ax["out_channels"].size,
        "patch_size": a["patch_size"],
        "grid": ax["height"].size // a["patch_size"],
        "tokens": ax["tokens"].size,
        "hidden": ax["hidden"].size,
        "heads": ax["heads"].size,
        "head_dim": ax["head_dim"].size,
        "mlp": ax["mlp"].size,
        "depth": a["depth"],
        "num_classes": a["num_classes"],
        "table_rows": ax["classes"].size,
        "class_dropout_prob": repr(a["class_dropout_prob"]),
        "frequency": ax["frequency"].size,
        "frequency_shift": a["frequency_shift"],
        "max_period": a["max_period"],
        "attn_norm_eps": repr(a["attn_norm_eps"]),
        "mlp_norm_eps": repr(a["mlp_norm_eps"]),
        "final_norm_eps": repr(a["final_norm_eps"]),
        "batch": ax["batch"].size,
    }


def emit_torch(graph: Graph) -> str:
    return render(f"torch/{graph.attrs['flavor']}.py.j2", **torch_context(graph))
