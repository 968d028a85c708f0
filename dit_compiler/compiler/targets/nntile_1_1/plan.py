"""The memory plan: when each activation's value and gradient are done, from the layers' declarations.

Pure Python over the model's wiring, so `ditc inspect` and the tests can compute it without NNTile.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Step:
    """One layer, in forward order: its ports bound to tensor names, and the ports its backward reads."""

    inputs: Mapping[str, str]
    outputs: Mapping[str, str]
    backward_reads: frozenset[str]


@dataclass(frozen=True)
class PlanRow:
    first: tuple[str, ...]            # gradients its backward writes first: it overwrites them
    release_grads: tuple[str, ...]    # gradients to release after its backward (it made them)
    release_values: tuple[str, ...]   # values to release after its forward (nothing reads them again)
    release_read: tuple[str, ...] = ()  # values to release after its backward (the last backward to read them)


def memory_plan(steps: Sequence[Step], activations: set[str], params: set[str], host_reads: set[str]) -> list[PlanRow]:
    """Per layer, which activations it may overwrite or release, so that neither values nor gradients
    are held longer than the model needs them:

    - an activation's gradient is written first by its last reader in forward order (the first in
      backward), which overwrites it instead of accumulating, so no gradient is zeroed ahead of backward;
    - a gradient is released after the backward of the layer that produced the activation;
    - a value is released after its last forward reader when no backward reads it (the residual stream),
      else after the backward of its first forward reader that reads it in backward too (the last such
      backward to run), so that nothing of a step's activations is held through the optimiser's update.
    `host_reads` are values the host reads (the output patches): never released. Parameters must have
    one reader each (their gradients are overwritten), and no layer may read a tensor twice."""
    readers = Counter(name for s in steps for name in s.inputs.values() if name in params)
    for s in steps:
        names = list(s.inputs.values())
        if len(set(names)) != len(names):
            raise ValueError(f"a layer reads {names} with a repeat; its gradient would be overwritten")
    last_reader: dict[str, int] = {}
    last_backward_reader: dict[str, int] = {}
    for i, s in enumerate(steps):
        ports = {**s.inputs, **s.outputs}
        for name in sorted({ports[p] for p in s.backward_reads}):
            last_backward_reader.setdefault(name, i)
        for name in s.inputs.values():
            if name in activations:
                last_reader[name] = i
    shared = sorted(name for name, count in readers.items() if count > 1)
    if shared:
        raise ValueError(f"parameters read by several layers: {', '.join(shared)}; their gradients would be "
                         "overwritten")
    first: list[list[str]] = [[] for _ in steps]
    values: list[list[str]] = [[] for _ in steps]
    read: list[list[str]] = [[] for _ in steps]
    for name, i in last_reader.items():
        first[i].append(name)
        if name not in last_backward_reader and name not in host_reads:
            values[i].append(name)
    for name, i in last_backward_reader.items():
        if name in activations and name not in host_reads:
            read[i].append(name)
    return [PlanRow(tuple(first[i]), tuple(o for o in s.outputs.values() if o in activations), tuple(values[i]),
                    tuple(read[i])) for i, s in enumerate(steps)]
