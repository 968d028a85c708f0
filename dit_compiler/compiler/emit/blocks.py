"""Rendering graph names in generated code, and folding a model's identical DiT blocks into one loop.

Block i's tensors (`Tensor.block`) hold i as one dotted part of their names (`blocks.3.norm1`,
`transformer_blocks.3.attn1.to_q.weight`). Rendered relative to its block, a name becomes an f-string
(`f"blocks.{i}.norm1"`); a block
reads one tensor the previous block made (the residual stream), which becomes the variable `x`. When
every block renders to the same lines, generated code holds them once, in a function of `i`, and a
loop; otherwise every block is written out. Folding is checked, never assumed: the comparison of the
rendered lines is the proof that the loop computes what the unrolled code would.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

from dit_compiler.compiler.graph.ir import Graph, Node

Render = Callable[[str], str]


def literal(name: str) -> str:
    return json.dumps(name)


def block_template(graph: Graph, name: str, i: int) -> str | None:
    """`name` with its first dotted part equal to i written as `{i}`, if it names a tensor of block i or
    the state_dict key of one."""
    tensor = graph.tensors.get(name)
    block = tensor.block if tensor is not None else next(
        (t.block for t in graph.params if t.source.key == name), None)
    parts = name.split(".")
    if block != i or str(i) not in parts:
        return None
    k = parts.index(str(i))
    return ".".join(parts[:k] + ["{i}"] + parts[k + 1:])


@dataclass(frozen=True)
class Blocks:
    """The device nodes around and in the blocks, and how the blocks fold (None: they do not)."""

    before: list[Node]
    blocks: list[list[Node]]
    after: list[Node]
    chain_in: str | None      # what block 0 reads from before the blocks (later blocks: the previous one's)
    chain_out: str | None     # template of what block i passes on, `{i}` in it


def split_blocks(graph: Graph, host: bool = False) -> Blocks:
    """The blocks of the graph's device nodes (with `host`, of all its nodes, host ops included)."""
    nodes = graph.nodes if host else graph.device_nodes
    depth = graph.depth
    blocks: list[list[Node]] = [[] for _ in range(depth)]
    for n in nodes:
        if n.block is not None:
            blocks[n.block].append(n)
    first = next(i for i, n in enumerate(nodes) if n.block is not None)
    last = max(i for i, n in enumerate(nodes) if n.block is not None)
    if any(n.block is None for n in nodes[first:last + 1]):
        raise ValueError("a node outside the blocks sits between them")
    chain_in, chain_out = _chain(graph, blocks)
    return Blocks(nodes[:first], blocks, nodes[last + 1:], chain_in, chain_out)


def _external_inputs(graph: Graph, nodes: list[Node]) -> list[str]:
    made = {o for n in nodes for o in n.output_names}
    return list(dict.fromkeys(i for n in nodes for i in n.input_names
                              if i not in made and graph.tensors[i].role == "activation"))


def _chain(graph: Graph, blocks: list[list[Node]]) -> tuple[str | None, str | None]:
    """The one input position where the blocks read different tensors: block 0 a tensor from before the
    blocks, block i >= 1 the same tensor of block i - 1. (None, None) where every block reads the same."""
    inputs = [_external_inputs(graph, b) for b in blocks]
    if len(blocks) == 1:
        return _single_chain(graph, blocks[0], inputs[0])
    if len({len(e) for e in inputs}) > 1:
        return None, None
    differing = [k for k in range(len(inputs[0])) if len({e[k] for e in inputs}) > 1]
    if len(differing) != 1:
        return None, None
    k = differing[0]
    templates = {block_template(graph, e[k], i - 1) for i, e in enumerate(inputs) if i >= 1}
    if len(templates) != 1 or None in templates or graph.tensors[inputs[0][k]].block is not None:
        return None, None
    return inputs[0][k], templates.pop()


def _single_chain(graph: Graph, block: list[Node], inputs: list[str]) -> tuple[str | None, str | None]:
    """One block: the chain is the one input from before the block with the dims of the one block output
    read after it that has them (the residual stream), if exactly one such pair exists."""
    made = {o for n in block for o in n.output_names}
    after = {i for n in graph.nodes if n.block is None for i in n.input_names} & made
    pairs = [(i, o) for i in inputs for o in after
             if graph.tensors[i].block is None and graph.tensors[i].dims == graph.tensors[o].dims]
    if len(pairs) != 1:
        return None, None
    return pairs[0][0], block_template(graph, pairs[0][1], 0)


def block_renderer(graph: Graph, blocks: Blocks, i: int) -> Render:
    """Names in block i's code: its own as f-strings of `i`, the chained input as `x`, others literal."""
    chained = (blocks.chain_in if i == 0 else blocks.chain_out.format(i=i - 1)) if blocks.chain_out else None

    def render(name: str) -> str:
        if name == chained:
            return "x"
        template = block_template(graph, name, i)
        return f'f"{template}"' if template is not None else literal(name)
    return render


def after_renderer(graph: Graph, blocks: Blocks) -> Render:
    """Names after the blocks: the last block's output as `x` (the loop leaves it there), others literal."""
    last = blocks.chain_out.format(i=len(blocks.blocks) - 1) if blocks.chain_out else None
    return lambda name: "x" if name == last else literal(name)


def folds(lines_of: Callable[[int, Render], list[str]], graph: Graph, blocks: Blocks) -> bool:
    """Whether every block renders to the same lines as block 0."""
    first = lines_of(0, block_renderer(graph, blocks, 0))
    return all(lines_of(i, block_renderer(graph, blocks, i)) == first for i in range(1, len(blocks.blocks)))
