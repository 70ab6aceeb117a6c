"""Where a prefill step's time goes on 1 and 2 GPUs: torch.profiler around the EP workers' steps.

For each GPU count G, G processes each run an `ExpertWorker` (the Ray actor's class, here without Ray),
joined by NCCL, with seeded random weights of one of `bench/runtime.py`'s shapes and the contiguous
plan. Every worker prefills `--tokens` tokens per step (sequences of 2048). After warm-up steps, rank 0
times a few steps, then profiles one more. With several GPUs the exchange is `--exchange` (symm_mem by
default, as `ours-2gpu-symm` in runtime.md).

Writes `<out>/profile-<shape>.md`: per G, the step time and rank 0's kernels by CUDA time. The question it
answers is runtime.notes.md's: why 2 workers with 16k tokens each take longer than 1 worker with 16k.

Run (GPU host): python bench/profile_step.py --out bench/results [--shape qwen3_30b --tokens 16384]
CPU smoke test: python bench/profile_step.py --quick --device cpu --out /tmp/profile
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
from pathlib import Path

for _var in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS"):
    os.environ[_var] = "0" if _var == "NCCL_NVLS_ENABLE" else "1"  # never NVLink multicast

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

SEQ_LEN = 2048
TOP_KERNELS = 25


def _worker(rank: int, args: argparse.Namespace, G: int, port: int, model_dir: str, out: dict) -> None:
    import numpy as np
    import torch

    import expertmesh.workers.worker as worker_mod
    from expertmesh.workers.config import read_model_config
    from expertmesh.workers.group_config import GroupConfig
    from expertmesh.workers.plans import contiguous_plan

    cfg = read_model_config(model_dir)
    plan = contiguous_plan(cfg.num_moe_layers, cfg.num_experts, G)
    exchange = args.exchange if G > 1 else "auto"
    config = GroupConfig(model=model_dir, workers=G, device=args.device,
                         dtype="bfloat16" if args.device == "cuda" else "float32", weights="random",
                         exchange=exchange, max_tokens=args.tokens if exchange == "symm_mem" else 0)
    spec = worker_mod.WorkerSpec(config=config, plan=plan, master_addr="127.0.0.1", master_port=port,
                                 gpu=rank if args.device == "cuda" else None)  # no Ray to assign one
    w = worker_mod.ExpertWorker(rank, G)
    w.setup(spec)
    rng = np.random.default_rng(rank)
    seq_len = min(SEQ_LEN, args.tokens)
    n = args.tokens // seq_len
    next_id = rank * 1_000_000

    def step() -> float:
        nonlocal next_id
        ids = list(range(next_id, next_id + n))
        next_id += n
        inputs = [(s, rng.integers(0, cfg.vocab_size, seq_len).tolist()) for s in ids]
        t0 = time.perf_counter()
        w.step(inputs, return_logits=False)
        wall = time.perf_counter() - t0
        w.free(ids)
        return wall

    for _ in range(args.warmup):
        step()
    walls = [step() for _ in range(args.reps)]
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    with profile(activities=activities) as prof:
        profiled = step()
    if rank == 0:
        sort = "self_cuda_time_total" if args.device == "cuda" else "self_cpu_time_total"
        events = prof.key_averages()
        out[G] = {"step_ms": statistics.median(walls) * 1e3, "profiled_ms": profiled * 1e3,
                  "device_ms": sum(getattr(e, "self_device_time_total", 0) for e in events) / 1e3,
                  "table": events.table(sort_by=sort, row_limit=TOP_KERNELS, max_name_column_width=60)}
    w.shutdown()
    if args.device == "cuda":
        torch.cuda.synchronize()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def main() -> None:
    import torch.multiprocessing as mp
    from runtime import QUICK, SHAPES, hf_config  # bench/runtime.py: the shapes of runtime.md

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--shape", default="qwen3_30b", choices=sorted(SHAPES))
    ap.add_argument("--tokens", type=int, default=16384, help="new tokens per worker and step")
    ap.add_argument("--gpus", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--exchange", default="symm_mem", choices=["all_to_all", "symm_mem"])
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--quick", action="store_true", help="tiny shape (CPU smoke test)")
    ap.add_argument("--workdir", default="/tmp/expertmesh-profile")
    args = ap.parse_args()
    if args.device == "cpu" and args.exchange == "symm_mem":
        args.exchange = "all_to_all"
    shape = (QUICK if args.quick else SHAPES)[args.shape]
    model_dir = Path(args.workdir) / args.shape
    hf_config(shape).save_pretrained(model_dir)  # config.json only: the workers draw random weights
    ctx = mp.get_context("spawn")
    lines = [f"# Profile of a prefill step: {args.shape}, {args.tokens} tokens per worker", "",
             f"Command: `python {' '.join(sys.argv)}`. Exchange with several GPUs: {args.exchange}. Step time: "
             f"median of {args.reps} steps after {args.warmup} warm-up steps, rank 0's wall time of "
             "`ExpertWorker.step` (a device sync included). Kernels: rank 0, one more step under "
             "torch.profiler, by self CUDA time.", ""]
    for G in args.gpus:
        manager = ctx.Manager()
        out = manager.dict()
        port = _free_port()
        procs = [ctx.Process(target=_worker, args=(r, args, G, port, str(model_dir), out)) for r in range(G)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        if G not in out:
            lines += [f"## {G} GPU(s): FAILED (exit codes {[p.exitcode for p in procs]})", ""]
            continue
        res = out[G]
        header = (f"## {G} GPU(s): step {res['step_ms']:.2f} ms (profiled step {res['profiled_ms']:.2f} ms, "
                  f"kernels {res['device_ms']:.2f} ms of it)")
        lines += [header, "", "```", res["table"].rstrip(), "```", ""]
        print(header, flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    path = Path(args.out) / f"profile-{args.shape}.md"
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
