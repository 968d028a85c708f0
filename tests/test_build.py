"""`ditc build` and the CLI around it: generated code is current, deterministic, atomic; errors exit 2."""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, SPECS
from dit_compiler import __version__
from dit_compiler.compiler.build import Build, compile_spec, stale_files, write_build
from dit_compiler.cli import main
from dit_compiler.compiler.spec import load_spec

SHIPPED = sorted(SPECS.glob("*.yaml"))


def run_cli(*args: str, cwd: Path | None = None, exe: list[str] | None = None) -> subprocess.CompletedProcess:
    cmd = (exe or [sys.executable, "-m", "dit_compiler.cli"]) + list(args)
    env = os.environ | {"PYTHONPATH": str(ROOT)} if exe is None else os.environ.copy()
    return subprocess.run(cmd, cwd=cwd or ROOT, env=env, capture_output=True, text=True, timeout=300)


#: The builds kept in generated/ for a reader (any other is one `ditc build` away): tiny (flavor dit,
#: every tiled axis ragged and multi-tile), tiny-diffusers (the same model in diffusers' naming: a flavor
#: is a naming map), dit-s-2 (the paper's DiT-S/2: its 12 blocks fold into one, as every depth's do).
KEPT = ("dit-s-2", "tiny", "tiny-diffusers")


@pytest.mark.parametrize("name", KEPT)
def test_generated_folder_is_up_to_date(name):
    spec = load_spec(SPECS / f"{name}.yaml")
    stale = stale_files(compile_spec(spec), ROOT / "generated" / spec.name)
    assert not stale, f"generated/{spec.name}: {stale} out of date; run `ditc build specs/{{{','.join(KEPT)}}}.yaml`"


def test_generated_holds_the_kept_builds_under_60k_lines():
    """The repository keeps these builds; anything else a user builds into generated/ (the README's
    `ditc build specs/dit-xl.yaml`) is git-ignored, not a failure here."""
    listed = subprocess.run(["git", "ls-files", "generated"], cwd=ROOT, capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout: the kept builds are what git tracks")
    files = [ROOT / line for line in listed.stdout.splitlines()]
    assert sorted({f.relative_to(ROOT / "generated").parts[0] for f in files}) == sorted(KEPT)
    lines = sum(len(f.read_text().splitlines()) for f in files)
    assert lines < 60_000, lines


def test_build_is_deterministic_across_processes(tmp_path):
    outs = []
    for seed in ("0", "1", "random"):
        out = tmp_path / seed
        env = os.environ | {"PYTHONHASHSEED": seed, "PYTHONPATH": str(ROOT)}
        subprocess.run([sys.executable, "-m", "dit_compiler.cli", "build", "specs/tiny.yaml", "specs/dit-s-2.yaml",
                        "-o", str(out)], cwd=ROOT, env=env, check=True, capture_output=True)
        outs.append({p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()})
    assert outs[0] == outs[1] == outs[2] and len(outs[0]) == 10


def test_generated_files_say_which_spec_and_version_made_them():
    folder = ROOT / "generated" / "tiny"
    for name in ("torch_reference.py", "nntile_model.py", "spec.resolved.yaml"):
        head = (folder / name).read_text().splitlines()[:3]
        assert any('"tiny"' in line and "sha256" in line for line in head), (name, head)
        assert any(__version__ in line for line in head), (name, head)


def test_a_failed_build_leaves_the_previous_one_untouched(tmp_path, monkeypatch):
    built = compile_spec(load_spec(SPECS / "tiny.yaml"))
    folder = write_build(built, tmp_path)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    real_fsync = os.fsync
    calls = []

    def failing_fsync(fd):   # the disk fills up while the third file is written
        calls.append(fd)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError):
        write_build(Build(built.graph, {k: v + "# changed\n" for k, v in built.files.items()}), tmp_path)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]  # no staging folder left behind


def test_bad_spec_exits_2_with_a_located_message_and_writes_nothing(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("preset: DiT-S/2\nmodel:\n  hiden_size: 100\n")
    done = run_cli("build", str(bad), "-o", str(tmp_path / "out"))
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert "bad.yaml:3" in done.stderr and "hidden_size" in done.stderr
    assert not (tmp_path / "out").exists()


def test_one_bad_spec_among_several_writes_nothing(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2]\n")
    assert main(["build", str(SPECS / "tiny.yaml"), str(bad), "-o", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()


def test_missing_spec_and_non_build_folder_exit_2(tmp_path, capsys):
    assert main(["verify", str(tmp_path / "nope.yaml")]) == 2
    assert main(["inspect", str(tmp_path)]) == 2
    assert "not a ditc build" in capsys.readouterr().err


def test_inspect_formats(capsys):
    assert main(["inspect", str(SPECS / "dit-s-2.yaml"), "--summary"]) == 0
    assert "6.06 GMAC" in capsys.readouterr().out
    assert main(["inspect", str(SPECS / "tiny.yaml"), "--format", "json"]) == 0
    assert '"forward_macs"' in capsys.readouterr().out
    assert main(["inspect", str(SPECS / "tiny.yaml"), "--dot"]) == 0
    assert capsys.readouterr().out.startswith("digraph")


def test_inspect_compares_the_predicted_training_peak_with_a_memory_limit(capsys):
    assert main(["inspect", str(SPECS / "dit-s-2-b8.yaml"), "--summary", "--memory-limit", "1GiB"]) == 0
    out = capsys.readouterr().out
    assert "training step, predicted peak (backward" in out and "AdamW moments" in out
    assert "memory limit 1024 MiB against a predicted peak of" in out and "out-of-core" in out
    assert main(["inspect", str(SPECS / "tiny.yaml"), "--format", "json", "--memory-limit", "8G"]) == 0
    assert json.loads(capsys.readouterr().out)["memory_limit"]["fits"] is True
    with pytest.raises(SystemExit) as exit_:  # argparse's own exit, with its usage line
        main(["inspect", str(SPECS / "tiny.yaml"), "--memory-limit", "lots"])
    assert exit_.value.code == 2 and "'lots' is not a size such as 1.5GiB" in capsys.readouterr().err


def test_bench_refuses_a_memory_limit_it_cannot_train_under(tmp_path, capsys):
    """Exit 2 with a sentence, before the build is written, and no swap folder left behind."""
    assert main(["bench", str(SPECS / "tiny.yaml"), "-o", str(tmp_path), "--memory-limit", "300M",
                 "--swap-dir", str(tmp_path)]) == 2
    assert "too small: NNTile's process needs" in capsys.readouterr().err
    assert not list(tmp_path.glob("ditc-swap-*"))
    assert main(["bench", str(SPECS / "tiny.yaml"), "-o", str(tmp_path), "--memory-limit", "2G",
                 "--swap-dir", str(tmp_path / "nowhere")]) == 2
    assert "--swap-dir " + str(tmp_path / "nowhere") + ": no such folder" in capsys.readouterr().err
    assert not (tmp_path / "tiny").exists()
    spec = tmp_path / "limited.yaml"  # the spec's key when no flag is given
    spec.write_text(f"extends: {SPECS / 'tiny.yaml'}\nname: limited\nmemory_limit: 300MiB\n")
    assert main(["bench", str(spec), "-o", str(tmp_path)]) == 2
    assert "memory limit 300 MiB" in capsys.readouterr().err


def test_schema_command_prints_the_schema(capsys):
    assert main(["schema"]) == 0
    assert '"$schema": "https://json-schema.org/draft/2020-12/schema"' in capsys.readouterr().out


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    command = 'pip install -q ".[test]" && python -m pytest -q'
    assert command in readme and command in ci


@pytest.mark.skipif(shutil.which("ditc") is None, reason="the ditc console script is not installed (pip install .)")
def test_installed_console_script_builds_from_anywhere(tmp_path):
    """The installed package carries its templates and schema: build from a folder outside the repository."""
    where = subprocess.run([sys.executable, "-c", "import dit_compiler, pathlib; "
                            "print(pathlib.Path(dit_compiler.__file__).parent)"],
                           cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    installed = Path(where) / "templates" if where else None
    if installed is None or any(not (installed / p.relative_to(ROOT / "templates")).is_file()
                                or (installed / p.relative_to(ROOT / "templates")).read_bytes() != p.read_bytes()
                                for p in (ROOT / "templates").rglob("*.j2")):
        pytest.skip("the installed ditc is not this checkout's (run `pip install .` first)")
    shutil.copy(SPECS / "tiny.yaml", tmp_path / "tiny.yaml")
    done = run_cli("build", "tiny.yaml", "-o", "out", cwd=tmp_path, exe=["ditc"])
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "tiny" / "nntile_model.py").read_text() == \
        (ROOT / "generated" / "tiny" / "nntile_model.py").read_text()


def test_verify_without_nntile_says_so_and_checks_what_it_can(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "nntile", None)  # `import nntile` now fails, as on a machine without it
    assert main(["verify", str(SPECS / "tiny.yaml"), "-o", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "NNTile model not run: NNTile is not importable" in out
    lines = out.splitlines()   # the header first, then the progress lines, then the table
    header = lines.index("ditc verify: tiny")
    progress = [i for i, line in enumerate(lines) if re.match(r"\[\d/2\] ", line)]
    assert lines[header + 1].startswith("tiling: ") and header + 1 < progress[0] and len(progress) == 2
    assert out.count("ditc verify: tiny") == 1
    assert "diffusers DiTTransformer2DModel (built from the spec's config" in out
    assert "torch reference vs diffusers: forward" in out
    assert main(["verify", str(SPECS / "tiny.yaml"), "-o", str(tmp_path), "--require-nntile"]) == 2
    assert "--require-nntile" in capsys.readouterr().err


@pytest.mark.parametrize("args", [["bench", "specs/tiny.yaml", "--ncpus", "0"],
                                  ["verify", "specs/tiny.yaml", "--ncpus", "two"],
                                  ["bench", "specs/tiny.yaml", "--repeats", "0"]])
def test_bad_counts_exit_2_before_any_work(args, capsys):
    with pytest.raises(SystemExit) as stop:
        main(args)
    assert stop.value.code == 2 and "argument" in capsys.readouterr().err


@pytest.mark.parametrize("file, loop", [("nntile_model.py", "for i in range(DEPTH):"),
                                        ("torch_reference.py", "for block in self.blocks:")])
def test_generated_models_do_not_grow_with_depth(file, loop):
    """The runtime lives in `dit_compiler.compiler.targets.nntile_1_1`, the torch code in the reference's functions;
    a build holds its model's tables and wiring, identical blocks once, in a loop."""
    files = {name: compile_spec(load_spec(SPECS / f"{name}.yaml")).files[file] for name in ("dit-s-2", "dit-xl", "tiny")}
    lines = {name: len(text.splitlines()) for name, text in files.items()}
    assert abs(lines["dit-xl"] - lines["dit-s-2"]) <= 5 and max(lines.values()) < 600, lines
    assert loop in files["dit-xl"]


def test_spec_targets_are_the_target_packages():
    from dit_compiler.compiler import targets
    from dit_compiler.compiler.spec import schema

    assert schema()["properties"]["target"]["enum"] == list(targets.TARGETS)
    for name in targets.TARGETS:
        assert targets.get(name).NAME == name


def test_a_generated_model_imports_without_nntile(monkeypatch):
    """Its tables and wiring are plain Python; NNTile is imported at the first kernel call."""
    from dit_compiler.compiler.build import load_module

    monkeypatch.setitem(sys.modules, "nntile", None)
    module = load_module(ROOT / "generated" / "tiny" / "nntile_model.py")
    assert module.AXES["hidden"] == (64, 24)
    assert "blocks.1.attn.probs" in module.Model.declarations(module.Model)


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="not a git checkout")
def test_the_default_outputs_of_train_and_sample_are_ignored_by_git():
    for path in ("runs/digits/run.json", "samples/tiny/grid.png"):
        assert subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT).returncode == 0, path


def test_every_argument_has_help_and_the_readme_command_tables_list_every_flag():
    from dit_compiler.cli import parser

    readme = (ROOT / "README.md").read_text().replace("--[no-]", "--")
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^\| `ditc (\w+)[^\n]*", readme, re.M)}
    _, commands = parser()
    assert set(rows) == set(commands)
    for name, command in commands.items():
        row = rows[name] + (rows["sample"] if "[sampling flags]" in rows[name] else "")
        for action in command._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"ditc {name} {action.option_strings or action.metavar}: no help"
            listed = [flag for flag in action.option_strings if re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", row)]
            assert listed or not action.option_strings, f"README's row of ditc {name} lacks {action.option_strings}"
