"""What a hostile file system cannot make ditc do: write through a link or onto a device, take a folder
of the user's for its own, or run code from a run folder (issue 22, "Security")."""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from conftest import SPECS, needs_nntile
from dit_compiler.compiler.build import MANIFEST_FILE, TORCH_FILE, compile_spec, write_build
from dit_compiler.files import OUTPUT_MARKER, cache_root, check_owned, mark_folder, write_atomic, write_text_atomic
from dit_compiler.cli import main
from dit_compiler.errors import UsageError
from dit_compiler.app.train import RUN_FILE, run_build_dir
from dit_compiler.app.weights import load_checkpoint
from dit_compiler.compiler.spec import load_spec
from train_helpers import train_tiny

VICTIM = "the user's file\n"


@pytest.fixture
def victim(tmp_path) -> Path:
    path = tmp_path / "victim"
    path.write_text(VICTIM)
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return train_tiny(tmp_path_factory.mktemp("security"), steps=2)


def _links_at_temporary_names(folder: Path, name: str, victim: Path) -> None:
    """Links where a writer with predictable temporary names would put its file (every name an earlier
    ditc used, and the obvious others)."""
    folder.mkdir(parents=True, exist_ok=True)
    for temp in (f".{name}.ditc-tmp", f".{name}.tmp", f".{name}.tmp.npz", f".{name}.tmp.png", f"{name}.tmp",
                 f"{name}~", f".{name}.swp"):
        (folder / temp).symlink_to(victim)


def test_the_issues_reproducer_leaves_the_victim_untouched(tmp_path, victim, capsys):
    out = tmp_path / "out"
    assert main(["build", str(SPECS / "tiny.yaml"), "-o", str(out)]) == 0
    with open(out / "tiny" / "graph.json", "a") as graph:
        graph.write("#\n")
    _links_at_temporary_names(out / "tiny", MANIFEST_FILE, victim)
    assert main(["build", str(SPECS / "tiny.yaml"), "-o", str(out)]) == 0
    assert victim.read_text() == VICTIM
    manifest = out / "tiny" / MANIFEST_FILE
    assert not manifest.is_symlink() and json.loads(manifest.read_text())["spec"] == "tiny"


@pytest.mark.parametrize("kind", [None, "samples"])
def test_writes_never_follow_a_link(tmp_path, victim, kind):
    folder = tmp_path / "f"
    if kind:
        mark_folder(folder, (kind,))   # a folder of ditc's, where someone else planted links
    _links_at_temporary_names(folder, "x.bin", victim)
    write_atomic(folder / "x.bin", lambda file: file.write(b"new"), kind)
    assert (folder / "x.bin").read_bytes() == b"new" and not (folder / "x.bin").is_symlink()
    assert victim.read_text() == VICTIM
    (folder / "y.bin").symlink_to(victim)   # a link as the destination: refused, left as it is
    with pytest.raises(UsageError, match="is a link; ditc never writes through a link"):
        write_atomic(folder / "y.bin", lambda file: file.write(b"new"), kind)
    assert (folder / "y.bin").is_symlink() and victim.read_text() == VICTIM
    assert not [p for p in folder.iterdir() if p.name.startswith(".x.bin.") and not p.is_symlink()]  # no temp left


def test_a_link_made_while_ditc_writes_is_never_written_through(tmp_path, victim):
    dest = tmp_path / "out.json"

    def swap_destination(file) -> None:   # the destination becomes a link mid-write
        file.write(b"new")
        dest.symlink_to(victim)

    with pytest.raises(UsageError, match="is a link"):
        write_atomic(dest, swap_destination)
    assert victim.read_text() == VICTIM and dest.is_symlink()
    dest.unlink()

    def swap_temporary(file) -> None:   # the temporary file (its name found) replaced by a link
        temp = next(p for p in tmp_path.iterdir() if p.name.startswith(".out.json."))
        temp.unlink()
        temp.symlink_to(victim)
        file.write(b"new")

    with pytest.raises(UsageError, match="replaced by something else while ditc wrote it"):
        write_atomic(dest, swap_temporary)
    assert victim.read_text() == VICTIM and not os.path.lexists(dest)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["victim"]


def test_special_files_are_refused_before_any_work_and_never_replaced(tmp_path, capsys):
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    link = tmp_path / "link.json"
    link.symlink_to(tmp_path / "victim")
    for target, says in ((fifo, "is a FIFO, not a regular file"), (Path(os.devnull), "is a character device"),
                         (link, "is a link")):
        out = tmp_path / "out"
        assert main(["verify", str(SPECS / "tiny.yaml"), "-o", str(out), "--json", str(target), "--no-oracle"]) == 2
        assert says in capsys.readouterr().err
        assert not out.exists()   # refused before the build is written
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and stat.S_ISCHR(os.stat(os.devnull).st_mode)
    assert link.is_symlink() and not (tmp_path / "victim").exists()
    with pytest.raises(UsageError, match="is a FIFO"):
        write_text_atomic(fifo, "x")


def test_a_folder_is_ditcs_by_its_marker_not_by_a_file_name(run, tmp_path, capsys):
    for name, text in (("settings.json", '{"editor.fontSize": 14}\n'), ("run.json", "{}\n"),
                       ("evaluate.json", "[]\n"), ("results.json", "{}\n")):
        folder = tmp_path / name
        folder.mkdir()
        (folder / name).write_text(text)
        for command in (["sample", str(run), "--n", "2"], ["evaluate", str(run), "--n", "2", "--cfg", "1"],
                        ["train", str(SPECS / "tiny.yaml"), "--steps", "2"]):
            assert main([*command, "--backend", "torch", "--steps", "2", "--out", str(folder)]) == 2
            assert f"--out {folder}: a folder ditc did not write (it has no {OUTPUT_MARKER})" in capsys.readouterr().err
        assert sorted(p.name for p in folder.iterdir()) == [name] and (folder / name).read_text() == text
    samples = tmp_path / "samples"
    assert main(["sample", str(run), "--backend", "torch", "--steps", "2", "--n", "2", "--out", str(samples)]) == 0
    marker = json.loads((samples / OUTPUT_MARKER).read_text())
    assert marker["kind"] == "samples" and sorted(marker["files"]) == ["grid.png", "samples.npz", "settings.json"]
    with pytest.raises(UsageError, match="ditc wrote it as a samples folder, not a run folder"):
        check_owned(samples, ("run",), "--out")
    (samples / "grid.png").write_bytes(b"the user's edit")   # a file ditc wrote, changed since: kept
    (samples / "notes.txt").write_text("mine")
    assert main(["sample", str(run), "--backend", "torch", "--steps", "2", "--n", "2", "--out", str(samples)]) == 2
    assert "grid.png: changed since ditc wrote it" in capsys.readouterr().err
    assert (samples / "grid.png").read_bytes() == b"the user's edit" and (samples / "notes.txt").read_text() == "mine"


def _copy_run(run: Path, to: Path) -> Path:
    import shutil

    shutil.copytree(run, to, symlinks=True)
    return to


def _tamper(path: Path, marker: Path) -> None:
    """Make `path` (a generated module) create `marker` when imported."""
    path.write_text(path.read_text() + f"\nopen({str(marker)!r}, 'w').close()\n")


def test_a_tampered_run_is_refused_and_none_of_its_code_runs(run, tmp_path, capsys):
    marker = tmp_path / "imported"
    for command in ("sample", "evaluate", "export"):
        copy = _copy_run(run, tmp_path / f"run-{command}")
        build = run_build_dir(copy)
        _tamper(build / TORCH_FILE, marker)
        extra = ["--diffusers", str(tmp_path / "d")] if command == "export" else \
            ["--backend", "torch", "--steps", "2", "--n", "2", "--cfg", "1"]
        assert main([command, str(copy), *extra]) == 2
        err = capsys.readouterr().err
        assert f"{build / TORCH_FILE}: not the file ditc compiles from" in err and "ditc runs no code" in err
        assert not marker.exists()
    # a forger who also rewrites the manifest (its sha256 of the tampered file) is refused the same way
    copy = _copy_run(run, tmp_path / "run-manifest")
    build = run_build_dir(copy)
    _tamper(build / TORCH_FILE, marker)
    manifest = json.loads((build / MANIFEST_FILE).read_text())
    import hashlib

    manifest["files"][TORCH_FILE] = hashlib.sha256((build / TORCH_FILE).read_bytes()).hexdigest()
    (build / MANIFEST_FILE).write_text(json.dumps(manifest))
    assert main(["sample", str(copy), "--backend", "torch", "--steps", "2", "--n", "2"]) == 2
    assert "not the file ditc compiles from" in capsys.readouterr().err and not marker.exists()


def test_run_json_cannot_lead_outside_the_run(run, tmp_path, capsys):
    marker = tmp_path / "imported"
    outside = write_build(compile_spec(load_spec(SPECS / "tiny.yaml")),
                          tmp_path / "elsewhere")
    _tamper(outside / TORCH_FILE, marker)
    for build, says in ((str(outside), "is not the name of a folder in the run"),
                        ("../elsewhere/tiny", "is not the name of a folder in the run"),
                        ("..", "is not the name of a folder in the run"),
                        ("link", "a link, where")):
        copy = _copy_run(run, tmp_path / f"run-{len(list(tmp_path.iterdir()))}")
        (copy / "link").symlink_to(outside)
        data = json.loads((copy / RUN_FILE).read_text())
        (copy / RUN_FILE).write_text(json.dumps(data | {"build": build}))
        assert main(["sample", str(copy), "--backend", "torch", "--steps", "2", "--n", "2"]) == 2
        assert says in capsys.readouterr().err
        assert not marker.exists() and not (copy / "samples").exists()


def test_refusing_pickled_code_does_not_advise_loading_it_unsafely(tmp_path):
    import torch

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'ran'}",))

    path = tmp_path / "evil.pt"
    torch.save({"model": Payload()}, path)
    with pytest.raises(UsageError) as refused:
        load_checkpoint(path)
    text = str(refused.value)
    assert "ditc never runs code from a checkpoint" in text and "system" in text
    for advice in ("weights_only", "safe_globals", "allowlist", "trusted source"):
        assert advice not in text
    assert not (tmp_path / "ran").exists()


def test_an_empty_or_relative_xdg_cache_home_is_ignored(monkeypatch):
    monkeypatch.delenv("DITC_CACHE_DIR", raising=False)
    for value in ("", "relative/cache"):
        monkeypatch.setenv("XDG_CACHE_HOME", value)
        assert cache_root() == Path.home() / ".cache" / "ditc"
    monkeypatch.setenv("XDG_CACHE_HOME", "/somewhere")
    assert cache_root() == Path("/somewhere/ditc")


@needs_nntile
def test_a_starpu_home_starpu_cannot_use_is_refused_before_any_work(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "dit_compiler.cli", "verify", str(SPECS / "tiny.yaml"), "-o", str(out),
                           "--no-oracle"], capture_output=True, text=True,
                          env=os.environ | {"STARPU_HOME": "/proc/none", "DITC_KERNELS": "nntile"})
    assert done.returncode == 2, done.stderr
    assert "$STARPU_HOME=/proc/none: StarPU keeps its performance models in /proc/none/.starpu" in done.stderr
    assert "Traceback" not in done.stderr and not out.exists()
