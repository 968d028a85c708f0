"""What a machine can run, checked before a runner allocates anything: memory and CPU workers."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

from dit_compiler.compiler.graph.cost import totals
from dit_compiler.errors import UsageError

if TYPE_CHECKING:  # the command line reads MAX_NCPUS before anything heavy is imported
    from dit_compiler.compiler.graph.ir import Graph

#: How long a rank of a data-parallel run waits for the others (rendezvous, a collective) before failing,
#: by default: long enough for rank 0 to write a DiT-XL checkpoint while the others wait at the next step.
DIST_TIMEOUT_S = 1800
MAX_DIST_TIMEOUT_S = 7 * 86400


def cores() -> int:
    """The CPU cores this process may run on: the most CPU workers of a target's runtime (and torch
    threads) a runner starts. Idle NNTile workers spin, so more workers than cores only slow a run down
    (on 2 cores, 4 workers made the tiny spec's NNTile pass 12 times slower, 100 workers 350 times)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def check_memory(graph: Graph) -> None:
    """Refuse a model whose parameters, activations and gradients alone exceed this machine's memory:
    torch or the target's runtime would fail while allocating it, or the kernel would kill the process."""
    tot = totals(graph)
    need = tot.param_bytes + tot.activation_bytes + tot.gradient_bytes
    have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > have:
        raise UsageError(f"{graph.spec.source}: running {graph.spec.name!r} needs at least {need / 2**30:,.1f} GiB "
                         f"(parameters, activations and their gradients); this machine has {have / 2**30:,.1f} GiB. "
                         "`ditc inspect` shows where the memory goes")
