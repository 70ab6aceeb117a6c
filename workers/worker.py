"""`ExpertWorker`: one member of an EP group, one process per GPU (a Ray actor; CPU + gloo in tests).

A worker holds every non-expert weight (attention is data-parallel: each worker serves its own sequences)
and, per MoE layer, the experts its plan gives its rank; it reads only those tensors from the checkpoint.
All workers of a group run every step in lockstep, because each MoE layer is a collective exchange.

The class is plain Python; `expertmesh.workers.group` wraps it with `ray.remote` and drives it.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from expertmesh.kernels.exchange import Exchange
from expertmesh.kernels.moe import Precision
from expertmesh.placement.plan import Placement

from .checkpoint import CheckpointReader, RandomReader, open_weights
from .config import read_model_config
from .decode_graph import DecodeGraphs
from .group_config import GroupConfig
from .kvcache import DEFAULT_KV_BLOCKS
from .model import MoEModel, PackedTokens
from .moe import EPExecutor, LayerMeasure, make_exchange
from .recording import StatsSink, StepRecorder
from .sampling import SamplingParams, sample
from .weights import ExpertShard, load_expert_shard, load_model_weights

__all__ = ["ExpertWorker", "WorkerSpec", "StepOutput", "DTYPES"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs to join its group and load its share (picklable): the group's config, the
    plan it serves, where the process group meets, and the statistics sink."""

    config: GroupConfig
    plan: Placement
    master_addr: str
    master_port: int
    sink: StatsSink | None = None
    gpu: int | None = None  # CUDA device index of this worker; None: the GPU Ray assigned (see _local_gpu_index)


@dataclass
class StepOutput:
    """One worker's answer to a step, in the order of its inputs."""

    seq_ids: list[int]
    tokens: list[int] | None  # sampled next token per sequence (when sampling was asked for)
    logits: np.ndarray | None  # float32 [N, V] of each sequence's last position (when asked for)
    num_tokens: int
    seconds: float  # wall time of the forward pass on this worker (sampling and the device sync included)
    call_s: float = 0.0  # wall time of the whole call inside the worker (the rest is Ray and the driver)
    layers: list[LayerMeasure] = field(default_factory=list)  # per MoE layer, when measured
    # per scored sequence, float32 [n]: log-prob of the token after each new position (`MoEModel.forward`)
    token_logprobs: dict[int, np.ndarray] = field(default_factory=dict)
    routed: np.ndarray | None = None  # int16 [T, L_moe, k] expert ids of the new tokens, in order (when asked)


NOSET_CVD = "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"


def _local_gpu_index() -> int:
    """This actor's GPU as a torch index.

    By default Ray narrows CUDA_VISIBLE_DEVICES to the actor's GPU, which is then cuda:0. The symmetric
    memory exchange needs every process to see all GPUs of the node (each rank maps its peers' buffers),
    so a cluster started with RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES=1 leaves the variable alone and
    the actor picks its assigned GPU by id among the visible ones.
    """
    if torch.cuda.device_count() == 1:
        return 0
    import ray

    ids = [str(i) for i in ray.get_gpu_ids()]
    if not ids:
        raise RuntimeError("no GPU assigned to this worker by Ray (created without num_gpus=1?)")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    order = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
    return order.index(ids[0]) if ids[0] in order else int(ids[0])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class ExpertWorker:
    def __init__(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size
        self.model: MoEModel | None = None
        self.executor: EPExecutor | None = None
        self.shard: ExpertShard | None = None
        self.kv_blocks = 0
        self.reader: CheckpointReader | RandomReader | None = None

    # ---- life cycle ----------------------------------------------------------------------------
    def pid(self) -> int:
        return os.getpid()

    def rendezvous_address(self) -> tuple[str, int]:
        """This node's IP and a free port, for rank 0 to host the process group's store."""
        import ray

        return ray.util.get_node_ip_address(), _free_port()

    def setup(self, spec: WorkerSpec) -> dict:
        """Join the process group and load this rank's weights; returns what was loaded."""
        start = time.perf_counter()
        self.spec, config = spec, spec.config
        # torch defaults to one intra-op thread per core of the host, not of this worker's share: several
        # workers per node would oversubscribe it (vLLM's workers run with one thread too).
        torch.set_num_threads(max(1, int(config.cpus_per_worker)))
        if config.device == "cuda":
            if spec.gpu is not None and not 0 <= spec.gpu < torch.cuda.device_count():
                raise ValueError(f"gpu: expected a CUDA device index in [0, {torch.cuda.device_count()}), "
                                 f"got {spec.gpu}")
            if os.environ.get(NOSET_CVD) == "1" and not os.environ.get("CUDA_VISIBLE_DEVICES"):
                # Ray's compiled graphs map this actor's GPU id through the variable and refuse an empty
                # one; naming every GPU in order changes nothing for a process that sees them all.
                os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, range(torch.cuda.device_count())))
            self.device = torch.device("cuda", _local_gpu_index() if spec.gpu is None else spec.gpu)
            torch.cuda.set_device(self.device)
            backend = "nccl"
        else:
            self.device = torch.device("cpu")
            backend = "gloo"
        dist.init_process_group(
            backend, init_method=f"tcp://{spec.master_addr}:{spec.master_port}", rank=self.rank,
            world_size=self.world_size, timeout=timedelta(seconds=config.timeouts.collective_s),
            device_id=self.device if backend == "nccl" else None,
        )
        self.cfg = read_model_config(config.model)
        self.dtype = DTYPES[config.resolved_dtype(self.cfg.dtype)]
        self.reader = open_weights(config.weights, config.model, self.cfg, self.device, config.seed)
        weights = load_model_weights(self.reader, self.cfg, self.dtype, self.device)
        self.executor = EPExecutor(self.cfg, self.rank, self.world_size, self.device, self.dtype,
                                   config.resolved_precision(self.cfg.quantization), config.replica_rule)
        self.fixed_decode = config.decode_graphs if config.decode_graphs is not None else self.device.type == "cuda"
        self.set_exchange(config.exchange, config.max_tokens)
        self._load_experts(spec.plan)
        self.kv_blocks = self._kv_budget(config)  # from the memory the weights and experts leave
        self.model = MoEModel(self.cfg, weights, self.executor, self.dtype, self.device,
                              decode_graphs=self.fixed_decode, kv_blocks=self.kv_blocks,
                              kv_block_size=config.kv_block_size)
        stats = config.stats
        self.recorder = StepRecorder(spec.sink, f"{stats.run}/worker-{self.rank}", stats.flush_every,
                                     (self.cfg.num_moe_layers, self.cfg.num_experts, self.cfg.top_k), self.device,
                                     group=(self.rank, self.world_size) if stats.shares else None,
                                     reduce=dist.all_reduce)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(config.seed * 1009 + self.rank)
        self._last: dict[int, int] = {}  # sequence -> the token last sampled for it (`step`'s feed)
        return {**self.info(), "load_s": time.perf_counter() - start}

    def _kv_budget(self, config: GroupConfig) -> int:
        """KV-cache blocks this worker may hold: the config's number, else what the memory share leaves (the
        cache allocates them, plus its scratch block, once, when the model is built)."""
        if config.kv_blocks is not None:
            return config.kv_blocks
        if self.device.type != "cuda":
            return DEFAULT_KV_BLOCKS
        free, total = torch.cuda.mem_get_info(self.device)
        cfg = self.cfg
        per_block = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * config.kv_block_size * self.dtype.itemsize
        room = free - (1 - config.kv_memory_fraction) * total
        if room < 2 * per_block:
            raise RuntimeError(f"kv_memory_fraction: {config.kv_memory_fraction} of the GPU leaves no room for one "
                               f"KV block after the weights ({free / 2**30:.1f} of {total / 2**30:.1f} GiB free)")
        return int(room // per_block) - 1  # the scratch block

    def _load_experts(self, plan: Placement) -> None:
        # The experts this rank holds already are copied on the device instead of read; FP8 experts keep no
        # dense copy to take them from, so a re-placement reads them all.
        previous = self.shard if self.executor.precision is not Precision.FP8 else None
        self.shard = None
        shard = load_expert_shard(self.reader, self.cfg, plan.phy2log, plan.num_gpus, self.rank, self.dtype,
                                  self.device, previous)
        del previous
        self.executor.load(plan, shard)
        self.shard, self.plan = shard, plan
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def apply_plan(self, plan: Placement) -> dict:
        """Switch to another placement of the same model: read the experts it gives this rank.

        Every worker must apply the same plan before the next step (the driver does this at a step
        boundary); sequences and their caches are kept.
        """
        self._load_experts(plan)
        return self.info()

    def set_exchange(self, kind: str, max_tokens: int = 0) -> str:
        """Switch the dispatch/combine implementation (collective: every worker calls it together)."""
        fp8 = self.executor.precision.fp8_dispatch
        self.executor.exchange = make_exchange(self.world_size, kind, fp8, max_tokens, self.cfg, self.dtype)
        self.executor.decode_exchange = self._decode_exchange(kind)
        return type(self.executor.exchange).__name__

    def _decode_exchange(self, kind: str) -> Exchange | None:
        """The exchange of the group's fixed-shape decode steps (None: decode runs the variable path)."""
        if self.world_size == 1 or not self.fixed_decode:
            return None
        if kind == "symm_mem":  # capturable: decode steps become CUDA graphs across the ranks
            return make_exchange(self.world_size, kind, self.executor.precision.fp8_dispatch,
                                 DecodeGraphs.max_batch, self.cfg, self.dtype)
        if self.device.type == "cpu":  # the same fixed-shape steps, eagerly (how CPU tests reach them)
            return self.executor.exchange
        # NCCL's all_to_all reads split sizes back, so no graph; padded fixed shapes would only cost.
        return None

    def info(self) -> dict:
        decoder = None if self.model is None else self.model.decoder
        return {
            "rank": self.rank,
            "pid": os.getpid(),
            "device": str(self.device),
            "exchange": type(self.executor.exchange).__name__,
            "plan_version": self.plan.version,
            "precision": self.executor.precision.value,
            "slot_expert": [e.tolist() for e in self.executor.slot_expert],
            "expert_bytes": self.executor.expert_bytes(),
            "tensors_read": sorted(self.reader.names_read),
            "live_sequences": 0 if self.model is None else self.model.cache.live,
            "kv_blocks": self.kv_blocks,
            # decode steps run at fixed shapes, and the CUDA graphs captured for them
            "decode_steps": 0 if decoder is None else decoder.steps,
            "decode_graphs": 0 if decoder is None else decoder.captures,
            "flat_steps": 0 if decoder is None else decoder.flat_steps,  # of the decode steps, with prompt rows
        }

    def shutdown(self) -> None:
        self.recorder.close()
        if dist.is_initialized():
            dist.destroy_process_group()

    # ---- serving -------------------------------------------------------------------------------
    def step(
        self,
        inputs: Sequence[tuple[int, Sequence[int]]] | PackedTokens,
        sampling: SamplingParams | Sequence[SamplingParams] | None = None,
        return_logits: bool = True,
        measure: bool = False,
        pause_s: float = 0.0,
        group_batch: int = 0,
        score: Mapping[int, int] | None = None,
        return_routed: bool = False,
        free: Sequence[int] = (),
        feed: Sequence[int] = (),
    ) -> StepOutput:
        """Prefill or decode `inputs` (sequence id, new token ids) in lockstep with the group.

        `sampling` (one for all inputs, or one per input) asks for next tokens; `measure` times each MoE
        layer's phases (it synchronises the device, so it slows the step); `pause_s` sleeps before the first
        layer (failure tests use it to hold a step open); `group_batch` > 0: the driver found the whole
        group's step decode-only, with at most that many sequences per worker (see `MoEModel.step`);
        `score` (sequence -> the token after its new ones, -1: none) asks for those sequences' token
        log-probabilities (`StepOutput.token_logprobs`); `return_routed` for the gate's expert ids; `free`:
        sequences to drop first (one call instead of a `free` call before the step); `feed`: sequences
        whose one new token is the one this worker sampled for them last (the driver sent this step before
        it knew that token: overlapped steps, `cluster/serve/overlap.py`; their token in `inputs` is ignored).
        """
        if len(free):
            self.model.cache.free([int(s) for s in free])
            for s in free:
                self._last.pop(int(s), None)
        if len(feed):
            inputs = self._fed(inputs, feed)
        return self._run(inputs, None, sampling, return_logits, measure, pause_s, record=True,
                         group_batch=group_batch, score=score, return_routed=return_routed)

    def _fed(self, inputs, feed: Sequence[int]) -> PackedTokens:
        """`inputs` with each fed sequence's (single) new token replaced by the one last sampled for it."""
        packed = inputs if isinstance(inputs, PackedTokens) else PackedTokens.pack(inputs)
        row = {s: i for i, s in enumerate(packed.seq_ids.tolist())}
        starts = np.cumsum(packed.lengths) - packed.lengths
        tokens = packed.tokens.copy()
        for s in feed:
            if packed.lengths[row[int(s)]] != 1:
                raise ValueError(f"feed: sequence {s} must bring exactly one new token")
            tokens[starts[row[int(s)]]] = self._last[int(s)]
        return PackedTokens(packed.seq_ids, packed.lengths, tokens)

    def step_packed(self, args: tuple) -> StepOutput:
        """`step(*args)`: the entry point of the group's compiled graph (one argument per worker)."""
        if self.device.type == "cuda":
            # The graph runs this on a thread of its own, whose current device is not the one setup chose
            # (Triton launches and CUDA graph capture use the current device).
            torch.cuda.set_device(self.device)
        return self.step(*args)

    def replay(
        self,
        inputs: Sequence[tuple[int, Sequence[int]]] | PackedTokens,
        topk_ids: np.ndarray,
        measure: bool = True,
    ) -> StepOutput:
        """A step whose gates are replaced by `topk_ids` int [T, L, k] (one row per new token, in order).

        Used to measure a placement's real dispatch bytes and times with a recorded trace; the sequences
        are freed afterwards and nothing is recorded as statistics.
        """
        ids = torch.tensor(np.asarray(topk_ids), dtype=torch.int64, device=self.device)
        packed = inputs if isinstance(inputs, PackedTokens) else PackedTokens.pack(inputs)
        try:
            return self._run(packed, ids, None, False, measure, 0.0, record=False)
        finally:
            self.model.cache.free(packed.seq_ids.tolist())

    def _run(self, inputs, override, sampling, return_logits, measure, pause_s, record,
             group_batch: int = 0, score: Mapping[int, int] | None = None,
             return_routed: bool = False) -> StepOutput:
        entered = time.perf_counter()
        model = self.model
        if pause_s:
            time.sleep(pause_s)
        start = time.perf_counter()
        result = model.step(inputs, override, group_batch, measure, score)
        tokens = None
        if sampling is not None:
            positions = [model.cache.length[s] for s in result.seq_ids]
            params = [sampling] * len(positions) if isinstance(sampling, SamplingParams) else list(sampling)
            tokens = sample(result.logits, params, positions, self.generator).tolist()
            self._last.update(zip(result.seq_ids, tokens, strict=True))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - start
        if record:
            self.recorder.record(result.routed if self.recorder.recording else None)
        logits = result.logits.cpu().numpy() if return_logits else None
        return StepOutput(
            seq_ids=result.seq_ids,
            tokens=tokens,
            logits=logits,
            num_tokens=result.num_tokens,
            seconds=seconds,
            call_s=time.perf_counter() - entered,
            layers=result.measures,
            token_logprobs={s: v.cpu().numpy() for s, v in result.token_logprobs.items()},
            routed=result.routed.to(torch.int16).cpu().numpy() if return_routed else None,
        )

    def free(self, seq_ids: Sequence[int]) -> list[int]:
        """Drop sequences and their caches; returns the ids this worker did not hold."""
        for s in seq_ids:
            self._last.pop(int(s), None)
        return self.model.cache.free([int(s) for s in seq_ids])

    def capture_decode_graphs(self, rows: int) -> int:
        """Capture the fixed-shape steps' CUDA graphs up to `rows` rows before serving (`DecodeGraphs.
        capture_sizes`; the engine calls it on every worker at once); returns the graphs captured."""
        if self.model.decoder is None:
            return 0
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        return self.model.decoder.capture_sizes(rows)

    def flush_stats(self) -> None:
        self.recorder.flush()

