"""The backend interface that training and sampling run on, and the torch backend.

A backend holds a compiled DiT's weights, their EMA and AdamW's moments, and runs forward and backward
on numpy arrays. Everything else (data, timesteps, noise, label dropout, the loss and its gradient,
the samplers) runs on the host, identically for every backend, so runs on two backends with one seed
are comparable step by step. Weights cross the interface under the torch reference's state_dict keys,
the optimizer state as `torch.optim.AdamW.state_dict()` (parameter indices in the order of the
reference's `parameters()`, DiT's frozen `pos_embed` included without state): the canonical format
every backend converts to and from, and the one DiT's checkpoints hold.
"""
from __future__ import annotations

import copy
import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

from dit_compiler.app.weights import StateDict, to_numpy, to_torch
from dit_compiler.compiler import targets
from dit_compiler.compiler.build import TORCH_FILE, load_module
from dit_compiler.compiler.captions import label_inputs
from dit_compiler.compiler.graph.ir import Graph
from dit_compiler.compiler.targets.base import OptimConfig
from dit_compiler.errors import UsageError

if TYPE_CHECKING:
    from dit_compiler.app.distributed import World


class Backend(Protocol):
    name: str
    batch: int   # the compiled batch: `forward` and `predict` take exactly this many images

    def forward(self, x: np.ndarray, t: np.ndarray, y: np.ndarray) -> np.ndarray:
        """x [N,C,H,W] float32, t [N] float32 (integer-valued), y [N] int64 -> [N,C_out,H,W] float32,
        keeping what `backward` needs. A caption model reads label y's caption (`compiler.captions`)."""

    def predict(self, x: np.ndarray, t: np.ndarray, y: np.ndarray) -> np.ndarray:
        """`forward` for sampling: no `backward` follows, so nothing is kept for it."""

    def backward(self, grad_out: np.ndarray, accumulate: bool = False) -> None:
        """This step's parameter gradients from d loss / d output, added to those of the step's earlier
        micro-batches with `accumulate` (nothing carries across steps); in a data-parallel world, by the
        step, their mean over the ranks."""

    def clip_grad_norm(self, max_norm: float) -> float:
        """The global norm of the step's gradients (over the ranks' mean), which are then scaled by
        `compiler.targets.base.clip_scale(norm, max_norm)`; needs `OptimConfig.max_grad_norm` set when opened."""

    def set_lr(self, lr: float) -> None:
        """AdamW's learning rate from the next step on."""

    def step(self) -> None:
        """One AdamW step."""

    def ema_update(self, decay: float) -> None:
        """ema = decay * ema + (1 - decay) * weights, for every parameter (DiT's `update_ema`)."""

    def state_dict(self) -> StateDict: ...

    def ema_state_dict(self) -> StateDict: ...

    def optimizer_state(self) -> dict: ...

    def load(self, model: StateDict, ema: StateDict | None = None, opt: dict | None = None) -> None:
        """Set the weights; the EMA (a copy of the weights when None) and AdamW's state (fresh when None)."""

    def close(self) -> None: ...


class TorchBackend:
    """The generated torch reference, always in eval mode (label dropout is the host's job). In a
    data-parallel world it trains under DistributedDataParallel (on the rank's GPU where it has one)."""

    name = "torch"

    def __init__(self, build_dir: Path, graph: Graph, optim: OptimConfig, inference: bool = False,
                 world: World | None = None):
        self.batch = graph.axes["batch"].size
        self.graph = graph
        self.optim = optim
        self.device = torch.device(world.device if world is not None else "cpu")
        self.model = load_module(Path(build_dir) / TORCH_FILE).Model().eval().to(self.device)
        # a sampler holds the weights it samples with, nothing else
        self.ema = None if inference else copy.deepcopy(self.model).requires_grad_(False)
        self.opt = None if inference else self._adamw()
        self._out: torch.Tensor | None = None
        self.runs = self.model   # what forward calls: the model, or DDP around it
        if world is not None and world.size > 1 and not inference:
            from torch.nn.parallel import DistributedDataParallel

            self.runs = DistributedDataParallel(self.model, device_ids=None if self.device.index is None
                                                else [self.device.index])

    def _adamw(self) -> torch.optim.AdamW:
        o = self.optim
        return torch.optim.AdamW(self.model.parameters(), lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)

    def _check(self, x: np.ndarray) -> None:
        if len(x) != self.batch:
            raise ValueError(f"the model is compiled for batch {self.batch}, got {len(x)} images")

    def _inputs(self, *arrays: np.ndarray) -> list[torch.Tensor]:
        self._check(arrays[0])
        return [torch.from_numpy(a).to(self.device) for a in arrays]

    def forward(self, x: np.ndarray, t: np.ndarray, y: np.ndarray) -> np.ndarray:
        self._out = self.runs(*self._inputs(x, t, *label_inputs(self.graph, y)))
        return self._out.detach().cpu().numpy().copy()

    @torch.no_grad()
    def predict(self, x: np.ndarray, t: np.ndarray, y: np.ndarray) -> np.ndarray:
        return self.model(*self._inputs(x, t, *label_inputs(self.graph, y))).cpu().numpy()

    def backward(self, grad_out: np.ndarray, accumulate: bool = False) -> None:
        if self._out is None:
            raise RuntimeError("backward without a forward")
        if not accumulate:
            self.opt.zero_grad(set_to_none=True)
        self._out.backward(*self._inputs(grad_out))   # under DDP, averaged over the ranks in buckets
        self._out = None

    def clip_grad_norm(self, max_norm: float) -> float:
        return float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm))

    def set_lr(self, lr: float) -> None:
        for group in self.opt.param_groups:
            group["lr"] = lr

    def step(self) -> None:
        self.opt.step()

    @torch.no_grad()
    def ema_update(self, decay: float) -> None:
        for ema, param in zip(self.ema.parameters(), self.model.parameters()):
            ema.mul_(decay).add_(param, alpha=1 - decay)

    def state_dict(self) -> StateDict:
        return to_numpy(self.model.state_dict())

    def ema_state_dict(self) -> StateDict:
        return to_numpy(self.ema.state_dict())

    def optimizer_state(self) -> dict:
        return copy.deepcopy(self.opt.state_dict())

    def load(self, model: StateDict, ema: StateDict | None = None, opt: dict | None = None) -> None:
        self.model.load_state_dict(to_torch(model))
        if self.ema is None:
            return
        self.ema.load_state_dict(to_torch(ema if ema is not None else model))
        self.opt = self._adamw()
        if opt is not None:
            self.opt.load_state_dict(opt)

    def close(self) -> None:
        self._out = None
        self.runs = self.model   # DDP holds the process group: let it go before the group ends


#: Backends by name, as "module:class", imported when opened: a backend is a class whose constructor
#: takes (build_dir, graph, optim, inference, world=None) and that implements `Backend`; given a `World`
#: of several ranks, its `backward` averages the gradients over them. `nntile` is the spec's target's backend.
BACKENDS: dict[str, str] = {"torch": "dit_compiler.app.backend:TorchBackend", "nntile": ""}
#: The default: NNTile where the spec's target's runtime is importable, else torch (saying why).
AUTO = "auto"


def open_backend(name: str, build_dir: Path, graph: Graph, optim: OptimConfig = OptimConfig(),
                 note=print, inference: bool = False, world: World | None = None) -> Backend:
    """The backend `name` on a build; `inference` opens it for sampling only (`predict`, `load`); `world`
    makes it one rank of a data-parallel run."""
    target = targets.get(graph.spec.target)
    if name == AUTO:   # without importing the runtime: the backend may set it up first (out-of-core)
        reason = target.installed()
        name = "torch" if reason else "nntile"
        if reason:
            note(f"note: {reason}; running on torch")
    if name not in BACKENDS:
        raise UsageError(f"--backend {name}: not available here; allowed: {', '.join([AUTO, *sorted(BACKENDS)])}")
    module, _, cls = (BACKENDS[name] or target.BACKEND).partition(":")
    return getattr(importlib.import_module(module), cls)(build_dir, graph, optim, inference, world=world)


def load_into(backend: Backend, model: StateDict, source: str, ema: StateDict | None = None,
              opt: dict | None = None) -> None:
    """`backend.load`, with a state_dict that does not fit the model reported as a user error."""
    try:
        backend.load(model, ema, opt)
    except (RuntimeError, KeyError, ValueError) as error:
        first = str(error).strip().splitlines()[0]
        raise UsageError(f"{source}: its weights do not fit this spec's model ({first})") from None
