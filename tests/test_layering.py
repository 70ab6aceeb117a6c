"""The dependency directions of DESIGN.md §2, checked on every import statement and on what importing loads.

    .venv/bin/python -m pytest tests/test_layering.py

Each rule is checked twice: on the import statements written in its folder (the AST, function bodies
included: a lazy import is still a dependency), and in a fresh interpreter that imports every module of
the folder and then looks in `sys.modules` (what those modules import in turn, however deep).
(import-linter cannot follow our layout: its graph builder needs top-level packages, and expertmesh's
subpackages live in top-level folders mapped by pyproject. This test reads the same rules directly.)
"""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Rule:
    folder: str  # relative to the repository root
    package: str  # the import name of that folder
    forbidden: tuple[str, ...]  # modules it must not import, directly or through anything it imports
    why: str
    # Modules it may import inside functions but must not load when imported (optional extras).
    lazy: tuple[str, ...] = ()


RULES = [
    Rule("placement", "expertmesh.placement",
         ("ray", "redis", "grpc", "torch", "expertmesh.cluster", "expertmesh.workers", "expertmesh.kernels"),
         "placement is pure planning: arrays in, plan out"),
    Rule("kernels", "expertmesh.kernels", ("ray", "redis", "grpc", "expertmesh.cluster", "expertmesh.workers"),
         "kernels depend on no control plane"),
    Rule("cluster/stats", "expertmesh.cluster.stats",
         ("torch", "triton", "ray", "grpc", "expertmesh.workers", "expertmesh.kernels", "expertmesh.cluster.serve",
          "expertmesh.cluster.controller"),
         "routing statistics import placement only", lazy=("redis",)),
    Rule("cluster/serve", "expertmesh.cluster.serve", ("expertmesh.cluster.controller",),
         "serving imports placement, stats, workers and the gRPC stubs; the controller talks to it over gRPC"),
    Rule("cluster/controller", "expertmesh.cluster.controller",
         ("torch", "triton", "expertmesh.workers", "expertmesh.kernels", "expertmesh.cluster.serve"),
         "the controller imports placement, stats and the gRPC stubs, never workers or torch"),
    Rule("workers", "expertmesh.workers",
         ("ortools", "expertmesh.cluster", "expertmesh.placement.placers", "expertmesh.placement.ilp",
          "expertmesh.placement.eplb", "expertmesh.placement.cli"),
         "workers do not solve placements or import the control plane that drives them"),
]
IDS = [rule.package.removeprefix("expertmesh.") for rule in RULES]


def _imports(path: Path, package: str) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the module's own package
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            names.append(base)
            names.extend(f"{base}.{alias.name}" for alias in node.names)
    return names


def _modules(folder: Path, package: str) -> list[tuple[Path, str, str]]:
    """(file, module name, package it sits in) of every module under `folder`, subpackages included."""
    out = []
    for path in sorted(folder.rglob("*.py")):
        parts = path.relative_to(folder).with_suffix("").parts
        inner = ".".join([package, *parts[:-1]])
        out.append((path, inner if parts[-1] == "__init__" else f"{inner}.{parts[-1]}", inner))
    return out


def _matches(name: str, forbidden: tuple[str, ...]) -> bool:
    return any(name == f or name.startswith(f + ".") for f in forbidden)


def direct_violations(folder: Path, package: str, forbidden: tuple[str, ...]) -> list[str]:
    return [f"{path.name} imports {name}" for path, _, inner in _modules(folder, package)
            for name in _imports(path, inner) if _matches(name, forbidden)]


def loaded_after_import(modules: list[str], forbidden: tuple[str, ...], path: tuple[str, ...] = ()) -> list[str]:
    """Which of `forbidden` (a module or any of its submodules) a fresh interpreter holds in `sys.modules` once it
    has imported `modules`."""
    code = (
        "import importlib, sys\n"
        f"sys.path[:0] = {list(path)!r}\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        f"forbidden = {list(forbidden)!r}\n"
        "print(sorted(f for f in forbidden if any(m == f or m.startswith(f + '.') for m in sys.modules)))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert done.returncode == 0, f"importing {modules} failed:\n{done.stderr[-3000:]}"
    return ast.literal_eval(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("rule", RULES, ids=IDS)
def test_imports_written_in_the_folder_respect_the_rule(rule: Rule) -> None:
    files = _modules(ROOT / rule.folder, rule.package)
    assert files, f"{rule.folder}/ has no Python files"
    bad = direct_violations(ROOT / rule.folder, rule.package, rule.forbidden)
    assert not bad, f"{rule.why}:\n" + "\n".join(bad)


@pytest.mark.parametrize("rule", RULES, ids=IDS)
def test_importing_every_module_of_the_folder_loads_nothing_forbidden(rule: Rule) -> None:
    modules = [name for _, name, _ in _modules(ROOT / rule.folder, rule.package)]
    assert modules, f"{rule.folder}/ has no modules"  # a folder holding only its __init__.py still runs
    loaded = loaded_after_import(modules, rule.forbidden + rule.lazy)
    assert not loaded, f"{rule.why}; importing {rule.package} loads {loaded}"


def test_the_checks_catch_a_broken_rule(tmp_path: Path) -> None:
    """A probe package breaking a rule two imports deep, and one importing lazily: each check sees its case."""
    pkg = tmp_path / "probe"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\n")  # nothing forbidden written here...
    (pkg / "b.py").write_text("import wave\n")  # ...but b loads it
    (pkg / "lazy.py").write_text("def f():\n    import wave\n")
    assert direct_violations(pkg, "probe", ("wave",)) == ["b.py imports wave", "lazy.py imports wave"]
    assert loaded_after_import(["probe.a"], ("wave",), (str(tmp_path),)) == ["wave"]
    assert loaded_after_import(["probe.lazy"], ("wave",), (str(tmp_path),)) == []
    # Relative imports resolve against the module's package: `from ..cluster import x` inside workers/.
    names = _imports(pkg / "a.py", "expertmesh.workers")
    assert "expertmesh.workers.b" in names
    (pkg / "c.py").write_text("from ..cluster import store\nimport ray.util\nfrom torch import nn\n")
    names = _imports(pkg / "c.py", "expertmesh.workers")
    assert "expertmesh.cluster" in names and "expertmesh.cluster.store" in names
    assert "ray.util" in names and "torch.nn" in names


def test_reading_plans_and_traces_needs_no_solver_or_torch():
    """The runtime reads plans on GPU machines without OR-Tools; the planner runs without torch."""
    modules = ["expertmesh.placement", "expertmesh.placement.plan", "expertmesh.placement.cost"]
    assert loaded_after_import(modules, ("ortools", "torch", "ray", "redis")) == []


def test_every_package_folder_is_in_the_wheel():
    """pyproject lists packages one by one: a new subpackage missing there would be left out of the wheel."""
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(tool["packages"])
    for package, folder in tool["package-dir"].items():
        for init in (ROOT / folder).rglob("__init__.py"):
            name = ".".join([package, *init.parent.relative_to(ROOT / folder).parts])
            assert name in listed, f"{init.parent.relative_to(ROOT)}/ is a package but pyproject omits {name}"
