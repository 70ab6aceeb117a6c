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


def _real_data(folder: str) -> Path:
    path = TRACES / folder
    if not path.exists():
        pytest.skip(f"real routing data not found at {path} (it lives in ../shared, outside the repo)")
    return path


@pytest.fixture(scope="session")
def mixtral_dir() -> Path:
    return _real_data("mixtral-8x7b-decode")


@pytest.fixture(scope="session")
def qwen_dir() -> Path:
    return _real_data("qwen-moe-eplb-counts")
