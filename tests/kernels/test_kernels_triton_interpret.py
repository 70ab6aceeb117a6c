"""Runs the Triton kernel checks (forward and backward) on Triton's CPU interpreter, so a broken kernel fails CI
without a GPU.

TRITON_INTERPRET is read when a kernel is decorated, i.e. when its module is imported; a subprocess keeps
the setting away from every other test in this pytest process.

Run: pytest tests/kernels/test_kernels_triton_interpret.py
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent


@pytest.mark.slow
@pytest.mark.parametrize("checks", [("interpret_checks.py", "interpret_checks_bwd.py"), ("paged_interpret_checks.py",)],
                         ids=["pipeline", "paged"])
def test_triton_kernels_under_the_interpreter(checks):
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
         *(str(HERE / name) for name in checks)],
        cwd=HERE, env=env, capture_output=True, text=True, timeout=600,
    )
    tail = proc.stdout[-6000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, tail
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, tail
