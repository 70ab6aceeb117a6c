"""Fixtures of the GPU tests (every test here skips without CUDA).

    checkpoint   session: a small Qwen3-MoE checkpoint (fp32, 3 layers, 4 heads / 2 KV heads of 32, 8 experts
                 top-2), written by `transformers` save_pretrained
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

# The GPU tests reuse the CPU tests' check modules (tests/kernels/*_checks.py, kernel_cases.py), and never use
# NVLink multicast (a shared NVSwitch host): both set here, before any test module imports.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "kernels"))
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=128, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        head_dim=32, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=48, intermediate_size=96,
        norm_topk_prob=True, initializer_range=0.1, max_position_embeddings=512)
    path = tmp_path_factory.mktemp("gpu_ckpt") / "qwen3"
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    return path
