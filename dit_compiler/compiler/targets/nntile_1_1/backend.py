"""The NNTile backend of `ditc train` and `ditc sample` (the interface `dit_compiler.app.backend.Backend`).

It runs the generated `nntile_model.py` of a build: forward and backward on NNTile, AdamW and the EMA on
NNTile tensors (one task per tile each, no copy to the host per step). Weights, the EMA and AdamW's
moments cross the interface in the torch reference's layout: weights and EMA by state_dict key, the
optimizer as `torch.optim.AdamW.state_dict()`, whose parameter indices follow the reference's
`parameters()` (read from the reference built on torch's meta device, which allocates nothing). This
AdamW keeps `exp_avg` and `exp_avg_sq` themselves, so they convert as they are.

In a data-parallel world, `backward` submits the model's backward and, while it runs, reads each
parameter gradient as soon as the layer that makes it is done (in the model's `gradient_order`), into
flat buckets whose all-reduce starts as each fills (`world.gradient_buckets`, `base.DataParallel`); the
means go back into the gradients before AdamW's step, which every rank applies alike.
"""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import numpy as np
import torch

from dit_compiler.compiler.build import NNTILE_FILE, TORCH_FILE, load_module
from dit_compiler.compiler.captions import label_inputs
from dit_compiler.compiler.graph.ir import Graph
from dit_compiler.compiler.targets.base import DataParallel, OptimConfig, clip_scale
from dit_compiler.compiler.targets.nntile_1_1.ooc import OutOfCoreError, out_of_core
from dit_compiler.compiler.targets.nntile_1_1.runtime import check_environment, default_workers, nntile_runtime, problem
from dit_compiler.errors import UsageError


class NNTileBackend:
    name = "nntile"

    def __init__(self, build_dir: Path, graph: Graph, optim: OptimConfig, inference: bool = False,
                 ncpus: int | None = None, world: DataParallel | None = None):
        """`inference`: a forward-only model (sampling): no gradients, no AdamW moments, values released
        as soon as used; `forward`, `backward`, `step` and the EMA are then unavailable."""
        ncpus = ncpus or default_workers()   # a bad $STARPU_NCPU refused before StarPU reads it
        self._stack = contextlib.ExitStack()
        limit = None if inference else graph.spec.memory_limit_bytes
        #: Out-of-core settings under the spec's memory limit: set before NNTile is imported.
        try:
            self.out_of_core = self._stack.enter_context(out_of_core(graph, limit)) if limit else None
        except OutOfCoreError as error:
            raise OutOfCoreError(f"memory_limit {graph.spec.memory_limit} (the spec's, or --memory-limit): {error}") \
                from None
        if self.out_of_core is not None:
            self.out_of_core.apply()   # before `problem` imports NNTile (idempotent: nntile_runtime applies it too)
            print(f"nntile {self.out_of_core.describe()}", file=sys.stderr)
        if self.out_of_core is None:   # ditc's own out-of-core sets StarPU's limit itself
            check_environment(graph, "sample" if inference else "train")
        if (reason := problem()) is not None:
            self._stack.close()

            raise UsageError(f"--backend nntile: {reason}")
        self.batch = graph.axes["batch"].size
        self.graph = graph
        self.optim = optim
        with torch.device("meta"):
            reference = load_module(Path(build_dir) / TORCH_FILE).Model()
        named = list(reference.named_parameters())
        #: The reference's parameters() in order, and which of them train (AdamW's indices).
        self.order = [(k, p.requires_grad) for k, p in named]
        self.keys = list(reference.state_dict())   # the reference's state_dict order, kept in checkpoints
        self.frozen = {k: v.numpy().copy() for k, v in reference.state_dict().items()
                       if k not in {k for k, p in named if p.requires_grad} and v.device.type != "meta"}
        self.param_groups = torch.optim.AdamW([p for _, p in named], lr=optim.lr, betas=optim.betas, eps=optim.eps,
                                              weight_decay=optim.weight_decay).state_dict()["param_groups"]
        self._stack.enter_context(nntile_runtime(ncpus, self.out_of_core))
        module = load_module(Path(build_dir) / NNTILE_FILE)
        self.model = module.Model(inference=inference)
        self._stack.callback(self.model.unregister)
        self.adamw = None if inference else self.model.adamw(optim.lr, optim.weight_decay, optim.betas, optim.eps)
        if self.adamw is not None:
            self._stack.callback(self.adamw.unregister)
        self.ema = None
        self._grad_out: np.ndarray | None = None   # backward's start, kept for `step` on one process
        #: Averages the gradients over the ranks of a data-parallel world (None on one process).
        self.buckets = None
        #: Under accumulation or clipping: the step's gradients on the host, summed over its micro-batches
        #: (and, once `_reduced`, averaged over the ranks and clipped), written back before AdamW's step.
        self.sums: list[np.ndarray] | None = None
        self._reduced = False
        if not inference and ((world is not None and world.size > 1) or optim.whole_gradients):
            self.gradients = [self.model.parameters[k].grad for k in self.model.gradient_order]
            if world is not None and world.size > 1:
                self.buckets = world.gradient_buckets([tuple(g.shape) for g in self.gradients])
            if optim.whole_gradients:
                self.sums = [np.zeros(tuple(g.shape), dtype=np.float32, order="F") for g in self.gradients]
                self._scratch = [np.empty_like(s) for s in self.sums]

    # -- running --------------------------------------------------------------------------------------
    def forward(self, x: np.ndarray, t: np.ndarray, y: np.ndarray) -> np.ndarray:
        return self.model.forward(x, t, *label_inputs(self.graph, y))

    def predict(self, x: np.ndarray, t: np.ndarray, y: np.ndarray) -> np.ndarray:
        return self.model.forward(x, t, *label_inputs(self.graph, y))

    def backward(self, grad_out: np.ndarray, accumulate: bool = False) -> None:
        """On one process backward waits for `step`, which runs it with AdamW layer by layer; in a
        data-parallel world it runs now, and the gradients are averaged over the ranks as they finish.
        Under accumulation or clipping it runs now and each gradient, as it finishes, is copied to the host
        and added to the step's sum (NNTile's backward overwrites its gradients); the sum is averaged over
        the ranks once, by `clip_grad_norm` or `step`."""
        if self.sums is not None:
            self.model.backward_async(grad_out)
            for i, gradient in enumerate(self.gradients):
                if accumulate:
                    gradient.to_array(self._scratch[i])
                    self.sums[i] += self._scratch[i]
                else:
                    gradient.to_array(self.sums[i])
            self._reduced = False
            return
        if self.buckets is None:
            self._grad_out = grad_out
            return
        self.model.backward_async(grad_out)
        self.buckets.average(lambda i, out: self.gradients[i].to_array(out),
                             lambda i, mean: self.gradients[i].from_array(mean))

    def _reduce(self) -> None:
        """The host sums averaged over the ranks (once a step)."""
        if self.buckets is not None and not self._reduced:
            self.buckets.average(lambda i, out: np.copyto(out, self.sums[i]),
                                 lambda i, mean: np.copyto(self.sums[i], mean))
        self._reduced = True

    def clip_grad_norm(self, max_norm: float) -> float:
        if self.sums is None:
            raise RuntimeError("clip_grad_norm needs a backend opened with OptimConfig.max_grad_norm set")
        self._reduce()
        norm = float(np.sqrt(sum(np.square(s, dtype=np.float64).sum() for s in self.sums)))
        scale = clip_scale(norm, max_norm)
        if scale < 1.0:
            for s in self.sums:
                s *= np.float32(scale)
        return norm

    def set_lr(self, lr: float) -> None:
        self.adamw.lr = lr
        for group in self.param_groups:
            group["lr"] = lr

    def step(self) -> None:
        """AdamW. On one process each layer's parameters are updated right after that layer's backward (the
        same update: a parameter's gradient is complete then), so parameter gradients are never all held:
        a training step's peak is 12 bytes a parameter instead of 16, and out-of-core updates a parameter
        while backward has it in memory."""
        if self.sums is not None:
            self._reduce()
            for gradient, total in zip(self.gradients, self.sums):
                gradient.from_array(total)
            self.adamw.step()
        elif self.buckets is None:
            grad_out, self._grad_out = self._grad_out, None
            self.model.backward_update(grad_out, self.adamw)
        else:
            self.adamw.step()

    def ema_update(self, decay: float) -> None:
        self._ema().update(decay)

    def _ema(self):
        """The EMA's tensors, made on first use (sampling never needs them) as a copy of the weights."""
        if self.ema is None:
            self.ema = self.model.ema()
            self._stack.callback(self.ema.unregister)
        return self.ema

    # -- state, in the torch reference's layout --------------------------------------------------------
    def state_dict(self) -> dict[str, np.ndarray]:
        return self._ordered(self.model.state_dict())

    def ema_state_dict(self) -> dict[str, np.ndarray]:
        return self._ordered(self.model.to_torch(self._ema().shadow))

    def _ordered(self, trained: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The reference's state_dict: its frozen entries (DiT's pos_embed) and the trained ones, in its order."""
        both = self.frozen | trained
        return {k: both[k] for k in self.keys}

    def optimizer_state(self) -> dict:
        state = {}
        if self.adamw.num_iter:
            moments = self.model.adamw_state(self.adamw)
            state = {i: {"step": torch.tensor(float(moments["step"])),
                         "exp_avg": torch.from_numpy(moments["exp_avg"][k]),
                         "exp_avg_sq": torch.from_numpy(moments["exp_avg_sq"][k])}
                     for i, (k, trains) in enumerate(self.order) if trains}
        return {"state": state, "param_groups": [dict(group) for group in self.param_groups]}

    def load(self, model: dict, ema: dict | None = None, opt: dict | None = None) -> None:
        self.model.load_state_dict(model)
        if self.adamw is None:   # a sampler holds the weights it samples with, nothing else
            return
        self.model.from_torch(ema if ema is not None else model, self._ema().shadow)
        state = (opt or {}).get("state") or {}
        if state:
            keys = dict(enumerate(k for k, _ in self.order))
            steps = {int(s["step"]) for s in state.values()}
            if len(steps) != 1:
                raise ValueError(f"the optimizer state holds several step counts {sorted(steps)}")
            self.model.load_adamw_state(self.adamw, {
                "step": steps.pop(),
                "exp_avg": {keys[i]: s["exp_avg"] for i, s in state.items()},
                "exp_avg_sq": {keys[i]: s["exp_avg_sq"] for i, s in state.items()}})
        else:
            self.adamw.num_iter = 0

    def close(self) -> None:
        self._stack.close()
