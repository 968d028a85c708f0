"""`ditc train`: DiT's training loop over any backend, with checkpoints that resume exactly.

Per step, on the host: the next full batch from the loader, timesteps uniform in [0, 1000), Gaussian
noise, label dropout (a label becomes the null class `num_classes` with the spec's
`class_dropout_prob`), `q_sample`; the backend's forward; DiT's loss and its gradient with respect to
the output (`dit_compiler.diffusion.losses`); the backend's backward, AdamW step and EMA update. All the
host's draws come from one numpy generator seeded with `--seed`, the data order from the loader's
own seeded permutations, so two backends see the same data, timesteps, noise and dropped labels.
The model stays in eval mode: the generated reference would drop labels itself in train mode.

The EMA starts as a copy of the initial weights (DiT's `update_ema(ema, model, decay=0)`). With
`ema_warmup` (the default) step s uses min(decay, (1 + s) / (10 + s)): at DiT's 0.9999 a 4,000-step run
averages over its last few hundred steps instead of staying near the initial weights, and a long run
reaches the plain decay after ~90,000 steps. `--no-ema-warmup` is DiT's constant decay.

A run folder holds the build of its spec, `run.json`, `metrics.csv`, `loss.png` and
`checkpoints/NNNNNNN.pt` (DiT's format, see `weights`) with the EMA beside each as
`NNNNNNN-ema.safetensors`. Ctrl-C or SIGTERM finishes the current step, writes a checkpoint and exits
130 or 143 with the command that resumes.

Data-parallel (`dit_compiler.run.distributed`): with N ranks the global batch is N times the compiled
batch. Every rank draws the global batch's images, timesteps, noise and dropped labels from the same
seeded generators, as one process does for its batch, and runs its own slice; the backend averages the
gradients over the ranks, so N ranks at compiled batch B/N take the steps one process takes at B. The
loader and generator state in a checkpoint is therefore global: a run resumes on any number of ranks.
Rank 0 alone writes the run folder, checkpoints, metrics (the loss averaged over the ranks) and plots;
the ranks agree after each step whether any of them was signalled, so all stop at the same step.
"""
from __future__ import annotations

import contextlib
import csv
import json
import shutil
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import TextIO

import numpy as np

from dit_compiler.build import SPEC_FILE, compile_spec, graph_of, write_atomic, write_build, write_text_atomic
from dit_compiler.data import BatchLoader, ImageShape, load_dataset
from dit_compiler.diffusion.objective import objective_of
from dit_compiler.errors import UsageError
from dit_compiler.run.backend import OptimConfig, load_into, open_backend
from dit_compiler.run.common import load_module
from dit_compiler.run.distributed import World, digest
from dit_compiler.run.progress import Progress
from dit_compiler.run.schedules import lr_at, micro_batches
from dit_compiler.run.weights import init_weights, initialize_dit_weights, load_checkpoint, load_weights, \
    save_checkpoint, save_safetensors, to_numpy
from dit_compiler.spec import load_spec
from dit_compiler.spec.model import Spec, TrainSpec

RUN_FILE = "run.json"
METRICS_FILE = "metrics.csv"
LOSS_PLOT = "loss.png"
CHECKPOINTS = "checkpoints"
METRICS = ("step", "loss", "mse", "vb", "lr", "images_per_s", "wall_s")


@dataclass(frozen=True)
class TrainConfig(TrainSpec):
    """A run's settings: the spec's `train:` section (its defaults DiT's), flags on top, and the backend."""

    backend: str = "auto"
    init: str | None = None   # `--init`: the checkpoint a new run starts from (None: DiT's initialisation)

    def ema_decay_at(self, updates: int) -> float:
        return min(self.ema_decay, (1 + updates) / (10 + updates)) if self.ema_warmup else self.ema_decay


def resolve_config(run_dir: Path, overrides: dict, resume: bool, spec: Spec | None = None) -> TrainConfig:
    """A fresh run: the spec's `train:` section with `overrides`. A resumed run: its own settings with
    `overrides`."""
    known = {f.name for f in fields(TrainConfig)}
    base = TrainConfig(**asdict(spec.train)) if spec is not None else TrainConfig()
    if resume:
        saved = _read_run(run_dir)["config"]
        base = TrainConfig(**{k: v for k, v in saved.items() if k in known})
    return replace(base, **{k: v for k, v in overrides.items() if v is not None and k in known})


def _read_run(run_dir: Path) -> dict:
    path = run_dir / RUN_FILE
    if not path.is_file():
        raise UsageError(f"{run_dir}: not a training run (no {RUN_FILE}); nothing to resume")
    return json.loads(path.read_text())


def checkpoints(run_dir: Path) -> list[Path]:
    """The run's checkpoints, oldest first."""
    return sorted((run_dir / CHECKPOINTS).glob("[0-9]" * 7 + ".pt"))


def run_build_dir(run_dir: Path) -> Path:
    return run_dir / _read_run(run_dir)["build"]


class _StopSignals:
    """Turns Ctrl-C and SIGTERM into a flag the loop checks after each step."""

    def __enter__(self) -> "_StopSignals":
        self.signum: int | None = None
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def check_run(spec, run_dir: Path, config: TrainConfig, resume: bool):
    """Everything `train` refuses before it writes anything: data that do not fit the model, a run folder
    that cannot take this run, a resume with another model or from a checkpoint that cannot be read.
    Returns the dataset, the build and (on resume) the checkpoint."""
    build = compile_spec(spec)
    data = load_dataset(config.data, ImageShape.of_graph(build.graph))
    if config.init and not resume:
        init_weights(Path(config.init), build)
    existing = checkpoints(run_dir) if run_dir.is_dir() else []
    if resume:
        if not existing:
            raise UsageError(f"{run_dir}: no checkpoint to resume from")
        saved = load_spec(run_build_dir(run_dir) / SPEC_FILE)
        # the model, not the train or sample settings, nor the batch and tiling (another number of ranks
        # keeps the global batch with another compiled batch)
        if (saved.model, saved.precision, saved.diffusion) != (spec.model, spec.precision, spec.diffusion):
            raise UsageError(f"{run_dir}: trained with another model or diffusion objective than {spec.source} "
                             f"describes (see {run_build_dir(run_dir) / SPEC_FILE}); a resumed run may change the "
                             "batch and the tiling, not the model or the objective")
        ckpt = load_checkpoint(existing[-1])
        if not isinstance(ckpt.get("train_state"), dict):
            raise UsageError(f"{existing[-1]}: no `train_state` to resume from (a checkpoint `ditc train` did not "
                             "write); start a new run, or sample from it with --ckpt")
        return data, build, ckpt
    elif existing:
        raise UsageError(f"{run_dir}: already holds a run (last checkpoint {existing[-1].name}); pass --resume "
                         "to continue it, or another --out")
    return data, build, None


def _prepare_run(spec, build, run_dir: Path, config: TrainConfig) -> Callable[[], None]:
    """Write the build and run.json; returns what removes them again (and the folder, if this made it)."""
    made = not run_dir.exists()
    (run_dir / CHECKPOINTS).mkdir(parents=True, exist_ok=True)
    build_dir = write_build(build, run_dir)
    write_text_atomic(run_dir / RUN_FILE, json.dumps(
        {"spec": str(spec.source), "build": build_dir.name, "config": asdict(config),
         "diffusion": asdict(spec.diffusion)}, indent=1) + "\n")

    def undo() -> None:
        (run_dir / RUN_FILE).unlink(missing_ok=True)
        shutil.rmtree(build_dir, ignore_errors=True)
        with contextlib.suppress(OSError):   # only while empty: nothing of anyone's is removed
            (run_dir / CHECKPOINTS).rmdir()
            if made:
                run_dir.rmdir()
    return undo


def initial_weights(build_dir: Path, graph, seed: int):
    """DiT's initialisation of the reference module, as a state_dict every backend loads."""
    from dit_compiler.build import TORCH_FILE

    module = load_module(build_dir / TORCH_FILE).Model()
    initialize_dit_weights(module, graph.facts.flavor, graph.facts.depth, seed)
    return to_numpy(module.state_dict())


class _Metrics:
    """metrics.csv, one row per step, flushed as it goes; a resumed run drops rows past its checkpoint."""

    def __init__(self, path: Path, resume_step: int | None):
        rows: list[dict] = []
        if resume_step is not None and path.is_file():
            with path.open(newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        self.rows = [{k: float(v) if v else None for k, v in r.items()} for r in rows]
        self.file = path.open("w", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=METRICS)
        self.writer.writeheader()
        for row in rows:
            self.writer.writerow(row)
        self.file.flush()

    def add(self, row: dict) -> None:
        self.rows.append(row)
        self.writer.writerow({k: ("" if v is None else f"{v:.6g}" if isinstance(v, float) else v)
                              for k, v in row.items()})
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def plot_loss(rows: list[dict], path: Path, title: str) -> None:
    """The per-step loss and its running mean (window: 2% of the steps), log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.array([r["step"] for r in rows])
    loss = np.array([r["loss"] for r in rows])
    window = max(1, len(loss) // 50)
    smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, loss, lw=0.5, alpha=0.4, label="loss")
    ax.plot(steps[window - 1:], smooth, lw=1.5, label=f"running mean ({window} steps)")
    ax.set(xlabel="step", ylabel="loss (mse + vb)", yscale="log", title=title)
    ax.legend()
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=120), suffix=".png")
    plt.close(fig)


def train(spec, run_dir: Path, config: TrainConfig, resume: bool = False, stream: TextIO | None = None,
          world: World = World()) -> int:
    """Train `spec` into `run_dir`; returns the exit code (0, or 130/143 after a signal). `world`: this
    process's place in a data-parallel run (by default the only process)."""

    stream = stream or sys.stderr
    lead = world.lead
    undo: Callable[[], None] = lambda: None
    ckpt = None
    if lead:   # every data and folder error before anything is written
        data, build, ckpt = check_run(spec, run_dir, config, resume)
        graph = build.graph
        if ckpt is not None and world.size == 1 and ckpt["train_state"]["step"] >= config.steps:
            print(f"{run_dir} is at step {ckpt['train_state']['step']} already and --steps (or train.steps) is "
                  f"{config.steps}: nothing to train, nothing changed; raise --steps to go on", file=stream)
            return 0
        prepared = _prepare_run(spec, build, run_dir, config)
        if not resume:   # a resumed run keeps its folder whatever happens
            undo = prepared
    else:
        graph = graph_of(spec)
        data = load_dataset(config.data, ImageShape.of_graph(graph))
    world.barrier()   # the other ranks read the build and the checkpoint once rank 0 has checked them
    build_dir = run_build_dir(run_dir)
    shape = ImageShape.of_graph(graph)
    batch = graph.axes["batch"].size
    global_batch, mine = batch * world.size * config.accumulation, world.slice(batch)
    dropout = graph.facts.class_dropout_prob
    objective = objective_of(spec.diffusion)
    loader = BatchLoader(data, global_batch, config.seed)
    rng = np.random.default_rng(config.seed)
    try:   # a backend that cannot start (no NNTile, a memory limit below the model) leaves no run behind
        backend = open_backend(config.backend, build_dir, graph, OptimConfig(
            lr=config.lr, weight_decay=config.weight_decay, accumulation=config.accumulation,
            max_grad_norm=config.grad_clip), note=print if lead else lambda text: None, world=world)
    except BaseException:
        undo()
        raise
    step, wall = 0, 0.0
    if resume:
        path = checkpoints(run_dir)[-1]
        ckpt = ckpt or load_checkpoint(path)   # the other ranks read it here
        state = ckpt["train_state"]
        weights = to_numpy(ckpt["model"])
        load_into(backend, weights, str(path), to_numpy(ckpt["ema"]), ckpt["opt"])
        step, wall = state["step"], state["wall_s"]
        loader.load_state(state["data"])
        rng.bit_generator.state = state["rng"]
        if lead:
            before = state.get("global_batch", batch)
            change = f" (it took {before} images a step, now {global_batch})" if before != global_batch else ""
            print(f"resuming {run_dir} at step {step} from {path}{change}", file=stream)
    elif config.init:   # checked by `check_run`; the optimizer fresh, the EMA a copy of the weights
        weights, entry = load_weights(Path(config.init), ema=True)
        load_into(backend, weights, f"--init {config.init} ({entry})")
        if lead:
            print(f"starting from {config.init} ({entry})", file=stream)
    else:
        weights = initial_weights(build_dir, graph, config.seed)
        load_into(backend, weights, "initial weights")
    if world.size > 1:   # a digest of every weight: only where there are other ranks to compare it with
        world.check_same({"backend": backend.name, "weights": digest(weights)})
    metrics = _Metrics(run_dir / METRICS_FILE, step if resume else None) if lead else None

    def checkpoint() -> Path:
        path = run_dir / CHECKPOINTS / f"{step:07d}.pt"
        ema = backend.ema_state_dict()
        train_state = {"step": step, "wall_s": wall, "data": loader.state(), "rng": rng.bit_generator.state,
                       "backend": backend.name, "ranks": world.size, "global_batch": global_batch}
        save_checkpoint(path, backend.state_dict(), ema, backend.optimizer_state(),
                        asdict(config) | {"spec": str(spec.source), "diffusion": asdict(spec.diffusion)}, train_state)
        save_safetensors(path.with_name(f"{step:07d}-ema.safetensors"), ema)
        if metrics.rows:
            plot_loss(metrics.rows, run_dir / LOSS_PLOT, f"{spec.name} on {backend.name}")
        return path

    progress = Progress(config.steps, f"train {spec.name}", "step", initial=step, stream=stream) if lead else None
    start_step, session_start, signum = step, time.perf_counter(), None
    try:
        with _StopSignals() as stop:
            while step < config.steps and signum is None:
                began = time.perf_counter()
                x0, y = loader.next()   # the global batch's draws, then this rank's slice of them
                t = objective.draw(rng, global_batch)
                noise = rng.standard_normal(x0.shape)
                if dropout > 0:
                    y = np.where(rng.random(global_batch) < dropout, shape.num_classes, y)
                parts = []
                for k, rows in enumerate(micro_batches(global_batch, config.accumulation, mine)):
                    x_t, model_t = objective.noised(x0[rows], t[rows], noise[rows])
                    out = backend.forward(x_t.astype(np.float32), model_t.astype(np.float32), y[rows])
                    terms = objective.losses(x0[rows], x_t, t[rows], noise[rows], out)
                    backend.backward(terms.grad / config.accumulation, accumulate=k > 0)
                    parts.append([terms.mean, terms.mse.mean(), np.nan if terms.vb is None else terms.vb.mean()])
                if config.grad_clip:
                    backend.clip_grad_norm(config.grad_clip)
                lr = lr_at(step, config.lr, config.lr_schedule, config.warmup_steps, config.steps)
                backend.set_lr(lr)
                backend.step()
                backend.ema_update(config.ema_decay_at(step))
                loss, mse, vb = world.mean(list(np.mean(parts, axis=0)))
                signum = world.agreed_signal(stop.signum)
                step += 1
                took = time.perf_counter() - began
                wall += took
                if not lead:
                    continue
                metrics.add({"step": step, "loss": loss, "mse": mse, "vb": None if terms.vb is None else vb,
                             "lr": lr, "images_per_s": global_batch / took, "wall_s": wall})
                progress.update(loss=f"{loss:.4f}", **{"img/s": f"{global_batch / took:.0f}"})
                if config.ckpt_every and step % config.ckpt_every == 0 and step < config.steps:
                    checkpoint()
            path = checkpoint() if lead else None
            if signum is not None:
                if lead:
                    progress.close()
                    print(f"\nstopped by {signal.Signals(signum).name} at step {step}; checkpoint {path}\n"
                          f"resume with: {_resume_command(spec, run_dir, world)}", file=stream)
                return 128 + signum
    finally:
        if lead:
            progress.close()
            metrics.close()
        backend.close()
    if not lead:
        return 0
    elapsed = time.perf_counter() - session_start
    done = step - start_step
    tail = [r["loss"] for r in metrics.rows[-100:]]
    ranks = f" ({world.size} ranks)" if world.size > 1 else ""
    print(f"trained {spec.name} on {backend.name}{ranks}: {done} steps in {elapsed:.0f} s "
          f"({done * global_batch / elapsed if elapsed else 0:.0f} images/s), step {step}, "
          f"loss {np.mean(tail) if tail else float('nan'):.4f} (mean of the last {len(tail)}); "
          f"checkpoint {path}, EMA {path.with_name(f'{step:07d}-ema.safetensors')}")
    return 0


def _resume_command(spec, run_dir: Path, world: World) -> str:
    command = f"ditc train {spec.source} --out {run_dir} --resume"
    if world.launcher == "ditc":
        return f"{command} --nproc {world.size}"
    if world.launcher == "torchrun":
        return f"{command}, under torchrun as this run was started (any number of ranks)"
    return command
