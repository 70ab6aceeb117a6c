"""A writer process for the multi-process tests: records deterministic steps and flushes one window each.

    python stats_writer_proc.py URL MODEL WRITER WINDOWS [--tokens T --layers L --experts E --top-k K ...]

Prints its final RecorderStatus as JSON on stdout; exits 0 unless the recorder raised into it.
`step_ids(writer, window, ...)` regenerates exactly what a writer recorded, for the expected sums.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import numpy as np


def step_ids(writer: int, window: int, tokens: int, layers: int, experts: int, top_k: int) -> np.ndarray:
    rng = np.random.default_rng([writer, window])
    # Skewed routing (a few hot experts), distinct experts per token: Gumbel top-k over log-weights.
    logits = np.log(np.arange(1, experts + 1, dtype=np.float64) ** -1.0)[None, None, :]
    noisy = logits + rng.gumbel(size=(tokens, layers, experts))
    return np.argsort(-noisy, axis=2)[:, :, :top_k].astype(np.int32)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("url")
    p.add_argument("model")
    p.add_argument("writer", type=int)
    p.add_argument("windows", type=int)
    p.add_argument("--tokens", type=int, default=8)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--keep", type=int, default=256)
    p.add_argument("--sleep", type=float, default=0.0)
    p.add_argument("--close-timeout", type=float, default=60.0)
    p.add_argument("--op-timeout", type=float, default=5.0)
    a = p.parse_args()

    import logging

    from expertmesh.cluster.stats.recorder import RedisStatsSink

    # Every reply and failure on stderr: the tests show them when a count does not add up.
    logging.basicConfig(level=logging.DEBUG, stream=sys.stderr, format="%(relativeCreated)d %(message)s")

    sink = RedisStatsSink(
        a.url,
        a.model,
        a.layers,
        a.experts,
        a.top_k,
        keep=a.keep,
        min_backoff_s=0.02,
        max_backoff_s=0.2,
        connect_timeout_s=0.5,
        op_timeout_s=a.op_timeout,
    )
    rec = sink.open(f"w{a.writer}")
    for window in range(a.windows):
        ids = step_ids(a.writer, window, a.tokens, a.layers, a.experts, a.top_k)
        half = len(ids) // 2
        rec.record(ids[:half])  # two steps per window
        rec.record(ids[half:])
        rec.flush(window=window)
        if a.sleep:
            time.sleep(a.sleep)
    status = rec.close(timeout_s=a.close_timeout)
    json.dump(dataclasses.asdict(status), sys.stdout)


if __name__ == "__main__":
    main()
