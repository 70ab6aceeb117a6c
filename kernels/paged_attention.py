"""Attention over a paged KV cache: new keys into their blocks, decode attention, prefill over a past.

    k_cache, v_cache  [NB, KVH, BS, D]  blocks of BS positions, D innermost (`workers.kvcache` layout)
    block_tables      int [B, W]        row b: sequence b's blocks in position order (any strides)
    lengths           int [B]           keys of row b to attend over (0: the row's output is zeros)
    slots             int [T]           flat slot block * BS + offset of each new token (< 0: not written)

    write_kv(k_cache, v_cache, k [T, KVH, D], v [T, KVH, D], slots)
    decode_attention(q [B, QH, D], k_cache, v_cache, block_tables, lengths) -> [B, QH, D]
    prefill_attention(q [B, n, QH, D], k_cache, v_cache, block_tables, lengths, keys) -> [B, n, QH, D]
        query i of row b sits at position lengths[b] - n + i and sees keys 0 .. that position
    gather_kv(k_cache, v_cache, block_tables, lengths, keys) -> k, v [B, KVH, keys, D], zeros past lengths

Grouped-query attention: QH = G * KVH, query head j reads KV head j // G (Hugging Face's convention).
Scores are scaled by `scale` (default D ** -0.5) and accumulate in float32.

Every call has fixed shapes given its inputs' shapes and reads nothing back to the host, so a CUDA graph
can capture it; the block tables, lengths and slots are ordinary device inputs.

Decode (Triton, flash-decoding): one program per (row, KV head, split) handles the G query heads of its KV
head, so each key block is read once for all of them; a row's keys are cut into `splits` chunks computed on
the device from its length, so one long sequence spreads over many SMs while a short one leaves most
splits empty, all within one launch shape. With splits > 1 a second kernel merges the chunks' partial
outputs by their log-sum-exp. Prefill is compute-bound: its past is gathered into contiguous keys (one
Triton copy) and handed to `scaled_dot_product_attention` with a causal-over-past mask.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ._backend import use_triton

__all__ = ["write_kv", "decode_attention", "prefill_attention", "gather_kv", "decode_splits"]

MAX_SPLITS = 64  # a row's keys are cut into at most this many chunks
SPLIT_KEYS = 64  # keys per tile of the decode kernel: chunks are multiples of it


def _check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape or k_cache.dtype != v_cache.dtype:
        raise ValueError(f"k_cache, v_cache: expected two [blocks, kv_heads, block_size, head_dim] tensors of one "
                         f"shape and dtype, got {list(k_cache.shape)} {k_cache.dtype} and {list(v_cache.shape)} "
                         f"{v_cache.dtype}")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("k_cache, v_cache: the head dim must be contiguous (stride 1)")


def _check_rows(block_tables: torch.Tensor, lengths: torch.Tensor, rows: int) -> None:
    if block_tables.dim() != 2 or block_tables.shape[0] != rows or block_tables.dtype not in (torch.int32,
                                                                                              torch.int64):
        raise ValueError(f"block_tables: expected an int32/int64 [{rows}, W] tensor, got "
                         f"{block_tables.dtype} {list(block_tables.shape)}")
    if tuple(lengths.shape) != (rows,) or lengths.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"lengths: expected an int32/int64 [{rows}] tensor, got {lengths.dtype} {list(lengths.shape)}")


# ---- write --------------------------------------------------------------------------------------------
def write_kv_reference(k_cache, v_cache, k, v, slots) -> None:
    keep = slots >= 0  # (a boolean index reads the count back: the reference is not for CUDA graphs)
    slots = slots[keep].to(torch.int64)
    blocks, offsets = slots // k_cache.shape[2], slots % k_cache.shape[2]
    k_cache[blocks, :, offsets] = k[keep].to(k_cache.dtype)
    v_cache[blocks, :, offsets] = v[keep].to(v_cache.dtype)


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor,
             impl: str = "auto") -> None:
    """Store k, v [T, KVH, D] at their flat cache slots [T] (block * block_size + offset; < 0 skips the row).
    Two rows must not share a slot (which one lands is undefined), except padding rows on the scratch block."""
    _check_cache(k_cache, v_cache)
    T = slots.shape[0]
    want = (T, k_cache.shape[1], k_cache.shape[3])
    if tuple(k.shape) != want or tuple(v.shape) != want:
        raise ValueError(f"k, v: expected shape {list(want)}, got {list(k.shape)} and {list(v.shape)}")
    if slots.dim() != 1 or slots.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"slots: expected a 1-D int32/int64 tensor, got {slots.dim()}-D {slots.dtype}")
    if T == 0:
        return
    if use_triton(impl, k_cache, v_cache, k, v, slots):
        from ._triton_paged_attention import write_kv_triton

        write_kv_triton(k_cache, v_cache, k, v, slots)
        return
    write_kv_reference(k_cache, v_cache, k, v, slots)


# ---- gather -------------------------------------------------------------------------------------------
def gather_kv_reference(k_cache, v_cache, block_tables, lengths, keys: int) -> tuple[torch.Tensor, torch.Tensor]:
    B, KVH, BS, D = block_tables.shape[0], k_cache.shape[1], k_cache.shape[2], k_cache.shape[3]
    W = -(-keys // BS)
    table = block_tables[:, :W].to(torch.int64)
    valid = (torch.arange(keys, device=k_cache.device)[None, :] < lengths[:, None])[:, None, :, None]
    out = []
    for cache in (k_cache, v_cache):
        g = cache[table].permute(0, 2, 1, 3, 4).reshape(B, KVH, W * BS, D)[:, :, :keys]
        out.append(torch.where(valid, g, torch.zeros((), dtype=cache.dtype, device=cache.device)))
    return out[0], out[1]


def gather_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor, lengths: torch.Tensor,
              keys: int, impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Contiguous k, v [B, KVH, keys, D] of each row's first `keys` positions; zeros at positions >= lengths.
    The table must have at least ceil(keys / block_size) columns."""
    _check_cache(k_cache, v_cache)
    B = block_tables.shape[0]
    _check_rows(block_tables, lengths, B)
    if block_tables.shape[1] * k_cache.shape[2] < keys:
        raise ValueError(f"block_tables: {block_tables.shape[1]} columns of {k_cache.shape[2]} positions cannot "
                         f"hold keys={keys}")
    if B == 0 or keys == 0:
        shape = (B, k_cache.shape[1], keys, k_cache.shape[3])
        return (torch.zeros(shape, dtype=k_cache.dtype, device=k_cache.device),
                torch.zeros(shape, dtype=v_cache.dtype, device=v_cache.device))
    if use_triton(impl, k_cache, v_cache, block_tables, lengths):
        from ._triton_paged_attention import gather_kv_triton

        return gather_kv_triton(k_cache, v_cache, block_tables, lengths, keys)
    return gather_kv_reference(k_cache, v_cache, block_tables, lengths, keys)


# ---- decode -------------------------------------------------------------------------------------------
def decode_attention_reference(q, k_cache, v_cache, block_tables, lengths, scale: float) -> torch.Tensor:
    B, QH, D = q.shape
    KVH, BS = k_cache.shape[1], k_cache.shape[2]
    keys = block_tables.shape[1] * BS
    k, v = gather_kv_reference(k_cache, v_cache, block_tables, lengths, keys)
    mask = (torch.arange(keys, device=q.device)[None, :] < lengths[:, None])[:, None, None, :]
    # One new token per row: the G query heads of a KV head share its keys and mask, so they run as G query
    # rows of that head (no key repeated per query head).
    o = F.scaled_dot_product_attention(q.view(B, KVH, QH // KVH, D), k, v, attn_mask=mask, scale=scale)
    return torch.where((lengths > 0)[:, None, None, None], o, torch.zeros((), dtype=o.dtype, device=o.device)
                       ).reshape(B, QH, D)


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def decode_splits(rows: int, kv_heads: int, max_keys: int, device: torch.device) -> int:
    """Chunks per row of the decode kernel: about two programs per SM (the interpreter counts 4 SMs), never
    more chunks than `max_keys` (the table's width in keys) fills with tiles."""
    want = -(-2 * _multiprocessors(device) // max(rows * kv_heads, 1))
    return max(1, min(MAX_SPLITS, want, -(-max_keys // SPLIT_KEYS)))


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                     lengths: torch.Tensor, scale: float | None = None, splits: int | None = None,
                     impl: str = "auto") -> torch.Tensor:
    """[B, QH, D]: each row's one query token over its first lengths[b] keys, found through its block table.

    splits: chunks per row (default `decode_splits`: from B, KVH and the SM count; fixed by the shapes, as a
    CUDA graph needs). Entries of a table past a row's length are never read.
    """
    _check_cache(k_cache, v_cache)
    if q.dim() != 3 or q.shape[2] != k_cache.shape[3] or q.shape[1] % k_cache.shape[1]:
        raise ValueError(f"q: expected [B, a multiple of {k_cache.shape[1]} heads, {k_cache.shape[3]}], "
                         f"got {list(q.shape)}")
    B = q.shape[0]
    _check_rows(block_tables, lengths, B)
    scale = q.shape[2] ** -0.5 if scale is None else float(scale)
    if B == 0:
        return q.new_zeros(q.shape)
    if use_triton(impl, q, k_cache, v_cache, block_tables, lengths):
        from ._triton_paged_attention import decode_attention_triton

        if splits is None:
            splits = decode_splits(B, k_cache.shape[1], block_tables.shape[1] * k_cache.shape[2], q.device)
        return decode_attention_triton(q, k_cache, v_cache, block_tables, lengths, scale, splits)
    return decode_attention_reference(q, k_cache, v_cache, block_tables, lengths, scale)


# ---- prefill over a past ------------------------------------------------------------------------------
def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                      lengths: torch.Tensor, keys: int, scale: float | None = None,
                      impl: str = "auto") -> torch.Tensor:
    """[B, n, QH, D]: n new query tokens per row (their keys already written) over the row's past and new keys.

    keys: max(lengths), known on the host (it sizes the gathered keys). Rows need lengths[b] >= n.
    """
    _check_cache(k_cache, v_cache)
    if q.dim() != 4 or q.shape[3] != k_cache.shape[3] or q.shape[2] % k_cache.shape[1]:
        raise ValueError(f"q: expected [B, n, a multiple of {k_cache.shape[1]} heads, {k_cache.shape[3]}], "
                         f"got {list(q.shape)}")
    B, n, QH, _ = q.shape
    _check_rows(block_tables, lengths, B)
    k, v = gather_kv(k_cache, v_cache, block_tables, lengths, keys, impl)
    q_pos = lengths[:, None] - n + torch.arange(n, device=q.device)[None, :]  # [B, n]
    mask = (torch.arange(keys, device=q.device)[None, None, :] <= q_pos[:, :, None])[:, None]  # [B, 1, n, keys]
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=mask, scale=scale,
                                       enable_gqa=k.shape[1] != QH)
    return o.transpose(1, 2)
