"""Kernel benchmarks: permute/unpermute, FP8 quantise, grouped GEMM, paged decode attention, dispatch/combine.

Writes `<out>/kernels.md` and `<out>/kernels.json`. Every row names the baseline measured in the same run
and the ratio to it. Bandwidths count bytes read + bytes written (a copy of n bytes moves 2n), in GB/s
(1e9 B/s); exchange rates count the bytes that leave each GPU (payload + FP8 scales + routing metadata to
the other rank; the local copy is excluded) per second, slowest rank's time.

Run: python bench/kernels.py [--out bench/results] [--quick] [--only attention]
     python bench/kernels.py --quick --only attention --out /tmp/k   # on a CPU: checks the script itself
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

# Never NVLink multicast: it can take a shared NVSwitch host down.
for _var in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS"):
    os.environ[_var] = "0" if _var == "NCCL_NVLS_ENABLE" else "1"

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from report import describe, environment  # noqa: E402  (bench/report.py: this folder is on sys.path)

from expertmesh.kernels import (  # noqa: E402
    AllToAllExchange,
    ExpertMap,
    SymmMemExchange,
    build_expert_layout,
    build_layout,
    grouped_mm,
    permute,
    quantize_fp8,
    quantize_weights_fp8,
    quantize_weights_fp8_blockwise,
    scaled_grouped_mm,
    scaled_grouped_mm_blockwise,
    unpermute_combine,
)
from expertmesh.kernels.paged_attention import decode_attention, decode_splits  # noqa: E402
from expertmesh.kernels.symm_exchange import symmetric_buffer  # noqa: E402

ROWS: list[dict] = []


def row(section: str, name: str, value: float, unit: str, baseline: str = "", base_value: float | None = None,
        target: str = "", note: str = "") -> dict:
    """One result. `ratio` > 1 means better than the baseline: value / baseline for rates, baseline / value
    for times (unit "us")."""
    ratio = None
    if base_value:
        ratio = base_value / value if unit == "us" else value / base_value
    r = {"section": section, "name": name, "value": value, "unit": unit, "baseline": baseline,
         "baseline_value": base_value, "ratio": ratio, "target": target, "note": note}
    ROWS.append(r)
    ratio = "" if r["ratio"] is None else f"x{r['ratio']:.2f} vs {baseline}"
    print(f"{section:9s} {name:70s} {value:10.2f} {unit:8s} {ratio} {target} {note}", flush=True)
    return r


def do_bench(fn) -> float:
    """Median seconds per call, L2 flushed between calls (triton.testing.do_bench); on a CPU (`--quick`
    checks the script there) the median wall time of a few calls."""
    if not torch.cuda.is_available():
        times = []
        for _ in range(4):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return float(np.median(times[1:]))
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=150, return_mode="median") / 1e3


def graph_bench(fn, reps: int = 20) -> float:
    """Median seconds per call of `fn` replayed from a CUDA graph holding `reps` calls: the device time alone,
    as the runtime's decode graphs see it (outside a graph, small decode kernels are bound by the host's
    launch path). L2 is not flushed between the calls of one replay."""
    if not torch.cuda.is_available():
        return do_bench(fn)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # compile and warm on the capture stream
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        for _ in range(reps):
            fn()
    return do_bench(graph.replay) / reps


def routing(T: int, E: int, k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    scores = torch.rand(T, E, generator=gen)
    ids = torch.topk(scores, k, dim=1).indices
    w = torch.softmax(torch.randn(T, k, generator=gen), dim=1)
    return ids, w


# ---- one GPU ------------------------------------------------------------------------------------------
def bench_copy_like(nbytes: int) -> float:
    """GB/s (read + write) of a device-to-device copy of `nbytes` bytes."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    t = do_bench(lambda: dst.copy_(src))
    return 2 * nbytes / t / 1e9


def single_gpu(quick: bool) -> None:
    """Permute / unpermute / FP8 quantise at shape (b) on one GPU: 4096 tokens x 7168, 256 experts, top-8."""
    gen = torch.Generator().manual_seed(0)
    T, H, E, k = 4096, 7168, 256, 8
    ids, w = routing(T, E, k, gen)
    ids, w = ids.cuda(), w.cuda()
    emap = ExpertMap.from_phy2log(np.arange(E), 1, device="cuda")
    lay = build_layout(ids, w, emap, 0)
    el = build_expert_layout(lay.slots, E)
    M = el.num_rows
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    moved = 2 * M * H * 2  # read + write of M bf16 rows
    copy_p = bench_copy_like(M * H * 2)
    row("permute", f"copy baseline ({M}x{H} bf16)", copy_p, "GB/s")
    for impl, label in (("auto", "Triton"), ("torch", "torch reference (index_select)")):
        t = do_bench(lambda impl=impl: permute(x, el.row_index, impl=impl))
        row("permute", f"permute {label} ({T}->{M} rows x {H} bf16)", moved / t / 1e9, "GB/s",
            "device copy", copy_p, ">= 0.75x copy" if impl == "auto" else "")
    y = torch.randn(M, H, device="cuda", dtype=torch.bfloat16)
    moved_u = (M + T) * H * 2 + el.pair_pos.numel() * 12
    copy_u = bench_copy_like(moved_u // 2)
    row("permute", f"copy baseline ({moved_u // 2 / 1e6:.0f} MB)", copy_u, "GB/s")
    for impl, label in (("auto", "Triton"), ("torch", "torch reference")):
        t = do_bench(lambda impl=impl: unpermute_combine(y, el.pair_pos, lay.weights, impl=impl))
        row("permute", f"unpermute+combine {label} ({M}->{T} rows, top-{k})", moved_u / t / 1e9, "GB/s",
            "device copy", copy_u, ">= 0.75x copy" if impl == "auto" else "")
    moved_q = M * H * 2 + M * H + M * (H // 128) * 4
    copy_q = bench_copy_like(moved_q // 2)
    for tile, impl, label in ((128, "auto", "1x128 Triton"), (128, "torch", "1x128 torch reference"),
                              (None, "auto", "rowwise Triton")):
        t = do_bench(lambda tile=tile, impl=impl: quantize_fp8(y, tile, impl=impl))
        row("fp8", f"quantise {label} ({M}x{H} bf16)", moved_q / t / 1e9, "GB/s", "device copy", copy_q)
    # Layout costs at (b) for one rank of 2 GPUs.
    emap2 = ExpertMap.from_phy2log(np.arange(E), 2, device="cuda")
    t = do_bench(lambda: build_layout(ids, w, emap2, 0))
    row("layout", "build_layout (4096 tok, 256 exp, top-8, 2 GPUs)", t * 1e6, "us")
    lay2 = build_layout(ids, w, emap2, 0)
    t = do_bench(lambda: build_expert_layout(lay2.slots, E // 2, max_rows=T * k))
    row("layout", "build_expert_layout (same, no host sync)", t * 1e6, "us")


GEMM_SHAPES = [  # (label, experts, rows, K, N)
    ("(b) gate_up: 128 local experts, 32768 rows, 7168->4096", 128, 32768, 7168, 4096),
    ("(b) down: 128 local experts, 32768 rows, 2048->7168", 128, 32768, 2048, 7168),
    ("ref: 16 experts, 16384 rows, 4096->2048", 16, 16384, 4096, 2048),
]


def grouped_gemm(quick: bool) -> None:
    for shape in GEMM_SHAPES:
        _grouped_gemm_shape(*shape)
        torch.cuda.empty_cache()


def _grouped_gemm_shape(label: str, S: int, M: int, K: int, N: int) -> None:
    gen = torch.Generator().manual_seed(S)
    # Uniform routing; each expert's group padded to 16 rows (build_expert_layout(align=16)), as FP8 GEMMs
    # like it. The FLOPs count the padded rows, for both dtypes alike.
    counts = torch.bincount(torch.randint(0, S, (M,), generator=gen), minlength=S)
    counts = (counts + 15) // 16 * 16
    M = int(counts.sum())
    offs = counts.cumsum(0).to(torch.int32).cuda()
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(S, N, K, device="cuda", dtype=torch.bfloat16) / K ** 0.5
    flops = 2.0 * M * K * N
    wd = w[0]
    dense = flops / do_bench(lambda: x @ wd.T) / 1e12
    row("gemm", f"dense bf16 GEMM, same FLOPs ({M}x{K}x{N})", dense, "TFLOP/s")
    bf16 = flops / do_bench(lambda: grouped_mm(x, w, offs)) / 1e12
    row("gemm", f"grouped bf16 {label}", bf16, "TFLOP/s", "dense bf16", dense)
    xq, xs = quantize_fp8(x, tile=None)
    xs1 = xs[:, 0].contiguous()
    wq = quantize_weights_fp8(w)
    t = do_bench(lambda: scaled_grouped_mm(xq, xs1, wq, offs))
    row("gemm", f"grouped FP8 rowwise {label}", flops / t / 1e12, "TFLOP/s", "grouped bf16", bf16,
        ">= 1.4x bf16 at (b)" if label.startswith("(b)") else "")
    t_q = do_bench(lambda: quantize_fp8(x, tile=None))
    row("gemm", f"grouped FP8 incl. activation quantise {label}", flops / (t + t_q) / 1e12, "TFLOP/s",
        "grouped bf16", bf16)
    # DeepSeek-V3's format through our Triton kernel: 1 x 128 activation tiles (as FP8 dispatch carries
    # them), 128 x 128 weight blocks.
    xq_t, xs_t = quantize_fp8(x, tile=128)
    wb = quantize_weights_fp8_blockwise(w)
    t_b = do_bench(lambda: scaled_grouped_mm_blockwise(xq_t, xs_t, wb, offs))
    row("gemm", f"grouped FP8 1x128/128x128 Triton {label}", flops / t_b / 1e12, "TFLOP/s", "grouped bf16",
        bf16, ">= 1.4x bf16 at (b)" if label.startswith("(b)") else "", "dispatch point's default launch")
    swept = sorted((_time_blockwise(xq_t, xs_t, wb, offs, c), c) for c in BLOCKWISE_CONFIGS)
    for i, (t_c, cfg) in enumerate(swept):
        row("tuning", f"grouped FP8 1x128 Triton {label}: " + _cfg_name(cfg), flops / t_c / 1e12, "TFLOP/s",
            "grouped bf16", bf16, note="fastest" if i == 0 else "")
    ones, wq0 = torch.ones(1, N, device="cuda"), wq.q[0]
    t_d8 = do_bench(lambda: torch._scaled_mm(xq, wq0.T, xs1[:, None], ones, out_dtype=torch.bfloat16,
                                             use_fast_accum=True))
    row("gemm", f"dense FP8 rowwise _scaled_mm, same FLOPs ({M}x{K}x{N})", flops / t_d8 / 1e12, "TFLOP/s",
        "dense bf16", dense)


# Launches of the blockwise Triton kernel swept at every GEMM shape: (block_m, block_n, warps, stages, group_m).
BLOCKWISE_CONFIGS = [(64, 128, 4, 3, 1), (64, 128, 4, 4, 8), (64, 128, 4, 4, 1), (64, 128, 4, 5, 8),
                     (64, 128, 8, 4, 8), (64, 256, 8, 3, 8), (64, 256, 8, 4, 8), (128, 128, 8, 4, 8),
                     (128, 256, 8, 3, 8), (128, 256, 8, 4, 8)]


def _cfg_name(cfg: tuple[int, ...]) -> str:
    return "block {}x{}, {} warps, {} stages, group_m {}".format(*cfg)


def _time_blockwise(xq, xs, wb, offs, cfg) -> float:
    from expertmesh.kernels._triton_grouped_fp8 import grouped_fp8_blockwise_triton

    bm, bn, warps, stages, gm = cfg
    try:
        return do_bench(lambda: grouped_fp8_blockwise_triton(xq, xs, wb.q, wb.scale, offs, torch.bfloat16, bm, bn,
                                                             warps, stages, gm))
    except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory: that launch is simply not a candidate
        print(f"blockwise {_cfg_name(cfg)} failed: {exc}", flush=True)
        return float("inf")


# ---- paged decode attention ---------------------------------------------------------------------------
ATTENTION_SHAPES = {"mixtral": (32, 8, 128), "qwen3_30b": (32, 4, 128)}  # query heads, KV heads, head dim
ATTENTION_CASES = [(1, 128), (1, 4096), (1, 32768), (8, 4096), (8, 32768), (64, 4096), (256, 2048)]  # (B, keys)


def bench_read(nbytes: int) -> float:
    """GB/s of a max() over `nbytes` of bf16 (reads only): the roofline of a kernel that only reads."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    return nbytes / do_bench(lambda: src.max()) / 1e9


def paged_attention(quick: bool) -> None:
    """Decode attention (one query token per row, every row `keys` long) through the paged kernel, blocks of 16
    scattered at random as a long-running cache leaves them, against SDPA over the same keys stored
    contiguously [B, KVH, keys, D] (its best case: no mask, the G query heads of a KV head as G query rows).
    GB/s = K and V bytes read / time, against this run's read rate (a max() over 4 GiB)."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    cases = [(1, 128), (2, 300)] if quick and dev == "cpu" else ATTENTION_CASES
    read = bench_read(4 << 30) if dev == "cuda" else None
    if read:
        row("attention", "read baseline: max() over 4 GiB bf16", read, "GB/s")
    bs = 16
    gen = torch.Generator().manual_seed(0)
    for name, (QH, KVH, D) in ATTENTION_SHAPES.items():
        for B, keys in cases:
            W = -(-keys // bs)
            q = torch.randn(B, QH, D, generator=gen).to(dtype).to(dev)
            kc = torch.randn(B * W + 1, KVH, bs, D, generator=gen).to(dtype).to(dev)
            vc = torch.randn_like(kc)
            table = torch.randperm(B * W, generator=gen).view(B, W).to(torch.int32).to(dev)
            lengths = torch.full((B,), keys, dtype=torch.int32, device=dev)
            k = kc[table.long()].permute(0, 2, 1, 3, 4).reshape(B, KVH, W * bs, D)[:, :, :keys].contiguous()
            v = vc[table.long()].permute(0, 2, 1, 3, 4).reshape(B, KVH, W * bs, D)[:, :, :keys].contiguous()
            moved = 2 * B * KVH * keys * D * k.element_size()
            label = f"{name} {QH}/{KVH} heads, D {D}, B {B} x {keys} keys"
            t_sdpa = graph_bench(functools.partial(torch.nn.functional.scaled_dot_product_attention,
                                                   q.view(B, KVH, QH // KVH, D), k, v))
            sdpa = moved / t_sdpa / 1e9
            row("attention", f"decode SDPA, contiguous cache, CUDA graph: {label}", sdpa, "GB/s",
                "read" if read else "", read,
                note=f"{t_sdpa * 1e6:.1f} us")
            splits = decode_splits(B, KVH, keys, q.device)
            call = functools.partial(decode_attention, q, kc, vc, table, lengths, splits=splits)
            t_paged = do_bench(call)
            t_graph = graph_bench(call)
            paged = moved / t_graph / 1e9
            of_read = f", x{paged / read:.2f} of read" if read else ""
            impl = "Triton, CUDA graph" if read else "torch reference"
            in_graph = f" in a graph ({t_paged * 1e6:.1f} us eager)" if read else ""
            row("attention", f"decode paged {impl}: {label}", paged, "GB/s", "SDPA contiguous", sdpa,
                ">= 0.8x read at >= 4096 keys" if keys >= 4096 else "",
                note=f"{t_graph * 1e6:.1f} us{in_graph}, {splits} splits{of_read}")
            del q, kc, vc, k, v


# ---- two GPUs -----------------------------------------------------------------------------------------
BASELINE = "all_to_all_single (NCCL) + torch permute"
CUSTOM = "custom NVLink (Triton + symm mem)"
CASES = [  # (label, tokens per rank, hidden, experts, top-k, fp8 dispatch)
    ("(a) 4096 tok x 4096, 8 exp top-2, bf16", 4096, 4096, 8, 2, False),
    ("(b) 4096 tok x 7168, 256 exp top-8, FP8 dispatch", 4096, 7168, 256, 8, True),
    ("(c) decode 128 tok x 7168, 256 exp top-8, FP8", 128, 7168, 256, 8, True),
]


def _time_dist(fn, iters: int, warmup: int = 5) -> float:
    """Seconds per call, slowest rank, ranks started together."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    dist.barrier()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    t = torch.tensor([start.elapsed_time(end) / iters / 1e3], device="cuda")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def _time_graph(fn, reps: int = 10, replays: int = 20) -> float:
    """Seconds per call of `fn` captured `reps` times in one CUDA graph, slowest rank."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # warm on the capture stream
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    dist.barrier()
    graph = torch.cuda.CUDAGraph()
    # thread_local: NCCL's watchdog thread queries events while this thread captures.
    with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
        for _ in range(reps):
            fn()
    return _time_dist(graph.replay, replays, warmup=2) / reps


def _p2p_copy(nbytes: int, group) -> float:
    """GB/s of a plain copy into the peer's symmetric-memory buffer, both ranks at once (one way each)."""
    _, handle = symmetric_buffer(nbytes, group)
    peer = handle.get_buffer(1 - dist.get_rank(), (nbytes,), torch.uint8)
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device="cuda")
    t = _time_dist(lambda: peer.copy_(src), 30)
    dist.barrier()
    return nbytes / t / 1e9


def _exchange_worker(rank: int, init_file: str, results, quick: bool) -> None:
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            device_id=torch.device("cuda", rank))
    out: list[dict] = []
    try:
        group = dist.group.WORLD
        copy32 = _p2p_copy(32 << 20, group)
        out.append(dict(section="exchange", name="p2p copy into peer symm buffer, 32 MiB", value=copy32,
                        unit="GB/s"))
        for label, T, H, E, k, fp8 in CASES:
            try:
                out.append(_exchange_case(rank, group, label, T, H, E, k, fp8))
            except Exception as exc:  # noqa: BLE001 - reported in the table, then the next case runs
                traceback.print_exc()
                name = f"{label}: FAILED {type(exc).__name__}: {str(exc)[:300]}"
                out.append(dict(section="exchange", name=name, value=float("nan"), unit=""))
        results[rank] = out
    finally:
        dist.destroy_process_group()


def _exchange_case(rank: int, group, label: str, T: int, H: int, E: int, k: int, fp8: bool) -> dict:
    gen = torch.Generator().manual_seed(rank)
    ids, w = routing(T, E, k, gen)
    emap = ExpertMap.from_phy2log(np.arange(E), 2, device="cuda")
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    layout = build_layout(ids.cuda(), w.cuda(), emap, rank)
    res = {}
    custom = SymmMemExchange(None, T, H, k, torch.bfloat16, fp8)
    res["tuning"] = _tune(custom, x, layout, E // 2)
    for name, ex in ((BASELINE, AllToAllExchange(fp8=fp8)), (CUSTOM, custom)):
        rec = ex.dispatch(x, layout)
        el = build_expert_layout(rec.slots, E // 2, rec.valid)
        y = torch.randn(el.num_rows, H, device="cuda", dtype=torch.bfloat16)
        ex.combine(y, el, rec, layout)
        wire_d = ex.last_dispatch.wire_bytes()
        wire_c = ex.last_combine.wire_bytes()
        iters = 50 if T <= 128 else 20
        td = _time_dist(lambda ex=ex: ex.dispatch(x, layout), iters)
        rec = ex.dispatch(x, layout)
        tc = _time_dist(lambda ex=ex, rec=rec, el=el, y=y: ex.combine(y, el, rec, layout), iters)
        wires = torch.tensor([wire_d, wire_c], device="cuda", dtype=torch.float64)
        dist.all_reduce(wires, op=dist.ReduceOp.MAX)
        wire_d, wire_c = (int(v) for v in wires.tolist())
        res[name] = dict(dispatch=td, combine=tc, wire_d=wire_d, wire_c=wire_c)
        if isinstance(ex, SymmMemExchange):
            res[name]["dispatch_graph"] = _time_graph(lambda ex=ex: ex.dispatch(x, layout))
            rec = ex.dispatch(x, layout)
            res[name]["combine_graph"] = _time_graph(
                lambda ex=ex, rec=rec, el=el, y=y: ex.combine(y, el, rec, layout))

            def both(ex=ex, el=el, y=y):
                ex.combine(y, el, ex.dispatch(x, layout), layout)

            res[name]["both_graph"] = _time_graph(both)
            res[name]["both"] = _time_dist(both, iters)
    copy_same = _p2p_copy(max(res[CUSTOM]["wire_d"], 1 << 20), group)
    return dict(section="exchange", label=label, results=res, copy_same=copy_same)


TUNING = [(2048, 4), (4096, 8), (1024, 4), (2048, 8), (8192, 8)]  # (block_elems, num_warps)


def _tune(ex: SymmMemExchange, x, layout, slots: int) -> list[tuple[int, int, float, float]]:
    """Time dispatch and combine (CUDA graphs) for each launch shape; keep the fastest pair on `ex`."""
    rows = []
    for block, warps in TUNING:
        ex.block_elems, ex.num_warps = block, warps
        rec = ex.dispatch(x, layout)
        el = build_expert_layout(rec.slots, slots, rec.valid)
        y = torch.randn(el.num_rows, x.shape[1], device="cuda", dtype=x.dtype)
        td = _time_graph(lambda: ex.dispatch(x, layout))
        rec = ex.dispatch(x, layout)
        tc = _time_graph(lambda rec=rec, el=el, y=y: ex.combine(y, el, rec, layout))
        rows.append((block, warps, td, tc))
    best = min(rows, key=lambda r: r[2] + r[3])
    ex.block_elems, ex.num_warps = best[0], best[1]
    return rows


def two_gpu(quick: bool) -> None:
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        results = ctx.Manager().dict()
        mp.start_processes(_exchange_worker, args=(os.path.join(tmp, "rdzv"), results, quick), nprocs=2,
                           join=True, start_method="spawn")
        items = results[0]
    for item in items:
        if "label" in item:
            _exchange_rows(item["label"], item["results"], item["copy_same"])
        else:
            row("exchange", item["name"], item["value"], item["unit"])


def _exchange_rows(label: str, res: dict, copy_same: float) -> None:
    b, c = res[BASELINE], res[CUSTOM]
    case = label[:3]
    best = min(res["tuning"], key=lambda r: r[2] + r[3])
    for block, warps, td, tc in res["tuning"]:
        row("tuning", f"{label}: custom launch {block} elems/program, {warps} warps: dispatch, graph",
            td * 1e6, "us", note=f"combine {tc * 1e6:.1f} us" + (" (used below)" if best[:2] == (block, warps)
                                                                 else ""))
    row("exchange", f"{label}: p2p copy of the same wire bytes", copy_same, "GB/s",
        note=f"{c['wire_d'] / 1e6:.1f} MB per rank")
    row("exchange", f"{label}: dispatch baseline", b["dispatch"] * 1e6, "us",
        note=f"wire {b['wire_d'] / b['dispatch'] / 1e9:.0f} GB/s")
    row("exchange", f"{label}: dispatch custom, eager", c["dispatch"] * 1e6, "us", "dispatch baseline (us)",
        b["dispatch"] * 1e6, ">= 2x at (a)" if case == "(a)" else "",
        note=f"{c['dispatch_graph'] * 1e6:.1f} us in a CUDA graph")
    row("exchange", f"{label}: dispatch custom wire rate, eager", c["wire_d"] / c["dispatch"] / 1e9, "GB/s",
        "p2p copy, same bytes", copy_same, ">= 0.85x copy at (a)" if case == "(a)" else "")
    row("exchange", f"{label}: dispatch custom wire rate, CUDA graph",
        c["wire_d"] / c["dispatch_graph"] / 1e9, "GB/s", "p2p copy, same bytes", copy_same)
    row("exchange", f"{label}: combine baseline", b["combine"] * 1e6, "us",
        note=f"wire {b['wire_c'] / b['combine'] / 1e9:.0f} GB/s")
    row("exchange", f"{label}: combine custom, eager", c["combine"] * 1e6, "us", "combine baseline (us)",
        b["combine"] * 1e6, note=f"{c['combine_graph'] * 1e6:.1f} us in a CUDA graph, "
                                 f"wire {c['wire_c'] / c['combine'] / 1e9:.0f} GB/s")
    row("exchange", f"{label}: dispatch+combine custom, CUDA graph", c["both_graph"] * 1e6, "us",
        "baseline dispatch+combine (us)", (b["dispatch"] + b["combine"]) * 1e6,
        "< 60 us at (c)" if case == "(c)" else "", note=f"eager {c['both'] * 1e6:.1f} us")


# ---- report -------------------------------------------------------------------------------------------
HEADER = (
    "Bandwidths count bytes read + written (GB/s = 1e9 B/s). Exchange rates count the bytes leaving each GPU "
    "(payload + FP8 scales + routing metadata; the local copy excluded) over the slowest rank's time. "
    "Dispatch = from x [T, H] and its layout to the rows landed on the serving ranks (a barrier included); "
    "combine = from the expert outputs to [T, H] back home. Expert layout and GEMMs are in neither "
    "(rows 'layout', 'gemm'). Ratio > 1 = better than the baseline (rate / baseline rate, or baseline time / "
    "time). Permute counts every gathered row as read, although a token's 8 copies re-read it partly from L2."
)


def write(out_dir: Path, env: dict, command: str, wall: float) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = {"env": env, "command": command, "wall_s": wall, "rows": ROWS}
    (out_dir / "kernels.json").write_text(json.dumps(doc, indent=1) + "\n")
    lines = [
        "# Kernel benchmarks (issue 4)", "",
        describe(env), "",
        f"Command: `{command}` ({wall:.0f} s).", "", HEADER, "",
        "| section | measurement | value | unit | baseline (same run) | baseline value | ratio | target "
        "| note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in ROWS:
        bv = "" if r["baseline_value"] is None else f"{r['baseline_value']:.2f}"
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.2f}"
        lines.append(f"| {r['section']} | {r['name']} | {r['value']:.2f} | {r['unit']} | {r['baseline']} "
                     f"| {bv} | {ratio} | {r['target']} | {r['note']} |")
    (out_dir / "kernels.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--quick", action="store_true", help="fewer iterations")
    ap.add_argument("--skip-single", action="store_true")
    ap.add_argument("--skip-exchange", action="store_true")
    ap.add_argument("--only", choices=("attention",), help="run only this part")
    args = ap.parse_args()
    if not torch.cuda.is_available() and not (args.quick and args.only == "attention"):
        sys.exit("bench/kernels.py needs CUDA (on a CPU only `--quick --only attention`, to check the script)")
    t0 = time.time()
    env = environment("torch", "triton")
    command = "python " + " ".join(sys.argv)
    # Each part runs on even if an earlier one fails, so one device call always yields a table.
    parts = [] if args.skip_single else [single_gpu, grouped_gemm, paged_attention]
    if not args.skip_exchange and torch.cuda.device_count() >= 2:
        parts.append(two_gpu)
    if args.only:
        parts = [paged_attention]
    for part in parts:
        try:
            part(args.quick)
        except Exception as exc:  # noqa: BLE001 - reported in the table, then the next part runs
            row(part.__name__, f"FAILED: {type(exc).__name__}: {str(exc)[:300]}", float("nan"), "")
            traceback.print_exc()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        write(Path(args.out), env, command, time.time() - t0)


if __name__ == "__main__":
    main()
