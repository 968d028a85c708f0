"""Nothing a user types loses a file, hangs, or prints a traceback.

`HOSTILE` is the table of bad inputs: each runs `ditc` in a folder holding the case's files and must exit
2 with a message naming the file (or flag) and the problem, raise nothing (an exception escaping `main`
fails the test, as a traceback would have shown), and leave every file as it was: nothing written,
nothing removed. Real processes and a real SIGTERM test concurrent builds and interruption.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, SPECS, needs_nntile
from dit_compiler.files import mark_folder
from dit_compiler.cli import main

TINY = (SPECS / "tiny.yaml").read_text()
SMALL = "preset: DiT-S/8\nmodel:\n  depth: 1\n"
EXTENDS_CHAIN = {f"c{i}.yaml": f"extends: c{i + 1}.yaml\n" for i in range(20)} | {"c20.yaml": SMALL}


DIGITS_SPEC = "name: d\nmodel: {input_size: 8, in_channels: 1, patch_size: 2, hidden_size: 32, depth: 1, num_heads: 2}\n"


def npz(**arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def torch_saved(value) -> bytes:
    import torch

    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def _bad_crc() -> bytes:
    data = bytearray(npz(images=np.zeros((4, 8, 8), np.uint8), labels=np.zeros(4, np.int64)))
    data[data.index(b"\x93NUMPY") + 200] ^= 0xFF   # a byte of the first member's pixels
    return bytes(data)


def _huge_shape() -> bytes:
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (10**6, 10**6, 8)})
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("images.npy", header.getvalue() + bytes(64))
        archive.writestr("labels.npy", header.getvalue())
    return buffer.getvalue()


BAD_CRC, HUGE_SHAPE = _bad_crc(), _huge_shape()
SAMPLES = npz(images=np.zeros((2, 1, 8, 8), np.float32), labels=np.zeros(2, np.int64))


def sweep(body: str) -> str:
    return "base: base.yaml\nname: s\n" + body


SWEEP_FILES = {"base.yaml": TINY}
#: The marker a sweep's results folder holds (any results in it are then read, and checked).
SWEEP_MARKER = {"res/s/ditc-output.json": json.dumps({"written_by": "ditc 0", "kind": "sweep", "files": {}})}

#: id -> (files written first, arguments, what stderr must say). Paths are relative to the case's folder.
HOSTILE = {
    # specs: bounds, names, empty files, quoting, extends chains
    "20-digit widths": ({"s.yaml": "model:\n  hidden_size: 12345678901234567890\n  num_heads: 98765432109876543210\n"},
                        ["validate", "s.yaml"], ["s.yaml:2:16: model.hidden_size: too large", "from 1 to 65536",
                                                 "s.yaml:3:14: model.num_heads: too large"]),
    "unallocatable width": ({"s.yaml": "model:\n  hidden_size: 1e9\n"}, ["build", "s.yaml"],
                            ["s.yaml:2:16: model.hidden_size: too large"]),
    "depth beyond its maximum": ({"s.yaml": "model:\n  depth: 10000\n"}, ["inspect", "s.yaml"],
                                 ["s.yaml:2:10: model.depth: too large", "from 1 to 1000"]),
    "mlp_ratio beyond its maximum": ({"s.yaml": "model:\n  mlp_ratio: 1e300\n"}, ["validate", "s.yaml"],
                                     ["s.yaml:2:14: model.mlp_ratio: too large"]),
    "vanishing mlp_ratio": ({"s.yaml": "model:\n  mlp_ratio: 1e-9\n"}, ["validate", "s.yaml"],
                            ["s.yaml:2:14: model.mlp_ratio", "not a whole number of at least 1"]),
    "classes beyond their maximum": ({"s.yaml": "model:\n  num_classes: 100000000\n"}, ["validate", "s.yaml"],
                                     ["model.num_classes: too large"]),
    "batch beyond its maximum": ({"s.yaml": "preset: DiT-S/2\nbatch: 1000000\n"}, ["validate", "s.yaml"],
                                 ["s.yaml:2:8: batch: too large"]),
    "name with a newline": ({"s.yaml": 'preset: DiT-S/2\nname: "foo\\n"\n'}, ["build", "s.yaml"],
                            ["s.yaml:2:7: name: not of the allowed form", "letters, digits"]),
    "name with a path": ({"s.yaml": "preset: DiT-S/2\nname: ../x\n"}, ["build", "s.yaml"], ["s.yaml:2:7: name"]),
    "name too long": ({"s.yaml": "preset: DiT-S/2\nname: " + "a" * 65 + "\n"}, ["build", "s.yaml"],
                      ["s.yaml:2:7: name: too long"]),
    "file stem with a space": ({"my spec.yaml": "preset: DiT-S/2\n"}, ["build", "my spec.yaml"],
                               ["my spec.yaml: name:", "its file name is no valid build name", "'my spec'"]),
    "file stem '.'": ({"..yaml": "preset: DiT-S/2\n"}, ["build", "..yaml"], ["..yaml: name:", "got '.'"]),
    "keys that are no strings": ({"s.yaml": "1: 2\n~: 3\n"}, ["validate", "s.yaml"],
                                 ["s.yaml:1:1: <top level>: keys must be strings (got '1')", "s.yaml:2:1"]),
    "empty spec": ({"e.yaml": ""}, ["build", "e.yaml"],
                   ["e.yaml: <top level>: the spec is empty; `preset: DiT-XL/2` selects the defaults"]),
    "spec of comments": ({"e.yaml": "# nothing yet\n\n"}, ["build", "e.yaml"], ["e.yaml", "the spec is empty"]),
    "extends a system file": ({"s.yaml": "extends: /etc/passwd\n"}, ["validate", "s.yaml"],
                              ["/etc/passwd:1:1", "characters)"]),
    "an integer of 5,000 digits": ({"s.yaml": "model:\n  depth: " + "9" * 5000 + "\n"}, ["validate", "s.yaml"],
                                         ["s.yaml:2:10: model.depth: an integer of 5000 digits"]),
    "extends with a NUL byte": ({"s.yaml": 'extends: "a\\0b.yaml"\n'}, ["build", "s.yaml"],
                                ["s.yaml:1:10: extends: not a path a file can have: it holds a NUL byte"]),
    "extends with a lone surrogate": ({"s.yaml": 'extends: "a\\ud800.yaml"\n'}, ["validate", "s.yaml"],
                                      ["s.yaml:1:10: extends: not a path a file can have", "cannot be encoded"]),
    "a spec that is not UTF-8": ({"s.yaml": b"preset: DiT-S/2\nname: \xff\n"}, ["build", "s.yaml"],
                                 ["s.yaml:2:7: <top level>: not UTF-8 text: byte 0xff"]),
    "brackets nested 10,000 deep": ({"s.yaml": "model: " + "[" * 10000 + "]" * 10000 + "\n"}, ["validate", "s.yaml"],
                                    ["s.yaml: <top level>: spec is nested too deeply"]),
    "a file above the size limit": ({"s.yaml": "# padding\n" * 4000}, ["validate", "s.yaml"],
                                    ["s.yaml: <top level>: spec is 40000 bytes; the limit is 32 KiB"]),
    "a chain of files above the size limit together": (
        {"a.yaml": "extends: b.yaml\n" + "# pad\n" * 3000, "b.yaml": "batch: 2\n" + "# pad\n" * 3000},
        ["validate", "a.yaml"], ["b.yaml: <top level>: spec is 18009 bytes, and the files extending it 18016 bytes; "
                                 "the limit is 32 KiB"]),
    "thousands of mistakes": ({"s.yaml": "".join(f"k{i}: 1\n" for i in range(3000))}, ["validate", "s.yaml"],
                              ["s.yaml:1:1: k0: unknown key", "... and 2950 more problems"]),
    "memory_limit beyond 1 PiB": ({"s.yaml": SMALL + "memory_limit: 99999999999999999999TiB\n"}, ["inspect", "s.yaml"],
                                  ["s.yaml:4:15: memory_limit: not an allowed memory size (got '99999999999999999999TiB')",
                                   "from 1 byte to 1 PiB"]),
    "extends chain too deep": (EXTENDS_CHAIN, ["validate", "c0.yaml"],
                               ["c0.yaml: extends: extends chain longer than 16 files, from this file to c15.yaml, whose line 1"]),
    # build: what a build may replace
    "build over a user's folder": ({"s.yaml": "preset: DiT-S/2\nname: specs\n", "specs/notes.txt": "mine\n"},
                                   ["build", "s.yaml", "-o", "."], ["specs/ is a folder ditc did not build"]),
    "build over a user's file": ({"s.yaml": "preset: DiT-S/2\nname: m\n", "out/m": "a file\n"},
                                 ["build", "s.yaml", "-o", "out"], ["out/m exists and is not a build folder"]),
    "build over a file the manifest does not list": (
        {"s.yaml": "preset: DiT-S/2\nname: m\n", "out/m/ditc-build.json": '{"written_by": "ditc 0.1.0", "files": {}}\n',
         "out/m/graph.json": "my own graph\n"},
        ["build", "s.yaml", "-o", "out"], ["out/m/graph.json is not a file ditc wrote"]),
    "build over a corrupt manifest": ({"s.yaml": "preset: DiT-S/2\nname: m\n", "out/m/ditc-build.json": "[1, 2]\n"},
                                      ["build", "s.yaml", "-o", "out"], ["out/m/ditc-build.json: not a manifest ditc wrote"]),
    "two specs of one name": ({"a.yaml": "preset: DiT-S/2\nname: x\n", "b.yaml": "preset: DiT-S/4\nname: x\n"},
                              ["build", "a.yaml", "b.yaml", "-o", "out"], ["a.yaml and b.yaml both build 'x'"]),
    "-o at a file": ({"s.yaml": SMALL, "f": "x\n"}, ["build", "s.yaml", "-o", "f"], ["-o f: a file, not a folder"]),
    "-o under a file": ({"s.yaml": SMALL, "f": "x\n"}, ["build", "s.yaml", "-o", "f/sub"],
                        ["-o f/sub:", "is a file, so no folder can be made under it"]),
    "-o where no folder can be made": ({"s.yaml": SMALL}, ["build", "s.yaml", "-o", "/proc/ditc-test"],
                                       ["/proc/ditc-test:"]),  # as root: mkdir fails; else: not writable
    "-o not writable": ({"s.yaml": SMALL}, ["build", "s.yaml", "-o", "/proc/sys/ditc-test"],
                        ["-o /proc/sys/ditc-test: /proc/sys is not writable by you"]),  # even for root
    # runners: paths, flags and the environment, refused before any work
    "--json where no file can be written": ({"s.yaml": SMALL}, ["verify", "s.yaml", "-o", "out", "--json", "/proc/x"],
                                            ["--json /proc/x: no file can be written in /proc"]),
    # runs, datasets and checkpoints ditc reads
    "run.json not JSON": ({"run/run.json": "{bad"}, ["sample", "run"], ["run/run.json: the run record is not JSON"]),
    "run.json of wrong types": ({"run/run.json": '{"spec": 1, "build": "b", "config": {}}'}, ["sample", "run"],
                                ["run/run.json: not a run record ditc wrote (`spec` is not a file name)"]),
    "run.json with NaN": ({"run/run.json": '{"spec": "s", "build": "b", "config": {"lr": NaN}}'}, ["sample", "run"],
                          ["run/run.json: the run record is not JSON (NaN is not JSON)"]),
    "run.json of an impossible config": (
        {"s.yaml": SMALL, "run/run.json": '{"spec": "s", "build": "b", "config": {"lr": 5, "steps": "x"}}',
         "run/checkpoints/0000001.pt": "x"},
        ["sample", "run"], ["run/run.json: not a run record ditc wrote (config.steps: wrong type (got 'x')"]),
    "run.json of a 5,000-digit integer": ({"run/run.json": '{"spec": ' + "9" * 5000 + "}"}, ["sample", "run"],
                                          ["run/run.json: the run record is not JSON (an integer of more than 4300"]),
    "a dataset with a bad CRC": ({"s.yaml": DIGITS_SPEC, "d.npz": BAD_CRC}, ["train", "s.yaml", "--data", "d.npz"],
                                 ["d.npz: the dataset is not a readable .npz file (Bad CRC-32 for file 'images.npy')"]),
    "a dataset of object arrays": ({"s.yaml": DIGITS_SPEC, "d.npz": npz(images=np.array([None, 1], dtype=object),
                                                                        labels=np.zeros(2, np.int64))},
                                   ["train", "s.yaml", "--data", "d.npz"],
                                   ["d.npz: images.npy in the dataset holds Python objects"]),
    "a dataset declaring a huge shape": ({"s.yaml": DIGITS_SPEC, "d.npz": HUGE_SHAPE},
                                         ["train", "s.yaml", "--data", "d.npz"],
                                         ["d.npz: images.npy in the dataset declares shape (1000000, 1000000, 8)"]),
    "a dataset label of 2**63": ({"s.yaml": DIGITS_SPEC, "d.npz": npz(images=np.zeros((2, 8, 8), np.uint8),
                                                                      labels=np.array([1, 2**63], np.uint64))},
                                 ["train", "s.yaml", "--data", "d.npz"], ["d.npz: label 9223372036854775808 is out of range"]),
    "corrupt --inception weights": ({"i.pt": b"PK\x03\x04 not really", "r.npz": SAMPLES, "s.npz": SAMPLES},
                                    ["evaluate", "s.npz", "--inception", "i.pt", "--ref", "r.npz"],
                                    ["--inception i.pt: not a checkpoint"]),
    "--inception weights that are no tensors": ({"i.pt": torch_saved({"fc.weight": [1, 2]}), "r.npz": SAMPLES,
                                                 "s.npz": SAMPLES},
                                                ["evaluate", "s.npz", "--inception", "i.pt", "--ref", "r.npz"],
                                                ["--inception i.pt: not an Inception v3 state_dict"]),
    "samples with a huge declared shape": ({"s.npz": HUGE_SHAPE}, ["evaluate", "s.npz"],
                                           ["s.npz: images.npy in the samples", "declares shape (1000000, 1000000, 8)"]),
    "--json at a folder": ({"s.yaml": SMALL, "d/keep": ""}, ["verify", "s.yaml", "--json", "d"],
                           ["--json d: a folder; name a file"]),
    "--json in a missing folder": ({"s.yaml": SMALL}, ["bench", "s.yaml", "--json", "no/where.json"],
                                   ["--json no/where.json: the folder", "does not exist"]),
    "--json under a file": ({"s.yaml": SMALL, "f": "x\n"}, ["verify", "s.yaml", "-o", "out", "--json", "f/r.json"],
                            ["--json f/r.json:", "/f is a file, not a folder"]),
    "-o empty": ({"s.yaml": SMALL}, ["build", "-o", "", "s.yaml"],
                 ["usage: ditc build", "argument -o/--out: an empty path; name one ('.' for the current folder)"]),
    "-o empty for verify": ({"s.yaml": SMALL}, ["verify", "s.yaml", "--out="], ["argument -o/--out: an empty path"]),
    "-o empty for a sweep": (SWEEP_FILES | {"w.yaml": sweep("")}, ["sweep", "w.yaml", "-o", ""],
                             ["argument -o/--out: an empty path"]),
    "--blas-core unknown": ({"s.yaml": SMALL}, ["verify", "s.yaml", "-o", "out", "--blas-core", "NOTACORE"],
                            ["error: --blas-core NOTACORE: "]),  # NNTile is loaded in this process, or not found
    "--swap-dir at a file": ({"s.yaml": SMALL, "f": "x\n"},
                             ["bench", "s.yaml", "-o", "out", "--memory-limit", "1GiB", "--swap-dir", "f"],
                             ["--swap-dir f: a file, not a folder"]),
    "--swap-dir missing": ({"s.yaml": SMALL}, ["bench", "s.yaml", "-o", "out", "--memory-limit", "1GiB", "--swap-dir", "no"],
                           ["--swap-dir no: no such folder"]),
    "--swap-dir without a memory limit": ({"s.yaml": SMALL, "d/keep": ""}, ["bench", "s.yaml", "-o", "out", "--swap-dir", "d"],
                                          ["--swap-dir d: needs a memory limit", "--memory-limit SIZE"]),
    "--memory-limit too small to run": ({"s.yaml": SMALL}, ["bench", "s.yaml", "-o", "out", "--memory-limit", "1KiB"],
                                        ["--memory-limit 1KiB: memory limit 1024 bytes", "too small"]),
    "memory_limit too small to run": ({"s.yaml": SMALL + "memory_limit: 1KiB\n"}, ["bench", "s.yaml", "-o", "out"],
                                      ["s.yaml: memory_limit 1KiB: memory limit 1024 bytes", "too small"]),
    "--seed below 0": ({"s.yaml": SMALL}, ["verify", "s.yaml", "--seed", "-1"], ["--seed: -1 is outside 0 to 4294967295"]),
    "--seed above 2**32": ({"s.yaml": SMALL}, ["verify", "s.yaml", "--seed", str(2**32)], ["--seed: 4294967296 is outside"]),
    "--memory-limit beyond 1 PiB": ({"s.yaml": SMALL}, ["inspect", "s.yaml", "--memory-limit", "99999999999999999999TiB"],
                                    ["--memory-limit: '99999999999999999999TiB' is outside", "from 1 byte to 1 PiB"]),
    "--memory-limit of 400 digits": ({"s.yaml": SMALL}, ["inspect", "s.yaml", "--memory-limit", "9" * 400],
                                     ["--memory-limit:", "is outside the memory sizes allowed"]),
    "--memory-limit negative": ({"s.yaml": SMALL}, ["inspect", "s.yaml", "--memory-limit", "-5GiB"],
                                ["argument --memory-limit: '-5GiB' is not a size such as 1.5GiB"]),
    "--cfg negative": ({}, ["evaluate", "run1", "--cfg", "-1,2"], ["argument --cfg:", "-1"]),
    "--ncpus of a million": ({"s.yaml": SMALL}, ["bench", "s.yaml", "--ncpus", "1000000"], ["--ncpus: 1000000 is outside 1 to"]),
    "a model bigger than memory": ({"s.yaml": "model:\n  hidden_size: 65536\n  num_heads: 16\n  depth: 100\n"},
                                   ["verify", "s.yaml", "-o", "out"], ["s.yaml: running 's' needs at least", "GiB"]),
    "verify a build folder missing a file": (
        {"b/tiny/ditc-build.json": "{}", "b/tiny/spec.resolved.yaml": (ROOT / "generated/tiny/spec.resolved.yaml").read_text(),
         "b/tiny/torch_reference.py": (ROOT / "generated/tiny/torch_reference.py").read_text()},
        ["verify", "b/tiny"], ["b/tiny: nntile_model.py, graph.json missing",
                               "`ditc build b/tiny/spec.resolved.yaml -o b` rebuilds it"]),
    # the command line
    "unknown top-level flag": ({}, ["--bogus"], ["usage: ditc ", "unrecognized arguments: --bogus"]),
    "unknown command flag": ({"s.yaml": SMALL}, ["build", "--bogus", "s.yaml"],
                             ["usage: ditc build", "unrecognized arguments: --bogus"]),
    "no command": ({}, [], ["choose a command: validate, schema, build"]),
    "--dot with --format json": ({"s.yaml": SMALL}, ["inspect", "s.yaml", "--dot", "--format", "json"],
                                 ["--dot and --format json ask for different outputs"]),
    "--summary with --dot": ({"s.yaml": SMALL}, ["inspect", "s.yaml", "--summary", "--dot"],
                             ["--dot and --summary ask for different outputs"]),
    "--rounds without --bench": (SWEEP_FILES | {"w.yaml": sweep("")}, ["sweep", "w.yaml", "--rounds", "2"],
                                 ["--rounds counts benchmark passes, so it needs --bench"]),
    # sweep files
    "sweep grid a list": (SWEEP_FILES | {"w.yaml": sweep("grid: [1, 2]\n")}, ["sweep", "w.yaml"],
                          ["w.yaml:3:7: grid: wrong type", "allowed: a mapping"]),
    "sweep zip value a number": (SWEEP_FILES | {"w.yaml": sweep("zip: {batch: 5}\n")}, ["sweep", "w.yaml"],
                                 ["w.yaml:3:14: zip.batch: wrong type (got 5)", "a list of at least 1 values"]),
    "sweep points of numbers": (SWEEP_FILES | {"w.yaml": sweep("points: [1, 2]\n")}, ["sweep", "w.yaml"],
                                ["w.yaml:3:9: points.0: wrong type (got 1)", "points.1"]),
    "sweep set a number": (SWEEP_FILES | {"w.yaml": sweep("points: [{name: a, set: 5}]\n")}, ["sweep", "w.yaml"],
                           ["w.yaml:3:25: points.0.set: wrong type (got 5)"]),
    "sweep base a number": ({"w.yaml": "base: 5\n"}, ["sweep", "w.yaml"], ["w.yaml:1:7: base: wrong type (got 5)"]),
    "sweep base missing": ({"w.yaml": "base: nowhere.yaml\n"}, ["sweep", "w.yaml"], ["w.yaml:1:7: base: no spec file at"]),
    "sweep without base": ({"w.yaml": "grid: {batch: [1]}\n"}, ["sweep", "w.yaml"], ["w.yaml", "missing key 'base'"]),
    "sweep empty": ({"w.yaml": ""}, ["sweep", "w.yaml"], ["w.yaml", "missing key 'base'"]),
    "sweep key below a value": (SWEEP_FILES | {"w.yaml": sweep("grid:\n  model.depth.x: [1]\n")}, ["sweep", "w.yaml"],
                                ["w.yaml:4:3: grid.model.depth.x: 'model.depth.x' is no spec key a sweep can set"]),
    "sweep key misspelt": (SWEEP_FILES | {"w.yaml": sweep("grid:\n  model.dept: [1, 2]\n")}, ["sweep", "w.yaml"],
                           ["w.yaml:4:3: grid.model.dept:", "did you mean 'model.depth'?"]),
    "sweep preset varied": (SWEEP_FILES | {"w.yaml": sweep("grid:\n  preset: [DiT-S/2]\n")}, ["sweep", "w.yaml"],
                            ["w.yaml:4:3: grid.preset: 'preset' is no spec key a sweep can set"]),
    "sweep point key misspelt": (SWEEP_FILES | {"w.yaml": sweep("points:\n  - name: a\n    sett: {batch: 2}\n")},
                                 ["sweep", "w.yaml"], ["w.yaml:5:5: points.0.sett: unknown key; did you mean 'set'?"]),
    "sweep value of the wrong type": (SWEEP_FILES | {"w.yaml": sweep("grid:\n  model.depth: [two, 2]\n")},
                                      ["sweep", "w.yaml"], ["w.yaml:4:16: grid.model.depth: not a value model.depth allows"]),
    "sweep key in grid and zip": (SWEEP_FILES | {"w.yaml": sweep("grid:\n  batch: [1, 2]\nzip:\n  batch: [3]\n")},
                                  ["sweep", "w.yaml"], ["batch is varied in both grid and zip"]),
    "sweep zip lists of two lengths": (SWEEP_FILES | {"w.yaml": sweep("zip:\n  batch: [1, 2]\n  model.depth: [1]\n")},
                                       ["sweep", "w.yaml"], ["w.yaml:4:3: zip: every list in zip must have one length"]),
    "sweep value twice": (SWEEP_FILES | {"w.yaml": sweep("grid:\n  batch: [1, 1]\n")}, ["sweep", "w.yaml"],
                          ["w.yaml:4:10: grid.batch: the value 1 is listed twice"]),
    "sweep value twice, apart": (SWEEP_FILES | {"w.yaml": sweep("grid:\n  model.num_heads: [1,2,1]\n")}, ["sweep", "w.yaml"],
                                 ["w.yaml:4:20: grid.model.num_heads: the value 1 is listed twice; allowed: a list"]),
    "sweep point names twice": (SWEEP_FILES | {"w.yaml": sweep("points:\n  - {name: a}\n  - {name: a}\n")},
                                ["sweep", "w.yaml"], ["points.1.name: two points have this name"]),
    "sweep file stem with a space": (SWEEP_FILES | {"my sweep.yaml": "base: base.yaml\n"}, ["sweep", "my sweep.yaml"],
                                     ["my sweep.yaml: name: the sweep sets no `name:`", "'my sweep'"]),
    "sweep name with a path": (SWEEP_FILES | {"w.yaml": "base: base.yaml\nname: ../../x\n"}, ["sweep", "w.yaml"],
                               ["w.yaml:2:7: name: not of the allowed form"]),
    "sweep alias grid": (SWEEP_FILES | {"w.yaml": sweep("grid:\n  model.depth: &v [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]\n"
                                                        "  batch: *v\n  model.in_channels: *v\n  model.num_classes: *v\n")},
                         ["sweep", "w.yaml"], ["w.yaml: <top level>: the sweep has 10,000 points; the limit is 1,000",
                                               "--max-points N"]),
    "sweep not UTF-8": ({"w.yaml": b"base: caf\xe9.yaml\n"}, ["sweep", "w.yaml"], ["w.yaml:1:10", "not UTF-8"]),
    "sweep of YAML errors": ({"w.yaml": "base: [\n"}, ["sweep", "w.yaml"], ["w.yaml:2:1", "YAML syntax error"]),
    "sweep base spec invalid": ({"base.yaml": "model:\n  depth: 0\n", "w.yaml": sweep("")}, ["sweep", "w.yaml"],
                                ["base.yaml:2:10: model.depth: too small"]),
    "sweep into a user's folder": (SWEEP_FILES | {"w.yaml": sweep(""), "res/s/notes.txt": "mine\n"},
                                   ["sweep", "w.yaml", "-o", "res"], ["res/s/: a folder ditc did not write"]),
    "sweep into a folder of a user's results.json": (
        SWEEP_FILES | {"w.yaml": sweep(""), "res/s/results.json": json.dumps({"kind": "ditc sweep results", "sweep": "s",
                                                                               "points": []})},
        ["sweep", "w.yaml", "-o", "res", "--resume"], ["res/s/: a folder ditc did not write (it has no ditc-output.json)"]),
    "sweep into a folder marked as another kind": (
        SWEEP_FILES | {"w.yaml": sweep(""),
                       "res/s/ditc-output.json": json.dumps({"written_by": "ditc 0", "kind": "run", "files": {}})},
        ["sweep", "w.yaml", "-o", "res"], ["ditc wrote it as a run folder, not a sweep folder"]),
    "sweep into a folder with a forged marker": (
        SWEEP_FILES | {"w.yaml": sweep(""), "res/s/ditc-output.json": '{"kind": "sweep", "files": {"../x": ""}}'},
        ["sweep", "w.yaml", "-o", "res"], ["ditc-output.json: not a marker ditc wrote"]),
    "sweep resumes a corrupt results.json": (SWEEP_FILES | SWEEP_MARKER | {"w.yaml": sweep(""), "res/s/results.json": "{bad"},
                                             ["sweep", "w.yaml", "-o", "res", "--resume"],
                                             ["res/s/results.json: not a results file ditc sweep wrote for 's'"]),
    "sweep resumes a foreign results.json": (SWEEP_FILES | SWEEP_MARKER | {"w.yaml": sweep(""),
                                                                           "res/s/results.json": "[1, 2]\n"},
                                             ["sweep", "w.yaml", "-o", "res", "--resume"],
                                             ["res/s/results.json: not a results file ditc sweep wrote"]),
    "sweep resumes another sweep's results": (
        SWEEP_FILES | SWEEP_MARKER | {"w.yaml": sweep(""), "res/s/results.json": json.dumps(
            {"kind": "ditc sweep results", "sweep": "t", "points": []})},
        ["sweep", "w.yaml", "-o", "res", "--resume"], ["(the results of sweep 't')"]),
}


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every path under `folder` with its bytes (None for a folder)."""
    return {str(p.relative_to(folder)): None if p.is_dir() else p.read_bytes() for p in sorted(folder.rglob("*"))}


def ditc(*args: str) -> tuple[int, str, str]:
    """`main` as the console script runs it: an exception escaping it fails the test."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as stop:  # argparse's own exit
            code = stop.code
    return code, out.getvalue(), err.getvalue()


def put(folder: Path, files: dict[str, str | bytes]) -> None:
    for name, text in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text if isinstance(text, bytes) else text.encode())


@pytest.mark.parametrize("case", HOSTILE, ids=list(HOSTILE))
def test_hostile_input_is_refused_cleanly(case, tmp_path, monkeypatch):
    files, args, expected = HOSTILE[case]
    put(tmp_path, files)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("STARPU_NCPU", raising=False)
    before = snapshot(tmp_path)
    code, out, err = ditc(*args)
    assert code == 2, (code, out, err)
    for text in expected:
        assert text in err, (text, err)
    assert "Traceback" not in out + err and "set_int_max_str_digits" not in err
    assert snapshot(tmp_path) == before  # nothing written, nothing removed


@needs_nntile
@pytest.mark.parametrize("variable, value, expected", [
    ("DITC_KERNELS", "turbo", "$DITC_KERNELS kernel set 'turbo': allowed are auto, ditc, nntile"),
    ("DITC_BLAS_CORE", "NOTACORE", "DITC_BLAS_CORE=NOTACORE: "),
])
def test_a_bad_runtime_request_is_refused_before_the_build_is_written(variable, value, expected, tmp_path,
                                                                       monkeypatch):
    monkeypatch.setenv(variable, value)
    for command in ("verify", "bench"):
        code, _, err = ditc(command, str(SPECS / "tiny.yaml"), "-o", str(tmp_path))
        assert code == 2 and expected in err, err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("value", ["abc", "-1", "0", "1e3", "1000"])
def test_a_bad_starpu_ncpu_is_refused_by_runners_only(value, tmp_path, monkeypatch):
    monkeypatch.setenv("STARPU_NCPU", value)
    assert ditc("--version")[0] == 0
    assert ditc("validate", str(SPECS / "tiny.yaml"))[0] == 0
    code, _, err = ditc("verify", str(SPECS / "tiny.yaml"), "-o", str(tmp_path))
    assert code == 2 and f"STARPU_NCPU={value!r} in the environment is not a number of CPU workers" in err
    assert not any(tmp_path.iterdir())
    monkeypatch.setenv("STARPU_NCPU", "")  # empty counts as unset
    assert ditc("validate", str(SPECS / "tiny.yaml"))[0] == 0


def test_a_build_keeps_the_users_files_and_replaces_only_its_own(tmp_path):
    spec = tmp_path / "m.yaml"
    spec.write_text("preset: DiT-S/2\nmodel:\n  depth: 1\n")
    assert ditc("build", str(spec), "-o", str(tmp_path / "out"))[0] == 0
    folder = tmp_path / "out" / "m"
    (folder / "checkpoint.pt").write_bytes(b"weights")
    (folder / "plots").mkdir()
    manifest = json.loads((folder / "ditc-build.json").read_text())
    assert set(manifest["files"]) == {"torch_reference.py", "nntile_model.py", "graph.json", "spec.resolved.yaml"}
    assert manifest["written_by"].startswith("ditc ")
    spec.write_text("preset: DiT-S/4\nmodel:\n  depth: 1\n")
    code, out, _ = ditc("build", str(spec), "-o", str(tmp_path / "out"))
    assert code == 0 and "wrote" in out
    assert (folder / "checkpoint.pt").read_bytes() == b"weights" and (folder / "plots").is_dir()
    assert json.loads((folder / "ditc-build.json").read_text())["files"] != manifest["files"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["m"]  # no staging or old folders


def test_mlp_ratio_is_whole_up_to_float_rounding(tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text("preset: DiT-S/2\nmodel:\n  hidden_size: 100\n  num_heads: 4\n  mlp_ratio: 1.1\n")
    from dit_compiler.compiler.build import compile_spec
    from dit_compiler.compiler.spec import load_spec
    graph = compile_spec(load_spec(spec)).graph
    assert graph.axes["mlp"].size == 110


def test_verify_names_an_edited_build_file_and_how_to_rebuild(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "nntile", None)  # the torch side alone: fast
    folder = tmp_path / "tiny"
    shutil.copytree(ROOT / "generated" / "tiny", folder)
    with (folder / "torch_reference.py").open("a") as file:
        file.write("# my edit\n")
    code, out, err = ditc("verify", str(folder), "--no-oracle")
    assert code == 0, err
    assert (f"note: {folder}/torch_reference.py was edited since ditc wrote it" in out
            and f"`ditc build {folder}/spec.resolved.yaml -o {tmp_path}` rebuilds it" in out)


def test_sweep_without_nntile_marks_points_unverified_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "nntile", None)
    put(tmp_path, {"base.yaml": TINY, "w.yaml": sweep("grid:\n  model.depth: [1, 2]\n")})
    code, out, err = ditc("sweep", str(tmp_path / "w.yaml"), "-o", str(tmp_path / "res"), "--verify")
    assert code == 1
    assert err.count("NNTile is not importable") == 1 and "marked unverified" in err
    assert [line.split()[-1] for line in out.splitlines()[:2]] == ["unverified", "unverified"]
    assert "\r" not in err  # no progress bar where the output is not a terminal
    code, out, err = ditc("sweep", str(tmp_path / "w.yaml"), "-o", str(tmp_path / "res"), "--bench", "--resume")
    assert code == 1 and "marked not benchmarked" in err and "Traceback" not in out + err


def test_resume_reruns_a_point_whose_spec_changed(tmp_path):
    put(tmp_path, {"base.yaml": TINY, "w.yaml": sweep("grid:\n  model.depth: [1, 2]\n")})
    args = ("sweep", str(tmp_path / "w.yaml"), "-o", str(tmp_path / "res"))
    assert ditc(*args)[0] == 0
    code, _, err = ditc(*args, "--resume")
    assert code == 0 and err.count("(kept from the earlier run)") == 2
    before = json.loads((tmp_path / "res" / "s" / "results.json").read_text())["points"]
    (tmp_path / "base.yaml").write_text(TINY.replace("num_classes: 10", "num_classes: 7"))
    code, _, err = ditc(*args, "--resume")
    assert code == 0 and "kept" not in err
    results = json.loads((tmp_path / "res" / "s" / "results.json").read_text())
    assert results["kind"] == "ditc sweep results" and results["sweep"] == "s"
    assert all(new["spec_sha256"] != old["spec_sha256"] for new, old in zip(results["points"], before))
    assert "num_classes: 7" in (tmp_path / "res" / "s" / "builds" / "s-depth1" / "spec.resolved.yaml").read_text()


def run_cli(*args: str, cwd: Path) -> subprocess.Popen:
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "dit_compiler.cli", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def complete_builds(out: Path) -> list[str]:
    """The build folders under `out`, each checked whole: every file its manifest lists, with that content;
    no staging folder or temporary file left anywhere."""
    assert not [p for p in out.rglob(".*")], "a temporary file or folder was left behind"
    for folder in out.iterdir():
        listed = json.loads((folder / "ditc-build.json").read_text())["files"]
        for name, digest in listed.items():
            assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest, folder / name
    return sorted(p.name for p in out.iterdir())


def test_concurrent_builds_of_one_name_all_succeed(tmp_path):
    for i, preset in enumerate(("DiT-S/2", "DiT-S/4", "DiT-S/8", "DiT-B/2")):
        (tmp_path / f"s{i}.yaml").write_text(f"preset: {preset}\nname: same\nmodel:\n  depth: 20\n")
    procs = [run_cli("build", f"s{i}.yaml", "-o", "out", cwd=tmp_path) for i in range(4)]
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0 and "Traceback" not in err, err
    assert complete_builds(tmp_path / "out") == ["same"]


def test_sigterm_leaves_every_build_whole_and_nothing_behind(tmp_path):
    """SIGTERM right after the first of six folders lands, first into fresh folders, then twice over them:
    each folder is the old build or the new one, whole, and nothing temporary is left; exit 143 and no
    traceback (or, where the signal came after the last folder, the usual end by SIGTERM)."""
    names = [f"k{i}" for i in range(6)]
    codes = []
    for preset in ("DiT-XL/2", "DiT-XL/4", "DiT-XL/8"):
        for name in names:
            (tmp_path / f"{name}.yaml").write_text(f"preset: {preset}\nname: {name}\nmodel:\n  depth: 40\n")
        proc = run_cli("build", *[f"{n}.yaml" for n in names], "-o", "out", cwd=tmp_path)
        assert proc.stdout.readline().endswith("out/k0/\n")  # the first folder landed
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
        codes.append(proc.returncode)
        assert "Traceback" not in err
        assert proc.returncode in (143, -signal.SIGTERM), (proc.returncode, err)
        assert proc.returncode != 143 or "terminated; nothing half-written was kept" in err
        assert set(complete_builds(tmp_path / "out")) <= set(names)
    assert 143 in codes  # the signal landed while the build was writing at least once


@pytest.mark.parametrize("args", [["validate", "pipe.yaml"], ["validate", "s.yaml"], ["sweep", "pipe.yaml"]])
def test_a_named_pipe_is_refused_not_waited_on(args, tmp_path, monkeypatch):
    os.mkfifo(tmp_path / "pipe.yaml")
    (tmp_path / "s.yaml").write_text("extends: pipe.yaml\n")
    monkeypatch.chdir(tmp_path)
    code, _, err = ditc(*args)
    assert code == 2 and "pipe.yaml" in err and "not a regular file" in err


def test_a_rebuild_removes_only_unedited_files_an_older_build_wrote(tmp_path):
    spec = tmp_path / "m.yaml"
    spec.write_text("preset: DiT-S/2\nmodel:\n  depth: 1\n")
    assert ditc("build", str(spec), "-o", str(tmp_path))[0] == 0
    folder, manifest_path = tmp_path / "m", tmp_path / "m" / "ditc-build.json"
    manifest = json.loads(manifest_path.read_text())
    for name, text in (("dropped.py", "# an older ditc wrote this\n"), ("edited.py", "# so did it\n")):
        (folder / name).write_text(text)
        manifest["files"][name] = hashlib.sha256(text.encode()).hexdigest()
    manifest_path.write_text(json.dumps(manifest))
    (folder / "edited.py").write_text("# and then its user changed it\n")
    spec.write_text("preset: DiT-S/4\nmodel:\n  depth: 1\n")
    assert ditc("build", str(spec), "-o", str(tmp_path))[0] == 0
    assert not (folder / "dropped.py").exists() and (folder / "edited.py").exists()
    assert "edited.py" not in json.loads(manifest_path.read_text())["files"]


def _numbers(schema: dict, path: tuple[str, ...] = ()) -> list[str]:
    """Dotted keys of every number or integer in the spec's schema (alone or among `anyOf` options)."""
    kinds = {schema.get("type")} | {option.get("type") for option in schema.get("anyOf", [])}
    found = [".".join(path)] if kinds & {"number", "integer"} else []
    for key, inner in schema.get("properties", {}).items():
        found += _numbers(inner, path + (key,))
    return found


def test_every_spec_number_refuses_nan_and_infinities(tmp_path):
    from dit_compiler.compiler.spec.validate import _validator

    keys = _numbers(_validator().schema)
    assert {"train.lr", "train.weight_decay", "train.ema_decay", "sample.cfg", "sample.eta", "batch"} <= set(keys)
    spec = tmp_path / "s.yaml"
    for key in keys:
        for value in (".nan", ".inf", "-.inf"):
            *parents, leaf = key.split(".")
            spec.write_text("preset: DiT-S/8\n" + "".join(f"{'  ' * i}{p}:\n" for i, p in enumerate(parents))
                            + f"{'  ' * len(parents)}{leaf}: {value}\n")
            code, _, err = ditc("validate", str(spec))
            assert code == 2 and f"{key}: must be a finite number" in err, (key, value, err)
    (tmp_path / "base.yaml").write_text(SMALL)
    (tmp_path / "w.yaml").write_text("base: base.yaml\nname: w\ngrid:\n  model.mlp_ratio: [2, .nan]\n")
    code, _, err = ditc("sweep", str(tmp_path / "w.yaml"), "-o", str(tmp_path / "res"))
    assert code == 2 and "must be a finite number (got nan)" in err and not (tmp_path / "res").exists()


def test_a_special_file_named_results_json_is_refused_not_waited_on(tmp_path, monkeypatch):
    put(tmp_path, SWEEP_FILES | {"w.yaml": sweep("")})
    (tmp_path / "res" / "s").mkdir(parents=True)
    mark_folder(tmp_path / "res" / "s", ("sweep",))   # ditc's sweep folder: its results.json is read
    os.mkfifo(tmp_path / "res" / "s" / "results.json")
    monkeypatch.chdir(tmp_path)
    for args in (["--resume"], []):
        code, _, err = ditc("sweep", "w.yaml", "-o", "res", *args)
        assert code == 2 and "res/s/results.json: not a results file" in err and "not a regular file" in err


@needs_nntile
@pytest.mark.parametrize("value, expected", [("1", "STARPU_LIMIT_CPU_MEM=1 in the environment leaves StarPU 1 MiB; "
                                                   "'tiny' needs at least 64 MiB"),
                                             ("lots", "STARPU_LIMIT_CPU_MEM='lots' in the environment is not a number")])
def test_a_starpu_memory_limit_the_model_cannot_run_under_is_refused_before_starpu_starts(value, expected, tmp_path,
                                                                                      monkeypatch):
    monkeypatch.setenv("STARPU_LIMIT_CPU_MEM", value)
    code, _, err = ditc("verify", str(SPECS / "tiny.yaml"), "-o", str(tmp_path))
    assert code == 2 and expected in err, err
    assert not any(tmp_path.iterdir())


def test_a_build_file_edited_into_bytes_that_are_not_utf8_is_named(tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text(SMALL + "name: m\n")
    assert ditc("build", str(spec), "-o", str(tmp_path))[0] == 0
    with (tmp_path / "m" / "torch_reference.py").open("ab") as f:
        f.write(b"\xff\xfe\n")
    code, _, err = ditc("verify", str(tmp_path / "m"), "--no-oracle")
    assert code == 2 and "m/torch_reference.py: cannot be imported (SyntaxError" in err, err
    code, out, _ = ditc("build", str(spec), "-o", str(tmp_path))
    assert code == 0 and "wrote" in out   # the edited file differs: a build replaces it


def test_ctrl_c_while_ditc_starts_exits_130_without_a_traceback(tmp_path):
    # a real SIGINT, sent by the process to itself while it imports ditc's command line
    hook = ("import os, signal, sys\n"
            "class Interrupt:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'dit_compiler.cli':\n"
            "            os.kill(os.getpid(), signal.SIGINT)\n"
            "sys.meta_path.insert(0, Interrupt())\n"
            "from dit_compiler.__main__ import run\n"
            "sys.exit(run())\n")
    proc = subprocess.run([sys.executable, "-c", hook, "validate", str(SPECS / "tiny.yaml")], capture_output=True,
                          text=True, env=os.environ | {"PYTHONPATH": str(ROOT)}, timeout=120)
    assert proc.returncode == 130 and "interrupted" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_a_non_ascii_path_prints_under_an_ascii_terminal(tmp_path):
    folder = tmp_path / "spécs"
    folder.mkdir()
    (folder / "s.yaml").write_text(SMALL)
    env = os.environ | {"PYTHONPATH": str(ROOT), "PYTHONIOENCODING": "ascii"}
    for args, code in ((["build", "s.yaml", "-o", "out"], 0), (["validate", "s.yaml"], 0), (["verify", "none.yaml"], 2)):
        proc = subprocess.run([sys.executable, "-m", "dit_compiler.cli", *args], cwd=folder, capture_output=True,
                              text=True, env=env, timeout=300)
        assert proc.returncode == code and "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    proc = subprocess.run([sys.executable, "-m", "dit_compiler.cli", "validate", str(folder / "s.yaml")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and "sp\\xe9cs" in proc.stdout


@pytest.mark.parametrize("name", ["run.json", "metrics.csv"])
def test_a_huge_sparse_run_file_is_refused_before_it_is_read(name, tmp_path):
    from train_helpers import train_tiny

    run = train_tiny(tmp_path, steps=1)
    with (run / name).open("ab") as f:
        f.truncate(1 << 40)   # a terabyte of holes: reading it whole would exhaust memory
    code, _, err = ditc("train", str(tmp_path / "tiny-digits.yaml"), "--out", str(run), "--resume", "--steps", "2",
                        "--backend", "torch")
    assert code == 2 and f"{run / name}: the " in err and "is 1,048,576 MiB; the limit is" in err, err


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A 2-step tiny digits run (torch), copied by each test that changes it."""
    from train_helpers import train_tiny

    return train_tiny(tmp_path_factory.mktemp("trained"), steps=2)


def _copy(run: Path, tmp_path: Path) -> tuple[Path, str]:
    shutil.copytree(run.parent, tmp_path / "copy")
    return tmp_path / "copy" / "run", str(tmp_path / "copy" / "tiny-digits.yaml")


def _files(folder: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_a_resume_on_a_smaller_dataset_starts_its_next_epoch(trained, tmp_path):
    run, spec = _copy(trained, tmp_path)   # 2 steps of 8 digits: the data position is 16
    np.savez(tmp_path / "few.npz", images=np.zeros((5, 8, 8), np.uint8), labels=np.arange(5))
    proc = subprocess.run([sys.executable, "-m", "dit_compiler.cli", "train", spec, "--out", str(run), "--resume",
                           "--steps", "3", "--data", str(tmp_path / "few.npz"), "--backend", "torch"],
                          capture_output=True, text=True, env=os.environ | {"PYTHONPATH": str(ROOT)}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "the run stopped at image 16 of an epoch;" in proc.stdout + proc.stderr
    assert (run / "checkpoints" / "0000003.pt").is_file()


@pytest.mark.parametrize("field, value, says", [
    ("step", -1, "train_state.step is -1, not 2, the step its name says"),
    ("step", 7, "train_state.step is 7, not 2"),
    ("wall_s", float("nan"), "train_state.wall_s is nan"),
    ("data", {"seed": 0, "epoch": -3, "position": 1}, "train_state.data is"),
    ("rng", {"bit_generator": "PCG64"}, "train_state.rng is"),
    ("global_batch", 0, "train_state.global_batch is 0"),
    ("ema", "not weights", "no `ema` weights"),
])
def test_a_checkpoint_whose_train_state_is_odd_is_refused_and_nothing_changes(field, value, says, trained, tmp_path):
    import torch

    run, spec = _copy(trained, tmp_path)
    path = run / "checkpoints" / "0000002.pt"
    ckpt = torch.load(path, weights_only=True)
    if field == "ema":
        ckpt["ema"] = value
    else:
        ckpt["train_state"][field] = value
    torch.save(ckpt, path)
    before = _files(run)
    code, _, err = ditc("train", spec, "--out", str(run), "--resume", "--steps", "4", "--backend", "torch")
    assert code == 2 and f"{path}: cannot resume from it: {says}" in err, err
    assert _files(run) == before


@pytest.mark.parametrize("row, says", [("2,x,1,1,1,1,1", "line 3 holds a value that is not a number"),
                                       ("2,1,1", "line 3 has not 7 values"), ("-5,1,1,1,1,1,1", "line 3: step '-5' is not a step number")])
def test_a_bad_metrics_row_is_refused_naming_the_line(row, says, trained, tmp_path):
    run, spec = _copy(trained, tmp_path)
    lines = (run / "metrics.csv").read_text().splitlines()
    (run / "metrics.csv").write_text("\n".join(lines[:2] + [row]) + "\n")
    before = _files(run)
    code, _, err = ditc("train", spec, "--out", str(run), "--resume", "--steps", "4", "--backend", "torch")
    assert code == 2 and f"{run / 'metrics.csv'}: not the metrics table ditc writes ({says}" in err, err
    assert _files(run) == before


def test_two_trainings_into_one_run_folder_are_refused(trained, tmp_path):
    from train_helpers import terminate_training

    run, spec = _copy(trained, tmp_path)
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    first = subprocess.Popen([sys.executable, "-c", "import time, sys\n"
                              "from dit_compiler.app.train import run_lock\n"
                              "from pathlib import Path\n"
                              f"with run_lock(Path({str(run)!r})):\n"
                              "    print('locked', flush=True); time.sleep(120)"],
                             stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert first.stdout.readline().strip() == "locked"
        before = _files(run)
        for extra in (["--resume", "--steps", "4"], ["--steps", "4"]):
            code, _, err = ditc("train", spec, "--out", str(run), "--backend", "torch", *extra)
            assert code == 2 and "another `ditc train` is writing this run now" in err, err
        assert _files(run) == before
    finally:
        first.kill()
        first.wait()
    # the lock goes with the process that held it, however it ended
    code, err = terminate_training(["train", spec, "--out", str(run), "--resume", "--steps", "100000",
                                    "--backend", "torch"], run, env, rows=3)
    assert code == 143, err


@pytest.mark.parametrize("poison, says", [(float("nan"), "holds 1 NaN or infinite value(s)"),
                                          (float("inf"), "holds 1 NaN or infinite value(s)"),
                                          ("complex", "is complex64; allowed: real floating-point tensors")])
def test_weights_that_are_not_finite_reals_are_refused_before_sampling_or_resuming(poison, says, trained, tmp_path):
    import torch

    run, spec = _copy(trained, tmp_path)
    path = run / "checkpoints" / "0000002.pt"
    ckpt = torch.load(path, weights_only=True)
    key = sorted(ckpt["ema"])[0]
    for entry in ("ema", "model"):
        if poison == "complex":
            ckpt[entry][key] = ckpt[entry][key].to(torch.complex64)
        else:
            ckpt[entry][key].view(-1)[0] = poison
    torch.save(ckpt, path)
    code, _, err = ditc("sample", str(run), "--out", str(tmp_path / "samples"), "--steps", "2", "--n", "2")
    assert code == 2 and f"{path} (ema): weight {key} {says}" in err, err
    assert not (tmp_path / "samples").exists()
    code, _, err = ditc("train", spec, "--out", str(run), "--resume", "--steps", "4", "--backend", "torch")
    assert code == 2 and f"{path} (model): weight {key} {says}" in err, err


def test_a_vae_folder_without_weights_is_refused_before_sampling(trained, tmp_path):
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text('{"_class_name": "AutoencoderKL", "latent_channels": 1}')
    code, _, err = ditc("sample", str(trained), "--vae", str(tmp_path / "vae"), "--out", str(tmp_path / "s"),
                        "--steps", "2", "--n", "2")
    assert code == 2 and f"--vae {tmp_path / 'vae'}: not a diffusers AutoencoderKL folder with its weights" in err
    assert "sampling" not in err and not (tmp_path / "s").exists()


def test_a_full_disk_names_the_checkpoint_and_keeps_nothing_half_written(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("a 1 MiB tmpfs cannot be mounted here (mounting needs root)")
    try:
        from train_helpers import tiny_spec

        spec = tiny_spec(tmp_path)
        code, _, err = ditc("train", str(spec.source), "--out", str(disk / "run"), "--steps", "4", "--ckpt-every", "1",
                            "--backend", "torch")
        assert code == 1 and "No space left on device; nothing half-written was kept" in err, err
        full = err.split("error: ")[-1].split(":")[0]
        assert full.startswith(str(disk / "run")) and not os.path.exists(full)
        assert not [p for p in disk.rglob("*") if ".tmp" in p.name or "ditc-tmp" in p.name]
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_images_past_pils_pixel_limit_and_a_corrupt_classifier_cache(tmp_path):
    from PIL import Image

    from dit_compiler.app.evaluate import digits_classifier

    (tmp_path / "data" / "a").mkdir(parents=True)
    Image.new("L", (10_000, 10_000)).save(tmp_path / "data" / "a" / "bomb.png")   # 100 million pixels, 100 KiB
    (tmp_path / "s.yaml").write_text(DIGITS_SPEC)
    code, _, err = ditc("train", str(tmp_path / "s.yaml"), "--data", str(tmp_path / "data"), "--out",
                        str(tmp_path / "r"))
    assert code == 2 and "bomb.png: an image of 100,000,000 pixels; allowed: at most 89,478,485" in err, err
    assert not (tmp_path / "r").exists()

    cache = tmp_path / "cache"
    clf, trained = digits_classifier(cache)
    path = next(cache.iterdir())
    path.write_bytes(npz(w0=np.zeros((3, 3)), b0=np.zeros(3)))   # not the classifier's layers
    with pytest.warns(UserWarning, match="training the classifier again"):
        again, retrained = digits_classifier(cache)
    assert trained and retrained and again.heldout_accuracy == clf.heldout_accuracy
    assert digits_classifier(cache)[1] is False   # the cache was made whole again


def test_a_second_signal_stops_a_training_step_that_does_not_end():
    from dit_compiler.errors import Terminated
    from dit_compiler.app.train import _StopSignals

    with _StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGTERM)   # the first: the loop finishes its step and checkpoints
        assert stop.signum == signal.SIGTERM
        with pytest.raises(Terminated):   # the second: at once, wherever the step is
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(10**7):   # a step that never ends; the signal lands within it
                pass
