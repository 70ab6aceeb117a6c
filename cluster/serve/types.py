"""What the serving engine takes and gives: requests, streamed chunks, errors, status (no gRPC, no Ray here).

The engine (`engine.py`) implements `InferenceEngine`; the gRPC servicers, the Python client's in-process
mode, the benchmarks and the demo call it through this surface only. Each error carries the gRPC status
its callers map it to, so every entry point reports a failure the same way.

    engine = await Engine.start(config)
    async for chunk in engine.generate(GenerateRequest(prompt=Prompt(text="Hello"), max_new_tokens=32)):
        print(chunk.text, end="")
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

from expertmesh.placement.plan import Placement

__all__ = [
    "Prompt", "Sampling", "GenerateRequest", "ScoreRequest", "Usage", "FinishReason", "Chunk", "ScoreResult",
    "ModelInfo", "EngineStatus", "EngineError", "InvalidRequest", "QueueFull", "Unavailable", "DeadlineExceeded",
    "Cancelled", "InferenceEngine",
]


@dataclass(frozen=True)
class Prompt:
    """Token ids, or text the engine tokenizes with the checkpoint's tokenizer.json (exactly one of them)."""

    token_ids: tuple[int, ...] | None = None
    text: str | None = None


@dataclass(frozen=True)
class Sampling:
    """Greedy at temperature 0; else temperature, then top-k (0 = off), then top-p. A seed makes the tokens
    a function of (seed, position): the same seed gives the same tokens whatever else is batched with it."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None


@dataclass(frozen=True)
class GenerateRequest:
    prompt: Prompt
    max_new_tokens: int = 16
    sampling: Sampling = Sampling()
    stop_token_ids: tuple[int, ...] = ()  # besides the model's EOS (unless ignore_eos)
    ignore_eos: bool = False
    deadline_s: float = math.inf  # seconds from submission; past it the stream ends with DeadlineExceeded
    request_id: str = ""  # the engine assigns one when empty
    model: str = ""  # "" = the served model


@dataclass(frozen=True)
class ScoreRequest:
    """Log-probabilities of `continuation` given `prompt` (one per continuation token)."""

    prompt: Prompt
    continuation: Prompt
    deadline_s: float = math.inf
    request_id: str = ""
    model: str = ""


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    generated_tokens: int


class FinishReason(StrEnum):
    LENGTH = "length"  # max_new_tokens reached
    STOP = "stop"  # EOS or a stop token (it is included in token_ids)


@dataclass(frozen=True)
class Chunk:
    """Tokens sampled since the last chunk, their text delta (incremental detokenisation; "" without a
    tokenizer), and on the last chunk the finish reason and usage."""

    token_ids: tuple[int, ...]
    text: str = ""
    finish_reason: FinishReason | None = None
    usage: Usage | None = None


@dataclass(frozen=True)
class ScoreResult:
    logprobs: tuple[float, ...]
    usage: Usage


@dataclass(frozen=True)
class ModelInfo:
    name: str
    family: str
    num_experts: int
    top_k: int
    max_context: int  # tokens one sequence may hold (prompt + generated)
    has_tokenizer: bool


@dataclass(frozen=True)
class EngineStatus:
    ready: bool  # every replica serving
    draining: bool
    replicas: int
    workers_per_replica: int
    waiting: int  # requests queued
    running: int  # sequences in the running batch(es)
    kv_blocks_used: int
    kv_blocks_total: int
    preemptions: int  # since start
    plan_version: str
    extra: dict = field(default_factory=dict)


class EngineError(Exception):
    """A request the engine could not serve; `code` is the gRPC status name callers map it to."""

    code = "INTERNAL"


class InvalidRequest(EngineError):
    """Bad input; the message starts with the field's name (e.g. "max_new_tokens: expected >= 1, got 0")."""

    code = "INVALID_ARGUMENT"


class QueueFull(EngineError):
    code = "RESOURCE_EXHAUSTED"


class Unavailable(EngineError):
    """Draining, stopped, or a replica failed and the request could not be continued."""

    code = "UNAVAILABLE"


class DeadlineExceeded(EngineError):
    code = "DEADLINE_EXCEEDED"


class Cancelled(EngineError):
    code = "CANCELLED"


class InferenceEngine(Protocol):
    """The serving engine as its callers see it (all methods on one asyncio loop)."""

    def generate(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        """Stream the completion; raises an `EngineError` (before or between chunks). Closing the iterator
        early (or cancelling the task consuming it) cancels the request: its sequence is freed at the next
        step boundary."""
        ...

    async def score(self, request: ScoreRequest) -> ScoreResult: ...

    def models(self) -> list[ModelInfo]: ...

    def plan(self) -> Placement | None:
        """The placement every replica serves (None while none is up)."""
        ...

    def routing_figures(self) -> tuple[list[float], list[float]]:
        """Per MoE layer (balancedness, copies per token) of the recent routing ([] before any)."""
        ...

    def status(self) -> EngineStatus: ...

    async def drain(self, grace_s: float) -> None:
        """Refuse new requests (Unavailable) and let running ones finish for up to `grace_s` seconds; what
        is still running then ends with Unavailable."""
        ...

    async def stop(self) -> None: ...
