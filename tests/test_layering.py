"""The dependency directions of DESIGN.md §2, checked on every import statement of the source folders.

    .venv/bin/python -m pytest tests/test_layering.py

(import-linter cannot follow our layout: its graph builder needs top-level packages, and expertmesh's
subpackages live in top-level folders mapped by pyproject. This test reads the same rules directly.)
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# folder -> modules it must not import (directly), with the reason.
FORBIDDEN = {
    "placement": (["ray", "redis", "grpc", "torch", "expertmesh.cluster", "expertmesh.workers",
                   "expertmesh.kernels"], "placement is pure planning: arrays in, plan out"),
    "kernels": (["ray", "redis", "grpc", "expertmesh.cluster", "expertmesh.workers"],
                "kernels depend on no control plane"),
    "cluster": (["torch", "expertmesh.kernels"], "the control plane runs no expert math"),
    "workers": (["ortools", "expertmesh.cluster", "expertmesh.placement.placers", "expertmesh.placement.ilp",
                 "expertmesh.placement.eplb", "expertmesh.placement.cli"],
                "workers do not solve placements or import the control plane that drives them"),
}


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


def _module_package(folder: str, path: Path) -> str:
    rel = path.relative_to(ROOT / folder).with_suffix("")
    parts = ["expertmesh", folder, *rel.parts]
    return ".".join(parts[:-1])  # the package containing the module


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_folder_respects_dependency_direction(folder: str) -> None:
    forbidden, why = FORBIDDEN[folder]
    files = sorted((ROOT / folder).rglob("*.py"))
    assert files, f"{folder}/ has no Python files"
    bad = []
    for path in files:
        for name in _imports(path, _module_package(folder, path)):
            if any(name == f or name.startswith(f + ".") for f in forbidden):
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not bad, f"{why}:\n" + "\n".join(bad)


def test_checker_sees_relative_and_absolute_imports(tmp_path: Path) -> None:
    """The rule must catch `from ..cluster import x` written inside workers/, not only absolute imports."""
    probe = tmp_path / "probe.py"
    probe.write_text("from ..cluster import store\nimport ray.util\nfrom torch import nn\n")
    names = _imports(probe, "expertmesh.workers")
    assert "expertmesh.cluster" in names and "expertmesh.cluster.store" in names
    assert "ray.util" in names and "torch.nn" in names


def test_reading_plans_and_traces_needs_no_solver_or_torch():
    """The runtime reads plans on GPU machines without OR-Tools; the planner runs without torch."""
    import subprocess
    import sys

    code = ("import sys, expertmesh.placement as p, expertmesh.placement.plan, expertmesh.placement.cost; "
            "print(sorted(m for m in ('ortools', 'torch', 'ray', 'redis') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
