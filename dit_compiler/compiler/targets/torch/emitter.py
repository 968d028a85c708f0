"""The torch emitter: graph -> `torch_reference.py`, a standalone `nn.Module` that imports only torch,
numpy and math and reads like DiT's `models.py`: a class per block kind, the model class built without
arguments, one line per op with its output's shape.

It walks the graph as the NNTile emitter does (`dit_compiler.compiler.emit.blocks` folds the identical blocks
into one class); every line is its op kind's torch code (`ops.TORCH_OPS`). Modules sit at the paths of
the parameters' state_dict keys, so the module's state_dict is the flavor's checkpoint layout. Every
traced op's output is recorded under its graph name (`tap`), which `ditc verify` compares.
"""
from __future__ import annotations

import ast
import keyword
import math
import re
import textwrap
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from dit_compiler.compiler.emit.blocks import Blocks, block_template, split_blocks
from dit_compiler.compiler.emit.env import header, render
from dit_compiler.compiler.graph.ir import Graph, Node, Tensor
from dit_compiler.compiler.graph.ops import OPS
from dit_compiler.compiler.naming import TRACE, flavor_of
from dit_compiler.compiler.posembed import SOURCE as SINCOS_SOURCE, pos_scale
from dit_compiler.compiler.targets.torch.ops import TORCH_OPS, module_path

#: Letters of the shape comments, by axis.
LETTERS = {"batch": "N", "tokens": "T", "patches": "T_img", "context": "L", "hidden": "D", "mlp": "M",
           "frequency": "F", "out_dim": "O", "patch_dim": "P", "in_channels": "C", "out_channels": "C_out",
           "height": "H", "width": "W", "joint": "J", "caption": "E", "pooled": "E_pool"}
#: The graph's constants and how torch computes them (`{table}`: the table's arguments, `const_args`).
CONSTS = {TRACE.pos_embed: "torch.from_numpy(sincos_pos_embed({table})).float().unsqueeze(0)"}
WIDTH = 112


@lru_cache(maxsize=1)
def functions() -> dict[str, str]:
    """The source of every top-level function and class of `functions.py`, by name, in file order
    (read as text: building must not import torch)."""
    text = (Path(__file__).parent / "functions.py").read_text()
    return {node.name: ast.get_source_segment(text, node) for node in ast.parse(text).body
            if isinstance(node, (ast.FunctionDef, ast.ClassDef))}


def identifier(name: str) -> str:
    s = re.sub(r"\W", "_", name)
    return "_" + s if s[0].isdigit() or keyword.iskeyword(s) else s


def access(path: str) -> str:
    """Attribute access of a module path: `ff.net.0.proj` -> `.ff.net[0].proj`."""
    return "".join(f"[{p}]" if p.isdigit() else f".{p}" for p in path.split(".")) if path else ""


def shape(t: Tensor) -> str:
    """A tensor's torch shape in letters: batch-first, features last (the graph is feature-first)."""
    dims = t.dims if t.dims[0] == "batch" else t.dims[::-1]
    return "[" + ", ".join(LETTERS.get(d, str(d)) if isinstance(d, str) else str(d) for d in dims) + "]"


@dataclass
class Scope:
    """The Python names of one function body: tensors' variables, and where parameters live."""

    graph: Graph
    root: str = ""                 # the module path this scope's `self` stands for ("blocks.3")
    index: int | None = None       # the block index written as `{i}` in taps
    names: dict[str, str] = field(default_factory=dict)
    taken: set[str] = field(default_factory=set)

    def bind(self, tensor: str, preferred: str) -> str:
        name, k = identifier(preferred), 2
        while name in self.taken:
            name, k = f"{identifier(preferred)}_{k}", k + 1
        self.taken.add(name)
        self.names[tensor] = name
        return name

    def relative(self, name: str) -> str:
        """The tensor's name without its block part: `blocks.3.norm1` -> `norm1`."""
        if self.index is None:
            return name
        parts = name.split(".")
        return ".".join(parts[parts.index(str(self.index)) + 1:]) if str(self.index) in parts else name

    def local(self, tensor: str) -> str:
        return self.names.get(tensor) or self.bind(tensor, self.relative(tensor))

    # -- what op code refers to (ops.Code) ---------------------------------------------------------
    def value(self, tensor: str) -> str:
        return self.names[tensor]

    def module(self, tensor: str) -> str:
        return "self" + access(self.path(module_path(self.graph.tensors[tensor].source.key)))

    def const(self, tensor: str) -> str:
        return "self" + access(self.path(self.graph.tensors[tensor].source.key))

    def path(self, key: str) -> str:
        if not self.root:
            return key
        if not key.startswith(self.root + "."):
            raise ValueError(f"{key} is read in block {self.index} but lives outside it")
        return key[len(self.root) + 1:]

    def tap_name(self, tensor: str) -> str:
        return f'"{tensor}"' if self.index is None else f'f"{block_template(self.graph, tensor, self.index)}"'


def _row_split(graph: Graph, nodes: list[Node], k: int) -> list[Node]:
    """The run of linear nodes from k on that are row blocks of one torch weight (adaLN's chunks)."""
    first = nodes[k]
    source = graph.tensors[first.inputs["w"]].source if first.op == "linear" else None
    if source is None or source.rows is None:
        return [first]
    end = k
    while end < len(nodes) and nodes[end].op == "linear" and graph.tensors[nodes[end].inputs["w"]].source.key == source.key:
        end += 1
    run = nodes[k:end]
    size = source.rows[1] - source.rows[0]
    rows = [graph.tensors[n.inputs["w"]].source.rows for n in run]
    if rows != [(j * size, (j + 1) * size) for j in range(len(run))] or len(run) * size != source.torch_shape[0]:
        raise ValueError(f"{first.name}: the row blocks of {source.key} are not equal consecutive chunks: {rows}")
    return run


def body(graph: Graph, scope: Scope, nodes: list[Node]) -> list[str]:
    """The forward lines of `nodes`: one tapped line per traced op, one split line per row-split linear;
    an untraced op (patchify) binds its output to its code's expression."""
    lines, k = [], 0
    while k < len(nodes):
        run = _row_split(graph, nodes, k)
        node, kind = run[0], OPS[run[0].op]
        expr = TORCH_OPS[kind.torch].call(node, scope)
        k += len(run)
        if len(run) > 1:
            chunks = scope.bind(f"chunks of {node.name}", "chunks")
            lines.append(f"{chunks} = {expr}.chunk({len(run)}, dim=-1)  # {len(run)} x {shape(graph.tensors[node.outputs['y']])}")
            lines += [f"{scope.local(n.outputs['y'])} = tap(trace, {scope.tap_name(n.outputs['y'])}, {chunks}[{j}])"
                      for j, n in enumerate(run)]
        elif not kind.traced:
            scope.names[node.outputs["y"]] = expr
        else:
            out = node.outputs["y"]
            var, comment = scope.local(out), f"  # {shape(graph.tensors[out])}"
            line = f"{var} = tap(trace, {scope.tap_name(out)}, {expr})"
            if len(line) + len(comment) + 8 <= WIDTH:
                lines.append(line + comment)
            else:   # too long for one line: compute, then record
                lines += [fit(f"{var} = {expr}", comment), f"{var} = tap(trace, {scope.tap_name(out)}, {var})"]
    return lines


def fit(line: str, comment: str, indent: int = 8) -> str:
    """`line` + `comment`, or where that is longer than WIDTH, broken after the outermost parenthesis
    that holds a comma: its arguments go on a continuation line, or one a line where they are still
    longer than WIDTH."""
    if indent + len(line) + len(comment) <= WIDTH:
        return line + comment
    opened, commas = [], []     # open brackets; (depth, the bracket around it, its place) of each comma
    for k, ch in enumerate(line):
        if ch in "([":
            opened.append(k)
        elif ch in ")]":
            opened.pop()
        elif ch == "," and opened:
            commas.append((len(opened), opened[-1], k))
    if not commas:
        return line + comment
    depth, at, _ = min(commas)
    if indent + 4 + len(line) - at - 1 + len(comment) <= WIDTH:
        return line[:at + 1] + "\n    " + line[at + 1:] + comment
    cuts = [at] + [k for d, b, k in commas if (d, b) == (depth, at)]
    pieces = [line[a + 1:b + 1].strip() for a, b in zip(cuts, cuts[1:])] + [line[cuts[-1] + 1:].strip()]
    return line[:at + 1] + "".join("\n    " + piece for piece in pieces) + comment


def _tree(entries: list[tuple[str, object]]) -> dict:
    tree: dict = {}
    for path, leaf in entries:
        node = tree
        parts = path.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node.setdefault(parts[-1], leaf)
    return tree


@dataclass(frozen=True)
class _Const:
    value: str
    saved: bool
    buffer: bool = False    # a saved constant as a persistent buffer, not a frozen Parameter


def _expr(node, indent: int) -> str:
    """A module tree as one constructor expression: numbered children as an `nn.ModuleList` (an
    `nn.Identity` where the layout has a module without parameters), named ones as a `Group`."""
    if isinstance(node, str):
        return node
    keys = [k for k, v in node.items() if not isinstance(v, _Const)]
    if keys and all(k.isdigit() for k in keys):
        items = [_expr(node[str(j)], indent + 4) if str(j) in node else "nn.Identity()"
                 for j in range(1 + max(map(int, keys)))]
        head, tail = "nn.ModuleList([", "])"
    else:
        items = [f"{k}={_expr(node[k], indent + 4)}" for k in keys]
        head, tail = "Group(", ")"
    one = head + ", ".join(items) + tail
    if indent + len(one) <= WIDTH and "\n" not in one:
        return one
    pad = " " * (indent + 4)
    return head + "\n" + "".join(f"{pad}{item},\n" for item in items) + " " * indent + tail


def _consts(node: dict, path: str = "") -> list[str]:
    """Statements registering the constant tables of a module tree, after its modules exist."""
    lines = []
    for name, child in node.items():
        owner = "self" + access(path)
        if isinstance(child, _Const):
            if child.saved and not child.buffer and not path:
                lines.append(f"self.{name} = nn.Parameter({child.value}, requires_grad=False)")
            elif child.saved and not child.buffer:
                lines.append(f'{owner}.register_parameter("{name}", nn.Parameter({child.value}, requires_grad=False))')
            else:
                lines.append(f'{owner}.register_buffer("{name}", {child.value}, persistent={child.saved})')
        elif isinstance(child, dict):
            lines += _consts(child, f"{path}.{name}" if path else name)
    return lines


def init_lines(tree: dict, indent: int = 8) -> list[str]:
    """`__init__`'s statements (written at `indent`; continuation lines relative to the statement's)."""
    lines = [f"self.{name} = {_expr(child, indent + len(name) + 8)}".replace("\n" + " " * (indent + len(name) + 8), "\n")
             for name, child in tree.items() if not isinstance(child, _Const)]
    return lines + [fit(line, "", indent) for line in _consts(tree)]


def signature(name: str, args: list[str], returns: str, indent: int) -> str:
    """A `def` line, its arguments on a continuation line where it is longer than WIDTH."""
    line = f"def {name}({', '.join(args)}) -> {returns}:"
    if indent + len(line) <= WIDTH:
        return line
    pad = " " * (indent + 8)
    joined = ", ".join(args) if indent + 8 + len(", ".join(args)) <= WIDTH else f",\n{pad}".join(args)
    return f"def {name}(\n{pad}{joined}\n{' ' * indent}) -> {returns}:"


def module_entries(graph: Graph, nodes: list[Node], scope: Scope,
                   block_list: tuple[str, str] | None = None) -> list[tuple[str, object]]:
    """(module path, constructor) of the parameters and constants `nodes` read, in graph order, and
    `block_list` where the blocks' parameters begin."""
    ctors: dict[str, str] = {}
    for node in nodes:
        for path, ctor in TORCH_OPS[OPS[node.op].torch].modules(node, graph).items():
            if ctors.setdefault(path, ctor) != ctor:
                raise ValueError(f"module {path}: {ctors[path]} and {ctor}")
    read = {i for n in nodes for i in n.input_names}
    entries: list[tuple[str, object]] = []
    for t in graph.tensors.values():
        if block_list and t.block is not None and t.role == "param":
            entries.append(block_list)
            block_list = None
        if t.name not in read or t.source is None:
            continue
        if t.role == "const":
            entries.append((scope.path(t.source.key), _Const(CONSTS[t.name].format(table=const_args(graph, t)),
                                                             t.source.saved, t.source.layout == "crop")))
        elif t.source.key in ctors:   # a bare parameter, the attribute of its scope's module
            entries.append((scope.path(t.source.key), ctors[t.source.key]))
        else:
            entries.append((scope.path(module_path(t.source.key)), ctors[module_path(t.source.key)]))
    return entries


def const_args(graph: Graph, t: Tensor) -> str:
    """The arguments of `sincos_pos_embed` for the positional table `t`: the whole table diffusers saves
    (its max_size x max_size one where the model adds a crop), positions scaled as the design's."""
    patches = graph.axes.get("patches", graph.axes["tokens"])   # in_context's tokens hold 2 more
    args = f"{graph.axes['hidden'].size}, {math.isqrt(patches.size)}"
    if (scale := pos_scale(graph.spec.model)) != 1:
        args += f", scale={scale}"
    if t.source.layout == "crop":
        args += f", max_size={math.isqrt(t.source.torch_shape[1])}"
    return args


def _block_root(graph: Graph, i: int) -> str:
    keys = {t.source.key for t in graph.tensors.values() if t.block == i and t.role == "param"}
    roots = {".".join(k.split(".")[:k.split(".").index(str(i)) + 1]) for k in keys if str(i) in k.split(".")}
    if len(roots) != 1 or any(str(i) not in k.split(".") for k in keys):
        raise ValueError(f"block {i}: its parameters do not share one module path ending in {i}: {sorted(keys)}")
    root = roots.pop()
    if root.count(".") != 1:
        raise ValueError(f"block {i}: its module path {root} is not an entry of a top-level block list")
    return root


def _reads(graph: Graph, nodes: list[Node]) -> list[str]:
    made = {o for n in nodes for o in n.output_names}
    return list(dict.fromkeys(i for n in nodes for i in n.input_names
                              if i not in made and graph.tensors[i].role in ("activation", "input")))


def block_class(graph: Graph, blocks: Blocks, exports: list[str], i: int, name: str, inputs: dict[str, str]) -> str:
    """The class of block i (named `name`), `i` kept symbolic: identical blocks give identical text. It
    returns what the next block reads and the `exports` (templates of tensors read after the blocks)."""
    nodes = blocks.blocks[i]
    scope = Scope(graph, _block_root(graph, i), i)
    chained = blocks.chain_in if i == 0 else blocks.chain_out.format(i=i - 1)
    scope.bind(chained, "x")
    args = ["x"] + [scope.bind(r, inputs.get(r, r)) for r in _reads(graph, nodes) if r != chained]
    args = [f"{a}: torch.Tensor" for a in args]
    lines = body(graph, scope, nodes)
    returned = [scope.names[blocks.chain_out.format(i=i)]]
    returned += [scope.names[e.format(i=i)] for e in exports]
    init = init_lines(_tree(module_entries(graph, nodes, scope)))
    out = "torch.Tensor" if len(returned) == 1 else f"tuple[{', '.join(['torch.Tensor'] * len(returned))}]"
    text = [f"class {name}(nn.Module):",
            '    """One block; `i` is its place in the model (its traced names hold it)."""',
            "",
            "    def __init__(self, i: int) -> None:",
            "        super().__init__()",
            "        self.i = i",
            *(" " * 8 + line for line in "\n".join(init).split("\n")),
            "",
            "    " + signature("forward", ["self", *args, "trace: dict | None = None"], out, 4),
            "        i = self.i",
            *(" " * 8 + line for line in "\n".join(lines).split("\n")),
            f"        return {', '.join(returned)}"]
    return "\n".join(text)


def torch_context(graph: Graph) -> dict:
    flavor = flavor_of(graph.spec.model)
    blocks = split_blocks(graph, host=True)
    if blocks.chain_out is None:
        raise ValueError("the blocks do not chain (block i reads what block i - 1 made): no block loop")
    inputs = dict(zip(graph.inputs, flavor.inputs))
    outside = blocks.before + blocks.after
    scope = Scope(graph)
    for tensor, name in inputs.items():
        scope.bind(tensor, name)
    before = body(graph, scope, blocks.before)
    attr = _block_root(graph, 0).split(".")[0]
    made_in_blocks = {o for b in blocks.blocks for n in b for o in n.output_names}
    after_reads = [r for r in _reads(graph, blocks.after) if r in made_in_blocks]
    last = blocks.chain_out.format(i=len(blocks.blocks) - 1)
    exports = [r for r in after_reads if r != last]
    templates = [block_template(graph, e, graph.tensors[e].block) for e in exports]
    kinds: dict[str, str] = {}     # class text with its name left out -> class name
    order: list[str] = []
    for i in range(len(blocks.blocks)):
        text = block_class(graph, blocks, templates, i, "{name}", inputs)
        if text not in kinds:
            kinds[text] = flavor.block_class + (str(len(kinds) + 1) if kinds else "")
        order.append(kinds[text])
    classes = [text.replace("class {name}(", f"class {name}(", 1) for text, name in kinds.items()]
    # the loop over the blocks: each reads the chain and what block 0 reads from outside
    h = scope.bind(last, "h")
    others = [scope.value(r) for r in _reads(graph, blocks.blocks[0]) if r != blocks.chain_in]
    results = [h] + [scope.bind(f"export {t}", Scope(graph, index=0).relative(t.format(i=0))) for t in templates]
    loop = [f"{h} = {scope.value(blocks.chain_in)}"]
    call = f"{', '.join(results)} = block({', '.join([h] + others + ['trace'])})"
    if exports:
        loop += [f"for i, block in enumerate(self.{attr}):", f"    {call}"]
        for e, r in zip(exports, results[1:]):
            loop += [f"    if i == {graph.tensors[e].block}:", f"        {scope.bind(e, e)} = {r}"]
    else:
        loop += [f"for block in self.{attr}:", f"    {call}"]
    after = body(graph, scope, blocks.after)
    if len(kinds) == 1:
        block_list = f"nn.ModuleList({order[0]}(i) for i in range({len(order)}))"
    else:
        block_list = "nn.ModuleList([" + ", ".join(f"{c}({i})" for i, c in enumerate(order)) + "])"
    entries = module_entries(graph, outside, scope, (attr, block_list))
    used = {"tap", "Group"} | {u for n in graph.nodes for u in TORCH_OPS[OPS[n.op].torch].uses}
    sources = [src for name, src in functions().items() if name in used]
    if any(t.role == "const" for t in graph.tensors.values()):
        sources.append(SINCOS_SOURCE.rstrip())
    x = graph.axes
    legend = ", ".join(f"{LETTERS[a]} {a} {x[a].size}" for a in LETTERS if a in x and a != "batch")
    return {
        "header": header(graph, "Reference PyTorch module"),
        "about": "\n".join(textwrap.wrap(f"{graph.spec.name} in PyTorch: {flavor.about}", 104)),
        "legend": "\n".join(textwrap.wrap(f"Shapes in the comments: N batch (any; the NNTile model's is "
                                           f"{x['batch'].size}), {legend}.", 104)),
        "functions": sources,
        "classes": classes,
        "model_class": flavor.model_class,
        "blocks_attr": attr,
        "init": init_lines(_tree(entries)),
        "forward_def": signature("forward", ["self", *(f"{a}: torch.Tensor" for a in inputs.values()),
                                             "trace: dict | None = None"], "torch.Tensor", 4),
        "forward": before + loop + after,
        "output": scope.value(graph.outputs[0]),
    }


def emit_torch(graph: Graph) -> str:
    return render("torch/model.py.j2", **torch_context(graph))
