"""Requests checked at the engine's boundary: `InvalidRequest` whose message starts with the field's name.

    prompt = check_generate(request, model)      # the prompt's token ids, or InvalidRequest
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from expertmesh.workers.sampling import SamplingParams

from .tokenizer import Tokenizer
from .types import GenerateRequest, InvalidRequest, Prompt, Sampling, ScoreRequest

__all__ = ["ServedModel", "check_generate", "check_score", "sampling_params"]


@dataclass(frozen=True)
class ServedModel:
    """What a request is checked against."""

    name: str
    vocab_size: int
    max_context: int  # prompt + generated tokens one sequence may hold
    tokenizer: Tokenizer | None


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _token_ids(field: str, ids, model: ServedModel) -> list[int]:
    if not isinstance(ids, (tuple, list)) or not all(_is_int(t) for t in ids):
        raise InvalidRequest(f"{field}: expected a sequence of integer token ids")
    bad = [t for t in ids if not 0 <= t < model.vocab_size]
    if bad:
        raise InvalidRequest(f"{field}: token ids must lie in [0, {model.vocab_size}), got {bad[0]}")
    return list(ids)


def _prompt(field: str, prompt: Prompt, model: ServedModel, special: bool) -> list[int]:
    if not isinstance(prompt, Prompt):
        raise InvalidRequest(f"{field}: expected a Prompt, got {type(prompt).__name__}")
    if (prompt.token_ids is None) == (prompt.text is None):
        raise InvalidRequest(f"{field}: expected exactly one of token_ids and text")
    if prompt.text is not None:
        if not isinstance(prompt.text, str):
            raise InvalidRequest(f"{field}.text: expected a string")
        if model.tokenizer is None:
            raise InvalidRequest(f"{field}.text: the model has no tokenizer.json; send token_ids")
        ids = model.tokenizer.encode(prompt.text, add_special_tokens=special)
    else:
        ids = _token_ids(f"{field}.token_ids", prompt.token_ids, model)
    if not ids:
        raise InvalidRequest(f"{field}: expected at least one token, got none")
    return ids


def _model(name: str, model: ServedModel) -> None:
    if name not in ("", model.name):
        raise InvalidRequest(f"model: expected {model.name!r} (or empty), got {name!r}")


def _deadline(seconds) -> None:
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) or math.isnan(seconds) or seconds <= 0:
        raise InvalidRequest(f"deadline_s: expected a number of seconds > 0, got {seconds!r}")


def sampling_params(s: Sampling) -> SamplingParams:
    if not isinstance(s, Sampling):
        raise InvalidRequest(f"sampling: expected a Sampling, got {type(s).__name__}")
    if not isinstance(s.temperature, (int, float)) or not 0 <= s.temperature < math.inf:
        raise InvalidRequest(f"sampling.temperature: expected a finite number >= 0 (0 = greedy), got {s.temperature!r}")
    if not _is_int(s.top_k) or s.top_k < 0:
        raise InvalidRequest(f"sampling.top_k: expected an integer >= 0 (0 = off), got {s.top_k!r}")
    if not isinstance(s.top_p, (int, float)) or not 0 < s.top_p <= 1:
        raise InvalidRequest(f"sampling.top_p: expected a number in (0, 1], got {s.top_p!r}")
    if s.seed is not None and (not _is_int(s.seed) or not 0 <= s.seed < 2**63):
        raise InvalidRequest(f"sampling.seed: expected an integer in [0, 2^63) or none, got {s.seed!r}")
    return SamplingParams(temperature=float(s.temperature), top_p=float(s.top_p), top_k=s.top_k, seed=s.seed)


def check_generate(request: GenerateRequest, model: ServedModel) -> tuple[list[int], SamplingParams, set[int]]:
    """(prompt ids, sampling parameters, stop ids besides EOS) of a valid request."""
    if not isinstance(request, GenerateRequest):
        raise InvalidRequest(f"request: expected a GenerateRequest, got {type(request).__name__}")
    _model(request.model, model)
    prompt = _prompt("prompt", request.prompt, model, special=True)
    n = request.max_new_tokens
    if not _is_int(n) or n < 1:
        raise InvalidRequest(f"max_new_tokens: expected an integer >= 1, got {n!r}")
    if len(prompt) + n > model.max_context:
        raise InvalidRequest(f"max_new_tokens: the prompt's {len(prompt)} tokens plus {n} exceed the context of "
                             f"{model.max_context} tokens")
    sampling = sampling_params(request.sampling)
    stop = set(_token_ids("stop_token_ids", request.stop_token_ids, model))
    _deadline(request.deadline_s)
    return prompt, sampling, stop


def check_score(request: ScoreRequest, model: ServedModel) -> tuple[list[int], list[int]]:
    """(prompt ids, continuation ids) of a valid request."""
    if not isinstance(request, ScoreRequest):
        raise InvalidRequest(f"request: expected a ScoreRequest, got {type(request).__name__}")
    _model(request.model, model)
    prompt = _prompt("prompt", request.prompt, model, special=True)
    continuation = _prompt("continuation", request.continuation, model, special=False)
    if len(prompt) + len(continuation) > model.max_context:
        raise InvalidRequest(f"continuation: the prompt's {len(prompt)} tokens plus {len(continuation)} exceed "
                             f"the context of {model.max_context} tokens")
    _deadline(request.deadline_s)
    return prompt, continuation
