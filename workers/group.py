"""`EPGroup`: the driver's handle on one expert-parallel group of `ExpertWorker` Ray actors.

    group = EPGroup.create(GroupConfig(model=model_dir, plan="plan.json", workers=2, device="cuda"))
    out = group.step([[(0, prompt_a)], [(1, prompt_b)]], sampling=GREEDY)   # one list per worker
    group.free([0, 1]); group.shutdown()

The group is created as a unit (a placement group of one bundle per worker, then one `torch.distributed`
process group: NCCL on GPUs, gloo on CPUs) and fails as a unit: NCCL and gloo groups do not survive the
loss of a member, so when a worker dies or a step outlives its timeout, every worker is killed, the step
raises `WorkerFailure` or `StepTimeout`, and the caller creates a new group.

Sequences live on the worker that first received them (their home: data-parallel attention keeps their
cache there); the group remembers homes and refuses a step that sends a sequence elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray
from ray.exceptions import RayActorError, RayTaskError

from expertmesh.placement.plan import Placement, load_plan

from .actors import GroupError, StepTimeout, WorkerActors, WorkerFailure
from .checkpoint import CheckpointReader
from .config import ModelConfig, read_model_config
from .decode_graph import group_rows
from .group_config import GroupConfig
from .ledger import SequenceLedger, StepInputs, pack_inputs
from .model import PackedTokens
from .plans import PlanMismatchError, check_plan, contiguous_plan
from .recording import StatsSink
from .sampling import GREEDY, SamplingParams
from .worker import NOSET_CVD, StepOutput, WorkerSpec

__all__ = ["EPGroup", "SentStep", "GroupError", "WorkerFailure", "StepTimeout", "PlanMismatchError", "contiguous_plan"]


@dataclass(frozen=True)
class SentStep:
    """A step sent to the workers and not yet awaited (`EPGroup.send_step`, `EPGroup.step_outputs`)."""

    refs: list
    compiled: bool  # through the compiled graph (its outputs are read from channels)
    what: str  # "step N", for errors


class EPGroup:
    def __init__(self, workers: WorkerActors, config: GroupConfig, cfg: ModelConfig, plan: Placement) -> None:
        self._workers = workers
        self._actors, self._compiled = workers.actors, workers.compiled
        self.config, self.model_config, self.plan = config, cfg, plan
        self.model_dir, self.device = config.model, config.device
        self.step_timeout_s = config.timeouts.step_s
        self.max_tokens = config.max_tokens if config.exchange == "symm_mem" else 0  # per worker and step
        self.compiled_steps = config.compiled_steps  # steps through a Ray compiled graph (compiled_steps.py)
        self.flat_tokens = 0  # prompt tokens a fixed-shape (flat) step may take per worker (decode_graph.py)
        self.infos: list[dict] = []
        self.ledger = SequenceLedger(config.kv_block_size, [])  # budgets arrive with the workers' setup
        self.steps = 0

    @classmethod
    def create(cls, config: GroupConfig | str | Path, *, plan: Placement | None = None,
               sink: StatsSink | None = None) -> EPGroup:
        """Start the group `config` describes (a `GroupConfig`, or a YAML/JSON file of one).

        plan: a `Placement` to serve instead of `config.plan` (e.g. one computed in this process). sink: where
        routing statistics go (see `recording.StatsSink`; e.g. `expertmesh.cluster.RedisStatsSink`).
        Everything is checked before Ray starts: the checkpoint, the plan against it, the config; a Ray this
        call started is shut down again when the group cannot be created.
        """
        config, cfg, plan, num_workers = cls.check(config, plan=plan)
        started_ray = not ray.is_initialized()
        if started_ray:
            # Workers then see every GPU of their node and pick theirs (the symm_mem exchange needs that).
            os.environ.setdefault(NOSET_CVD, "1")
            ray.init()
        try:
            return cls._start(config, cfg, plan, num_workers, sink)
        except BaseException:
            if started_ray:
                ray.shutdown()
            raise

    @classmethod
    def check(cls, config: GroupConfig | str | Path, *, plan: Placement | None = None
              ) -> tuple[GroupConfig, ModelConfig, Placement, int]:
        """What `create` checks before any process starts (the config, the checkpoint, the plan against it),
        for callers that start Ray themselves: (config, model config, plan, number of workers)."""
        if not isinstance(config, GroupConfig):
            config = GroupConfig.load(config)
        cfg = read_model_config(config.model)
        if config.weights == "checkpoint":
            CheckpointReader(config.model)  # a folder without the tensors fails here
        if plan is None and config.plan is not None:
            plan = load_plan(config.plan)
        if plan is None:
            plan = contiguous_plan(cfg.num_moe_layers, cfg.num_experts, config.workers or 1)
        num_workers = config.workers or plan.num_gpus
        check_plan(plan, cfg, num_workers, config.model)
        return config, cfg, plan, num_workers

    @classmethod
    def _start(cls, config: GroupConfig, cfg: ModelConfig, plan: Placement, num_workers: int,
               sink: StatsSink | None) -> EPGroup:
        group = cls(WorkerActors.start(config, num_workers), config, cfg, plan)
        setup_s = config.timeouts.setup_s
        addr, port = group._workers.call([group._actors[0].rendezvous_address.remote()], setup_s, "rendezvous")[0]
        spec = WorkerSpec(config=config, plan=plan, master_addr=addr, master_port=port, sink=sink)
        group.infos = group._workers.call([a.setup.remote(spec) for a in group._actors], setup_s, "setup")
        group._workers.pids = [info["pid"] for info in group.infos]
        group.ledger = SequenceLedger(config.kv_block_size, [info["kv_blocks"] for info in group.infos])
        return group

    @property
    def num_workers(self) -> int:
        return len(self._actors)

    @property
    def usable(self) -> bool:
        """False once a failure or `shutdown` has torn the group down."""
        return self._workers.broken is None

    def shutdown(self) -> None:
        """Flush statistics, leave the process group and stop every worker (idempotent)."""
        if self._workers.broken is None:
            self._compiled.release()
            with contextlib.suppress(GroupError):
                self._workers.call([a.shutdown.remote() for a in self._actors], 60.0, "shutdown")
        if self._workers.broken is None:
            self._workers.teardown("shut down")

    def __enter__(self) -> EPGroup:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # ---- serving -------------------------------------------------------------------------------
    @property
    def home(self) -> dict[int, int]:
        """Home worker of every live sequence."""
        return self.ledger.home

    def _prepare(self, inputs: StepInputs, sampling, return_logits: bool, measure: bool,
                 pause_s: Sequence[float] | None, score: Sequence[Mapping[int, int]] | None = None,
                 routed: bool = False, free: Sequence[int] = ()) -> list[tuple]:
        """Check a step and build each worker's `step` arguments (nothing is sent or recorded, except that
        the ledger forgets `free`, whose workers drop them at the start of the step)."""
        self._workers.check_usable()
        freed = self.ledger.drop(free) if len(free) else {}
        try:
            checked = pack_inputs(inputs, self.ledger, self.model_config.vocab_size, self.max_tokens)
        except Exception:
            for rank, ids in freed.items():  # the step will not carry them
                self._actors[rank].free.remote(ids)
            raise
        if score is not None and len(score) != self.num_workers:
            raise ValueError(f"score: expected one mapping per worker ({self.num_workers}), got {len(score)}")
        score = [dict(m) if m else None for m in score] if score is not None else [None] * self.num_workers
        if sampling is not None and not isinstance(sampling, SamplingParams):
            if len(sampling) != self.num_workers or any(
                    len(s) != len(b) for s, b in zip(sampling, inputs, strict=True)):
                raise ValueError("sampling: expected one SamplingParams, or one per input of every worker")
            # One object when a worker's inputs share their parameters: 256 pickled dataclasses per decode
            # step cost ~1 ms on each side of the call.
            sampling = [s[0] if s and all(p == s[0] for p in s) else list(s) for s in sampling]
        else:
            sampling = [sampling] * self.num_workers
        pause = list(pause_s) if pause_s is not None else [0.0] * self.num_workers
        batch = 0 if any(score) else self._group_batch(checked, measure)  # scored steps take the variable path
        return [(b, sampling[rank], return_logits, measure, pause[rank], batch, score[rank], routed,
                 freed.get(rank, [])) for rank, b in enumerate(checked)]

    def step(
        self,
        inputs: StepInputs,
        sampling: SamplingParams | Sequence[Sequence[SamplingParams]] | None = None,
        return_logits: bool = True,
        measure: bool = False,
        pause_s: Sequence[float] | None = None,
        score: Sequence[Mapping[int, int]] | None = None,
    ) -> list[StepOutput]:
        """One lockstep step: `inputs[w]` is worker w's list of (sequence id, new token ids).

        A new sequence is prefilled, a known one continues from its cache. Returns one `StepOutput` per
        worker with the last position's logits (unless `return_logits=False`) and, when `sampling` is
        given (one `SamplingParams` for all, or one per input), the next token of every sequence.
        `score[w]` maps sequences of worker w to the token that follows their new tokens (-1: none); their
        token log-probabilities come back in `StepOutput.token_logprobs`.
        `pause_s[w]` holds worker w before its first layer (for failure tests). A step that would outgrow a
        worker's KV blocks raises `KVBudgetError` before anything runs.
        """
        args = self._prepare(inputs, sampling, return_logits, measure, pause_s, score)
        what = f"step {self.steps}"
        if self.compiled_steps:
            outputs = self._workers.graph_call(args, self.step_timeout_s, what)
        else:
            outputs = self._workers.call([a.step.remote(*x) for a, x in zip(self._actors, args, strict=True)],
                                 self.step_timeout_s, what)
        self.ledger.commit(inputs)
        self.steps += 1
        return outputs

    def send_step(
        self,
        inputs: StepInputs,
        sampling: SamplingParams | Sequence[Sequence[SamplingParams]] | None = None,
        return_logits: bool = True,
        score: Sequence[Mapping[int, int]] | None = None,
        routed: bool = False,
        free: Sequence[int] = (),
        feed: Sequence[Sequence[int]] | None = None,
    ) -> SentStep:
        """Check and send one step without waiting for it; `step_outputs` awaits it.

        Every worker runs the steps it is sent in order, so a caller may send step N+1 before awaiting step
        N (the engine's overlapped steps). `feed[w]`: sequences of worker w whose new token is a placeholder
        for the token the worker sampled for them last. `routed`: each worker's output carries its tokens'
        expert ids (`StepOutput.routed`). `free`: finished sequences, dropped by their workers before this
        step's tokens (no call of their own). Other arguments as in `step`.
        """
        args = self._prepare(inputs, sampling, return_logits, False, None, score, routed, free)
        if feed is not None:
            args = [(*a, list(f)) for a, f in zip(args, feed, strict=True)]
        what = f"step {self.steps}"
        if self.compiled_steps:
            refs = self._compiled.execute(args)
        else:
            refs = [a.step.remote(*x) for a, x in zip(self._actors, args, strict=True)]
        self.ledger.commit(inputs)
        self.steps += 1
        return SentStep(refs, self.compiled_steps, what)

    async def step_outputs(self, sent: SentStep) -> list[StepOutput]:
        """A sent step's outputs, awaited without blocking the loop (a compiled graph's channels are read in a
        thread). Failures are handled as in `step`: the group is torn down, `WorkerFailure` / `StepTimeout`."""
        if sent.compiled:
            return await asyncio.to_thread(self._workers.graph_get, sent.refs, self.step_timeout_s, sent.what)
        return await self._gather(sent.refs, sent.what)

    async def step_async(
        self,
        inputs: StepInputs,
        sampling: SamplingParams | Sequence[Sequence[SamplingParams]] | None = None,
        return_logits: bool = True,
        score: Sequence[Mapping[int, int]] | None = None,
        routed: bool = False,
        free: Sequence[int] = (),
    ) -> list[StepOutput]:
        """`step` for an asyncio loop: `send_step`, then `step_outputs`."""
        return await self.step_outputs(self.send_step(inputs, sampling, return_logits, score, routed, free))

    async def _gather(self, refs: list, what: str) -> list:
        """`_call` for an asyncio loop: await one call per worker, with the same failure handling."""
        try:
            return await asyncio.wait_for(asyncio.gather(*refs), self.step_timeout_s)
        except TimeoutError:
            await asyncio.to_thread(self._workers.timed_out, what, list(range(len(refs))), self.step_timeout_s)
        except (RayActorError, RayTaskError) as err:
            # Finding the dead worker and tearing down block on Ray for up to seconds: not on the event loop,
            # where other replicas' streams run.
            await asyncio.to_thread(self._workers.failed, what, self._workers.rank_of(err), err)

    def _group_batch(self, checked: list[PackedTokens], measure: bool) -> int:
        """`decode_graph.group_rows`: the most rows of a worker when every worker's step fits fixed shapes
        (decode-only; flat, with up to `flat_tokens` prompt tokens, when the engine sets it), else 0. The
        decision is the driver's because every worker must take the same path: each MoE layer is a
        collective, and the fixed-shape steps exchange through buffers of their own."""
        if measure or (self.num_workers == 1 and not self.flat_tokens):
            return 0
        return group_rows(checked, self.ledger.length, self.flat_tokens)

    def replay(
        self,
        inputs: Sequence[Sequence[tuple[int, Sequence[int]]]],
        topk_ids: Sequence[np.ndarray],
        measure: bool = True,
    ) -> list[StepOutput]:
        """A step whose gates are replaced by `topk_ids[w]` int [T_w, L, k] (T_w = worker w's new tokens).

        The sequences must be new; they are freed afterwards, and nothing is recorded as statistics.
        """
        self._workers.check_usable()
        for batch in inputs:
            for seq, _ in batch:
                if int(seq) in self.home:
                    raise ValueError(f"inputs: replay needs new sequences, {seq} is live")
        checked = pack_inputs(inputs, self.ledger, self.model_config.vocab_size, self.max_tokens)
        self._compiled.release()  # model work and collectives on the actors' own thread: not beside the graph's
        refs = [
            actor.replay.remote(batch, np.asarray(ids, dtype=np.int32), measure)
            for actor, batch, ids in zip(self._actors, checked, topk_ids, strict=True)
        ]
        return self._workers.call(refs, self.step_timeout_s, f"replay {self.steps}")

    def free(self, seq_ids: Sequence[int]) -> None:
        """Drop finished sequences from their home workers (unknown ids are ignored)."""
        self._workers.check_usable()
        by_rank = self.ledger.drop(seq_ids)
        refs = [self._actors[r].free.remote(ids) for r, ids in by_rank.items()]
        if refs:
            self._workers.call(refs, self.step_timeout_s, "free")

    def free_async(self, seq_ids: Sequence[int]) -> Awaitable[None]:
        """`free` for an asyncio loop: the ledger forgets the sequences and the calls are sent now (each
        worker runs them before any later step); await the result to see a failure."""
        self._workers.check_usable()
        by_rank = self.ledger.drop(seq_ids)
        return self._gather([self._actors[r].free.remote(ids) for r, ids in by_rank.items()], "free")

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        sampling: SamplingParams = GREEDY,
        first_seq_id: int = 0,
    ) -> list[list[int]]:
        """Generate `max_new_tokens` for each prompt; prompt i gets home worker i mod num_workers."""
        ids = list(range(first_seq_id, first_seq_id + len(prompts)))
        homes = [i % self.num_workers for i in range(len(prompts))]
        pending = [list(p) for p in prompts]
        generated: list[list[int]] = [[] for _ in prompts]
        for _ in range(max_new_tokens):
            inputs: list[list[tuple[int, list[int]]]] = [[] for _ in range(self.num_workers)]
            for i, (seq, toks) in enumerate(zip(ids, pending, strict=True)):
                inputs[homes[i]].append((seq, toks))
            outs = self.step(inputs, sampling=sampling, return_logits=False)
            where = {seq: tok for out in outs for seq, tok in zip(out.seq_ids, out.tokens, strict=True)}
            for i, seq in enumerate(ids):
                generated[i].append(where[seq])
                pending[i] = [where[seq]]
        self.free(ids)
        return generated

    def apply_plan(self, plan: Placement | str | Path) -> None:
        """Re-place experts at a step boundary: every worker reads the experts the new plan gives it."""
        self._workers.check_usable()
        if isinstance(plan, (str, Path)):
            plan = load_plan(plan)
        check_plan(plan, self.model_config, self.num_workers, self.model_dir)
        self._compiled.release()
        self.infos = self._workers.call([a.apply_plan.remote(plan) for a in self._actors], self.step_timeout_s,
                                "apply_plan")
        self.plan = plan

    def set_exchange(self, kind: str, max_tokens: int = 0) -> None:
        """Switch every worker's dispatch/combine implementation at a step boundary."""
        self._workers.check_usable()
        config = self.config.replace(exchange=kind, max_tokens=max_tokens)  # validates the pair
        self._compiled.release()
        self._workers.call([a.set_exchange.remote(kind, max_tokens) for a in self._actors], self.step_timeout_s,
                   "set_exchange")
        self.config = config
        self.max_tokens = max_tokens if kind == "symm_mem" else 0

    def capture_decode_graphs(self, rows: int) -> None:
        """Capture now every fixed-shape step's CUDA graph up to `rows` rows per worker (a capture inside a
        served step stalls every stream); nothing where steps run eagerly."""
        self._workers.check_usable()
        self._workers.call([a.capture_decode_graphs.remote(rows) for a in self._actors], self.config.timeouts.setup_s,
                           "capture_decode_graphs")

    def worker_info(self) -> list[dict]:
        self._workers.check_usable()
        return self._workers.call([a.info.remote() for a in self._actors], self.step_timeout_s, "info")

    def flush_stats(self) -> None:
        self._workers.check_usable()
        self._workers.call([a.flush_stats.remote() for a in self._actors], self.step_timeout_s, "flush_stats")

    def pids(self) -> list[int]:
        return [info["pid"] for info in self.infos]
