"""The code's layout: no import circles, function-local imports only where they keep a heavy package out
of start-up, the compiler below the checks and the application, and the NNTile target behind its
interface (`dit_compiler.compiler.targets.base.Target`)."""
from __future__ import annotations

import ast
import inspect
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import ROOT
from dit_compiler.compiler import targets
from dit_compiler.compiler.targets.base import Target

PACKAGE = ROOT / "dit_compiler"
TARGETS = PACKAGE / "compiler" / "targets"
#: What `ditc` keeps out of its start-up: a function-local import is allowed only where it keeps one out.
#: Besides torch and what imports it, Pillow, tqdm and safetensors each take 20 to 100 ms to import and
#: serve one command each (`python -X importtime`, 2-core EPYC).
#: Function-local imports kept for another reason than start-up time, each with it.
DELIBERATE = {("dit_compiler.__main__", "dit_compiler.cli"): "a Ctrl-C while ditc's modules import exits 130"}
HEAVY = {"torch", "diffusers", "matplotlib", "sklearn", "nntile", "PIL", "tqdm", "safetensors", "scipy"}


@dataclass
class Module:
    path: Path
    imports: set[str] = field(default_factory=set)      # ditc modules it imports when it is imported
    external: set[str] = field(default_factory=set)     # other top-level packages it imports then
    local: list[tuple[int, str]] = field(default_factory=list)   # (line, module) imported inside a function


def _name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Module]:
    """Every ditc module and what it imports, at module level and inside functions; imports under
    `if TYPE_CHECKING:` are for type hints only, never run, and not counted."""
    modules = {_name(path): Module(path) for path in sorted(PACKAGE.rglob("*.py"))}

    def resolve(dotted: str) -> str | None:
        while dotted and dotted not in modules:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    for name, module in modules.items():
        def visit(node: ast.AST, in_function: bool) -> None:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                for child in node.orelse:
                    visit(child, in_function)
                return
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                if isinstance(node, ast.Import):
                    dotted = [alias.name for alias in node.names]
                else:
                    base = node.module or ""
                    if node.level:   # relative: ditc uses none, but resolve it all the same
                        package = name.split(".") if module.path.name == "__init__.py" else name.split(".")[:-1]
                        base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
                    dotted = [f"{base}.{alias.name}" for alias in node.names] if base.startswith("dit_compiler") \
                        else [base]
                for target in dotted:
                    ditc = resolve(target) if target.startswith("dit_compiler") else None
                    if in_function:
                        module.local.append((node.lineno, ditc or target))
                    elif ditc:
                        module.imports.add(ditc)
                    else:
                        module.external.add(target.split(".")[0])
                return
            inner = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            for child in ast.iter_child_nodes(node):
                visit(child, inner)

        visit(ast.parse(module.path.read_text()), False)
        for line, target in module.local:
            if target.startswith("dit_compiler") and target != name:
                module.imports.add(target)   # a circle through a function-local import is a circle too
        module.imports.discard(name)
    return modules


MODULES = _modules()


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in edges[node]:
            if other not in index:
                connect(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                other = stack.pop()
                component.append(other)
                if other == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in edges:
        if node not in index:
            connect(node)
    return found


def test_no_import_circles():
    assert _cycles({name: module.imports for name, module in MODULES.items()}) == []


def test_the_cycle_finder_finds_a_circle():
    """The check above can fail: a circle through a function-local import is found."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def _top_level(name: str) -> set[str]:
    module = MODULES[name]
    return module.imports - {target for _, target in module.local}


def test_function_local_imports_keep_a_heavy_package_out_of_start_up():
    """A function-local import names torch, diffusers, matplotlib, scikit-learn or NNTile, or a ditc
    module whose import loads one of them: nothing else hides in a function."""
    def heavy(target: str) -> bool:
        if target.startswith("dit_compiler"):
            return _loads_heavy_at_import(target)
        return target.split(".")[0] in HEAVY

    offenders = [f"{module.path.relative_to(ROOT)}:{line}: {target}" for name, module in MODULES.items()
                 for line, target in module.local if not heavy(target) and (name, target) not in DELIBERATE]
    assert offenders == []


def _loads_heavy_at_import(name: str, seen: set[str] | None = None) -> bool:
    seen = set() if seen is None else seen
    seen.add(name)
    module = MODULES[name]
    return bool(module.external & HEAVY) or any(_loads_heavy_at_import(other, seen)
                                               for other in _top_level(name) | _parents(name) if other not in seen)


def _parents(name: str) -> set[str]:
    """The packages Python imports before `name` (their __init__)."""
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))} & set(MODULES)


def test_start_up_loads_no_heavy_package():
    """`ditc --help` and the parsing of any command line import none of HEAVY."""
    code = ("import sys; from dit_compiler.cli import parser; parser(); "
            f"print(sorted(m for m in {sorted(HEAVY)!r} if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize("half", ["dit_compiler.compiler", "dit_compiler.files", "dit_compiler.limits",
                                  "dit_compiler.errors"])
def test_the_compiler_and_the_shared_modules_import_no_check_app_or_command_line(half):
    """The compiler (and its targets) and the shared bottom modules depend on nothing above them."""
    above = ("dit_compiler.checks", "dit_compiler.app", "dit_compiler.cli")
    offenders = [f"{name} imports {other}" for name, module in MODULES.items()
                 if name == half or name.startswith(half + ".")
                 for other in module.imports if other.startswith(above)]
    assert offenders == []


def test_the_checks_import_no_application_or_command_line():
    offenders = [f"{name} imports {other}" for name, module in MODULES.items() if name.startswith("dit_compiler.checks")
                 for other in module.imports if other.startswith(("dit_compiler.app", "dit_compiler.cli"))]
    assert offenders == []


def _code_outside_targets() -> list[Path]:
    return [path for path in PACKAGE.rglob("*.py") if TARGETS not in path.parents]


def test_nothing_outside_the_targets_names_starpu_or_imports_nntile():
    """StarPU and NNTile belong to the NNTile target: no other module names StarPU (code, messages,
    comments or docstrings) or imports nntile, so a second NNTile version touches only its own package."""
    starpu = [f"{path.relative_to(ROOT)}:{n}" for path in _code_outside_targets()
              for n, line in enumerate(path.read_text().splitlines(), 1) if re.search("starpu", line, re.I)]
    nntile = [f"{path.relative_to(ROOT)}: {target}" for path in _code_outside_targets()
              for target in (*MODULES[_name(path)].external, *(t for _, t in MODULES[_name(path)].local))
              if target.split(".")[0] == "nntile"]
    assert starpu == [] and nntile == []


def _members(protocol: type) -> dict[str, object]:
    """The Protocol's members: its annotated attributes and its methods (without `self`)."""
    members: dict[str, object] = {name: None for name in protocol.__annotations__}
    members |= {name: value for name, value in vars(protocol).items()
                if callable(value) and not name.startswith("_")}
    return members


@pytest.mark.parametrize("name", sorted(targets.TARGETS))
def test_the_target_implements_the_interface(name):
    """Every member of `Target` is present, and each hook takes the interface's parameters, in order,
    with the same defaults (a caller written against the interface runs on the target)."""
    package = targets.get(name)
    assert isinstance(package, Target)
    wrong = []
    for member, declared in _members(Target).items():
        if not hasattr(package, member):
            wrong.append(f"{member}: missing")
        elif declared is not None:
            want = list(inspect.signature(declared).parameters.values())[1:]   # without `self`
            have = list(inspect.signature(getattr(package, member)).parameters.values())
            if [(p.name, p.default, p.kind) for p in want] != [(p.name, p.default, p.kind) for p in have]:
                wrong.append(f"{member}: {inspect.signature(getattr(package, member))}, the interface says "
                             f"({', '.join(str(p) for p in want)})")
    assert wrong == []


def test_the_interface_check_can_fail():
    """A package lacking a hook is not a target."""
    import types

    assert not isinstance(types.ModuleType("not_a_target"), Target)


def test_the_target_adds_and_applies_its_options():
    """The NNTile target's options reach the environment it reads, and only those given."""
    import argparse

    target = targets.get(targets.DEFAULT)
    parser = argparse.ArgumentParser()
    target.add_arguments(parser)
    assert target.settings(parser.parse_args(["--kernels", "nntile"])) == {"DITC_KERNELS": "nntile"}
    assert target.settings(parser.parse_args([])) == {}
    assert target.worker_environment(3)["STARPU_NCPU"] == "3"


def test_setuptools_ships_every_package():
    """pyproject's package list names every folder of Python code under dit_compiler/."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {_name(path) for path in PACKAGE.rglob("__init__.py")}
    assert found - listed == set()
