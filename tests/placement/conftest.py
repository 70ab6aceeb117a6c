"""Shared fixtures for the placement tests: small synthetic traces and the real traces when present."""

from __future__ import annotations

from pathlib import Path

import pytest

from expertmesh.placement.synthetic import SyntheticSpec, synthetic_trace

TRACES = Path(__file__).resolve().parents[3] / "shared" / "data" / "traces"


@pytest.fixture(scope="session")
def small_trace():
    """32 experts, top-4, 4 layers, planted clusters of 4 experts (a cluster fits one of 8 GPUs)."""
    return synthetic_trace(SyntheticSpec(num_experts=32, top_k=4, num_layers=4, num_tokens=1024, num_domains=8,
                                         tokens_per_sequence=16, seed=3))


@pytest.fixture(scope="session")
def mixtral_dir() -> Path:
    path = TRACES / "mixtral-8x7b-decode"
    if not path.exists():
        pytest.skip(f"real Mixtral traces not found at {path} (they live in ../shared, outside the repo)")
    return path


@pytest.fixture(scope="session")
def qwen_dir() -> Path:
    path = TRACES / "qwen-moe-eplb-counts"
    if not path.exists():
        pytest.skip(f"real Qwen count matrices not found at {path} (they live in ../shared, outside the repo)")
    return path
