"""Fixtures for the runtime tests: tiny random checkpoints of every family.

    tiny_models     session: {family: TinyModel(dir, config)}, written by `transformers` save_pretrained
                    (fp32, 8 experts, top-2, 3 decoder layers; Mixtral sharded over several files)
    wide_model      session: a Qwen3-MoE checkpoint 128 wide (hidden and expert FFN), the smallest shape
                    FP8 expert GEMMs take (128 x 128 weight blocks)
    reference       session: family (or "wide") -> the `transformers` model of that checkpoint (fp32, eval)

(`ray_cluster`, the shared local Ray cluster, is in tests/conftest.py.)

`transformers` is a test dependency only: it is imported here, never by `expertmesh.workers`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
COMMON = dict(vocab_size=96, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2,
              max_position_embeddings=256, initializer_range=0.1,
              num_experts_per_tok=2)


def family_config(family: str):
    import transformers

    if family == "mixtral":
        return transformers.MixtralConfig(num_local_experts=8, intermediate_size=24, **COMMON)
    if family == "qwen2_moe":  # a dense middle layer and a sigmoid-gated shared expert
        return transformers.Qwen2MoeConfig(num_experts=8, moe_intermediate_size=24, intermediate_size=40,
                                           shared_expert_intermediate_size=40, mlp_only_layers=[1],
                                           norm_topk_prob=False, **COMMON)
    if family == "qwen3_moe":  # head_dim 16 != hidden / heads; per-head q/k norms; normalised top-k
        return transformers.Qwen3MoeConfig(num_experts=8, moe_intermediate_size=24, intermediate_size=40,
                                           head_dim=16, norm_topk_prob=True, **COMMON)
    if family == "olmoe":  # q/k norms over the whole projection, clipped q/k/v
        return transformers.OlmoeConfig(num_experts=8, intermediate_size=24, clip_qkv=0.3,
                                        norm_topk_prob=False, eos_token_id=None, pad_token_id=None, **COMMON)
    raise ValueError(family)


@dataclass(frozen=True)
class TinyModel:
    family: str
    path: Path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, TinyModel]:
    import transformers

    root = tmp_path_factory.mktemp("checkpoints")
    out = {}
    for i, family in enumerate(FAMILIES):
        torch.manual_seed(100 + i)
        model = transformers.AutoModelForCausalLM.from_config(family_config(family))
        path = root / family
        # Mixtral goes out in shards (an index and several files), the others as one file.
        model.save_pretrained(path, max_shard_size="40KB" if family == "mixtral" else "100MB")
        out[family] = TinyModel(family, path)
    return out


@pytest.fixture(scope="session")
def wide_model(tmp_path_factory) -> TinyModel:
    import transformers

    torch.manual_seed(7)
    config = transformers.Qwen3MoeConfig(**{**COMMON, "hidden_size": 128, "num_hidden_layers": 2}, num_experts=8,
                                         moe_intermediate_size=128, intermediate_size=256, head_dim=32,
                                         norm_topk_prob=True)
    path = tmp_path_factory.mktemp("checkpoints") / "wide"
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return TinyModel("qwen3_moe", path)


@pytest.fixture(scope="session")
def reference(tiny_models, wide_model):
    import transformers

    @functools.cache
    def load(family: str):
        path = wide_model.path if family == "wide" else tiny_models[family].path
        return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    return load
