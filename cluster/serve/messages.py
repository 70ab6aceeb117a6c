"""Protobuf messages of `expertmesh.v1` <-> the engine's dataclasses (`types.py`), both directions.

The server turns requests into `GenerateRequest` / `ScoreRequest` and chunks into `GenerateResponse`; the
client does the reverse. The conversion is faithful and checks nothing: the engine validates every field
once (`InvalidRequest` naming it), and the proto's field paths are the dataclasses' (`sampling.top_p`), so
its messages name the field the caller sent. Unset optional fields take the dataclass defaults.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from expertmesh.protos.v1 import admin_pb2, inference_pb2

from .types import (
    Chunk,
    EngineStatus,
    FinishReason,
    GenerateRequest,
    ModelInfo,
    Prompt,
    Sampling,
    ScoreRequest,
    ScoreResult,
    Usage,
)

__all__ = [
    "generate_request", "score_request", "generate_response", "score_response", "models_response",
    "status_response", "prompt_message", "generate_message", "score_message", "chunk", "score_result",
    "model_infos", "engine_status", "RoutingSummary", "routing_summary_response", "routing_summary", "ERROR_KEY",
]

# Trailing metadata naming the engine's error class (QueueFull, ...): RESOURCE_EXHAUSTED alone may also be
# gRPC's own refusal of an oversized message.
ERROR_KEY = "expertmesh-error"

_FINISH = {FinishReason.LENGTH: inference_pb2.FINISH_REASON_LENGTH, FinishReason.STOP: inference_pb2.FINISH_REASON_STOP}
_FINISH_BACK = {v: k for k, v in _FINISH.items()}


@dataclass(frozen=True)
class RoutingSummary:
    """Per MoE layer figures of the recently served routing (the cost model's, under the current plan)."""

    balancedness: tuple[float, ...]  # [L]
    copies_per_token: tuple[float, ...]  # [L]


# ---- server side: proto -> engine -------------------------------------------------------------------
def _prompt(msg: inference_pb2.Prompt) -> Prompt:
    return Prompt(token_ids=tuple(msg.token_ids) or None, text=msg.text or None)


def _deadline(remaining_s: float | None) -> float:
    return math.inf if remaining_s is None else remaining_s


def generate_request(msg: inference_pb2.GenerateRequest, remaining_s: float | None = None) -> GenerateRequest:
    """`remaining_s`: the call's time left (`context.time_remaining()`), which becomes the request's deadline."""
    s = msg.sampling
    sampling = Sampling(temperature=s.temperature, top_k=s.top_k, seed=s.seed if s.HasField("seed") else None,
                        **({"top_p": s.top_p} if s.HasField("top_p") else {}))
    extra = {"max_new_tokens": msg.max_new_tokens} if msg.HasField("max_new_tokens") else {}
    return GenerateRequest(prompt=_prompt(msg.prompt), sampling=sampling, stop_token_ids=tuple(msg.stop_token_ids),
                           ignore_eos=msg.ignore_eos, deadline_s=_deadline(remaining_s), request_id=msg.request_id,
                           model=msg.model, **extra)


def score_request(msg: inference_pb2.ScoreRequest, remaining_s: float | None = None) -> ScoreRequest:
    return ScoreRequest(prompt=_prompt(msg.prompt), continuation=_prompt(msg.continuation),
                        deadline_s=_deadline(remaining_s), request_id=msg.request_id, model=msg.model)


def _usage(usage: Usage) -> inference_pb2.Usage:
    return inference_pb2.Usage(prompt_tokens=usage.prompt_tokens, generated_tokens=usage.generated_tokens)


def generate_response(c: Chunk) -> inference_pb2.GenerateResponse:
    msg = inference_pb2.GenerateResponse(token_ids=c.token_ids, text=c.text)
    if c.finish_reason is not None:
        msg.finish_reason = _FINISH[c.finish_reason]
    if c.usage is not None:
        msg.usage.CopyFrom(_usage(c.usage))
    return msg


def score_response(r: ScoreResult) -> inference_pb2.ScoreResponse:
    return inference_pb2.ScoreResponse(logprobs=r.logprobs, usage=_usage(r.usage))


def models_response(models: Sequence[ModelInfo]) -> inference_pb2.ListModelsResponse:
    return inference_pb2.ListModelsResponse(models=[
        inference_pb2.ModelInfo(name=m.name, family=m.family, num_experts=m.num_experts, top_k=m.top_k,
                                max_context=m.max_context, has_tokenizer=m.has_tokenizer) for m in models])


def status_response(s: EngineStatus) -> admin_pb2.GetStatusResponse:
    return admin_pb2.GetStatusResponse(
        ready=s.ready, draining=s.draining, replicas=s.replicas, workers_per_replica=s.workers_per_replica,
        waiting=s.waiting, running=s.running, kv_blocks_used=s.kv_blocks_used, kv_blocks_total=s.kv_blocks_total,
        preemptions=s.preemptions, plan_version=s.plan_version)


def routing_summary_response(summary: RoutingSummary, plan_version: str) -> admin_pb2.GetRoutingSummaryResponse:
    layers = [admin_pb2.LayerRouting(layer=i, balancedness=b, copies_per_token=c)
              for i, (b, c) in enumerate(zip(summary.balancedness, summary.copies_per_token, strict=True))]
    def mean(xs: tuple[float, ...]) -> float:
        return sum(xs) / len(xs) if xs else 0.0

    return admin_pb2.GetRoutingSummaryResponse(
        plan_version=plan_version, balancedness=mean(summary.balancedness),
        balancedness_worst=min(summary.balancedness, default=0.0), copies_per_token=mean(summary.copies_per_token),
        layers=layers)


# ---- client side: Python values -> proto -> Python values -----------------------------------------
def prompt_message(prompt: str | Sequence[int]) -> inference_pb2.Prompt:
    """Text, or token ids."""
    if isinstance(prompt, str):
        return inference_pb2.Prompt(text=prompt)
    return inference_pb2.Prompt(token_ids=list(prompt))


def generate_message(
    prompt: str | Sequence[int], *, max_new_tokens: int | None = None, temperature: float = 0.0, top_k: int = 0,
    top_p: float | None = None, seed: int | None = None, stop_token_ids: Sequence[int] = (),
    ignore_eos: bool = False, request_id: str = "", model: str = "",
) -> inference_pb2.GenerateRequest:
    sampling = inference_pb2.SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    return inference_pb2.GenerateRequest(
        model=model, prompt=prompt_message(prompt), max_new_tokens=max_new_tokens, sampling=sampling,
        stop_token_ids=list(stop_token_ids), ignore_eos=ignore_eos, request_id=request_id)


def score_message(prompt: str | Sequence[int], continuation: str | Sequence[int], *, request_id: str = "",
                  model: str = "") -> inference_pb2.ScoreRequest:
    return inference_pb2.ScoreRequest(model=model, prompt=prompt_message(prompt),
                                      continuation=prompt_message(continuation), request_id=request_id)


def _usage_back(msg: inference_pb2.Usage) -> Usage:
    return Usage(prompt_tokens=msg.prompt_tokens, generated_tokens=msg.generated_tokens)


def chunk(msg: inference_pb2.GenerateResponse) -> Chunk:
    return Chunk(token_ids=tuple(msg.token_ids), text=msg.text, finish_reason=_FINISH_BACK.get(msg.finish_reason),
                 usage=_usage_back(msg.usage) if msg.HasField("usage") else None)


def score_result(msg: inference_pb2.ScoreResponse) -> ScoreResult:
    return ScoreResult(logprobs=tuple(msg.logprobs), usage=_usage_back(msg.usage))


def model_infos(msg: inference_pb2.ListModelsResponse) -> list[ModelInfo]:
    return [ModelInfo(name=m.name, family=m.family, num_experts=m.num_experts, top_k=m.top_k,
                      max_context=m.max_context, has_tokenizer=m.has_tokenizer) for m in msg.models]


def engine_status(msg: admin_pb2.GetStatusResponse) -> EngineStatus:
    return EngineStatus(ready=msg.ready, draining=msg.draining, replicas=msg.replicas,
                        workers_per_replica=msg.workers_per_replica, waiting=msg.waiting, running=msg.running,
                        kv_blocks_used=msg.kv_blocks_used, kv_blocks_total=msg.kv_blocks_total,
                        preemptions=msg.preemptions, plan_version=msg.plan_version)


def routing_summary(msg: admin_pb2.GetRoutingSummaryResponse) -> RoutingSummary:
    return RoutingSummary(balancedness=tuple(x.balancedness for x in msg.layers),
                          copies_per_token=tuple(x.copies_per_token for x in msg.layers))
