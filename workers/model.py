"""Serving the Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE families over a flat token batch with a KV cache.

One worker runs the whole stack for its own sequences (data-parallel attention); only the routed experts
of MoE layers leave the worker, through an `ExpertExecutor` (dispatch -> grouped GEMM -> combine). The
family's math is `families.MoECausalLM` (the module training runs too); this file adds what serving needs
around it: attention over the paged KV cache, fixed-shape decode steps, routing replay and measurement.

Notation: T tokens of this step on this worker (all sequences, flattened in input order), N sequences,
H hidden, Q heads, KV key/value heads, D head dim, k experts per token, V vocabulary.

A step is a list of (sequence, new tokens); a sequence seen for the first time is a prefill, one with a
cache continues (decode when it brings one token). The step's new keys and values go into the cache first
(`kernels.paged_attention.write_kv`), then attention runs once per group of sequences with the same number
of new tokens n: prefills without a past over their own keys (SDPA, causal), one-token rows through the
paged decode kernel, chunks over a past through `prefill_attention` (the past gathered, then SDPA).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from expertmesh.kernels.paged_attention import decode_attention, prefill_attention, write_kv

from .config import ModelConfig
from .decode_graph import HEADER
from .families import MoECausalLM
from .kvcache import DEFAULT_KV_BLOCKS, PagedKVCache, SequenceError
from .moe import PLAIN_STEP, LayerMeasure, StepContext

__all__ = ["MoEModel", "StepBatch", "StepResult", "ExpertExecutor", "build_batch"]


class ExpertExecutor(Protocol):
    """Routed-expert output of one MoE layer for this worker's tokens (collective: every worker calls it).

    world_size: ranks of the EP group. fixed_decode: fixed-shape decode steps can run (always on one rank;
    several ranks need an exchange for them). capturable: such steps read nothing back to the host, so a
    CUDA graph may record them. version: changes whenever the weights or exchanges are replaced.
    """

    world_size: int
    version: int

    @property
    def fixed_decode(self) -> bool: ...

    @property
    def capturable(self) -> bool: ...

    def __call__(self, moe_layer: int, hidden: torch.Tensor, topk_ids: torch.Tensor,
                 topk_weights: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """hidden [T, H], topk_ids int64 [T, k], topk_weights float32 [T, k] -> [T, H]."""
        ...


@dataclass
class AttentionGroup:
    """The B sequences of one step with the same number of new tokens n."""

    n: int
    token_index: torch.Tensor  # int64 [B * n]: rows of the flat batch, sequence-major
    row_range: tuple[int, int] | None  # (first, end) when those rows are consecutive: a slice, no gather
    table: torch.Tensor | None  # int32 [B, W] block tables; None: prefills without a past (attend to the new keys)
    lengths: torch.Tensor | None  # int32 [B]: past + n, the keys each sequence attends over
    keys: int  # max(past) + n

    @property
    def size(self) -> int:
        return self.token_index.shape[0] // self.n

    def rows(self, t: torch.Tensor) -> torch.Tensor:
        """The group's rows of a flat-batch tensor t [T, ...]."""
        return t[self.row_range[0] : self.row_range[1]] if self.row_range else t.index_select(0, self.token_index)


@dataclass
class StepBatch:
    seq_ids: list[int]
    new_tokens: list[int]
    token_ids: torch.Tensor  # int64 [T]
    positions: torch.Tensor  # int64 [T]
    slots: torch.Tensor  # int64 [T]: flat cache slot (block * block_size + offset) of each new token
    last_index: torch.Tensor  # int64 [N]: row of each sequence's last new token
    groups: list[AttentionGroup]

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.shape[0])


@dataclass(frozen=True)
class PackedTokens:
    """A step's inputs for one worker as three arrays (how the group ships them: one buffer each, not one
    Python object per sequence): sequence ids, new tokens per sequence, and all new tokens in order."""

    seq_ids: np.ndarray  # int64 [N]
    lengths: np.ndarray  # int64 [N]
    tokens: np.ndarray  # int32 [sum(lengths)]

    @classmethod
    def pack(cls, inputs: Sequence[tuple[int, Sequence[int]]]) -> PackedTokens:
        arrays = [np.asarray(t).reshape(-1) for _, t in inputs]
        return cls(
            np.fromiter((int(s) for s, _ in inputs), np.int64, len(inputs)),
            np.fromiter((a.size for a in arrays), np.int64, len(arrays)),
            np.concatenate(arrays).astype(np.int32, copy=False) if arrays else np.zeros(0, np.int32),
        )


def _as_packed(inputs: Sequence[tuple[int, Sequence[int]]] | PackedTokens) -> PackedTokens:
    return inputs if isinstance(inputs, PackedTokens) else PackedTokens.pack(inputs)


def _check_step(packed: PackedTokens) -> tuple[list[int], list[int]]:
    """(sequence ids, new tokens per sequence) of a step, refused when a sequence repeats or brings nothing."""
    seq_ids = packed.seq_ids.tolist()
    if len(set(seq_ids)) != len(seq_ids):
        raise SequenceError(f"seq_ids: a sequence appears twice in one step ({sorted(seq_ids)})")
    new = packed.lengths.tolist()
    for s, n in zip(seq_ids, new, strict=True):
        if not n:
            raise SequenceError(f"tokens: sequence {s} brings no new token")
    return seq_ids, new


def build_batch(cache: PagedKVCache, inputs: Sequence[tuple[int, Sequence[int]]] | PackedTokens,
                device: torch.device) -> StepBatch:
    """Check a step's (sequence id, new token ids) list, admit its cache blocks, lay out the attention groups."""
    packed = _as_packed(inputs)
    seq_ids, new = _check_step(packed)
    pasts = cache.admit(seq_ids, new)
    # Per-token index maps, vectorised: a 32k-token prefill must not cost Python loops per token.
    counts = packed.lengths
    starts = np.concatenate([[0], np.cumsum(counts)])
    T = int(starts[-1])
    flat = packed.tokens.astype(np.int64)
    seq_of = np.repeat(np.arange(len(new)), counts)
    positions = np.asarray(pasts, dtype=np.int64)[seq_of] + np.arange(T) - starts[:-1][seq_of]
    slots = cache.slots(seq_ids, positions, counts)

    by_n: dict[int, list[int]] = {}
    for i, n in enumerate(new):
        by_n.setdefault(n, []).append(i)
    groups = []
    for n, members in sorted(by_n.items()):
        g_pasts = [pasts[i] for i in members]
        rows = (starts[members][:, None] + np.arange(n)[None, :]).ravel()
        keys = max(g_pasts) + n
        table = lengths = None
        if n == 1 or keys > n:  # a past to read (one-token rows always take the decode kernel)
            table = torch.from_numpy(cache.table([seq_ids[i] for i in members], cache.blocks_for(keys))).to(device)
            lengths = torch.tensor([p + n for p in g_pasts], dtype=torch.int32, device=device)
        in_order = bool(np.all(np.diff(rows) == 1))
        groups.append(AttentionGroup(
            n=n,
            token_index=torch.from_numpy(rows).to(device),
            row_range=(int(rows[0]), int(rows[-1]) + 1) if in_order else None,
            table=table, lengths=lengths, keys=keys,
        ))
    return StepBatch(
        seq_ids=seq_ids, new_tokens=new,
        token_ids=torch.from_numpy(flat).to(device),
        positions=torch.from_numpy(positions).to(device),
        slots=torch.from_numpy(slots).to(device),
        last_index=torch.from_numpy(starts[1:] - 1).to(device),
        groups=groups,
    )


# Attention backends we let SDPA choose from. Not cuDNN: torch picks its fused kernel for bf16 on H100/H200,
# and it builds an execution plan per new shape, so every decode step (one more key than the last) paid for
# a fresh plan: ~40-60 ms per step at any batch size on the device, in our model and in transformers alike.
# Flash and memory-efficient attention take any length as it comes.
_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@dataclass(frozen=True)
class StepResult:
    seq_ids: list[int]
    num_tokens: int
    logits: torch.Tensor  # float32 [N, V] of each sequence's last new token
    routed: torch.Tensor  # int64 [T, L_moe, k] expert ids of every new token
    measures: list[LayerMeasure] = field(default_factory=list)  # per MoE layer, when the step was measured
    token_logprobs: dict[int, torch.Tensor] = field(default_factory=dict)  # scored sequences (see `forward`)


class MoEModel:
    """The forward pass of one worker over `module` (its family's `MoECausalLM`, without routed experts: the
    executor holds them), in inference mode on `device` in `dtype`.

    `decode_graphs` runs steps where every sequence brings one token through `DecodeGraphs`: fixed shapes,
    captured as CUDA graphs on a GPU when the executor allows it (a decode step is launch-bound: hundreds
    of small kernels for ~1 ms of GPU work), the same computation run eagerly elsewhere.
    `kv_blocks` blocks of `kv_block_size` tokens are the worker's KV budget, allocated here once (`cache`).
    """

    def __init__(self, cfg: ModelConfig, module: MoECausalLM, executor: ExpertExecutor,
                 dtype: torch.dtype, device: torch.device, decode_graphs: bool = False,
                 kv_blocks: int = DEFAULT_KV_BLOCKS, kv_block_size: int = 16) -> None:
        self.cfg, self.module, self.executor = cfg, module.eval().requires_grad_(False), executor
        self.dtype, self.device = dtype, device
        self.cache = PagedKVCache(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, kv_block_size, kv_blocks, dtype,
                                  device)
        module.rope(torch.zeros(1, dtype=torch.int64, device=device), dtype)  # caches the frequencies before any graph
        self.decoder = None
        if decode_graphs:
            from .decode_graph import DecodeGraphs  # it drives this class

            self.decoder = DecodeGraphs(self, capture=device.type == "cuda")

    # ---- attention over the paged cache (the cores the family's attention runs) ------------------------
    def _attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   batch: StepBatch) -> torch.Tensor:
        """[T, Q, D]: the step's keys into the cache, then each group over its past and new keys."""
        T, Q, D = q.shape
        if T == 0:  # a worker without sequences this step still takes part in the MoE collectives
            return q
        KV = k.shape[1]
        k_cache, v_cache = self.cache.k[layer], self.cache.v[layer]
        write_kv(k_cache, v_cache, k, v, batch.slots)
        out = torch.empty((T, Q, D), dtype=q.dtype, device=q.device)
        for g in batch.groups:
            B, n = g.size, g.n
            rows = g.rows(q)
            if g.table is None:  # prefills without a past: causal over their own new keys
                kg, vg = (g.rows(t).reshape(B, n, KV, D).transpose(1, 2) for t in (k, v))
                og = F.scaled_dot_product_attention(rows.reshape(B, n, Q, D).transpose(1, 2), kg, vg,
                                                    is_causal=n > 1, enable_gqa=KV != Q)
                og = og.transpose(1, 2).reshape(B * n, Q, D)
            elif n == 1:
                og = decode_attention(rows, k_cache, v_cache, g.table, g.lengths)
            else:
                og = prefill_attention(rows.reshape(B, n, Q, D), k_cache, v_cache, g.table, g.lengths,
                                       g.keys).reshape(B * n, Q, D)
            if g.row_range:
                out[g.row_range[0] : g.row_range[1]] = og
            else:
                out[g.token_index] = og
        return out

    def _decode_attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          slots: torch.Tensor, table: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """[B, Q, D]: B one-token rows, their keys written to `slots`, each over its `lengths` keys through its
        block table row; shapes fixed by (B, table columns), what the decode kernel reads fixed by lengths."""
        k_cache, v_cache = self.cache.k[layer], self.cache.v[layer]
        write_kv(k_cache, v_cache, k, v, slots)
        return decode_attention(q, k_cache, v_cache, table, lengths)

    def _stack(self, token_ids: torch.Tensor, positions: torch.Tensor, attend, override_ids: torch.Tensor | None,
               ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor]:
        """The family's stack with `attend` as attention core and the executor as routed experts.
        Returns (final hidden states [T, H], routed ids int64 [T, L_moe, k])."""
        def routed(moe_layer, x, ids, weights):
            return self.executor(moe_layer, x, ids, weights, ctx)

        with sdpa_kernel(_SDPA_BACKENDS):
            x, routings = self.module.hidden(token_ids, positions, attend, routed, override_ids)
        return x, torch.stack([r.ids for r in routings], dim=1)  # every model has an MoE layer (ModelConfig)

    @torch.inference_mode()
    def logits(self, last: torch.Tensor) -> torch.Tensor:
        """float32 [N, V] next-token logits of final hidden states [N, H]."""
        return self.module.logits(last)

    @torch.inference_mode()
    def forward(self, batch: StepBatch, override_ids: torch.Tensor | None = None,
                ctx: StepContext = PLAIN_STEP, score: Mapping[int, int] | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor, dict[int, torch.Tensor]]:
        """Run the stack for one step.

        override_ids: int64 [T, L_moe, k] expert ids that replace the gate's choice (routing replay).
        ctx: what the MoE layers need to know about the step (measurement).
        score: sequence -> the token that follows its new tokens (-1: none known) for the sequences whose
        token log-probabilities are wanted.
        Returns (logits float32 [N, V] of each sequence's last new token, routed ids int64 [T, L_moe, k],
        per scored sequence float32 [n]: the log-probability of the token after each of its n new positions,
        i.e. of its next new token and, at the last position, of `score[seq]` (NaN for -1)).
        """
        want = (batch.num_tokens, self.cfg.num_moe_layers, self.cfg.top_k)
        if override_ids is not None and tuple(override_ids.shape) != want:
            raise ValueError(f"topk_ids: expected shape {list(want)}, got {list(override_ids.shape)}")
        x, routed = self._stack(batch.token_ids, batch.positions,
                                lambda layer, q, k, v: self._attention(layer, q, k, v, batch), override_ids, ctx)
        self.cache.commit(batch.seq_ids, batch.new_tokens)
        scored = self._token_logprobs(x, batch, score) if score else {}
        return self.logits(x.index_select(0, batch.last_index)), routed, scored

    def _token_logprobs(self, x: torch.Tensor, batch: StepBatch, score: Mapping[int, int],
                        rows_per_pass: int = 1024) -> dict[int, torch.Tensor]:
        """Log-probabilities of each scored sequence's following tokens from its final states in x [T, H],
        `rows_per_pass` rows at a time (a prefill's [T, V] logits at once would hold gigabytes)."""
        out = {}
        for seq, n, last in zip(batch.seq_ids, batch.new_tokens, batch.last_index.tolist(), strict=True):
            if seq not in score:
                continue
            first = last - n + 1
            after = torch.tensor([max(score[seq], 0)], device=x.device)
            targets = torch.cat([batch.token_ids[first + 1 : last + 1], after])
            parts = []
            for a in range(first, last + 1, rows_per_pass):
                b = min(a + rows_per_pass, last + 1)
                logprobs = torch.log_softmax(self.logits(x[a:b]), dim=-1)
                parts.append(logprobs.gather(-1, targets[a - first : b - first, None])[:, 0])
            values = torch.cat(parts)
            if score[seq] < 0:
                values[-1] = float("nan")
            out[seq] = values
        return out

    def _fixed_decode(self, packed: PackedTokens, override_ids: torch.Tensor | None, group_batch: int,
                      measure: bool) -> bool:
        """Whether this step runs through the decoder (fixed shapes, CUDA graphs where capturable)."""
        ex = self.executor
        if self.decoder is None or override_ids is not None or measure:
            return False  # a measured step must count only real tokens, not padding
        decode = bool(np.all(packed.lengths == 1))
        if ex.world_size == 1:
            if decode:
                return 0 < len(packed.seq_ids) <= self.decoder.max_batch
            # A flat step (prefill chunks as one-token rows) only when the driver found it short enough
            # (`decode_graph.fixed_rows` over its ledger, which holds this cache's lengths).
            return 0 < int(packed.lengths.sum()) <= group_batch
        if not group_batch or not ex.fixed_decode:
            return False
        rows = int(packed.lengths.sum())
        if not rows <= group_batch <= self.decoder.max_batch:
            raise ValueError(f"group_batch: a fixed-shape step of {group_batch} rows per rank needs "
                             f"<= {group_batch} rows on every rank, this one got "
                             f"{len(packed.seq_ids)} sequences of {packed.lengths.tolist()[:8]} tokens")
        return True

    @torch.inference_mode()
    def decode_forward(self, inputs: torch.Tensor, ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor]:
        """One new token for each of B rows, every shape fixed by inputs int32 [4 + W, B] (token ids,
        positions, flat cache slots, lengths, then the block table transposed: `DecodeGraphs` lays it out),
        nothing read back to the host: what a CUDA graph captures.

        Padding rows write to the cache's scratch block and attend over it; `ctx.fixed_batch` is B (every
        rank of the group pads to it). Does not commit: the caller advances the lengths.
        Returns (final hidden states [B, H], routed ids int64 [B, L_moe, k]); `logits` maps the real rows'
        states to logits outside the graph, whose outputs stay allocated per batch size ([B, V] float32
        logits at every size up to 512 would hold ~10 GB for a 152k vocabulary).
        """
        tokens, positions, slots, lengths = inputs[:HEADER]
        table = inputs[HEADER:].t()  # [B, W], strides (1, B)
        return self._stack(
            tokens, positions,
            lambda layer, q, k, v: self._decode_attention(layer, q, k, v, slots, table, lengths), None, ctx)

    def step(self, inputs: Sequence[tuple[int, Sequence[int]]] | PackedTokens,
             override_ids: torch.Tensor | None = None, group_batch: int = 0, measure: bool = False,
             score: Mapping[int, int] | None = None) -> StepResult:
        """Prefill or decode one step of (sequence id, new token ids); decode-only steps take the decoder.

        group_batch: > 0 when the driver found every rank's step fit for fixed shapes (decode-only, or flat:
        `decode_graph.fixed_rows`): the group's most rows, to which several ranks pad (the ranks must take
        the same path, since each MoE layer is a collective). One rank takes decode-only steps there
        alone, flat ones only when allowed. measure: time every MoE layer (`StepResult.measures`).
        score: token log-probabilities of these sequences (see `forward`); such a step takes the variable path.
        """
        packed = _as_packed(inputs)
        if not score and self._fixed_decode(packed, override_ids, group_batch, measure):
            seq_ids, new = _check_step(packed)
            pasts = self.cache.admit(seq_ids, new)
            batch = group_batch if self.executor.world_size > 1 else 0  # one rank pads to its own rows
            logits, routed = self.decoder.run(packed.tokens, seq_ids, pasts, batch, packed.lengths)
            self.cache.commit(seq_ids, new)
            return StepResult(seq_ids, int(packed.lengths.sum()), logits, routed)
        batch = build_batch(self.cache, packed, self.device)
        ctx = StepContext(measures=[] if measure else None)
        logits, routed, scored = self.forward(batch, override_ids, ctx, score)
        return StepResult(batch.seq_ids, batch.num_tokens, logits, routed, ctx.measures or [], scored)
