"""Helper of `test_nntile.py::test_out_of_core_training_matches_torch`, run in a fresh process: out-of-core
must be set up before NNTile is first imported, which pytest's process has done long before.

    python tests/ooc_train.py BUILD_DIR OUT_OF_CORE_JSON DATA_NPZ OUT_NPZ

Trains the build's NNTile model for `steps` AdamW steps (lr, weight decay and inputs from DATA_NPZ, the
torch reference's seeded weights) under the given out-of-core settings; writes the losses, the weights
(torch keys), the bytes read from and written to disk during the steps, and the tiles the pinning
library kept in memory.
"""
from __future__ import annotations

import ctypes
import json
import sys
from pathlib import Path

import numpy as np

from dit_compiler.checks.bench import disk_bytes
from dit_compiler.checks.common import random_weights
from dit_compiler.compiler.build import load_module


def main(build_dir: str, settings: str, data_file: str, out_file: str) -> None:
    data = np.load(data_file)
    module = load_module(Path(build_dir) / "nntile_model.py")
    from dit_compiler.compiler.targets.nntile_1_1 import OutOfCore

    ooc = OutOfCore(**json.loads(settings))
    with module.nntile_runtime(2, ooc):
        model = module.Model()
        model.load_parameters(random_weights(model.parameter_shapes(), 0))
        optimizer = model.adamw(float(data["lr"]), float(data["weight_decay"]))
        try:
            start = disk_bytes()
            losses = [model.train_step((data["x"], data["t"], data["y"]), data["target"], optimizer)
                      for _ in range(int(data["steps"]))]
            read, written = (b - a for a, b in zip(start, disk_bytes()))
            weights = model.state_dict()
        finally:
            optimizer.unregister()
            model.unregister()
    pinned = ctypes.CDLL(ooc.pin_library).ditc_pinned_tiles()
    np.savez(out_file, losses=np.array(losses), disk=np.array([read, written, pinned]),
             **{f"weight:{key}": value for key, value in weights.items()})


if __name__ == "__main__":
    main(*sys.argv[1:])
