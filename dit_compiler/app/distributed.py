"""Data-parallel training on torch.distributed: a rank's place in the world, its share of the cores, the
process group, and gradients averaged in buckets.

NNTile 1.1 does not run across MPI ranks (its MPI registration is commented out), so ditc trains
on several processes the standard way: every rank holds the whole model, runs it on its slice of the
global batch, and the ranks average their parameter gradients with torch.distributed (gloo on CPU, NCCL
where every rank of a machine has a GPU) before each applies the same AdamW step. A rank learns its
place from the environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR,
MASTER_PORT); `ditc train --nproc N` (`dit_compiler.app.launch`) sets the same on one machine.
"""
from __future__ import annotations

import contextlib
import gc
import hashlib
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from math import prod

import numpy as np

from dit_compiler.compiler import targets
from dit_compiler.compiler.targets.base import Target
from dit_compiler.errors import UsageError
from dit_compiler.limits import DIST_TIMEOUT_S, cores

#: Gradient bytes per bucket (DistributedDataParallel's default, 25 MiB).
BUCKET_BYTES = 25 * 2**20
#: Set by `ditc train --nproc N` in its ranks' environment (its value N): they carry the flag too.
LAUNCHED_BY_DITC = "DITC_NPROC"
#: A file `ditc train --nproc` names: a rank that fails appends its number before it leaves the group,
#: so the first line is the rank that failed first (the others failed because it left).
FAILURES_FILE = "DITC_FAILURES"


@dataclass(frozen=True)
class World:
    """Where this process stands: rank `rank` of `size`, `local_rank` of `local_size` on its machine.
    `device` is where collectives' tensors live (the rank's GPU under NCCL). The default is a single
    process: every collective is the identity."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    device: str = "cpu"
    launcher: str = ""   # "ditc" (--nproc) or "torchrun": how to start the run again

    @property
    def lead(self) -> bool:
        """Rank 0 alone writes checkpoints, metrics, plots and prints progress."""
        return self.rank == 0

    def slice(self, batch: int) -> slice:
        """This rank's images of a global batch of `size * batch` images."""
        return slice(self.rank * batch, (self.rank + 1) * batch)

    # -- collectives (the identity on one process) -------------------------------------------------
    def _reduce(self, values: Sequence[float], op: str) -> list[float]:
        if self.size == 1:
            return [float(v) for v in values]
        import torch
        import torch.distributed as dist

        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, op=getattr(dist.ReduceOp, op))
        return tensor.cpu().tolist()

    def mean(self, values: Sequence[float]) -> list[float]:
        """The mean of each value over the ranks."""
        return [v / self.size for v in self._reduce(values, "SUM")]

    def agreed_signal(self, signum: int | None) -> int | None:
        """The largest signal number any rank received (None if none did): every rank stops at the same step."""
        agreed = int(self._reduce([signum or 0], "MAX")[0])
        return agreed or None

    def barrier(self) -> None:
        self._reduce([0.0], "SUM")

    def gradient_buckets(self, shapes: Sequence[tuple[int, ...]]) -> GradientBuckets:
        """Gradients of `shapes` averaged over the ranks in buckets (what a target's backend averages with)."""
        return GradientBuckets(self, shapes)

    def check_same(self, facts: Mapping[str, str]) -> None:
        """Refuse to go on when a rank's `facts` (the backend, a digest of the weights) differ from rank 0's."""
        if self.size == 1:
            return
        import torch.distributed as dist

        gathered: list = [None] * self.size
        dist.all_gather_object(gathered, dict(facts))
        for rank, theirs in enumerate(gathered):
            differ = [k for k in facts if theirs[k] != gathered[0][k]]
            if differ:
                raise UsageError(
                    f"rank {rank} has another {' and '.join(differ)} than rank 0 "
                    f"({', '.join(f'{theirs[k]} against {gathered[0][k]}' for k in differ)}): every rank must "
                    "see the same run folder (a file system shared by the machines) and run the same ditc, "
                    "torch and NNTile")


def digest(state: Mapping[str, np.ndarray]) -> str:
    """A short fingerprint of a state_dict's keys and bytes."""
    h = hashlib.sha256()
    for key, value in state.items():
        h.update(key.encode())
        h.update(np.ascontiguousarray(value).data)
    return h.hexdigest()[:16]


def _env_int(environ: Mapping[str, str], name: str, lo: int, hi: int | None) -> int:
    text = environ.get(name, "")
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < lo or (hi is not None and value > hi):
        allowed = f"an integer from {lo} to {hi}" if hi is not None else f"an integer of at least {lo}"
        raise UsageError(f"{name}={text!r} in the environment (torchrun sets it): allowed: {allowed}")
    return value


def world_from_env(environ: Mapping[str, str] = os.environ) -> World | None:
    """This rank's `World` from torchrun's variables (or `ditc train --nproc`'s), None where WORLD_SIZE is
    unset (a plain single-process run)."""
    if "WORLD_SIZE" not in environ:
        return None
    size = _env_int(environ, "WORLD_SIZE", 1, None)
    rank = _env_int(environ, "RANK", 0, size - 1)
    local_size = _env_int(environ, "LOCAL_WORLD_SIZE", 1, size) if "LOCAL_WORLD_SIZE" in environ else 1
    local_rank = _env_int(environ, "LOCAL_RANK", 0, local_size - 1) if "LOCAL_RANK" in environ else 0
    if size > 1:
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if not environ.get(name):
                raise UsageError(f"WORLD_SIZE={size} but {name} is unset: start the ranks with torchrun or "
                                 "`ditc train --nproc N`")
        _env_int(environ, "MASTER_PORT", 1, 65535)
    return World(rank, size, local_rank, local_size, _device(local_rank, local_size),
                 "ditc" if LAUNCHED_BY_DITC in environ else "torchrun")


def _device(local_rank: int, local_size: int) -> str:
    """The rank's GPU where every rank of its machine has one and NCCL is built in, else the CPU."""
    import torch
    import torch.distributed as dist

    if torch.cuda.is_available() and torch.cuda.device_count() >= local_size and dist.is_nccl_available():
        return f"cuda:{local_rank}"
    return "cpu"


def rank_cores(local_rank: int, local_size: int, available: Sequence[int]) -> list[int]:
    """The cores of a rank: an equal share of `available` (the machine's, sorted), consecutive, so ranks
    never share a core (idle runtime workers spin). Cores left over by the division stay unused: the
    slowest rank sets the pace of every step."""
    if local_size > len(available):
        raise UsageError(f"{local_size} ranks on a machine with {len(available)} cores: at most one rank per core "
                         "(idle runtime workers spin, so ranks sharing cores slow each other down many times)")
    share = len(available) // local_size
    return list(available[local_rank * share:(local_rank + 1) * share])


def share_cores(world: World, target: Target) -> None:
    """Bind this rank to its share of the machine's cores before the target's runtime and torch start
    threads, and run as many workers (`target.worker_environment`) and torch threads. A worker count the
    user set in the environment (`target.requested_workers`) is left alone and nothing is bound: the user
    placed the ranks."""
    if target.requested_workers():
        return
    binds = hasattr(os, "sched_setaffinity")   # Linux
    available = sorted(os.sched_getaffinity(0)) if binds else list(range(cores()))
    mine = rank_cores(world.local_rank, world.local_size, available)
    if binds:
        os.sched_setaffinity(0, mine)
    os.environ.update(target.worker_environment(len(mine)))
    import torch

    torch.set_num_threads(len(mine))


@contextlib.contextmanager
def joined(world: World, timeout_s: float = DIST_TIMEOUT_S, target: str = targets.DEFAULT) -> Iterator[World]:
    """This rank on its cores and in the process group (gloo, or NCCL on GPUs) for the block; collectives
    that wait longer than `timeout_s` fail instead of hanging. `target` (a spec's `target:`) runs the model."""
    if world.size == 1:
        yield world
        return
    share_cores(world, targets.get(target))
    import torch
    import torch.distributed as dist

    if world.device.startswith("cuda"):
        torch.cuda.set_device(world.device)
    try:
        dist.init_process_group("nccl" if world.device.startswith("cuda") else "gloo",
                                timeout=timedelta(seconds=timeout_s))
    except dist.DistError as error:   # the other ranks never came, or the address is not this machine's
        where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
        raise UsageError(f"rank {world.rank} of {world.size}: the ranks did not meet at {where} within "
                         f"--dist-timeout {timeout_s:g} s ({str(error).strip().splitlines()[0]}); start every "
                         "rank with the same MASTER_ADDR, MASTER_PORT and WORLD_SIZE") from None
    try:
        yield world
    except BaseException:
        if path := os.environ.get(FAILURES_FILE):
            # the launcher's file in its private folder: appended to, never through a link, never made
            with contextlib.suppress(OSError), \
                    open(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK), "w") as failures:
                failures.write(f"{world.rank}\n")
        raise
    finally:
        dist.destroy_process_group()
        # Free what still holds the group (DDP's reducer) now: freed by the interpreter's last collection,
        # gloo's threads ended in std::terminate (SIGABRT at exit, every other run on a rank bound to a core).
        gc.collect()


@dataclass
class GradientBuckets:
    """Averages a fixed list of float32 arrays over the ranks: consecutive arrays share a flat buffer of
    about `cap_bytes` (a bucket), and each bucket's all-reduce starts, asynchronously, as soon as its
    arrays are read, so communication overlaps with the production of the rest. Arrays are given in
    the order they become ready; an array is read and written in Fortran order (NNTile's)."""

    world: World
    shapes: Sequence[tuple[int, ...]]
    cap_bytes: int = BUCKET_BYTES
    #: Seconds of the last `average`: reading (waiting for the producer), waiting for the collectives
    #: after the last read (the communication not hidden), writing the means back.
    last: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.members: list[list[int]] = [[]]
        filled = 0
        for i, shape in enumerate(self.shapes):
            if self.members[-1] and filled + 4 * prod(shape) > self.cap_bytes:
                self.members.append([])
                filled = 0
            self.members[-1].append(i)
            filled += 4 * prod(shape)
        self.buffers = [np.zeros(sum(prod(self.shapes[i]) for i in m), np.float32) for m in self.members]
        self.views: list[np.ndarray] = [np.empty(0, np.float32)] * len(self.shapes)
        for buffer, members in zip(self.buffers, self.members):
            offset = 0
            for i in members:
                n = prod(self.shapes[i])
                self.views[i] = buffer[offset:offset + n].reshape(self.shapes[i], order="F")
                offset += n

    def average(self, read: Callable[[int, np.ndarray], None], write: Callable[[int, np.ndarray], None]) -> None:
        """`read(i, out)` fills array i (blocking until it is ready), in index order; as each bucket is
        reduced, `write(i, mean)` takes the mean over the ranks of each of its arrays."""
        import torch
        import torch.distributed as dist

        began = time.perf_counter()
        pending = []
        for buffer, members in zip(self.buffers, self.members):
            for i in members:
                read(i, self.views[i])
            host = torch.from_numpy(buffer)
            on_device = host.to(self.world.device) if self.world.device != "cpu" else host
            pending.append((host, on_device, dist.all_reduce(on_device, async_op=True)))
        self.last = {"read_s": time.perf_counter() - began, "wait_s": 0.0, "write_s": 0.0}
        for (host, on_device, work), members in zip(pending, self.members):
            began = time.perf_counter()
            work.wait()
            if on_device is not host:
                host.copy_(on_device)
            host.mul_(1.0 / self.world.size)
            reduced = time.perf_counter()
            for i in members:   # while the next buckets are still being reduced
                write(i, self.views[i])
            self.last["wait_s"] += reduced - began
            self.last["write_s"] += time.perf_counter() - reduced

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.buffers)
