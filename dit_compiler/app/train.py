"""`ditc train`: DiT's training loop over any backend, with checkpoints that resume exactly.

Per step, on the host: the next full batch from the loader (with `--vae`, its images' latents, each
flipped or not and sampled from the VAE's posterior: `dit_compiler.app.latents`), timesteps uniform in
[0, 1000), Gaussian noise, label dropout (a label becomes the null class `num_classes` with the spec's
`class_dropout_prob`), `q_sample`; the backend's forward; DiT's loss and its gradient with respect to
the output (`dit_compiler.app.diffusion.losses`); the backend's backward, AdamW step and EMA update. All the
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

Data-parallel (`dit_compiler.app.distributed`): with N ranks the global batch is N times the compiled
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
import fcntl
import io
import json
import math
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import TextIO

import numpy as np

from dit_compiler.app.backend import AUTO, load_into, open_backend
from dit_compiler.app.data import DIGITS, DIGITS_SHAPE, BatchLoader, Dataset, ImageShape, load_dataset
from dit_compiler.app.latents import ENCODINGS, LatentDataset, load_latent_folder
from dit_compiler.app.diffusion.objective import objective_of
from dit_compiler.app.distributed import World, digest
from dit_compiler.app.progress import Progress, counted
from dit_compiler.app.schedules import lr_at, micro_batches
from dit_compiler.app.weights import check_weights, init_weights, initialize_dit_weights, initialize_pixart_weights, \
    initialize_sd3_weights, load_checkpoint, read_init, save_checkpoint, save_safetensors, to_numpy
from dit_compiler.compiler.build import SPEC_FILE, TORCH_FILE, compile_spec, graph_of, load_module, write_build
from dit_compiler.compiler.spec import load_spec
from dit_compiler.compiler.spec.model import Spec, TrainSpec
from dit_compiler.compiler.spec.validate import section_problems
from dit_compiler.compiler.targets.base import OptimConfig
from dit_compiler.errors import Terminated, UsageError, shown
from dit_compiler.files import OUTPUT_MARKER, RUN_LOCK, read_marker, read_small, write_atomic, write_text_atomic
from dit_compiler.userfiles import MAX_METADATA, MAX_METRICS, read_json, regular_size, writing

#: The kind of folder `ditc train` writes (its marker, `files.OUTPUT_MARKER`, says so).
RUN = "run"
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
    vae: str | None = None    # `--vae`: the AutoencoderKL folder (absolute) that encodes an image folder
    encode: str = "cached"    # `--encode`: how (`latents.ENCODINGS`)

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
    """The run's record, checked: `spec` and `build` strings and a `config` of valid train settings."""
    path = run_dir / RUN_FILE
    if not os.path.lexists(path):
        raise UsageError(f"{run_dir}: not a training run (no {RUN_FILE}); nothing to resume")
    record = read_json(path, MAX_METADATA, "run record")
    if problem := _run_problem(record):
        raise UsageError(f"{path}: not a run record ditc wrote ({problem}); it cannot be resumed or sampled: "
                         "start a new run with another --out")
    return record


def _run_problem(record) -> str | None:
    """What is wrong with a run.json's contents, or None."""
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}, not an object"
    for key in ("spec", "build"):
        if not isinstance(record.get(key), str) or not record[key]:
            return f"`{key}` is not a file name"
    config = record.get("config")
    if not isinstance(config, dict):
        return "`config` is not an object"
    if not isinstance(config.get("backend", AUTO), str):   # a name open_backend does not know is refused there
        return f"config.backend: not a backend's name (got {shown(config['backend'])})"
    if not isinstance(config.get("vae"), (str, type(None))) or config.get("encode", ENCODINGS[0]) not in ENCODINGS:
        return f"config.vae or config.encode is not a VAE folder and one of {', '.join(ENCODINGS)}"
    train_keys = {f.name for f in fields(TrainSpec)}
    problems = section_problems("train", {k: v for k, v in config.items() if k in train_keys})
    return f"config.{problems[0]}" if problems else None


def run_vae(run_dir: Path) -> str | None:
    """The AutoencoderKL folder the run's latents came from (`train --vae`), None for a run without one."""
    return _read_run(run_dir)["config"].get("vae")


def checkpoints(run_dir: Path) -> list[Path]:
    """The run's checkpoints, oldest first."""
    return sorted((run_dir / CHECKPOINTS).glob("[0-9]" * 7 + ".pt"))


def run_build_dir(run_dir: Path) -> Path:
    """The run's build folder, as its run.json names it: refused (UsageError) unless it is a folder right
    inside the run, not a link (a run.json may not point anywhere else)."""
    name = _read_run(run_dir).get("build")
    if not (isinstance(name, str) and name not in ("", ".", "..") and "\0" not in name and Path(name).name == name):
        raise UsageError(f"{run_dir / RUN_FILE}: `build` {shown(name)} is not the name of a folder in the run; "
                         "ditc reads nothing outside a run folder for it")
    folder = run_dir / name
    if folder.is_symlink() or not folder.is_dir():
        raise UsageError(f"{folder}: {'a link' if folder.is_symlink() else 'not a folder'}, where {run_dir / RUN_FILE} "
                         "names the run's build; ditc reads nothing outside a run folder for it")
    return folder


def trusted_build(run_dir: Path) -> tuple[Spec, Path]:
    """The spec and build folder of a training run, checked before any of its code is imported: a run
    folder is data, so its build must be, byte for byte, what its recorded spec compiles to with this ditc
    (which also checks the build's manifest and the sha256 it lists). A build that differs (edited, or
    written by another ditc) is refused, naming the file and how to rebuild it; nothing of it is run."""
    folder = run_build_dir(run_dir)
    spec = load_spec(folder / SPEC_FILE)   # YAML read as data: loading a spec runs nothing
    fresh = compile_spec(spec)
    rebuild = (f"ditc runs no code from a run folder that differs from a fresh build; `ditc build {folder / SPEC_FILE} "
               f"-o {run_dir}` rebuilds it")
    if spec.name != folder.name:
        raise UsageError(f"{folder / SPEC_FILE}: builds {spec.name!r}, not {folder.name!r}; {rebuild}")
    for name, text in sorted(fresh.files.items()):
        path = folder / name
        expected = text.encode("utf-8")
        try:
            same = read_small(path, len(expected)) == expected
        except (OSError, ValueError):
            same = False
        if not same:
            raise UsageError(f"{path}: not the file ditc compiles from {folder / SPEC_FILE} (edited, missing, or "
                             f"written by another ditc); {rebuild}")
    return spec, folder


class _StopSignals:
    """Turns Ctrl-C and SIGTERM into a flag the loop checks after each step."""

    def __enter__(self) -> "_StopSignals":
        self.signum: int | None = None
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:   # a second signal: the step in flight is not waited for
            raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()
        self.signum = signum

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def check_run(spec, run_dir: Path, config: TrainConfig, resume: bool):
    """Everything `train` refuses before it writes anything: data that do not fit the model, a run folder
    that cannot take this run, a resume with another model or from a checkpoint that cannot be read.
    Returns the dataset, the build and (on resume) the checkpoint."""
    build = compile_spec(spec)
    shape = ImageShape.of_graph(build.graph)
    if config.data == DIGITS and (shape.channels, shape.size) != (DIGITS_SHAPE.channels, DIGITS_SHAPE.size):
        raise UsageError(f"{spec.source}: its model takes {shape.channels}-channel {shape.size}x{shape.size} images, "
                         f"and the built-in `{DIGITS}` (train.data's default) are {DIGITS_SHAPE.channels}-channel "
                         f"{DIGITS_SHAPE.size}x{DIGITS_SHAPE.size}: this spec needs --data (an .npz with `images` and "
                         "`labels`, or a folder with a sub-folder of images per class) or train.data set")
    data = training_data(config, shape)
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
        check_train_state(ckpt, existing[-1])
        if os.path.lexists(run_dir / METRICS_FILE):
            read_metrics(run_dir / METRICS_FILE, ckpt["train_state"]["step"])
        for entry in ("model", "ema"):
            check_weights(to_numpy(ckpt[entry]), f"{existing[-1]} ({entry})")
        return data, build, ckpt
    elif existing:
        raise UsageError(f"{run_dir}: already holds a run (last checkpoint {existing[-1].name}); pass --resume "
                         "to continue it, or another --out")
    return data, build, None


def training_data(config: TrainConfig, shape: ImageShape) -> Dataset | LatentDataset:
    """The run's dataset: `--data` as it is, or (with `--vae`) an image folder's VAE latents."""
    if config.vae is None:
        return load_dataset(config.data, shape)
    if not Path(config.data).is_dir():
        raise UsageError(f"--vae {config.vae}: encodes a folder of images (a sub-folder per class); --data "
                         f"{config.data} is not a folder: drop --vae to train on its images as they are")
    return load_latent_folder(Path(config.data), Path(config.vae), shape, config.encode)


def check_train_state(ckpt: dict, path: Path) -> None:
    """Refuse (UsageError) a checkpoint whose `train_state` `ditc train` cannot resume from: missing, or
    with a field missing or of the wrong type or range. Its step must be the one its file is named for
    (a step of another number would renumber and overwrite the run's checkpoints)."""
    state = ckpt.get("train_state")
    if not isinstance(state, dict):
        raise UsageError(f"{path}: no `train_state` to resume from (a checkpoint `ditc train` did not write); start "
                         "a new run, or sample from it with --ckpt")
    problem = _train_state_problem(state, path) or next(
        (f"no `{k}` weights" for k in ("model", "ema") if not isinstance(ckpt.get(k), dict)), None) or \
        (None if isinstance(ckpt.get("opt"), dict) else "no optimizer state `opt`")
    if problem:
        raise UsageError(f"{path}: cannot resume from it: {problem}; resume from an earlier checkpoint (move this "
                         "one away) or start a new run")


def _train_state_problem(state: dict, path: Path) -> str | None:
    def whole(value, low: int = 0) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= low

    step, wall, data = state.get("step"), state.get("wall_s"), state.get("data")
    if not whole(step) or step != int(path.stem):
        return f"train_state.step is {shown(step)}, not {int(path.stem)}, the step its name says"
    if not isinstance(wall, (int, float)) or isinstance(wall, bool) or not math.isfinite(wall) or wall < 0:
        return f"train_state.wall_s is {shown(wall)}, not a number of seconds"
    if not isinstance(data, dict) or not all(whole(data.get(k)) for k in ("seed", "epoch", "position")):
        return f"train_state.data is {shown(data)}, not a data position (seed, epoch and position, whole numbers)"
    if "global_batch" in state and not whole(state["global_batch"], 1):
        return f"train_state.global_batch is {shown(state['global_batch'])}, not a batch size"
    try:
        np.random.default_rng().bit_generator.state = state.get("rng")
    except (TypeError, ValueError, KeyError, OverflowError):
        return f"train_state.rng is {shown(state.get('rng'))}, not the state of numpy's PCG64 generator"
    return None


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """This process alone trains into `run_dir` while the block runs: a second `ditc train` into the same
    folder is refused (UsageError) instead of interleaving its checkpoints with this one's. The lock is
    held on `run_dir/.ditc-train.lock` (flock, released when the process ends however it ends); folders
    this made, left holding nothing else, are removed again."""
    made = [folder for folder in (run_dir, *run_dir.parents) if not folder.exists()]
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / RUN_LOCK
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as error:
        raise UsageError(f"{path}: cannot lock the run folder ({error.strerror})") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UsageError(f"{run_dir}: another `ditc train` is writing this run now; wait for it to end, or "
                             "train into another --out") from None
        yield
    finally:
        os.close(fd)
        if made and [p.name for p in run_dir.iterdir()] == [RUN_LOCK]:
            path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):   # only while empty: nothing of anyone's is removed
                for folder in made:
                    folder.rmdir()


def _prepare_run(spec, build, run_dir: Path, config: TrainConfig) -> Callable[[], None]:
    """Write run.json (marking the folder as a run's) and the build; returns what removes them again (and
    the folder, if this made it)."""
    made = not run_dir.exists()
    marked = not made and read_marker(run_dir) is not None
    built: list[Path] = []   # the build folder, once written: never a folder of anyone else's

    def undo() -> None:
        (run_dir / RUN_FILE).unlink(missing_ok=True)
        if not marked:
            (run_dir / OUTPUT_MARKER).unlink(missing_ok=True)
        for build_dir in built:
            shutil.rmtree(build_dir, ignore_errors=True)
        with contextlib.suppress(OSError):   # only while empty: nothing of anyone's is removed
            (run_dir / CHECKPOINTS).rmdir()
            if made:
                run_dir.rmdir()

    try:
        write_text_atomic(run_dir / RUN_FILE, json.dumps(
            {"spec": str(spec.source), "build": spec.name, "config": asdict(config),
             "diffusion": asdict(spec.diffusion)}, indent=1) + "\n", RUN)
        if (run_dir / CHECKPOINTS).is_symlink():
            raise UsageError(f"{run_dir / CHECKPOINTS}: a link; a run's checkpoints are written only inside the run")
        (run_dir / CHECKPOINTS).mkdir(exist_ok=True)
        built.append(write_build(build, run_dir))
    except BaseException:
        undo()
        raise
    return undo


def initial_weights(build_dir: Path, graph, seed: int):
    """The family's initialisation of the reference module (DiT's; PixArt-alpha's for adaln_single; DiT's on
    SD3's layout for joint), as a state_dict every backend loads."""
    module = load_module(build_dir / TORCH_FILE).Model()
    if graph.spec.model.conditioning == "adaln_single":
        initialize_pixart_weights(module, graph.depth, seed)
    elif graph.spec.model.conditioning == "joint":
        initialize_sd3_weights(module, graph.depth, seed)
    else:
        initialize_dit_weights(module, graph.spec.model.flavor, graph.depth, seed, graph.spec.model.conditioning)
    return to_numpy(module.state_dict())


class _Metrics:
    """metrics.csv, one row per step, flushed as it goes; a resumed run drops rows past its checkpoint."""

    def __init__(self, path: Path, resume_step: int | None):
        self.rows = read_metrics(path, resume_step) if resume_step is not None and os.path.lexists(path) else []
        self.path = path
        kept = io.StringIO()
        self.writer = csv.DictWriter(kept, fieldnames=METRICS)
        self.writer.writeheader()
        self.writer.writerows(map(_csv_row, self.rows))
        # written whole, then appended to through the same descriptor: never reopened by name
        self.file = io.TextIOWrapper(write_atomic(path, lambda file: file.write(kept.getvalue().encode()), RUN,
                                                  keep_open=True), encoding="utf-8", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=METRICS)

    def add(self, row: dict) -> None:
        self.rows.append(row)
        with writing(self.path):
            self.writer.writerow(_csv_row(row))
            self.file.flush()

    def close(self) -> None:
        self.file.close()


def _csv_row(row: dict) -> dict:
    return {k: ("" if v is None else f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()}


def read_metrics(path: Path, last_step: int) -> list[dict]:
    """The rows of a run's metrics.csv up to `last_step`; a file that is not the table ditc writes is
    refused, naming the line."""
    regular_size(path, MAX_METRICS, "metrics table")
    rows = []
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames != list(METRICS):
                raise ValueError(f"its header is not {','.join(METRICS)}")
            for row in reader:
                if None in row or None in row.values():
                    raise ValueError(f"line {reader.line_num} has not {len(METRICS)} values")
                try:
                    values = {k: float(v) if v else None for k, v in row.items()}
                except ValueError:
                    raise ValueError(f"line {reader.line_num} holds a value that is not a number") from None
                if values["step"] is None or not values["step"].is_integer() or values["step"] < 1:
                    raise ValueError(f"line {reader.line_num}: step {row['step']!r} is not a step number")
                if values["step"] <= last_step:
                    rows.append(values | {"step": int(values["step"])})
    except (ValueError, UnicodeDecodeError, csv.Error) as error:
        raise UsageError(f"{path}: not the metrics table ditc writes ({error}); move it away to resume without "
                         "the earlier steps' metrics") from None
    return rows


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
    write_atomic(path, lambda file: fig.savefig(file, format="png", dpi=120), RUN)
    plt.close(fig)


def train(spec, run_dir: Path, config: TrainConfig, resume: bool = False, stream: TextIO | None = None,
          world: World = World(), stop_at: int | None = None) -> int:
    """Train `spec` into `run_dir`; returns the exit code (0, or 130/143 after a signal). `world`: this
    process's place in a data-parallel run (by default the only process). `stop_at`: end at this step
    with a checkpoint, a part of a run of `config.steps` (whose learning-rate schedule it follows), which
    a later call resumes."""
    with run_lock(run_dir) if world.lead else contextlib.nullcontext():
        return _train(spec, run_dir, config, resume, stream or sys.stderr, world,
                      config.steps if stop_at is None else min(stop_at, config.steps))


def _train(spec, run_dir: Path, config: TrainConfig, resume: bool, stream: TextIO, world: World, end: int) -> int:
    lead = world.lead
    undo: Callable[[], None] = lambda: None
    ckpt = None
    if lead:   # every data and folder error before anything is written
        data, build, ckpt = check_run(spec, run_dir, config, resume)
        graph = build.graph
        if ckpt is not None and world.size == 1 and ckpt["train_state"]["step"] >= end:
            print(f"{run_dir} is at step {ckpt['train_state']['step']} already and training ends at step {end} "
                  "(--steps, --stop-at or train.steps): nothing to train, nothing changed; raise it to go on",
                  file=stream)
            return 0
        prepared = _prepare_run(spec, build, run_dir, config)
        if not resume:   # a resumed run keeps its folder whatever happens
            undo = prepared
    else:
        graph = graph_of(spec)
    world.barrier()   # the other ranks read the build, the checkpoint and a latent cache once rank 0 has checked them
    if not lead:
        data = training_data(config, ImageShape.of_graph(graph))
    build_dir = run_build_dir(run_dir)
    shape = ImageShape.of_graph(graph)
    batch = graph.axes["batch"].size
    global_batch, mine = batch * world.size * config.accumulation, world.slice(batch)
    my_rows = np.concatenate(list(micro_batches(global_batch, config.accumulation, mine)))
    dropout = graph.spec.model.class_dropout_prob
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
        if lead and state["data"]["position"] >= len(data):
            print(f"note: the run stopped at image {state['data']['position']} of an epoch; {config.data} has "
                  f"{len(data)} images, so it resumes at the start of the next epoch", file=stream)
        loader.load_state(state["data"])
        rng.bit_generator.state = state["rng"]
        if lead:
            before = state.get("global_batch", batch)
            change = f" (it took {before} images a step, now {global_batch})" if before != global_batch else ""
            print(f"resuming {run_dir} at step {step} from {path}{change}", file=stream)
    elif config.init:   # checked by `check_run`; the optimizer fresh, the EMA a copy of the weights
        weights, entry = read_init(Path(config.init))
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

    progress = Progress(end, f"train {spec.name}", "step", initial=step, stream=stream) if lead else None
    start_step, session_start, signum = step, time.perf_counter(), None
    try:
        with _StopSignals() as stop:
            while step < end and signum is None:
                began = time.perf_counter()
                index = loader.next()   # the global batch's draws, then this rank's slice of them
                x0, y = data.batch(index, rng, my_rows), data.labels[index]
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
                if config.ckpt_every and step % config.ckpt_every == 0 and step < end:
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
    print(f"trained {spec.name} on {backend.name}{ranks}: {counted(done, 'step')} in {elapsed:.0f} s "
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
