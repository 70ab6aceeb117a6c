"""Where a replica's iterations spend their time, phase by phase (`bench/serve.py` prints it).

Sums of seconds over the iterations that ran a step; `per_step()` gives the means in milliseconds:

  schedule  reaping ended sequences and planning the step (`Scheduler.schedule`)
  inputs    building each worker's (sequence, tokens) lists and sampling parameters
  prepare   the group's checks, packing and sending (`EPGroup.send_step`)
  call      awaiting every worker's output (`EPGroup.step_outputs`), until the replica's loop has its
            turn again: other tasks of the event loop (the streams' consumers) run within it
  worker    inside the slowest worker's `step` call (`StepOutput.call_s`); `forward` of it: the model,
            sampling and the device sync (`StepOutput.seconds`)
  apply     advancing the sequences and queueing their tokens to the streams
  other     the rest of the iteration (metrics, routing statistics)

`call - worker` is Ray's share (the arguments and outputs through the channels, the wakeups) and the loop's.
Overlapped steps (`overlap.py`): `call` is the wait for the step in flight, which ran while the host
planned and sent the next one, so `other` (the iteration's remainder) comes out negative by the overlap.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

__all__ = ["StepTimes"]


@dataclass
class StepTimes:
    steps: int = 0
    tokens: int = 0  # new tokens fed, all workers
    iteration: float = 0.0
    schedule: float = 0.0
    inputs: float = 0.0
    prepare: float = 0.0
    call: float = 0.0
    worker: float = 0.0
    forward: float = 0.0
    apply: float = 0.0

    def add(self, **seconds: float) -> None:
        """Add seconds to the named phases."""
        for name, value in seconds.items():
            setattr(self, name, getattr(self, name) + value)

    def add_step(self, outs, **seconds: float) -> None:
        """One step landed: its workers' figures, and seconds of the named phases."""
        self.steps += 1
        self.add_outputs(outs)
        self.add(**seconds)

    def add_outputs(self, outs) -> None:
        self.worker += max(o.call_s for o in outs)
        self.forward += max(o.seconds for o in outs)
        self.tokens += sum(o.num_tokens for o in outs)

    def snapshot(self) -> StepTimes:
        return StepTimes(**{f.name: getattr(self, f.name) for f in fields(self)})

    def since(self, before: StepTimes) -> StepTimes:
        return StepTimes(**{f.name: getattr(self, f.name) - getattr(before, f.name) for f in fields(self)})

    def per_step(self) -> dict[str, float]:
        """Mean milliseconds per step of each phase, `other` (the iteration's remainder) and `ray`
        (call - worker); `tokens`: mean new tokens per step."""
        n = max(self.steps, 1)
        ms = {f.name: getattr(self, f.name) / n * 1e3 for f in fields(self) if f.name not in ("steps", "tokens")}
        parts = ("schedule", "inputs", "prepare", "call", "apply")
        ms["other"] = ms["iteration"] - sum(ms[p] for p in parts)
        ms["ray"] = ms["call"] - ms["worker"]
        return {"steps": self.steps, "tokens": self.tokens / n, **ms}
