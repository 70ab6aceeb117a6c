"""Held-out evaluation: a plan judged on traffic it was not made on.

Either a second trace of the same model (`--held-out FILE`) or one trace split in two (`--split KIND:FRACTION`):

    sequence:F   a seeded random F of the sequences plans, the rest is held out (same traffic mix, other
                 requests: what a plan meets when the load it saw recurs);
    time:F       the first F of the tokens, in trace order, plans and the rest is held out (the controller's
                 case: it always plans on the past). A sequence cut by the boundary is split with it.

`KIND:FRACTION:SEED` picks the seed of a sequence split (default 0). Both parts must keep a token.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .trace import Trace

__all__ = ["SPLIT_KINDS", "SplitSpec", "parse_split", "split_trace", "take_tokens"]

SPLIT_KINDS = ("sequence", "time")


@dataclass(frozen=True)
class SplitSpec:
    kind: str
    fraction: float  # of the sequences (or tokens) that plan
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in SPLIT_KINDS:
            raise ValueError(f"--split: expected a kind in {SPLIT_KINDS}, got {self.kind!r}")
        if not 0 < self.fraction < 1:
            raise ValueError(f"--split: expected a fraction strictly between 0 and 1, got {self.fraction}")
        if self.seed < 0:
            raise ValueError(f"--split: expected a seed >= 0, got {self.seed}")


def parse_split(text: str) -> SplitSpec:
    """`KIND:FRACTION[:SEED]`, e.g. `sequence:0.5` or `time:0.7`; ValueError naming --split otherwise."""
    parts = text.split(":")
    if len(parts) not in (2, 3):
        raise ValueError(f"--split: expected KIND:FRACTION[:SEED] such as sequence:0.5, got {text!r}")
    try:
        fraction = float(parts[1])
        seed = int(parts[2]) if len(parts) == 3 else 0
    except ValueError:
        raise ValueError(f"--split: expected KIND:FRACTION[:SEED] with a number and a whole seed, got {text!r}"
                         ) from None
    return SplitSpec(parts[0], fraction, seed)


def take_tokens(trace: Trace, mask: np.ndarray) -> Trace:
    """The tokens where `mask` holds, in order."""
    w = None if trace.topk_weights is None else trace.topk_weights[mask]
    return Trace(trace.topk_ids[mask], trace.seq_ids[mask], trace.num_experts, w, dict(trace.meta))


def split_trace(trace: Trace, spec: SplitSpec) -> tuple[Trace, Trace]:
    """(planning part, held-out part) of `trace` (module docstring). Deterministic for a spec."""
    if spec.kind == "time":
        cut = int(round(spec.fraction * trace.num_tokens))
        mask = np.arange(trace.num_tokens) < cut
    else:
        sequences = np.unique(trace.seq_ids)
        if len(sequences) < 2:
            raise ValueError(f"--split: sequence split needs two sequences or more, the trace has {len(sequences)}; "
                             "use time:F")
        rng = np.random.default_rng([spec.seed, 29])
        keep = int(round(spec.fraction * len(sequences)))
        keep = min(max(keep, 1), len(sequences) - 1)
        chosen = rng.permutation(sequences)[:keep]
        mask = np.isin(trace.seq_ids, chosen)
    if mask.all() or not mask.any():
        raise ValueError(f"--split: {spec.kind}:{spec.fraction} leaves no token on one side of "
                         f"{trace.num_tokens} tokens")
    return take_tokens(trace, mask), take_tokens(trace, ~mask)
