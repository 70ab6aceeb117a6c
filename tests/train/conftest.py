"""Fixtures of the training tests: the same tiny `transformers` checkpoints as tests/workers (one definition,
loaded from tests/workers/conftest.py by path; pytest keeps conftest modules per folder).

    tiny_models     session: {family: TinyModel(dir, family)} (fp32, 8 experts, top-2, 3 decoder layers)
    wide_model      session: a Qwen3-MoE checkpoint 128 wide, the smallest shape FP8 expert GEMMs take
    reference       session: family (or "wide") -> the `transformers` model of that checkpoint (fp32)
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_spec = importlib.util.spec_from_file_location("_workers_conftest",
                                               Path(__file__).parents[1] / "workers" / "conftest.py")
_workers = sys.modules[_spec.name] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_workers)

FAMILIES = _workers.FAMILIES
tiny_models = _workers.tiny_models
wide_model = _workers.wide_model
reference = _workers.reference
