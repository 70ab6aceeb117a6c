"""`GroupConfig`: everything that defines one expert-parallel group, as one frozen, validated object.

    config = GroupConfig(model="path/to/Mixtral-8x7B", plan="plan.json", device="cuda", precision="fp8")
    config = GroupConfig.load("engine.yaml")                 # the same fields as YAML or JSON
    group = EPGroup.create(config)

It is the group part of `expertmesh serve --config`, of the Helm chart's engine values and of the training
job's config (each embeds it), so its JSON Schema (`GroupConfig.json_schema()`) validates all three.
Objects that are not configuration travel beside it: a `Placement` computed in-process and the statistics
sink are arguments of `EPGroup.create`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from expertmesh.kernels.moe import Precision
from expertmesh.placement.routing import DEFAULT_REPLICA_RULE, REPLICA_RULES
from expertmesh.schema import Config

__all__ = ["GroupConfig", "Timeouts", "StatsSettings", "EXCHANGES", "DTYPE_NAMES", "resolve_precision"]

EXCHANGES = ("auto", "all_to_all", "symm_mem")
DTYPE_NAMES = ("float32", "bfloat16", "float16")

Exchange = Literal["auto", "all_to_all", "symm_mem"]
PrecisionName = Literal["bf16", "fp8-dispatch", "fp8"]
assert set(PrecisionName.__args__) == {p.value for p in Precision}
ReplicaRule = Literal["fixed", "balanced"]
assert ReplicaRule.__args__ == REPLICA_RULES


def resolve_precision(precision: str | None, checkpoint_quantization: str | None) -> Precision:
    """`precision`, else FP8 for an FP8 checkpoint (its experts then run exactly its weights), else bf16."""
    if precision is not None:
        return Precision(precision)
    return Precision.FP8 if checkpoint_quantization == "fp8" else Precision.BF16


class Timeouts(Config):
    step_s: float = Field(300.0, gt=0)
    """A step (or any call) that takes longer tears the group down (`StepTimeout`)."""
    setup_s: float = Field(600.0, gt=0)
    """Scheduling the workers, joining the process group and loading the weights."""
    collective_s: float = Field(120.0, gt=0)
    """The process group's timeout for one collective (NCCL or gloo)."""


class StatsSettings(Config):
    flush_every: int = Field(1, ge=1)
    """Steps per routing-statistics window."""
    shares: bool = True
    """Workers sum each window's counts and each writes one share of the layers (else each writes its own tokens)."""
    run: str = Field("run", min_length=1)
    """Writer ids are `<run>/worker-<rank>`."""


class GroupConfig(Config):
    model: str = Field(min_length=1)
    """Checkpoint directory in Hugging Face format (config.json + safetensors)."""
    plan: str | None = None
    """Plan file (`expertmesh plan --out`); none: the contiguous placement."""
    workers: int | None = Field(None, ge=1)
    """Workers (GPUs) of the group; default: the plan's GPU count, 1 without a plan."""
    device: Literal["cpu", "cuda"] = "cpu"
    """cuda: one GPU per worker, NCCL; cpu: gloo (tests, development)."""
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    """Weights and activations; default: the checkpoint's on CUDA, float32 on CPU."""
    precision: PrecisionName | None = None
    """Routed experts: bf16 (the model's dtype), fp8-dispatch (FP8 tokens on the wire), fp8 (also FP8 GEMMs);
    default: fp8 for an FP8 checkpoint, else bf16."""
    exchange: Exchange = "auto"
    """Dispatch/combine: auto = all_to_all (NCCL or gloo all_to_all_single); symm_mem = NVLink writes into peers'
    buffers (one node, CUDA, needs max_tokens)."""
    replica_rule: ReplicaRule = DEFAULT_REPLICA_RULE
    """Which replica serves a replicated expert's tokens (placement/routing.py): fixed = the token's own GPU, else
    its node, else dealt round robin; balanced = split per step by the step's own load (one all-gather of
    per-expert counts per MoE layer). Plans without replicas on several GPUs run the same either way. Give the
    cost model the same rule (`evaluate(..., replica_rule=...)`) for its predictions to match."""
    max_tokens: int = Field(0, ge=0)
    """Most new tokens one worker brings to a step (sizes the symm_mem buffers); 0 = unbounded."""
    weights: Literal["checkpoint", "random"] = "checkpoint"
    """random: seeded random tensors of the checkpoint's shapes (benchmarks; only config.json is read)."""
    seed: int = 0
    """Random weights and unseeded sampling."""
    kv_block_size: int = Field(16, ge=1)
    """Tokens per KV-cache block (the unit of admission and preemption)."""
    kv_blocks: int | None = Field(None, ge=1)
    """KV-cache blocks per worker; default: what `kv_memory_fraction` leaves on a GPU, 4096 on CPU."""
    kv_memory_fraction: float = Field(0.9, gt=0, le=1)
    """Share of a GPU's memory a worker may fill, weights and cache together (vLLM's gpu_memory_utilization)."""
    decode_graphs: bool | None = None
    """Decode steps at fixed shapes, replayed as CUDA graphs (default: on for CUDA; on CPU they run eagerly)."""
    compiled_steps: bool = False
    """Drive steps through a Ray compiled graph (~0.1 ms instead of ~1 ms per step; each worker busy-polls a core)."""
    cpus_per_worker: float = Field(1.0, gt=0)
    """CPUs reserved per worker (also its torch threads)."""
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """Ray placement-group strategy of the workers' bundles."""
    timeouts: Timeouts = Timeouts()
    stats: StatsSettings = StatsSettings()

    @model_validator(mode="after")
    def _consistent(self) -> GroupConfig:
        if self.exchange == "symm_mem" and (self.device != "cuda" or self.max_tokens < 1):
            raise ValueError(f"exchange: 'symm_mem' needs device 'cuda' and max_tokens >= 1, got device "
                             f"{self.device!r} and max_tokens {self.max_tokens}")
        return self

    def resolved_precision(self, checkpoint_quantization: str | None) -> Precision:
        return resolve_precision(self.precision, checkpoint_quantization)

    def resolved_dtype(self, checkpoint_dtype: str) -> str:
        """The dtype the workers run: `dtype`, else the checkpoint's on CUDA, float32 on CPU."""
        if self.dtype is not None:
            return self.dtype
        return checkpoint_dtype if self.device == "cuda" and checkpoint_dtype in DTYPE_NAMES else "float32"
