"""A tiny digits-shaped DiT and a short training run, shared by the train, sample and evaluate tests."""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from dit_compiler.app.train import TrainConfig, train
from dit_compiler.compiler.spec import load_spec

TINY_DIGITS = """\
name: tiny-digits
model: {input_size: 8, in_channels: 1, patch_size: 2, hidden_size: 32, depth: 1, num_heads: 2, num_classes: 10}
batch: 8
"""


def tiny_spec(folder: Path, text: str = TINY_DIGITS):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tiny-digits.yaml"
    path.write_text(text)
    return load_spec(path)


def train_tiny(folder: Path, steps: int = 4, backend: str = "torch", resume: bool = False, **config) -> Path:
    """Train the tiny spec for a few steps into `folder/run` (or, with `resume`, on to `steps`); returns the
    run folder. On torch by default: its runs are bit-reproducible, which the resume tests rely on."""
    run = folder / "run"
    assert train(tiny_spec(folder), run, TrainConfig(steps=steps, lr=1e-3, backend=backend, **config),
                 resume=resume) == 0
    return run


def terminate_training(args: list[str], run: Path, env: dict, rows: int = 3) -> tuple[int, str]:
    """Start `ditc ARGS` (a training into `run`), send it SIGTERM once metrics.csv holds `rows` steps; returns
    its exit code and stderr."""
    process = subprocess.Popen([sys.executable, "-m", "dit_compiler.cli", *args], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=env)
    metrics = run / "metrics.csv"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.is_file() or len(metrics.read_text().splitlines()) <= rows):
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    return process.returncode, err
