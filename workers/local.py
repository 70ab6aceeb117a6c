"""The whole model in this process, every expert local (no Ray, no process group): one device, tests."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from expertmesh.kernels.moe import Precision

from .checkpoint import CheckpointReader
from .config import read_model_config
from .group_config import resolve_precision
from .kvcache import DEFAULT_KV_BLOCKS
from .model import MoEModel
from .moe import EPExecutor
from .plans import contiguous_plan
from .weights import load_expert_shard, load_model_weights

__all__ = ["load_local_model", "run_step"]


def load_local_model(model_dir: str | Path, dtype: torch.dtype = torch.float32,
                     device: str | torch.device = "cpu", decode_graphs: bool | None = None,
                     precision: Precision | str | None = None, kv_blocks: int = DEFAULT_KV_BLOCKS,
                     kv_block_size: int = 16) -> MoEModel:
    """A `MoEModel` holding all experts of `model_dir` (the contiguous plan on one GPU).

    decode_graphs: decode steps at fixed shapes (`DecodeGraphs`; CUDA graphs on a GPU); default on for CUDA.
    precision: of the routed experts (`expertmesh.kernels.Precision`); default: fp8 for an FP8 checkpoint.
    kv_blocks, kv_block_size: the KV cache, allocated once (`PagedKVCache`).
    """
    device = torch.device(device)
    cfg = read_model_config(model_dir)
    reader = CheckpointReader(model_dir)
    plan = contiguous_plan(cfg.num_moe_layers, cfg.num_experts, 1)
    executor = EPExecutor(cfg, 0, 1, device, dtype, resolve_precision(precision, cfg.quantization))
    executor.load(plan, load_expert_shard(reader, cfg, plan.phy2log, 1, 0, dtype, device))
    if decode_graphs is None:
        decode_graphs = device.type == "cuda"
    return MoEModel(cfg, load_model_weights(reader, cfg, dtype, device), executor, dtype, device, decode_graphs,
                    kv_blocks, kv_block_size)


def run_step(model: MoEModel, inputs: Sequence[tuple[int, Sequence[int]]],
             override_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of (sequence id, new tokens): (last-position logits [N, V], routed ids [T, L, k])."""
    result = model.step(inputs, override_ids)
    return result.logits, result.routed
