"""One request inside the engine: its tokens, its progress through the cache, and its stream.

A `Sequence` holds prompt + generated tokens (`tokens`) and how many of them its home worker's cache
holds (`computed`): the next step feeds `tokens[computed:]` (a prefill chunk, or the last sampled token).
Preemption and recovery set `computed` back to 0 under a fresh group sequence id, so the tokens already
streamed are recomputed, never sampled or sent again. Events reach the consumer through `events`:

    ("tokens", [ids], None)      tokens sampled in one step
    ("finish", [ids], reason)    the last tokens and why the sequence stopped
    ("error", EngineError, None) the stream ends with this error
    ("score", [logprobs], None)  a Score request's result
"""

from __future__ import annotations

import asyncio
import enum
import math
import time
from dataclasses import dataclass, field

from expertmesh.workers.sampling import SamplingParams

from .types import EngineError, FinishReason

__all__ = ["Sequence", "State", "Kind"]


class State(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    DONE = "done"


class Kind(enum.Enum):
    GENERATE = "generate"
    SCORE = "score"


@dataclass(eq=False)
class Sequence:
    request_id: str
    kind: Kind
    arrival: int  # admission order (lower first); kept across preemption and recovery
    tokens: list[int]  # prompt, then generated tokens
    prompt_len: int
    max_new_tokens: int
    sampling: SamplingParams
    stop_ids: frozenset[int]
    deadline: float  # time.monotonic() past which it ends with DeadlineExceeded
    state: State = State.WAITING
    seq_id: int | None = None  # the group's id while admitted
    home: int | None = None  # worker of the replica holding its cache
    computed: int = 0  # tokens in the cache
    logprobs: list[float] = field(default_factory=list)  # Score: one per continuation token, in order
    ending: EngineError | None = None  # set by a consumer (cancel, deadline): leave at the next boundary
    submitted: float = field(default_factory=time.monotonic)
    last_token_at: float | None = None
    preemptions: int = 0
    unknown: int = 0  # placeholder tokens at the end of `tokens`: sampled by steps still in flight (overlap.py)
    events: asyncio.Queue = field(default_factory=asyncio.Queue)

    @property
    def generated(self) -> int:
        return len(self.tokens) - self.prompt_len if self.kind is Kind.GENERATE else 0

    @property
    def remaining(self) -> int:
        """Tokens still to feed before the next sample (prefill chunks: several; decode: one)."""
        return len(self.tokens) - self.computed

    @property
    def outstanding(self) -> int:
        """Work left, in tokens: what the replica router balances."""
        new = self.max_new_tokens - self.generated if self.kind is Kind.GENERATE else 0
        return self.remaining + new

    @property
    def exhausted(self) -> bool:
        """Its last token to generate is sampled, or will be by a step in flight: nothing more to feed."""
        return self.kind is Kind.GENERATE and self.generated >= self.max_new_tokens

    @property
    def done(self) -> bool:
        return self.state is State.DONE

    def expired(self, now: float) -> bool:
        return now >= self.deadline

    def reset(self) -> None:
        """Forget the cache (preempted, or its group failed): everything is prefilled again (without the
        placeholders of tokens that steps in flight would have sampled: they are lost with the cache)."""
        if self.unknown:
            del self.tokens[-self.unknown:]
            self.unknown = 0
        self.seq_id, self.home, self.computed = None, None, 0
        self.state = State.WAITING
        if self.kind is Kind.SCORE:
            self.logprobs.clear()

    def finish_reason(self) -> FinishReason | None:
        """Why the sequence stops after its last sampled token, or None while it goes on."""
        if self.tokens[-1] in self.stop_ids:
            return FinishReason.STOP
        if self.generated >= self.max_new_tokens:
            return FinishReason.LENGTH
        return None


def deadline_after(seconds: float) -> float:
    return math.inf if math.isinf(seconds) else time.monotonic() + seconds
