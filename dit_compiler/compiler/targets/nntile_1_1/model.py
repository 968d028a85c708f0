"""The base of every generated NNTile 1.1 model: tensors from the graph's declarations, layers wired by
the generated `build`, the memory plan, forward and backward, parameters in torch's layout, AdamW.

A generated model subclasses `Model`, sets `AXES` (size and tile of every axis) and `GEOMETRY`, returns
its tensor declarations from `declarations()`, and wires its layers in `build()` with `op(...)` calls.
"""
from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from dit_compiler.compiler.graph.ops import OPS
from dit_compiler.compiler.graph.passes import layer_internals
from dit_compiler.compiler.targets.nntile_1_1.alloc import Allocator
from dit_compiler.compiler.targets.nntile_1_1.host import Geometry, from_graph_layout, to_graph_layout
from dit_compiler.compiler.targets.nntile_1_1.layers import LAYERS, Layer, Moments
from dit_compiler.compiler.targets.nntile_1_1.native import KernelChoice, kernels as choose_kernels
from dit_compiler.compiler.targets.nntile_1_1.optim import EMA, AdamW
from dit_compiler.compiler.targets.nntile_1_1.plan import PlanRow, Step, memory_plan
from dit_compiler.compiler.targets.nntile_1_1.runtime import wait_for_all

Dims = tuple[str | int, ...]


@dataclass(frozen=True)
class Decl:
    """A graph tensor as the generated model declares it (`role` as in `dit_compiler.compiler.graph.ir`)."""

    dims: Dims
    role: str = "activation"
    grad: bool = True
    dtype: str = "fp32"
    key: str | None = None                      # parameters: the torch state_dict key,
    torch_shape: tuple[int, ...] | None = None  # that tensor's shape,
    rows: tuple[int, int] | None = None         # the rows of it this parameter holds,
    layout: str = "same"                        # and how they map to the graph tensor


def param(dims: Dims, key: str, torch_shape: tuple[int, ...], rows: tuple[int, int] | None = None,
          layout: str = "same") -> Decl:
    return Decl(dims, "param", True, "fp32", key, torch_shape, rows, layout)


class Model:
    """One NNTile layer per graph op, in graph order (see the module docstring)."""

    AXES: ClassVar[Mapping[str, tuple[int, int]]]
    GEOMETRY: ClassVar[Geometry]
    #: The tensor whose value the host reads after forward (the output patches).
    OUTPUT: ClassVar[str]

    def __init__(self, keep_intermediates: bool = False, next_tag: int = 0, inference: bool = False,
                 kernels: str | None = None):
        """`keep_intermediates` keeps every activation's value and gradient for `value` and `grad` (as
        `ditc verify` does); otherwise the memory plan releases each as soon as nothing needs it.
        `inference` builds a forward-only model (sampling): no gradients, and every value and kept tensor
        released after its last forward reader. `kernels`: `ditc` or `nntile` (see `native.kernels`;
        default $DITC_KERNELS, else ditc's where they build); `self.kernels` says which set runs."""
        self.keep_intermediates, self.inference = keep_intermediates, inference
        self.kernels: KernelChoice = choose_kernels(kernels)
        self.alloc = Allocator(next_tag)
        self.decls = self.declarations()
        self.tensors: dict[str, Any] = {}
        self.layers: list[Layer] = []
        self.kinds: list[str] = []   # each layer's op kind, for per-kind profiles
        self.steps: list[Step] = []
        self.layer_params: list[tuple[Moments, ...]] = []  # the parameters each layer reads
        self.build()
        activations = {n for n, d in self.decls.items() if d.role == "activation"}
        params = {n for n, d in self.decls.items() if d.role == "param"}
        self.plan: list[PlanRow] = memory_plan(self.steps, activations, params, {self.OUTPUT})
        for layer, row in zip(self.layers, self.plan):
            layer.overwrites = tuple(self.tensors[name] for name in row.first)
        self.param_names = [n for n in self.decls if n in params]
        self.parameters = [self.tensor(n) for n in self.param_names]
        reader = {name: i for i, s in enumerate(self.steps) for name in s.inputs.values() if name in params}
        #: Indices into `param_names` in the order backward finishes their gradients: by the index of the
        #: layer that reads the parameter, descending (each parameter has one reader, see the memory plan).
        self.gradient_order = sorted(range(len(self.param_names)), key=lambda k: -reader[self.param_names[k]])

    # -- what a generated model provides ----------------------------------------------------------
    def declarations(self) -> dict[str, Decl]:
        raise NotImplementedError

    def build(self) -> None:
        raise NotImplementedError

    def set_inputs(self, *inputs: np.ndarray) -> None:
        """The graph's inputs in its order (latent, timesteps, then labels or captions ...)."""
        raise NotImplementedError

    def output(self) -> np.ndarray:
        raise NotImplementedError

    def set_output_grad(self, grad_out: np.ndarray) -> None:
        raise NotImplementedError

    def input_grad(self) -> np.ndarray:
        raise NotImplementedError

    # -- wiring -----------------------------------------------------------------------------------
    def op(self, kind: str, **bindings: Any) -> None:
        """Add the layer of op kind `kind`: its ports bound to tensor names, the rest its attributes."""
        op = OPS[kind]
        ports = {p: bindings.pop(p) for p in op.inputs + op.outputs if p in bindings or p not in op.optional}
        attrs = op.attrs(**bindings) if bindings else None
        cls = LAYERS[op.layer]
        node = ports[op.outputs[0]]
        first = self.decls[next(ports[p] for p in op.inputs if p in ports)].dims   # the first bound input
        internals = {name: tensor for name, (tensor, _, _) in layer_internals(cls, node, first, attrs).items()}
        layer = cls({p: self.tensor(n) for p, n in ports.items()},
                    {name: self.tensor(n) for name, n in internals.items()}, attrs, self.alloc, self.kernels.module)
        self.layers.append(layer)
        self.kinds.append(kind)
        self.steps.append(Step({p: ports[p] for p in op.inputs if p in ports}, {p: ports[p] for p in op.outputs},
                               frozenset() if self.inference else cls.BACKWARD_READS))
        self.layer_params.append(tuple(self.tensor(n) for n in ports.values() if self.decls[n].role == "param"))

    def tensor(self, name: str):
        """The graph tensor `name`, made on first use with the shape and tile of its dims' axes."""
        if name not in self.tensors:
            decl = self.decls[name]
            shape = tuple(d if isinstance(d, int) else self.AXES[d][0] for d in decl.dims)
            tile = tuple(d if isinstance(d, int) else self.AXES[d][1] for d in decl.dims)
            value = self.alloc.new(shape, tile, decl.dtype)
            if decl.role in ("param", "activation"):
                value = Moments(value, self.alloc.new(shape, tile) if decl.grad and not self.inference else None)
            elif decl.role == "input" and decl.dtype == "fp32":   # captions: read as values, no gradient
                value = Moments(value)
            self.tensors[name] = value
        return self.tensors[name]

    # -- values in and out, torch layouts ---------------------------------------------------------
    def set_value(self, name: str, torch_layout: np.ndarray) -> None:
        self.tensor(name).value.from_array(_fortran(np.asarray(torch_layout, dtype=np.float32).T))

    def set_grad(self, name: str, torch_layout: np.ndarray) -> None:
        self.tensor(name).grad.from_array(_fortran(np.asarray(torch_layout, dtype=np.float32).T))

    def set_labels(self, name: str, labels: np.ndarray) -> None:
        self.tensor(name).from_array(np.asarray(labels, dtype=np.int64))

    def set_const(self, name: str, array: np.ndarray) -> None:
        self.tensor(name).from_array(_fortran(np.asarray(array, dtype=np.float32)))

    def value(self, name: str) -> np.ndarray:
        """Activation `name` in torch layout (axes reversed)."""
        return _read(self._kept(name, "value", "release_values", "release_read")).T

    def grad(self, name: str) -> np.ndarray:
        """The gradient of activation `name` after `backward`, in torch layout."""
        return _read(self._kept(name, "grad", "release_grads")).T

    def _kept(self, name: str, part: str, *released: str):
        """A released tensor has no data to read (StarPU would abort): say so instead."""
        if not self.keep_intermediates and any(name in getattr(row, r) for row in self.plan for r in released):
            raise RuntimeError(f"the {part} of {name} is released once used; "
                               "build Model(keep_intermediates=True) to read it")
        tensor = getattr(self.tensors[name], part)
        if tensor is None:
            raise RuntimeError(f"{name} takes no gradient")
        return tensor

    # -- running ----------------------------------------------------------------------------------
    def forward(self, *inputs: np.ndarray) -> np.ndarray:
        """Latent [N, C, H, W], timesteps [N], labels [N] (or the graph's other inputs, in its order: captions
        [N, L, W] and their mask [N, L]) -> output [N, C_out, H, W] (numpy)."""
        self.set_inputs(*inputs)
        for i in range(len(self.layers)):
            self.forward_layer(i)
        wait_for_all()
        return self.output()

    def backward(self, grad_out: np.ndarray, input_grad: bool = True) -> np.ndarray | None:
        """Back-propagate `grad_out` [N, C_out, H, W]; returns the latent's gradient [N, C, H, W]."""
        self.backward_async(grad_out)
        wait_for_all()
        return self.input_grad() if input_grad else None

    def backward_async(self, grad_out: np.ndarray) -> None:
        """Submit backward and return while it runs: reading a parameter gradient (`to_array`) waits for
        that tensor's tasks only, so the host can take gradients in `gradient_order` as they finish."""
        self.set_output_grad(grad_out)
        for i in reversed(range(len(self.layers))):
            self.backward_layer(i)

    def backward_update(self, grad_out: np.ndarray, optimizer: AdamW) -> None:
        """Backward from `grad_out` with one AdamW step, each layer's parameters updated right after its
        backward: a parameter has one reader, so its gradient is complete then, and AdamW updates each
        parameter from its own gradient alone, so the result is that of a step after the whole backward.
        Parameter gradients are never all held at once, and under out-of-core a parameter is updated
        while backward has it in memory."""
        self.set_output_grad(grad_out)
        optimizer.begin_step()
        for i in reversed(range(len(self.layers))):
            self.backward_layer(i)
            optimizer.update(self.layer_params[i])
        wait_for_all()

    def forward_layer(self, i: int) -> None:
        layer = self.layers[i]
        layer.forward_async()
        self.release(self.plan[i].release_values, "value")
        if self.inference:
            self.release_kept(layer)

    def release_kept(self, layer: Layer) -> None:
        """The layer's own kept tensors: done after its backward (or its forward, in inference)."""
        if not self.keep_intermediates:
            for tensor in layer.kept:
                tensor.invalidate_submit()

    def backward_layer(self, i: int) -> None:
        self.layers[i].backward_async()
        self.after_backward(i)

    def after_backward(self, i: int) -> None:
        """Release what layer i's backward was the last to need: the gradients it made, the values no
        earlier backward reads, its kept tensors."""
        self.release(self.plan[i].release_grads, "grad")
        self.release(self.plan[i].release_read, "value")
        self.release_kept(self.layers[i])

    def release(self, names: tuple[str, ...], part: str) -> None:
        """Hand the memory of these activations' values or gradients back to StarPU (after the tasks
        already submitted on them); the next pass writes them before reading."""
        if not self.keep_intermediates:
            for name in names:
                getattr(self.tensors[name], part).invalidate_submit()

    # -- parameters, under the torch reference's state_dict keys ------------------------------------
    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load torch-reference weights (numpy arrays or torch tensors) by state_dict key."""
        self.load_parameters((key, state_dict[key]) for key in self.parameter_shapes())

    def parameter_shapes(self) -> dict[str, tuple[int, ...]]:
        """The torch reference's trainable weights this model holds: {state_dict key: shape}."""
        return {decl.key: decl.torch_shape for decl in self.decls.values() if decl.role == "param"}

    def load_parameters(self, items: Iterable[tuple[str, Any]]) -> None:
        """Load weights given as (state_dict key, value) pairs, one at a time, so that a caller streaming
        them never holds a second copy of the model; every key of `parameter_shapes` must come once."""
        names: dict[str, list[str]] = defaultdict(list)
        for name in self.param_names:
            names[self.decls[name].key].append(name)
        for key, value in items:
            if key not in names:
                raise ValueError(f"{key}: not a parameter of this model, or given twice")
            for name in names.pop(key):
                self._write(name, value, self.tensor(name).value)
        if names:
            raise ValueError(f"weights missing: {', '.join(sorted(names))}")

    def state_dict(self) -> dict[str, np.ndarray]:
        """Current weights under the torch reference's keys (a checkpoint the reference loads)."""
        return self.to_torch([p.value for p in self.parameters])

    def gradients(self) -> dict[str, np.ndarray]:
        """Parameter gradients as a torch-style {state_dict key: array}; row blocks are reassembled."""
        return self.to_torch([p.grad for p in self.parameters])

    def to_torch(self, tensors: list) -> dict[str, np.ndarray]:
        """One NNTile tensor per parameter (in `param_names` order: values, gradients, AdamW moments, EMA
        weights) as {state_dict key: array in the torch reference's layout}."""
        pieces: dict[str, list[np.ndarray]] = defaultdict(list)
        for name, tensor in zip(self.param_names, tensors, strict=True):
            decl = self.decls[name]
            rows = decl.rows
            shape = ((rows[1] - rows[0],) + decl.torch_shape[1:]) if rows else decl.torch_shape
            pieces[decl.key].append(from_graph_layout(_read(tensor), decl.layout, shape))
        return {key: np.concatenate(parts) if len(parts) > 1 else parts[0] for key, parts in pieces.items()}

    def from_torch(self, state: Mapping[str, Any], tensors: list) -> None:
        """The inverse of `to_torch`: arrays or torch tensors by state_dict key into one tensor per parameter."""
        for name, tensor in zip(self.param_names, tensors, strict=True):
            self._write(name, state[self.decls[name].key], tensor)

    def _write(self, name: str, value: Any, tensor) -> None:
        """Parameter `name`'s rows of the torch-layout `value` (array or torch tensor) into `tensor`."""
        decl = self.decls[name]
        value = np.asarray(value.detach().cpu().numpy() if hasattr(value, "detach") else value, dtype=np.float32)
        if value.shape != decl.torch_shape:
            raise ValueError(f"{decl.key}: shape {value.shape}, the model needs {decl.torch_shape}")
        rows = value[decl.rows[0]:decl.rows[1]] if decl.rows is not None else value
        tensor.from_array(to_graph_layout(rows, decl.layout, tuple(tensor.shape)))

    # -- training and profiling ---------------------------------------------------------------------
    def adamw(self, lr: float, weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999),
              eps: float = 1e-8) -> AdamW:
        """AdamW over every parameter (torch's defaults): `.step()` after `backward`, `.unregister()` at the end."""
        return AdamW(self.parameters, self.alloc, lr, weight_decay, betas, eps, self.kernels.module)

    def adamw_state(self, optimizer: AdamW) -> dict[str, Any]:
        """The optimiser's state by state_dict key: torch AdamW's `exp_avg` and `exp_avg_sq` as they are
        (this AdamW keeps the second moment itself, not its square root as NNTile's fused step does)."""
        exp_avg, exp_avg_sq = zip(*(optimizer.moments[id(p)] for p in self.parameters))
        return {"step": optimizer.num_iter, "exp_avg": self.to_torch(list(exp_avg)),
                "exp_avg_sq": self.to_torch(list(exp_avg_sq))}

    def load_adamw_state(self, optimizer: AdamW, state: Mapping[str, Any]) -> None:
        """The inverse of `adamw_state`."""
        exp_avg, exp_avg_sq = zip(*(optimizer.moments[id(p)] for p in self.parameters))
        self.from_torch(state["exp_avg"], list(exp_avg))
        self.from_torch(state["exp_avg_sq"], list(exp_avg_sq))
        optimizer.num_iter = int(state["step"])

    def ema(self) -> EMA:
        """An EMA of the parameters, starting from their current values (`to_torch(ema.shadow)` reads it)."""
        return EMA(self.parameters, self.alloc)

    def train_step(self, inputs: tuple[np.ndarray, ...], target: np.ndarray, optimizer: AdamW) -> float:
        """One optimiser step (`backward_update`) on the mean squared error against `target` [N, C_out, H, W]
        for the graph's `inputs` (latent, timesteps, labels or captions ...); returns the loss."""
        diff = self.forward(*inputs) - target
        self.backward_update(2.0 / target.size * diff, optimizer)
        return float(np.mean(diff ** 2))

    def profile_layers(self, inputs: tuple[np.ndarray, ...], target: np.ndarray, optimizer: AdamW,
                       repeats: int = 3) -> dict[str, float]:
        """Seconds per op kind of one `train_step`'s forward, backward and AdamW step. Each layer is submitted
        `repeats` times and waited on once, which amortises the cost of a wait but removes the overlap
        StarPU finds between layers: the sum exceeds a step."""
        seconds: dict[str, float] = defaultdict(float)

        def timed(label: str, run) -> None:
            start = time.perf_counter()
            for _ in range(repeats):
                run()
            wait_for_all()
            seconds[label] += (time.perf_counter() - start) / repeats

        self.set_inputs(*inputs)
        for i, kind in enumerate(self.kinds):
            timed(f"{kind} forward", self.layers[i].forward_async)
            self.release(self.plan[i].release_values, "value")  # after the repeats, which read what it frees
        self.set_output_grad(2.0 / target.size * (self.output() - target))
        for i in reversed(range(len(self.layers))):
            timed(f"{self.kinds[i]} backward", self.layers[i].backward_async)
            self.after_backward(i)
        start = time.perf_counter()
        optimizer.step()
        wait_for_all()
        seconds["adamw step"] = time.perf_counter() - start
        return dict(seconds)

    def unregister(self) -> None:
        for tensor in self.tensors.values():
            tensor.unregister()
        self.alloc.unregister()
        self.tensors.clear()
        self.layers.clear()


def _fortran(array: np.ndarray) -> np.ndarray:
    return np.asfortranarray(array)


def _read(tensor) -> np.ndarray:
    out = np.zeros(tensor.shape, order="F", dtype=np.float32)
    tensor.to_array(out)
    return out
