"""Serving throughput and latency, in the style of `vllm bench serve` (bench/results/serve.md).

    python bench/serve.py [--workers 1] [--shapes mixtral qwen3_30b] [--results bench/results]   # on a GPU
    python bench/serve.py --quick                                                             # CPU, ~1 min

The Mixtral- and Qwen3-shaped random checkpoints of `bench/runtime.py` (its writer), served three ways in
the same run, each swept over client concurrency 1-256 (closed loop: every client sends its next request
when the last one ended) on the same requests:

  engine       `cluster/serve/Engine`: continuous batching, chunked prefill, tokens streamed as sampled
  grpc         the same engine behind its gRPC server, clients in another process (bench/serve_grpc.py)
  static       today's `EPGroup.generate` on the engine's own group: batches of `concurrency` requests,
               each run to its longest output; a batch's tokens arrive together at its end
  transformers `generate` of the same checkpoint on one device, the same static batches (left-padded)

Requests: random prompt ids, lengths uniform in [0.5, 1.5] x PROMPT_LEN, outputs uniform in
[1 - r, 1 + r] x OUTPUT_LEN (r = --output-range-ratio, default 1: what vllm bench's `--random-range-ratio`
does to lengths), EOS ignored; REQUESTS_PER_CLIENT requests per client, so most of a level runs at its
concurrency. Figures per level: output
tokens/s (all generated tokens / wall time), TTFT (submission to first token) and TPOT ((last - first token)
/ (tokens - 1)) as p50 and p99 over requests, and the engine's mean step time (its loop's iteration: one
step and the host's work around it). Each level is run once
unmeasured first (CUDA graphs of new batch sizes are captured then).
Targets (issue 14, at concurrency 64): engine output tok/s >= 2x static, p99 TPOT <= 1.5x batch-1 TPOT;
gRPC TPOT within 5% of the engine's step time. Engine rows also break each step down by phase
(`cluster/serve/step_times.py`), so a run explains itself.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

_BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(_BENCH))
from report import describe, environment, write_report  # noqa: E402
from serve_grpc import GrpcClients  # noqa: E402

# isort: split
from runtime import QUICK, SHAPES, write_checkpoint  # noqa: E402  (it takes bench/ off the path)

# Off the path again: bench/kernels.py would shadow Hugging Face's `kernels` package, which transformers imports.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _BENCH]

CONCURRENCY = [1, 4, 16, 64, 128, 256]
QUICK_CONCURRENCY = [1, 4, 16]
PROMPT_LEN, OUTPUT_LEN = 128, 128
QUICK_PROMPT_LEN, QUICK_OUTPUT_LEN = 16, 8
REQUESTS_PER_CLIENT = 4  # requests per level: concurrency x this (at least MIN_REQUESTS)
MIN_REQUESTS = 16
QUICK_MIN_REQUESTS = 8
VARIANTS = ("engine", "grpc", "static", "transformers")
PHASES = ("schedule", "inputs", "prepare", "call", "worker", "forward", "ray", "apply", "other",
          "iteration")


# ---------------------------------------------------------------------------------------------- workload
def workload(n: int, prompt_len: int, output_len: int, ratio: float, vocab: int,
             seed: int) -> list[tuple[list[int], int]]:
    rng = np.random.default_rng(seed)
    ins = rng.integers(max(1, prompt_len // 2), prompt_len * 3 // 2 + 1, n)
    outs = rng.integers(max(2, round(output_len * (1 - ratio))), round(output_len * (1 + ratio)) + 1, n)
    return [(rng.integers(0, vocab, int(i)).tolist(), int(o)) for i, o in zip(ins, outs, strict=True)]


def summary(records: list[tuple[float, float, int]], wall: float) -> dict:
    """records: (ttft s, tpot s, output tokens) per request."""
    ttft = np.array([r[0] for r in records])
    tpot = np.array([r[1] for r in records if not math.isnan(r[1])])
    tokens = sum(r[2] for r in records)
    pct = lambda a, q: float(np.percentile(a, q)) * 1e3 if a.size else float("nan")  # noqa: E731
    return {"requests": len(records), "output_tokens": tokens, "wall_s": wall, "output_tok_s": tokens / wall,
            "ttft_p50_ms": pct(ttft, 50), "ttft_p99_ms": pct(ttft, 99), "tpot_p50_ms": pct(tpot, 50),
            "tpot_p99_ms": pct(tpot, 99)}


# ---------------------------------------------------------------------------------------------- variants
async def in_process(engine, requests, concurrency: int) -> list[tuple[float, float, int]]:
    """Closed-loop clients on the engine's own loop, through `Engine.generate`."""
    from expertmesh.cluster.serve.types import GenerateRequest, Prompt

    pending = list(reversed(requests))
    records = []

    async def client():
        while pending:
            prompt, n = pending.pop()
            t0 = time.perf_counter()
            first = last = None
            count = 0
            async for chunk in engine.generate(GenerateRequest(Prompt(token_ids=tuple(prompt)), max_new_tokens=n,
                                                               ignore_eos=True)):
                last = time.perf_counter()
                first = first or last
                count += len(chunk.token_ids)
            records.append((first - t0, (last - first) / (count - 1) if count > 1 else math.nan, count))

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return records


async def engine_level(engine, requests, concurrency: int, grpc=None) -> dict:
    """One level through the engine (in-process clients, or `grpc`'s clients over the server), with the
    replica's per-phase step times and the share of its steps that ran at fixed shapes."""
    replica = engine.replicas[0]
    fixed = lambda: sum(i["decode_steps"] for i in replica.group.worker_info())  # noqa: E731
    before, fixed_before, captured = replica.times.snapshot(), fixed(), replica.group.worker_info()[0]["decode_graphs"]
    start = time.perf_counter()
    if grpc is None:
        records = await in_process(engine, requests, concurrency)
        wall = time.perf_counter() - start
    else:
        records, wall = await grpc.level(requests, concurrency)
    phases = replica.times.since(before).per_step()
    info = replica.group.worker_info()
    phases["fixed_share"] = (fixed() - fixed_before) / max(phases["steps"] * len(info), 1)
    phases["graphs_captured"] = info[0]["decode_graphs"] - captured
    return {**summary(records, wall), "step_ms": phases["iteration"], "phases": phases}


async def settle(engine, group) -> None:
    """Wait until the engine holds nothing and its last frees ran on the workers, so that static batches can
    drive its group (a call after the frees returns only after them: one caller's actor calls run in order)."""
    while (s := engine.status()).running or s.waiting or s.kv_blocks_used:
        await asyncio.sleep(0.001)
    await asyncio.to_thread(group.worker_info)


def static_level(generate, requests, concurrency: int) -> dict:
    """Batches of `concurrency` requests through `generate(prompts, max_new) -> tokens`; every token of a
    batch reaches its client at the batch's end (TTFT = the batch's time), each step advances every row."""
    records, wall = [], 0.0
    for i in range(0, len(requests), concurrency):
        batch = requests[i:i + concurrency]
        longest = max(n for _, n in batch)
        t0 = time.perf_counter()
        generate([p for p, _ in batch], longest)
        seconds = time.perf_counter() - t0
        wall += seconds
        records += [(seconds, seconds / longest, n) for _, n in batch]
    return summary(records, wall)


def hf_generate(model, device: str):
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def generate(prompts: list[list[int]], max_new: int):
        width = max(map(len, prompts))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        # The attention backends of our model (runtime.py: cuDNN's per-shape plans slowed every decode step).
        with torch.inference_mode(), sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                                                  SDPBackend.MATH]):
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, min_new_tokens=max_new,
                                 do_sample=False, pad_token_id=0)
        if device == "cuda":
            torch.cuda.synchronize()
        assert out.shape[1] == width + max_new, "transformers stopped early"
        return out

    return generate


# ---------------------------------------------------------------------------------------------- measure
def show(label: str, figures: dict) -> None:
    print(f"{label}: {figures['output_tok_s']:,.0f} tok/s, TTFT p50 {figures['ttft_p50_ms']:.1f} ms, TPOT p50 "
          f"{figures['tpot_p50_ms']:.2f} p99 {figures['tpot_p99_ms']:.2f} ms", file=sys.stderr, flush=True)
    if "phases" in figures:
        ph = figures["phases"]
        print("  per step (ms): " + ", ".join(f"{k} {ph[k]:.3f}" for k in PHASES) +
              f"; {ph['tokens']:.1f} tokens/step, {ph['fixed_share']:.0%} fixed-shape steps, "
              f"{ph['graphs_captured']} graphs captured", file=sys.stderr, flush=True)


def start_grpc(engine, loop, notes: list, name: str) -> GrpcClients | None:
    """The engine's gRPC server and a client process, or None (noted) when they cannot start."""
    try:
        grpc = GrpcClients(engine)
        loop.run_until_complete(grpc.start())
        return grpc
    except Exception as exc:  # noqa: BLE001 - e.g. grpcio missing: the other variants still run
        notes.append(f"{name}: no grpc variant ({type(exc).__name__}: {exc})")
        return None


def measure_shape(name: str, shape: dict, ckpt: Path, args, device: str, rows: list, notes: list) -> None:
    import ray

    from expertmesh.cluster.serve.config import EngineConfig
    from expertmesh.cluster.serve.engine import Engine
    from expertmesh.workers.group_config import GroupConfig

    prompt_len, output_len = (QUICK_PROMPT_LEN, QUICK_OUTPUT_LEN) if args.quick else (PROMPT_LEN, OUTPUT_LEN)
    levels = args.concurrency or (QUICK_CONCURRENCY if args.quick else CONCURRENCY)

    least, per_client = (QUICK_MIN_REQUESTS, 2) if args.quick else (MIN_REQUESTS, REQUESTS_PER_CLIENT)

    def requests(c: int, seed: int):
        return workload(max(c * per_client, least), prompt_len, output_len, args.output_range_ratio,
                        shape["vocab"], seed)

    def record(variant: str, c: int, figures: dict) -> None:
        rows.append({"shape": name, "variant": variant, "concurrency": c, **figures})
        show(f"{name} {variant} c={c}", figures)

    ray.init(num_cpus=max(4, args.workers + 2), num_gpus=args.workers if device == "cuda" else 0,
             include_dashboard=False, log_to_driver=False, configure_logging=False)
    loop = asyncio.new_event_loop()
    try:
        t0 = time.perf_counter()
        group = GroupConfig(model=str(ckpt), workers=args.workers, device=device,
                            dtype="bfloat16" if device == "cuda" else "float32",
                            cpus_per_worker=1.0 if device == "cuda" else 0.5,
                            compiled_steps=device == "cuda" and not args.actor_calls,
                            timeouts={"step_s": 600, "collective_s": 600})
        config = EngineConfig(group=group, max_batch_tokens=args.max_batch_tokens, max_running=512,
                              max_waiting=4096, routing_every=0, decode_prefill_tokens=args.decode_prefill_tokens,
                              overlap_steps=args.overlap)
        engine = loop.run_until_complete(Engine.start(config))
        notes.append(f"{name}: engine on {args.workers} {device} worker(s) started in {time.perf_counter() - t0:.0f} s")
        ep_group = engine.replicas[0].group
        grpc = start_grpc(engine, loop, notes, name) if "grpc" in args.variants else None
        ids = iter(range(10**9, 2 * 10**9, 10**6))  # static batches' sequence ids, apart from the engine's
        try:
            for c in levels:
                loop.run_until_complete(engine_level(engine, requests(c, 1000 + c)[:c], c))  # warm-up
                record("engine", c, loop.run_until_complete(engine_level(engine, requests(c, c), c)))
                if grpc is not None:
                    loop.run_until_complete(engine_level(engine, requests(c, 1000 + c)[:c], c, grpc))
                    record("grpc", c, loop.run_until_complete(engine_level(engine, requests(c, c), c, grpc)))
                loop.run_until_complete(settle(engine, ep_group))
                if "static" not in args.variants:
                    continue
                static = lambda prompts, n: ep_group.generate(prompts, n, first_seq_id=next(ids))  # noqa: E731
                static_level(static, requests(c, 1000 + c)[:c], c)
                record("static", c, static_level(static, requests(c, c), c))
        finally:  # a failed level still stops the server, its client process and the engine's workers
            if grpc is not None:
                loop.run_until_complete(grpc.stop())
            loop.run_until_complete(engine.stop())
    finally:
        loop.close()
        ray.shutdown()

    if "transformers" not in args.variants:
        return
    import torch
    import transformers

    t0 = time.perf_counter()
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=dtype).to(device).eval()
    notes.append(f"{name}: transformers {transformers.__version__} loaded in {time.perf_counter() - t0:.0f} s "
                 f"(experts implementation {getattr(model.config, '_experts_implementation', '?')!r})")
    generate = hf_generate(model, device)
    for c in levels:
        static_level(generate, requests(c, 1000 + c)[:c], c)
        record("transformers", c, static_level(generate, requests(c, c), c))
    del model, generate
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------- report
def targets(rows: list[dict], shape: str) -> list[str]:
    by = {(r["variant"], r["concurrency"]): r for r in rows if r["shape"] == shape}
    out = []
    if ("engine", 64) in by and ("static", 64) in by:
        ratio = by[("engine", 64)]["output_tok_s"] / by[("static", 64)]["output_tok_s"]
        out.append(f"- {shape}: engine / static output tok/s at concurrency 64 = {ratio:.2f}x (target >= 2x)")
    if ("engine", 64) in by and ("engine", 1) in by:
        ratio = by[("engine", 64)]["tpot_p99_ms"] / by[("engine", 1)]["tpot_p50_ms"]
        out.append(f"- {shape}: engine p99 TPOT at 64 / batch-1 TPOT = {ratio:.2f}x (target <= 1.5x)")
    for c in sorted({c for v, c in by if v == "grpc"}):
        g = by[("grpc", c)]
        ratio = g["tpot_p50_ms"] / g["step_ms"]
        out.append(f"- {shape}: gRPC TPOT p50 / the engine's step time at concurrency {c} = {g['tpot_p50_ms']:.2f} / "
                   f"{g['step_ms']:.2f} ms = {ratio:.2f}x (target <= 1.05x)")
    return out


def phase_table(rows: list[dict], shape: str) -> list[str]:
    """The engine's mean milliseconds per step by phase (`cluster/serve/step_times.py`) at each level."""
    rows = sorted((r for r in rows if r["shape"] == shape and "phases" in r),
                  key=lambda r: (r["concurrency"], r["variant"]))
    if not rows:
        return []
    out = ["Engine step breakdown, mean ms per step (`cluster/serve/step_times.py`: `ray` = call - worker; "
           "`worker` includes `forward`; `iteration` is the sum of schedule .. other); fixed: steps run at "
           "fixed shapes (CUDA graphs), captured: graphs captured during the measured level:", "",
           "| concurrency | variant | tokens/step | " + " | ".join(PHASES) + " | fixed | captured |",
           "|---:|---|---:|" + "---:|" * len(PHASES) + "---:|---:|"]
    for r in rows:
        ph = r["phases"]
        cells = [f"{ph['tokens']:.1f}", *(f"{ph[k]:.3f}" for k in PHASES), f"{ph['fixed_share']:.0%}",
                 str(ph["graphs_captured"])]
        out.append(f"| {r['concurrency']} | {r['variant']} | " + " | ".join(cells) + " |")
    return out


def report(result: dict, results_dir: Path) -> Path:
    rows = result["rows"]
    lines = ["# Serving: continuous batching vs static batches vs transformers", "",
             f"Command: `{result['environment']['command']}`, {result['environment']['date']}.",
             describe(result["environment"]), "",
             f"Requests: prompts ~U[0.5, 1.5] x {result['settings']['prompt_len']} tokens, outputs ~U[1 - r, 1 + r] x "
             f"{result['settings']['output_len']} tokens (r = {result['settings']['output_range_ratio']}), EOS "
             f"ignored; closed-loop clients, {result['settings']['requests_per_client']} requests each. Static and "
             "transformers: "
             "batches of `concurrency` requests run to their longest output, tokens delivered at the batch's end "
             "(TTFT = batch time). TPOT = (last - first token) / (tokens - 1). Engine: max_batch_tokens "
             f"{result['settings']['max_batch_tokens']}, decode_prefill_tokens "
             f"{result['settings']['decode_prefill_tokens']}, overlap_steps {result['settings']['overlap_steps']}.",
             ""]
    for shape in dict.fromkeys(r["shape"] for r in rows):
        lines += [f"## {shape}", "",
                  "| concurrency | variant | requests | output tok/s | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | "
                  "TPOT p99 ms | engine step ms |",
                  "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in sorted((r for r in rows if r["shape"] == shape), key=lambda r: (r["concurrency"], r["variant"])):
            step = f"{r['step_ms']:.2f}" if "step_ms" in r else ""
            lines.append(f"| {r['concurrency']} | {r['variant']} | {r['requests']} | {r['output_tok_s']:,.0f} | "
                         f"{r['ttft_p50_ms']:.1f} | {r['ttft_p99_ms']:.1f} | {r['tpot_p50_ms']:.2f} | "
                         f"{r['tpot_p99_ms']:.2f} | {step} |")
        lines += ["", *targets(rows, shape), "", *phase_table(rows, shape), ""]
    lines += ["Notes:", *[f"- {n}" for n in result["notes"]]]
    return write_report(results_dir, result["name"], lines, result)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes on the CPU, 3 levels (~1 min)")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--workers", type=int, default=1, help="workers (GPUs) of the engine's EP group")
    parser.add_argument("--concurrency", type=int, nargs="+", default=None)
    parser.add_argument("--max-batch-tokens", type=int, default=2048, help="new tokens per worker and step")
    parser.add_argument("--decode-prefill-tokens", type=int, default=256,
                        help="EngineConfig.decode_prefill_tokens: prompt tokens per step beside decodes")
    parser.add_argument("--overlap", action="store_true", help="EngineConfig.overlap_steps: send each step "
                        "before the previous one's tokens are back")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--output-range-ratio", type=float, default=1.0,
                        help="output lengths uniform in [1 - r, 1 + r] x the mean")
    parser.add_argument("--actor-calls", action="store_true",
                        help="drive steps by actor calls (default on a GPU: a Ray compiled graph, ~1 ms less a step)")
    parser.add_argument("--results", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--name", default=None, help="report name (default serve, serve-quick with --quick)")
    parser.add_argument("--workdir", default=None, help="where checkpoints are written (default: a temp dir)")
    args = parser.parse_args(argv)

    import torch

    device = "cuda" if torch.cuda.is_available() and not args.quick else "cpu"
    shapes = QUICK if args.quick else SHAPES
    name = args.name or ("serve-quick" if args.quick else "serve")
    prompt_len, output_len = (QUICK_PROMPT_LEN, QUICK_OUTPUT_LEN) if args.quick else (PROMPT_LEN, OUTPUT_LEN)
    result = {"name": name, "environment": environment("torch", "ray", "transformers"), "device": device,
              "quick": args.quick, "shapes": {s: shapes[s] for s in args.shapes},
              "settings": {"prompt_len": prompt_len, "output_len": output_len, "workers": args.workers,
                           "compiled_steps": device == "cuda" and not args.actor_calls,
                           "max_batch_tokens": args.max_batch_tokens,
                           "decode_prefill_tokens": args.decode_prefill_tokens, "overlap_steps": args.overlap,
                           "requests_per_client": 2 if args.quick else REQUESTS_PER_CLIENT,
                           "output_range_ratio": args.output_range_ratio},
              "rows": [], "notes": []}
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for shape in args.shapes:
            info = write_checkpoint(shapes[shape], Path(tmp) / shape, device)
            result["notes"].append(f"{shape}: checkpoint {info['bytes'] / 1e9:.2f} GB written in "
                                   f"{info['seconds']:.0f} s")
            measure_shape(shape, shapes[shape], Path(tmp) / shape, args, device, result["rows"], result["notes"])
    print(report(result, Path(args.results)))


if __name__ == "__main__":
    main()
