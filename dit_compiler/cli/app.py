"""The diffusion application's commands, `train`, `sample`, `evaluate` and `export`: their arguments and
command functions. Light to import: torch and the modules that import it (the backends, training,
sampling, weights, export, Inception) load only when a command runs."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np

from dit_compiler.app.distributed import LAUNCHED_BY_DITC, joined, world_from_env
from dit_compiler.app.evaluate import format_table, make_scorer, write_table
from dit_compiler.app.launch import launch
from dit_compiler.app.vae import check_vae, load_vae
from dit_compiler.cli.args import (MAX_SEED, check_folder_arg, integer, memory_size, number, path, runner_target,
                                   spec_and_dir, workers)
from dit_compiler.compiler.build import compile_spec, graph_of, write_build
from dit_compiler.compiler.captions import label_classes
from dit_compiler.compiler.spec.model import SAMPLERS, Spec
from dit_compiler.errors import UsageError, shown
from dit_compiler.files import check_owned, mark_folder
from dit_compiler.userfiles import load_npz
from dit_compiler.limits import DIST_TIMEOUT_S, MAX_DIST_TIMEOUT_S, cores

MAX_STEPS = 10**8
MAX_SAMPLES = 10**6


def _floats(text: str) -> list[float]:
    """Guidance scales: comma-separated numbers from 1 to 100."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{shown(text)} is not a comma-separated list of numbers") from None
    return [number(1.0, 100.0)(str(v)) for v in values]


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{shown(text)} is not a comma-separated list of integers") from None


#: The kinds of folder (by the marker ditc writes in it, `files.OUTPUT_MARKER`) each command writes into.
RUN_KINDS = ("run",)
SAMPLES_KINDS = ("samples",)
EVALUATE_KINDS = ("evaluate", "samples")


def _output_folder(path: Path, flag: str, kinds: tuple[str, ...]) -> Path:
    """An output folder, checked before any work (`cli._check_folder_arg`), and new, empty or marked by
    ditc as one of `kinds` (`files.check_owned`), so that no file of the user's is overwritten."""
    check_folder_arg(str(path), flag)
    if path.is_symlink():
        raise UsageError(f"{flag} {path}: a link; ditc writes only into the folder itself, never through a link: "
                         f"name the folder it points to")
    check_owned(path, kinds, f"{flag} {path}")
    return path


def _input_folder(path: str | None, flag: str, needs: str | None = None) -> Path | None:
    """A folder the command reads (and, with `needs`, that file in it), checked before any work."""
    if path is None:
        return None
    folder = Path(path)
    if not folder.is_dir():
        raise UsageError(f"{flag} {path}: no such folder")
    if needs and not (folder / needs).is_file():
        raise UsageError(f"{flag} {path}: no {needs} in it")
    return folder


def _vae_folder(path: str | None) -> Path | None:
    """--vae: a diffusers AutoencoderKL folder, read now, so that one that is not is refused before sampling."""
    folder = _input_folder(path, "--vae", "config.json")
    if folder is not None:
        load_vae(folder)
    return folder


def _sample_vae(args) -> Path | None:
    """--vae; without it, the VAE a training run (the target) encoded its images with (`train --vae`), where
    that folder still is."""
    from dit_compiler.app.train import RUN_FILE, run_vae

    if args.vae or not os.path.lexists(Path(args.target) / RUN_FILE):
        return _vae_folder(args.vae)
    recorded = run_vae(Path(args.target))
    if recorded is None:
        return None
    if not Path(recorded).is_dir():
        print(f"note: {args.target} was trained on the latents of the VAE {recorded}, which is not there any more: "
              "pass --vae DIR to decode", file=sys.stderr)
        return None
    print(f"decoding with the VAE the run trained with: {recorded} (--vae DIR for another)", file=sys.stderr)
    return _vae_folder(recorded)


def add_commands(sub) -> None:
    """Add `train`, `sample`, `evaluate` and `export` to the `ditc` subparsers."""
    s = sub.add_parser("train", help="train a compiled DiT with DiT's diffusion loss on a dataset")
    s.add_argument("target", metavar="SPEC_OR_BUILD_DIR", help="a spec file or a build folder `ditc build` wrote")
    s.add_argument("--data", type=path, help="`digits` (built in, the default), an .npz with images and labels, or a "
                                  "folder with a sub-folder of images per class")
    s.add_argument("--vae", type=path, metavar="VAE_DIR",
                   help="a diffusers AutoencoderKL folder: --data FOLDER's images, centre-cropped to the spec's "
                        "input_size times the VAE's downsampling, randomly flipped, train as its latents (as DiT's "
                        "train.py); recorded in the run, so `ditc sample RUN` decodes with it")
    s.add_argument("--encode", choices=("cached", "on-the-fly"),
                   help="with --vae: encode every image once (both flips) into a cache later runs reuse, or each "
                        "step's images as the step runs (default cached)")
    s.add_argument("--steps", type=integer(1, MAX_STEPS), help="total training steps (default 4000)")
    s.add_argument("--lr", type=number(0.0, 1.0, above=True),
                   help="AdamW learning rate, more than 0 to 1 (default: the spec's train.lr, DiT's 1e-4)")
    s.add_argument("--lr-schedule", choices=("constant", "cosine"),
                   help="after the warm-up: constant (DiT's) or cosine down to 0 at the last step (default: the spec's "
                        "train.lr_schedule, constant)")
    s.add_argument("--warmup-steps", type=integer(0, MAX_STEPS), metavar="N",
                   help="the learning rate rises linearly over the first N steps (default: the spec's "
                        "train.warmup_steps, 0)")
    s.add_argument("--grad-clip", type=number(0.0, 1e6), metavar="NORM",
                   help="clip the global gradient norm to NORM, 0 off (default: the spec's train.grad_clip, 0)")
    s.add_argument("--accumulation", type=integer(1, 4096), metavar="N",
                   help="micro-batches of the compiled batch per step: a step takes batch x N x ranks images "
                        "(default: the spec's train.accumulation, 1)")
    s.add_argument("--weight-decay", type=number(0.0, 1.0),
                   help="AdamW weight decay, 0 to 1 (default: the spec's train.weight_decay, DiT's 0)")
    s.add_argument("--ema-decay", type=number(0.0, 1.0),
                   help="EMA decay, 0 to 1 (default: the spec's train.ema_decay, DiT's 0.9999)")
    s.add_argument("--ema-warmup", action=argparse.BooleanOptionalAction, default=None,
                   help="EMA decay min(decay, (1+s)/(10+s)) at step s (default on; off is DiT's constant decay)")
    s.add_argument("--backend", choices=("auto", "nntile", "torch"),
                   help="where the model runs (default auto: NNTile where it is importable, else torch)")
    s.add_argument("--out", type=path, help="run folder (default runs/<spec name>)")
    s.add_argument("--ckpt-every", type=integer(0, MAX_STEPS),
                   help="checkpoint every N steps, 0 only at the end (default 1000)")
    s.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    s.add_argument("--stop-at", type=integer(1, MAX_STEPS), metavar="STEP",
                   help="end at this step with a checkpoint, a part of the run: the learning-rate schedule still runs "
                        "to --steps, and --resume goes on (as `ditc sweep --train` trains between evaluations)")
    s.add_argument("--init", type=path, metavar="WEIGHTS",
                   help="start a new run from these weights (the EMA too; the optimizer fresh): a facebookresearch/DiT "
                        "checkpoint (a released state_dict or train.py's; its EMA), a ditc checkpoint (its EMA), "
                        "an EMA .safetensors or a diffusers model folder")
    s.add_argument("--seed", type=integer(0, MAX_SEED),
                   help="seeds the initial weights, data order, timesteps, noise, dropout (0 to 2**32-1)")
    s.add_argument("--memory-limit", type=memory_size, metavar="SIZE",
                   help="NNTile trains out-of-core under SIZE, e.g. 1.5GiB (default: the spec's memory_limit)")
    s.add_argument("--nproc", type=integer(1, cores()), default=1,
                   help="data-parallel ranks on this machine, each on its share of the cores; the global batch is "
                        "N times the compiled batch (default 1; across machines start ditc under torchrun)")
    s.add_argument("--ncpus", type=integer(1, cores()),
                   help=f"{runner_target().WORKERS_HELP}, and as many torch threads, of each process (with --nproc, "
                        "default: the cores' share of each rank)")
    s.add_argument("--dist-timeout", type=integer(10, MAX_DIST_TIMEOUT_S), default=DIST_TIMEOUT_S, metavar="SECONDS",
                   help=f"how long a rank waits for the others before failing (default {DIST_TIMEOUT_S})")
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("export", help="write trained weights as a diffusers model folder (DiTTransformer2DModel, "
                                      "PixArtTransformer2DModel)")
    s.add_argument("target", metavar="RUN_OR_SPEC", help="a training run folder, or a spec with --ckpt")
    s.add_argument("--ckpt", type=path, help="checkpoint (.pt or .safetensors; default: the run's last)")
    s.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                   help="export the checkpoint's EMA weights (default)")
    s.add_argument("--diffusers", type=path, required=True, metavar="DIR", help="the folder to write (new or empty)")
    s.set_defaults(func=cmd_export)

    for name, help_text in (("sample", "generate images with a trained DiT (DiT's samplers)"),
                            ("evaluate", "score generated digits: classifier accuracy, FD-digits and the floor")):
        s = sub.add_parser(name, help=help_text)
        if name == "sample":
            s.add_argument("target", metavar="RUN_OR_SPEC", help="a training run folder, or a spec with --ckpt")
        else:
            s.add_argument("target", metavar="RUN_SPEC_OR_SAMPLES",
                           help="a training run folder, a spec with --ckpt (both sample first), or samples to score: "
                                "a folder `ditc sample` wrote or its samples.npz")
        s.add_argument("--ckpt", type=path, help="checkpoint (.pt or .safetensors; default: the run's last)")
        s.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                       help="use the checkpoint's EMA weights (default)")
        s.add_argument("--backend", choices=("auto", "nntile", "torch"), default="auto",
                       help="where the model runs (default auto: NNTile where it is importable, else torch)")
        s.add_argument("--sampler", choices=("ddpm", "ddim", "euler", "heun"),
                       help="ddpm or ddim for objective ddpm, euler or heun for rectified_flow (default: the spec's "
                            "`sample.sampler`: ddpm, or euler for a flow)")
        s.add_argument("--steps", type=integer(1, 1000),
                       help="sampling steps, at most 1000: ddpm/ddim respace DiT's 1000 (default: the spec's "
                            "`sample.steps`: 250, or 50 for a flow)")
        s.add_argument("--eta", type=number(0.0, 1.0), help="DDIM eta (default: the spec's `sample.eta`, 0)")
        s.add_argument("--cfg-channels", choices=("auto", "dit", "all"),
                       help="guided channels: `dit` the first 3 (DiT), `all` every epsilon channel (diffusers), "
                            "`auto` dit for 4+ channels and all below (default: the spec's `sample.cfg_channels`)")
        s.add_argument("--clip-denoised", action="store_true", help="clip x_0 predictions to [-1, 1] (DiT: off)")
        s.add_argument("--sigma-small", action="store_true",
                       help="a model without learned sigma samples with the posterior variance instead of beta_t "
                            "(DiT's create_diffusion(sigma_small=True))")
        s.add_argument("--seed", type=integer(0, MAX_SEED), default=0, help="0 to 2**32-1 (default 0)")
        s.add_argument("--out", type=path, help="output folder (default RUN/samples or samples/<spec name>)"
                       if name == "sample" else "output folder (default RUN/evaluate, samples/evaluate for a spec, "
                       "the samples' own folder for samples)")
        s.add_argument("--vae", type=path, help="a diffusers AutoencoderKL folder to decode latents with")
        if name == "sample":
            s.add_argument("--cfg", type=number(1.0, 100.0),
                           help="guidance scale, 1 = none (default: the spec's `sample.cfg`, DiT's 4)")
            group = s.add_mutually_exclusive_group()
            group.add_argument("--classes", type=_ints, help="labels to sample, e.g. 0,3,7")
            group.add_argument("--n", type=integer(1, MAX_SAMPLES),
                               help="number of samples, labels cycling over the classes (default: 8 of each of the "
                                    "first 10 classes)")
            s.set_defaults(func=cmd_sample)
        else:
            s.add_argument("--cfg", type=_floats, help="guidance scales, e.g. 1,2,4 (default: the spec's `sample.cfg`)")
            s.add_argument("--n", type=integer(2, MAX_SAMPLES), default=1000, help="samples per scale (default 1000)")
            s.add_argument("--cache", type=path, help="where the digits classifier is cached (default ~/.cache/ditc)")
            s.add_argument("--inception", type=path,
                           help="Inception v3 weights (pytorch-fid's or torchvision's state_dict): score FID against "
                                "--ref instead of the digits scores")
            s.add_argument("--ref", type=path, help="with --inception: reference images, a folder or an .npz")
            s.set_defaults(func=cmd_evaluate)


def cmd_train(args) -> int:
    """One process; or, with --nproc N, a launcher of N ranks that run this same command line; or, where
    torchrun (or the launcher) set WORLD_SIZE, one rank of a data-parallel run."""
    from dit_compiler.app.train import resolve_config

    spec, _ = _load_target(args.target)
    if args.memory_limit:
        spec = replace(spec, memory_limit=args.memory_limit)
    run_dir = Path(args.out or Path("runs") / spec.name)
    world = world_from_env()
    if world is None or world.lead:   # the other ranks find the folder as the first rank makes it
        _output_folder(run_dir, "--out", RUN_KINDS)
    if args.memory_limit and args.backend == "torch":
        raise UsageError(f"--memory-limit {args.memory_limit}: the torch backend cannot run under a memory limit "
                         "(it has no out-of-core); use --backend nntile or drop --memory-limit")
    if args.ncpus and args.nproc * args.ncpus > cores():
        raise UsageError(f"--ncpus {args.ncpus} with --nproc {args.nproc}: {args.nproc * args.ncpus} workers on "
                         f"{cores()} cores (idle runtime workers spin, so shared cores slow every rank down); "
                         f"allowed: at most {cores() // args.nproc} a rank")
    overrides = {k: getattr(args, k) for k in ("data", "steps", "lr", "weight_decay", "ema_decay", "ema_warmup",
                                               "backend", "seed", "ckpt_every", "lr_schedule", "warmup_steps",
                                               "grad_clip", "accumulation", "init", "encode")}
    if args.vae:
        overrides["vae"] = str(_vae_folder(args.vae).resolve())   # recorded: sampling finds it from anywhere
    if args.init and args.resume:
        raise UsageError(f"--init {args.init}: starts a new run from weights, --resume continues {run_dir} from its "
                         "checkpoint; drop one")
    config = resolve_config(run_dir, overrides, args.resume, spec)
    if args.encode and config.vae is None:
        raise UsageError(f"--encode {args.encode}: how --vae encodes an image folder; without --vae the images "
                         "train as they are (add --vae VAE_DIR, or drop --encode)")
    with _threads(args):
        return _train(args, spec, run_dir, config, world)


@contextlib.contextmanager
def _threads(args) -> Iterator[None]:
    """With --ncpus N: N workers of the target's runtime (as verify and bench set them) and N torch threads for the command;
    torch's count as it was afterwards (`main` also runs in-process, in the tests). Under --nproc, every
    rank runs this too, and a rank whose workers are set is not bound to a share of the cores."""
    if not args.ncpus:
        yield
        return
    import torch

    workers(args)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.ncpus)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _train(args, spec, run_dir: Path, config, world) -> int:
    from dit_compiler.app.train import check_run, train

    if world is None:
        if args.nproc == 1:
            return train(spec, run_dir, config, resume=args.resume, stop_at=args.stop_at)

        check_run(spec, run_dir, config, args.resume)   # a mistake reported once, before any rank starts
        return launch([sys.executable, "-m", "dit_compiler.cli", *args.argv], args.nproc)
    if args.nproc > 1 and LAUNCHED_BY_DITC not in os.environ:
        raise UsageError(f"--nproc {args.nproc}: this process is already rank {world.rank} of {world.size} "
                         "(WORLD_SIZE is set, as torchrun sets it): torchrun starts the ranks; drop --nproc")
    with joined(world, args.dist_timeout, spec.target):
        return train(spec, run_dir, config, resume=args.resume, world=world, stop_at=args.stop_at)


def _load_target(target: str):
    return spec_and_dir(target)


def _checkpoint_of(args, tmp: str):
    """The spec, its build folder, the checkpoint (a run's last unless --ckpt), the default samples folder,
    and where builds of this model's variants go (the run folder, or `tmp`) for a run folder or for a
    spec given with --ckpt."""
    from dit_compiler.app.train import RUN_FILE, checkpoints, trusted_build

    path = Path(args.target)
    ckpt = Path(args.ckpt) if args.ckpt else None
    if os.path.lexists(path / RUN_FILE):
        spec, build_dir = trusted_build(path)
        if ckpt is None:
            if not checkpoints(path):
                raise UsageError(f"{path}: the run has no checkpoint yet")
            ckpt = checkpoints(path)[-1]
            if ckpt.is_symlink() or (path / "checkpoints").is_symlink():
                raise UsageError(f"{ckpt}: a link; ditc reads a run's checkpoints only from inside the run")
        default_out, builds = path / "samples", path
    else:
        spec, build_dir = _load_target(args.target)
        if ckpt is None:
            raise UsageError(f"{args.target}: a spec has no trained weights; pass --ckpt FILE (a ditc run's or "
                             "DiT's checkpoint) or give a training run folder")
        build_dir = build_dir or write_build(compile_spec(spec), tmp)
        default_out, builds = Path("samples") / spec.name, Path(tmp)
    if not ckpt.is_file():
        raise UsageError(f"--ckpt {ckpt}: " + ("a folder, not a checkpoint file" if ckpt.is_dir() else "no such file"))
    return spec, build_dir, ckpt, default_out, builds


def _open_model(args, tmp: str, rows: Callable[[Spec], int], output: Callable[[Path], Path]):
    """The graph, a backend holding the checkpoint's weights for sampling, a description of them, and the
    output folder (`output` of the default one: checked, like the checkpoint, before anything is built
    or written); `app.sample.open_sampler` compiles the variant for `rows(spec)` images a step beside the
    run (or in `tmp`)."""
    from dit_compiler.app.sample import open_sampler
    from dit_compiler.app.weights import check_weights_fit, load_weights

    spec, build_dir, ckpt, default_out, builds = _checkpoint_of(args, tmp)
    out = output(default_out)
    weights, entry = load_weights(ckpt, args.ema)   # a bad checkpoint is refused before a variant is built
    check_weights_fit(build_dir, weights, f"{ckpt} ({entry})")
    graph, backend = open_sampler(spec, build_dir, weights, str(ckpt), args.backend, rows(spec), builds)
    return graph, backend, f"{ckpt} ({entry})", out


def _rows(labels: int, scales: list[float]) -> int:
    """Model rows a sampling step runs: each label once, twice under guidance (conditional and null)."""
    return labels * (2 if any(s != 1 for s in scales) else 1)


def _labels(args, spec: Spec):
    from dit_compiler.app.sample import sample_labels

    return sample_labels(label_classes(spec.model), args.classes, args.n)


def cmd_export(args) -> int:
    from dit_compiler.app.export import export_diffusers
    from dit_compiler.app.weights import load_weights

    check_folder_arg(args.diffusers, "--diffusers")
    with tempfile.TemporaryDirectory() as tmp:
        spec, _, ckpt, _, _ = _checkpoint_of(args, tmp)
        weights, entry = load_weights(ckpt, args.ema)
        out = export_diffusers(graph_of(spec), weights, Path(args.diffusers), f"{ckpt} ({entry})")
    class_name = json.loads((out / "config.json").read_text())["_class_name"]
    print(f"exported {ckpt} ({entry}) as a diffusers {class_name}: {out}/")
    return 0


def _sample_config(args, graph, cfg: float | None = None):
    """The spec's `sample:` section with the flags on top (`cfg` one scale of a sweep)."""
    from dit_compiler.app.sample import SampleConfig

    spec = graph.spec.sample
    channels = args.cfg_channels or spec.cfg_channels
    objective = graph.spec.diffusion.objective
    if args.sampler and args.sampler not in SAMPLERS[objective]:
        raise UsageError(f"--sampler {args.sampler}: the model was trained with the {objective} objective (its "
                         f"spec's diffusion.objective); allowed: {', '.join(SAMPLERS[objective])}")
    if args.eta is not None and (args.sampler or spec.sampler) != "ddim":
        raise UsageError(f"--eta {args.eta:g}: eta is DDIM's; the sampler here is {args.sampler or spec.sampler} "
                         "(add --sampler ddim, or drop --eta)")
    if (args.steps or spec.steps) == 1 and (args.sampler or spec.sampler) == "ddpm":
        raise UsageError("sampling steps 1: a DDPM step's variance comes from the step after it (as in DiT), so DDPM "
                         "takes at least 2 steps; use --steps 2 or more, or --sampler ddim")
    for flag, given in (("--clip-denoised", args.clip_denoised), ("--sigma-small", args.sigma_small)):
        if given and graph.spec.diffusion.flow:
            raise UsageError(f"{flag}: DDPM's and DDIM's option; a rectified-flow model samples an ODE with euler "
                             "or heun, which has no x_0 prediction to clip nor a variance (drop it)")
    return SampleConfig(sampler=args.sampler or spec.sampler, steps=args.steps or spec.steps,
                        eta=spec.eta if args.eta is None else args.eta, cfg=cfg or spec.cfg,
                        cfg_channels=None if channels == "auto" else channels, seed=args.seed,
                        clip_denoised=args.clip_denoised, sigma_small=args.sigma_small)


def cmd_sample(args) -> int:
    from dit_compiler.app.sample import run_sample

    vae = _sample_vae(args)
    with tempfile.TemporaryDirectory() as tmp:
        graph, backend, source, out = _open_model(
            args, tmp, lambda spec: _rows(len(_labels(args, spec)), [args.cfg or spec.sample.cfg]),
            lambda default: _output_folder(Path(args.out) if args.out else default, "--out", SAMPLES_KINDS))
        labels = _labels(args, graph.spec)
        try:
            if vae is not None:
                check_vae(vae, graph.axes["in_channels"].size)
            run_sample(backend, graph, labels, _sample_config(args, graph, args.cfg), out, vae,
                       {"checkpoint": source, "spec": graph.spec.name})
        finally:
            backend.close()
    return 0


def _scorer(args):
    """A function (images, labels) -> scores: FID against --ref with --inception, else the digits scores."""
    if args.ref and not args.inception:
        raise UsageError(f"--ref {args.ref}: reference images are for FID, which needs --inception FILE (the "
                         "Inception weights); without it the digits scores need no reference")
    if args.inception and not args.ref:
        raise UsageError("--inception needs --ref PATH: the reference images (a folder or an .npz)")
    if args.cache:   # a cache folder: the classifier's one file goes beside whatever is there
        check_folder_arg(args.cache, "--cache")
    return make_scorer(args.inception and Path(args.inception), args.ref, Path(args.cache) if args.cache else None,
                       args.seed)


def _check_samples(path: Path, images, labels, classes: int | None) -> None:
    """Samples that can be scored: N,C,H,W finite images (at least two: a Frechet distance needs a
    covariance) and, for the digits scores, N class labels. An undertrained model's samples may lie far
    outside [-1, 1]: they are scored, not refused."""
    if images.ndim != 4 or len(images) < 2:
        raise UsageError(f"{path}: images has shape {images.shape}; allowed: N,C,H,W with N at least 2 (as "
                         "`ditc sample` writes them)")
    if not np.issubdtype(images.dtype, np.floating) or not np.isfinite(images).all():
        raise UsageError(f"{path}: images must be finite floats (samples as `ditc sample` writes them), got "
                         f"{images.dtype} from {images.min():g} to {images.max():g}")
    if classes is not None and (labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer)
                                or labels.min() < 0 or labels.max() >= classes):
        raise UsageError(f"{path}: labels must be {len(images)} integers from 0 to {classes - 1} (the classes "
                         f"the samples were generated for), got {labels.dtype} of shape {labels.shape}")


def _samples_cfg(samples_file: Path) -> float | None:
    """The guidance scale `ditc sample` recorded beside a samples file (its settings.json), None where unknown."""
    try:
        cfg = json.loads(samples_file.with_name("settings.json").read_text(encoding="utf-8")).get("cfg")
    except (OSError, ValueError, AttributeError):   # no settings.json, or not the one `ditc sample` writes
        return None
    return cfg if isinstance(cfg, (int, float)) and not isinstance(cfg, bool) else None


def cmd_evaluate(args) -> int:
    vae = _sample_vae(args)
    score = _scorer(args)
    target = Path(args.target)
    samples_file = target / "samples.npz" if target.is_dir() else target
    rows = []
    if samples_file.suffix == ".npz" and os.path.lexists(samples_file) and not samples_file.is_dir():
        arrays = load_npz(samples_file, ("images", "labels"), "samples (as `ditc sample` writes them)")
        images, labels = arrays["images"], arrays["labels"]
        _check_samples(samples_file, images, labels, None if args.inception else 10)
        out = _output_folder(Path(args.out) if args.out else samples_file.parent, "--out", EVALUATE_KINDS)
        rows.append({"cfg": _samples_cfg(samples_file)} | score(images, labels) | {"samples": str(samples_file)})
    else:
        from dit_compiler.app.sample import run_sample, sample_labels

        with tempfile.TemporaryDirectory() as tmp:
            graph, backend, source, out = _open_model(
                args, tmp, lambda spec: _rows(args.n, args.cfg or [spec.sample.cfg]),
                lambda default: _output_folder(Path(args.out) if args.out else default.with_name("evaluate"),
                                               "--out", EVALUATE_KINDS))
            mark_folder(out, EVALUATE_KINDS)   # before its cfg*/ samples folders
            labels = sample_labels(label_classes(graph.spec.model), None, args.n)
            try:
                if vae is not None:
                    check_vae(vae, graph.axes["in_channels"].size)
                for cfg in args.cfg or [graph.spec.sample.cfg]:
                    images, took = run_sample(backend, graph, labels, _sample_config(args, graph, cfg),
                                              out / f"cfg{cfg:g}", vae,
                                              {"checkpoint": source, "spec": graph.spec.name})
                    rows.append({"cfg": cfg} | score(images, labels) | {"sampling_s": round(took, 2),
                                                                         "checkpoint": source})
            finally:
                backend.close()
    write_table(rows, out)
    print(format_table(rows))
    print(f"table: {out}/evaluate.csv" + (f", plot: {out}/evaluate.png" if len(rows) > 1 else ""), file=sys.stderr)
    return 0
