"""`EngineConfig`: the serving engine's settings, with the EP group's `GroupConfig` embedded as `group:`.

    config = EngineConfig(group=GroupConfig(model="path/to/Mixtral-8x7B", workers=2, device="cuda"), replicas=2)
    config = EngineConfig.load("engine.yaml")      # group: {...}, replicas: 2, max_batch_tokens: 4096, ...

`expertmesh serve --config` reads this (the server's own settings beside it); the Helm chart's engine values
validate against `EngineConfig.json_schema()`.
"""

from __future__ import annotations

from pydantic import Field

from expertmesh.schema import Config
from expertmesh.workers.group_config import GroupConfig

__all__ = ["EngineConfig", "ServeStats", "Recovery"]


class ServeStats(Config):
    redis_url: str | None = None
    """Where workers record routing statistics (redis:// or rediss://); none: not recorded."""
    model: str | None = None
    """Model name of the statistics in Redis (the controller reads it); default: the served model's name."""
    run: str = Field("serve", min_length=1)
    """Run name of the statistics; a re-created group writes under `<run>.<incarnation>`."""


class Recovery(Config):
    attempts: int = Field(3, ge=1)
    """Re-creations of a failed group tried before its replica gives up (its requests end Unavailable)."""
    backoff_s: float = Field(1.0, ge=0)
    """Wait between attempts."""


class EngineConfig(Config):
    group: GroupConfig
    """Each replica's EP group (every replica gets the same config and plan)."""
    replicas: int = Field(1, ge=1)
    """Data-parallel EP groups; a request goes to the one with the fewest outstanding tokens."""
    max_batch_tokens: int = Field(2048, ge=1)
    """New tokens one worker takes per step: every decode token first, then prefill chunks."""
    decode_prefill_tokens: int = Field(256, ge=0)
    """Prompt tokens one worker takes per step while it also runs decodes (at most max_batch_tokens): a
    running stream then waits for short steps only. Steps of up to 512 tokens whose prompt chunks are this
    short (ending within 4096 tokens) run at the fixed shapes of decode steps, as CUDA graphs on a GPU
    (0: prompts never join those, and take max_batch_tokens per step)."""
    overlap_steps: bool = False
    """Send each step before the previous one's tokens are back (`cluster/serve/overlap.py`): the host's
    work per step (planning, packing, Ray, streaming) then runs while the GPU computes. A sequence that
    stops on a stop token costs one dropped row."""
    max_running: int = Field(256, ge=1)
    """Sequences one replica runs at once."""
    max_waiting: int = Field(1024, ge=0)
    """Requests waiting for admission, all replicas together; beyond it a request is refused (QueueFull)."""
    tokenizer: str | None = None
    """tokenizer.json, or a folder holding one; default: the model folder's (none there: token ids only)."""
    model_name: str | None = None
    """The served model's name (ListModels, the `model` field of requests); default: the model folder's name."""
    routing_every: int = Field(16, ge=0)
    """Every this many steps a step returns its routing, for the balancedness and copies metrics (0: never)."""
    stats: ServeStats = ServeStats()
    recovery: Recovery = Recovery()
