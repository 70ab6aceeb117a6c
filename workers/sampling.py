"""Next-token choice from last-position logits: greedy, or temperature, then top-k, then top-p truncation."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["SamplingParams", "sample", "GREEDY"]


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy (argmax)
    top_p: float = 1.0  # keep the smallest set of tokens whose probability reaches top_p
    top_k: int = 0  # keep the k most probable tokens (0 = all), before top_p
    seed: int | None = None  # per-request seed; None draws from the worker's generator

    def __post_init__(self) -> None:
        if not self.temperature >= 0.0:
            raise ValueError(f"temperature: expected >= 0 (0 = greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p: expected a value in (0, 1], got {self.top_p}")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise ValueError(f"top_k: expected an integer >= 0 (0 = off), got {self.top_k!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


GREEDY = SamplingParams()


def _top_k_filter(probs: torch.Tensor, top_k: int) -> torch.Tensor:
    """Zero all but the top_k most probable tokens (ties at the cut kept by torch.topk's order); renormalise."""
    if top_k <= 0 or top_k >= probs.shape[-1]:
        return probs
    values, order = torch.topk(probs, top_k, dim=-1)
    kept = torch.zeros_like(probs).scatter(-1, order, values)
    return kept / kept.sum(-1, keepdim=True)


def _top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero all but the smallest prefix (by descending probability) whose mass reaches top_p; renormalise."""
    if top_p >= 1.0:
        return probs
    sorted_p, order = torch.sort(probs, dim=-1, descending=True)
    before = torch.cumsum(sorted_p, dim=-1) - sorted_p  # mass of the tokens ranked above each one
    sorted_p = torch.where(before < top_p, sorted_p, torch.zeros_like(sorted_p))  # the top token always stays
    kept = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return kept / kept.sum(-1, keepdim=True)


def sample(logits: torch.Tensor, params: list[SamplingParams], positions: list[int],
           generator: torch.Generator | None = None) -> torch.Tensor:
    """int64 [N]: one token per row of `logits` [N, V] under that row's `params`.

    A seeded request draws from a generator seeded with (seed, position), so the same request gives the
    same tokens on any worker and in any batch.
    """
    out = torch.argmax(logits, dim=-1)
    for i, p in enumerate(params):
        if p.greedy:
            continue
        probs = torch.softmax(logits[i].float() / p.temperature, dim=-1)
        probs = _top_p_filter(_top_k_filter(probs, p.top_k), p.top_p)
        gen = generator
        if p.seed is not None:
            gen = torch.Generator(device=logits.device)
            gen.manual_seed((p.seed * 1_000_003 + positions[i]) % (2**63))
        out[i] = torch.multinomial(probs, 1, generator=gen)[0]
    return out
