"""Torch emitter: graph -> a standalone reference `nn.Module` (imports only torch and numpy)."""
from __future__ import annotations

from dit_compiler.emit.env import header, render
from dit_compiler.graph.ir import Graph
from dit_compiler.naming import ADALN_CHUNKS, FINAL_CHUNKS, TRACE
from dit_compiler.posembed import SOURCE as SINCOS_SOURCE


def torch_context(graph: Graph) -> dict:
    """Everything the torch templates print, read off the graph (never re-derived from the spec)."""
    ax, f = graph.axes, graph.facts
    return {
        "header": header(graph, "Reference PyTorch module"),
        "names": TRACE,
        "adaln_chunks": ADALN_CHUNKS,
        "final_chunks": FINAL_CHUNKS,
        "sincos_source": SINCOS_SOURCE,
        "input_size": ax["height"].size,
        "in_channels": ax["in_channels"].size,
        "out_channels": ax["out_channels"].size,
        "patch_size": f.patch_size,
        "grid": ax["height"].size // f.patch_size,
        "tokens": ax["tokens"].size,
        "hidden": ax["hidden"].size,
        "heads": ax["heads"].size,
        "head_dim": ax["head_dim"].size,
        "mlp": ax["mlp"].size,
        "depth": f.depth,
        "num_classes": f.num_classes,
        "table_rows": ax["classes"].size,
        "class_dropout_prob": repr(f.class_dropout_prob),
        "frequency": ax["frequency"].size,
        "frequency_shift": f.frequency_shift,
        "max_period": f.max_period,
        "attn_norm_eps": repr(f.attn_norm_eps),
        "mlp_norm_eps": repr(f.mlp_norm_eps),
        "final_norm_eps": repr(f.final_norm_eps),
        "batch": ax["batch"].size,
    }


def emit_torch(graph: Graph) -> str:
    return render(f"torch/{graph.facts.flavor}.py.j2", **torch_context(graph))
