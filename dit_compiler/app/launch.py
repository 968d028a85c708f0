"""`ditc train --nproc N`: start N ranks of a data-parallel run on this machine and watch them.

Each rank is a process of its own with torchrun's variables set (RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE, MASTER_ADDR=127.0.0.1, MASTER_PORT a free loopback port), so the ranks meet and
communicate through torch.distributed exactly as under torchrun; each takes its share of the cores
(`dit_compiler.app.distributed.share_cores`). The launcher stays in the foreground:

- a rank that fails (an exit code other than 0, 130 and 143, or death by a signal) ends the run: the
  launcher names the rank that failed first (its error is above, on the shared stderr; the others'
  errors follow from it), kills the rest and exits with that rank's code;
- Ctrl-C reaches every rank from the terminal, SIGTERM to the launcher is passed on to them: the ranks
  agree on the step to stop at, rank 0 writes a checkpoint, and all exit 130 or 143;
- once rank 0 has exited, the others get `GRACE_S` seconds to follow before they are killed.
"""
from __future__ import annotations

import contextlib
import os
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from dit_compiler.app.distributed import FAILURES_FILE, LAUNCHED_BY_DITC

#: Exit codes of a rank that did not fail: done, or stopped by Ctrl-C or SIGTERM after a checkpoint.
CLEAN = (0, 130, 143)
#: Seconds the other ranks may take to exit after rank 0 has.
GRACE_S = 60.0


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _describe(code: int) -> str:
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


def _exit_code(code: int) -> int:
    """A child's return code as a shell reports it: death by signal s is 128 + s."""
    return 128 - code if code < 0 else code


def launch(command: Sequence[str], nproc: int, stream: TextIO | None = None) -> int:
    """Run `command` as ranks 0 to nproc-1 of one world on this machine; returns rank 0's exit code, or
    the code of the rank that failed first."""
    with tempfile.TemporaryDirectory(prefix="ditc-launch-") as tmp:
        failures = Path(tmp) / "failures"
        failures.touch()
        env = os.environ | {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(nproc),
                            "LOCAL_WORLD_SIZE": str(nproc), LAUNCHED_BY_DITC: str(nproc), FAILURES_FILE: str(failures)}
        return _run(command, nproc, env, failures, stream or sys.stderr)


def _run(command: Sequence[str], nproc: int, env: dict[str, str], failures: Path, stream: TextIO) -> int:
    ranks: list[subprocess.Popen] = []

    def forward(signum, frame) -> None:
        for p in ranks:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for rank in range(nproc):
            ranks.append(subprocess.Popen(list(command), env=env | {"RANK": str(rank), "LOCAL_RANK": str(rank)}))
        return _watch(ranks, failures, stream)
    finally:
        _kill_running(ranks)   # none are left unless the launcher itself failed
        for s, handler in previous.items():
            signal.signal(s, handler)


def _watch(ranks: list[subprocess.Popen], failures: Path, stream: TextIO) -> int:
    """Wait for the ranks (a thread per rank reports its exit). At the first failure, the rank that failed
    first (the first line of `failures`: the others' errors follow from it, a peer closed the connection)
    is given `GRACE_S` to finish printing its error and exit; then the rest are killed."""
    exits: queue.Queue[tuple[int, int]] = queue.Queue()
    for rank, p in enumerate(ranks):
        threading.Thread(target=lambda r=rank, p=p: exits.put((r, p.wait())), daemon=True).start()
    codes: dict[int, int] = {}
    lead_done: float | None = None
    while len(codes) < len(ranks):
        try:
            rank, code = exits.get(timeout=None if lead_done is None else max(0.0, lead_done + GRACE_S - time.monotonic()))
        except queue.Empty:
            running = _kill_running(ranks)
            print(f"ditc train: ranks {', '.join(map(str, running))} did not exit within {GRACE_S:.0f} s of rank 0; "
                  "killed them", file=stream)
            return 1
        codes[rank] = code
        if code not in CLEAN:
            first = failures.read_text().split()
            if code > 0 and first and int(first[0]) != rank:   # a rank killed by a signal is a first cause
                rank = int(first[0])
                with contextlib.suppress(subprocess.TimeoutExpired):
                    ranks[rank].wait(GRACE_S)
                code = ranks[rank].poll() or code
            running = _kill_running(ranks)
            print(f"ditc train: rank {rank} {_describe(code)}; "
                  f"{'killed ranks ' + ', '.join(map(str, running)) if running else 'no other rank was left'}",
                  file=stream)
            return _exit_code(code)
        if rank == 0:
            lead_done = time.monotonic()
    return codes[0]


def _kill_running(ranks: list[subprocess.Popen]) -> list[int]:
    """Kill the ranks still running; returns their numbers."""
    running = [r for r, p in enumerate(ranks) if p.poll() is None]
    for r in running:
        ranks[r].kill()
        ranks[r].wait()
    return running
