"""Which implementation a kernel call runs: the Triton fast path or the plain-torch reference.

`impl="auto"` (the default everywhere) takes the Triton path when Triton imports and every tensor is on a
CUDA device, or, under Triton's CPU interpreter (`TRITON_INTERPRET=1`), on the CPU: that is how CI runs
the Triton kernels without a GPU. `impl="torch"` forces the reference; `impl="triton"` forces the fast
path and fails loudly where it cannot run.
"""

from __future__ import annotations

import functools
import os

import torch

__all__ = ["IMPLS", "triton_available", "interpreting", "use_triton", "check_impl"]

IMPLS = ("auto", "torch", "triton")


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    """True when Triton kernels run on the CPU interpreter (decided when they were decorated)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_impl(impl: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"impl: expected one of {IMPLS}, got {impl!r}")


def use_triton(impl: str, *tensors: torch.Tensor) -> bool:
    check_impl(impl)
    if impl == "torch":
        return False
    devices = {t.device.type for t in tensors if t is not None}
    ok = triton_available() and (devices == {"cuda"} or (interpreting() and devices == {"cpu"}))
    if impl == "triton" and not ok:
        raise RuntimeError(
            f"impl='triton': needs Triton and CUDA tensors (or TRITON_INTERPRET=1 with CPU tensors); "
            f"got devices {sorted(devices)}, triton available: {triton_available()}")
    return ok
