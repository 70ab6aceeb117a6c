"""Writing a benchmark's results: `<name>.md` (the tables, then the hand-written reading) and `<name>.json`."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def finite(value):
    """`value` with every NaN or infinite float (nested in dicts and lists) as None: standard JSON."""
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def write_report(results: str | Path, name: str, lines: list[str], payload: dict | None = None) -> Path:
    """results/<name>.md from `lines` plus results/<name>.notes.md (the reading of the numbers against the
    targets, written by hand after a run; kept across re-runs), and results/<name>.json from `payload`
    (NaN and infinities as null)."""
    results = Path(results)
    results.mkdir(parents=True, exist_ok=True)
    notes = results / f"{name}.notes.md"
    if notes.exists():
        lines = [*lines, "", notes.read_text().rstrip()]
    md = results / f"{name}.md"
    md.write_text("\n".join(lines) + "\n")
    if payload is not None:
        (results / f"{name}.json").write_text(json.dumps(finite(payload), indent=1) + "\n")
    return md


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(module: str) -> str:
    try:
        return str(__import__(module).__version__)
    except Exception:  # noqa: BLE001 - a missing or broken package is reported as such
        return "absent"


def _sh(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


# The NVLink multicast switches the device must keep off (KINDS.md); recorded so a run says how it ran.
_GPU_ENV = ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS")


def environment(*packages: str) -> dict:
    """Machine, versions of `packages` (plus python and numpy), command and date of a run; with torch among
    the packages and a GPU present, the GPUs, driver, CUDA, NCCL and the multicast settings too."""
    env = {"machine": f"{_cpu_name()}, {os.cpu_count()} cores", "platform": platform.platform(),
           "python": platform.python_version(), "numpy": np.__version__}
    env.update({name: _version(name) for name in packages})
    if "torch" in packages:
        import torch

        if torch.cuda.is_available():
            env["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            env["driver"] = _sh(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]).split("\n")[0]
            env["cuda"] = torch.version.cuda
            with contextlib.suppress(Exception):  # builds without NCCL
                env["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
            env["gpu_env"] = {v: os.environ.get(v) for v in _GPU_ENV}
    env["command"] = "python " + " ".join(sys.argv)
    env["date"] = time.strftime("%Y-%m-%d %H:%M")
    return env


def describe(env: dict) -> str:
    """One markdown line naming the machine and every version an `environment()` recorded."""
    skip = ("machine", "command", "date", "gpus")
    gpus = env.get("gpus")
    where = f"{len(gpus)} x {gpus[0]}, " if gpus else ""
    return (f"Machine: {where}{env.get('machine')}. Versions: "
            + ", ".join(f"{k} {v}" for k, v in env.items() if k not in skip) + ".")
