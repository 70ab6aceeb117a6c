"""Throughput of the EP runtime against `transformers` on the same checkpoint (bench/results/runtime.md).

    python bench/runtime.py measure --out runtime.json [--quick]       # on the GPU machine (2 GPUs)
    python bench/runtime.py report --measured runtime.json [--replay ep8.json] --results bench/results

Two shapes, bf16, random weights written as a real sharded Hugging Face checkpoint (config.json +
safetensors, per-expert tensors), real layer dimensions with fewer layers:

  mixtral    hidden 4096, 32 heads / 8 KV heads, 8 experts, FFN 14336, top-2, vocab 32000, 2 layers
  qwen3_30b  hidden 2048, 32 heads / 4 KV heads (head dim 128), 128 experts, FFN 768, top-8,
             vocab 151936, 2 layers

Rows: prefill tokens/s (batches of 2048-token sequences, 4k-32k tokens in one step) and decode tokens/s
(batch 1-256, 128-token prompts, 16 timed steps). Every 1-GPU decode row is also read against the memory
roofline (issue 16): the bytes one step must read (`decode_step_bytes`) over the step time, as a share of
the read bandwidth a max() over 4 GiB reaches in the variant's own process.

Variants, all in the same run on the same checkpoint:
ours on 1 GPU and on 2 GPUs (EPGroup: Ray actors, NCCL, data-parallel attention, sequences dealt round
robin), and `transformers` on 1 GPU with its default experts implementation and with
`experts_implementation="grouped_mm"` (if the default already is grouped_mm, the eager loop is measured as
the other baseline and the table says so). Medians of 3 timed runs after a warm-up.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from report import describe, environment, write_report  # noqa: E402

# Then off the path: bench/kernels.py would shadow Hugging Face's `kernels`, which transformers imports.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {
    "mixtral": dict(family="mixtral", hidden=4096, heads=32, kv_heads=8, head_dim=128, ffn=14336, experts=8,
                    top_k=2, vocab=32000, layers=2),
    "qwen3_30b": dict(family="qwen3_moe", hidden=2048, heads=32, kv_heads=4, head_dim=128, ffn=768,
                      experts=128, top_k=8, vocab=151936, layers=2),
}
QUICK = {name: dict(s, hidden=64, heads=4, kv_heads=2, head_dim=16, ffn=96, vocab=256, experts=min(s["experts"], 16),
                    top_k=min(s["top_k"], 4)) for name, s in SHAPES.items()}
SEQ_LEN = 2048
PREFILL_TOKENS = [4096, 8192, 16384, 32768]
DECODE_BATCH = [1, 8, 16, 64, 256]
PROMPT_LEN = 128
DECODE_STEPS = 16
REPS = 3


# ---------------------------------------------------------------------------------------------- checkpoint
def hf_config(shape: dict):
    import transformers

    common = dict(vocab_size=shape["vocab"], hidden_size=shape["hidden"], num_hidden_layers=shape["layers"],
                  num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
                  head_dim=shape["head_dim"], num_experts_per_tok=shape["top_k"], max_position_embeddings=65536,
                  rms_norm_eps=1e-5, tie_word_embeddings=False)
    if shape["family"] == "mixtral":
        return transformers.MixtralConfig(num_local_experts=shape["experts"], intermediate_size=shape["ffn"],
                                          **common)
    return transformers.Qwen3MoeConfig(num_experts=shape["experts"], moe_intermediate_size=shape["ffn"],
                                       intermediate_size=4 * shape["ffn"], norm_topk_prob=True, **common)


def write_checkpoint(shape: dict, path: Path, device: str, shard_bytes: int = 2 * 2**30) -> dict:
    """A sharded Hugging Face checkpoint with random bf16 weights (per-expert tensors, like published ones)."""
    import torch
    from safetensors.torch import save_file

    from expertmesh.workers.checkpoint import RandomReader, expert_keys
    from expertmesh.workers.config import read_model_config
    from expertmesh.workers.weights import load_model_weights

    start = time.perf_counter()
    path.mkdir(parents=True, exist_ok=True)
    hf_config(shape).save_pretrained(path)
    ours = read_model_config(path)
    shapes: dict[str, tuple[int, ...]] = {}

    class Names(RandomReader):  # the names and shapes our loader asks for, in the published layout
        def get(self, name, dtype, shape=None):
            shapes[name] = tuple(shape)
            return torch.empty(shape, dtype=dtype, device="meta")

    load_model_weights(Names(ours, "meta"), ours, torch.bfloat16, "meta")
    H, F = ours.hidden_size, ours.expert_ffn
    for layer in ours.moe_layers:
        for e in range(ours.num_experts):
            g, u, d = expert_keys(ours, layer, e)
            shapes.update({g: (F, H), u: (F, H), d: (H, F)})
    gen = torch.Generator(device=device).manual_seed(0)
    weight_map, shard, size, n = {}, {}, 0, 0

    def flush():
        nonlocal shard, size, n
        if shard:
            n += 1
            name = f"model-{n:05d}.safetensors"
            save_file(shard, path / name, metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
            shard, size = {}, 0

    for key, shp in shapes.items():
        if "norm" in key:
            t = torch.ones(shp, dtype=torch.bfloat16)
        else:
            t = torch.empty(shp, dtype=torch.bfloat16, device=device).normal_(0, 0.02, generator=gen).cpu()
        shard[key] = t
        size += t.numel() * 2
        if size >= shard_bytes:
            flush()
    flush()
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": sum(int(np.prod(s)) * 2 for s in shapes.values())}, "weight_map": weight_map}))
    return {"files": n, "bytes": sum(int(np.prod(s)) * 2 for s in shapes.values()),
            "seconds": time.perf_counter() - start}


# ---------------------------------------------------------------------------------------------- ours
def _rng_tokens(rng, n: int, vocab: int) -> list[int]:
    return rng.integers(0, vocab, n).tolist()


def ours_prefill(group, total: int, seq_len: int, vocab: int, rng) -> tuple[float, dict]:
    """Tokens/s of one step prefilling total / seq_len sequences (dealt round robin over the workers),
    and the median step and worker forward times (their difference: Ray's call and the step's host work)."""
    G = group.num_workers
    n = max(total // seq_len, 1)
    seq_len = total // n
    prompts = [_rng_tokens(rng, seq_len, vocab) for _ in range(n)]
    times, forward, call = [], [], []
    for rep in range(REPS + 1):
        ids = [rep * 1000 + i for i in range(n)]
        inputs = [[(ids[i], prompts[i]) for i in range(n) if i % G == r] for r in range(G)]
        t0 = time.perf_counter()
        outs = group.step(inputs, return_logits=False)
        times.append(time.perf_counter() - t0)
        forward.append(max(o.seconds for o in outs))
        call.append(max(o.call_s for o in outs))
        group.free(ids)
    step = float(np.median(times[1:]))
    return n * seq_len / step, {"step_ms": step * 1e3, "worker_ms": float(np.median(forward[1:])) * 1e3,
                                "call_ms": float(np.median(call[1:])) * 1e3}


def ours_decode(group, batch: int, vocab: int, rng) -> tuple[float, dict]:
    from expertmesh.workers import GREEDY

    G = group.num_workers
    ids = list(range(50_000, 50_000 + batch))
    prompts = [_rng_tokens(rng, PROMPT_LEN, vocab) for _ in range(batch)]
    inputs = [[(ids[i], prompts[i]) for i in range(batch) if i % G == r] for r in range(G)]
    # Prompts are prefilled in steps of at most max_tokens new tokens per worker (a symm_mem group's buffers
    # are sized for the benchmark's largest step, not for 512 prompts at once).
    per_step = max(1, group.max_tokens // PROMPT_LEN) if group.max_tokens else batch
    nxt: dict[int, int] = {}
    for first in range(0, max(map(len, inputs)), per_step):
        outs = group.step([b[first:first + per_step] for b in inputs], sampling=GREEDY, return_logits=False)
        nxt.update((s, t) for o in outs for s, t in zip(o.seq_ids, o.tokens, strict=True))
    times, forward, call = [], [], []
    for step in range(DECODE_STEPS + 2):
        inputs = [[(s, [nxt[s]]) for s, _ in b] for b in inputs]
        t0 = time.perf_counter()
        outs = group.step(inputs, sampling=GREEDY, return_logits=False)
        if step >= 2:
            times.append(time.perf_counter() - t0)
            forward.append(max(o.seconds for o in outs))
            call.append(max(o.call_s for o in outs))
        nxt = {s: t for o in outs for s, t in zip(o.seq_ids, o.tokens, strict=True)}
    group.free(ids)
    return batch * len(times) / float(np.sum(times)), {"step_ms": float(np.median(times)) * 1e3,
                                                       "worker_ms": float(np.median(forward)) * 1e3,
                                                       "call_ms": float(np.median(call)) * 1e3}


def local_prefill(model, total: int, seq_len: int, vocab: int, rng) -> float:
    """`ours-local`: the same model code in this process, every expert local (no Ray, no exchange)."""
    from expertmesh.workers.local import run_step

    n = max(total // seq_len, 1)
    seq_len = total // n
    prompts = [_rng_tokens(rng, seq_len, vocab) for _ in range(n)]
    times = []
    for rep in range(REPS + 1):
        ids = [rep * 1000 + i for i in range(n)]
        _sync()
        t0 = time.perf_counter()
        run_step(model, list(zip(ids, prompts, strict=True)))
        _sync()
        times.append(time.perf_counter() - t0)
        model.cache.free(ids)
    return n * seq_len / float(np.median(times[1:]))


def local_decode(model, batch: int, vocab: int, rng) -> float:
    from expertmesh.workers.local import run_step

    ids = list(range(50_000, 50_000 + batch))
    prompts = [_rng_tokens(rng, PROMPT_LEN, vocab) for _ in range(batch)]
    logits, _ = run_step(model, list(zip(ids, prompts, strict=True)))
    times = []
    for step in range(DECODE_STEPS + 2):
        nxt = logits.argmax(-1).tolist()
        _sync()
        t0 = time.perf_counter()
        logits, _ = run_step(model, [(s, [t]) for s, t in zip(ids, nxt, strict=True)])
        logits.argmax(-1).tolist()  # the token choice is part of a decode step
        _sync()
        if step >= 2:
            times.append(time.perf_counter() - t0)
    model.cache.free(ids)
    return batch * len(times) / float(np.sum(times))


# ---------------------------------------------------------------------------------------------- transformers
def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def hf_prefill(model, total: int, seq_len: int, vocab: int, rng, device: str) -> float:
    import torch

    n = max(total // seq_len, 1)
    seq_len = total // n
    x = torch.tensor([_rng_tokens(rng, seq_len, vocab) for _ in range(n)], device=device)
    times = []
    with torch.inference_mode():
        for _ in range(REPS + 1):
            _sync()
            t0 = time.perf_counter()
            out = model(x, use_cache=True, logits_to_keep=1)
            _sync()
            times.append(time.perf_counter() - t0)
            del out
    return n * seq_len / float(np.median(times[1:]))


def hf_decode(model, batch: int, vocab: int, rng, device: str) -> float:
    import torch

    x = torch.tensor([_rng_tokens(rng, PROMPT_LEN, vocab) for _ in range(batch)], device=device)
    times = []
    with torch.inference_mode():
        out = model(x, use_cache=True, logits_to_keep=1)
        cache = out.past_key_values
        for step in range(DECODE_STEPS + 2):
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            _sync()
            t0 = time.perf_counter()
            out = model(nxt, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            nxt = out.logits[:, -1].argmax(-1)  # the token choice is part of a decode step
            _sync()
            if step >= 2:
                times.append(time.perf_counter() - t0)
    return batch * len(times) / float(np.sum(times))


# ---------------------------------------------------------------------------------------------- roofline
ONE_GPU = ("ours-local", "ours-1gpu", "hf-default", "hf-grouped_mm", "hf-eager")


def decode_step_bytes(shape: dict, batch: int, context: int, itemsize: int) -> float:
    """Bytes one decode step of `batch` sequences of `context` cached positions must read: every non-expert
    weight once (attention, router, norms, lm_head, the batch's embedding rows), the routed experts its tokens
    reach (expected distinct count, E * (1 - (1 - k/E)^batch), under uniform routing) and each sequence's
    keys and values."""
    H, Q, KV, D, L = shape["hidden"], shape["heads"], shape["kv_heads"], shape["head_dim"], shape["layers"]
    E, k = shape["experts"], shape["top_k"]
    attention = 2 * H * Q * D + 2 * H * KV * D + 2 * H + 2 * D  # q, o; k, v; the layer's norms; q/k norms
    experts = E * (1 - (1 - k / E) ** batch) * 3 * H * shape["ffn"]
    weights = L * (attention + H * E + experts) + shape["vocab"] * H + batch * H + H
    cache = batch * context * L * 2 * KV * D
    return (weights + cache) * itemsize


def read_bandwidth(device: str, nbytes: int) -> float:
    """GB/s of a max() over `nbytes` of bf16 (a kernel that only reads), median of 10 after a warm-up."""
    import torch

    x = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    times = []
    for _ in range(11):
        _sync()
        t0 = time.perf_counter()
        x.max()
        _sync()
        times.append(time.perf_counter() - t0)
    del x
    if device == "cuda":
        torch.cuda.empty_cache()
    return nbytes / float(np.median(times[1:])) / 1e9


# ---------------------------------------------------------------------------------------------- measure
VARIANTS = ("ours-local", "ours-1gpu", "ours-2gpu", "ours-2gpu-symm", "hf-default", "hf-grouped_mm", "hf-eager")
HF_KWARGS = {"hf-default": {}, "hf-grouped_mm": {"experts_implementation": "grouped_mm"},
             "hf-eager": {"experts_implementation": "eager"}}


def measure_variant(name: str, variant: str, args, rows: list, notes: list) -> None:
    """Every prefill and decode size of one variant of one shape, in this process."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    # Every variant gets the same CPU thread budget as one EP worker (cpus_per_worker=1).
    torch.set_num_threads(args.torch_threads)
    shape = (QUICK if args.quick else SHAPES)[name]
    ckpt = Path(args.workdir) / name
    prefill = [t for t in args.prefill if t >= SEQ_LEN or args.quick]
    seq_len = SEQ_LEN if not args.quick else 32
    torch_dtype = torch.bfloat16 if device == "cuda" else torch.float32
    vocab = shape["vocab"]
    rng = np.random.default_rng(0)

    # The memory roofline of this process's GPU, before anything else holds memory (1-GPU variants only;
    # --quick on a CPU reads 256 MiB of host memory, to check the script).
    read_gbs = read_bandwidth(device, 256 << 20 if args.quick else 4 << 30) if variant in ONE_GPU else None
    itemsize = torch.tensor([], dtype=torch_dtype).element_size()

    def record(mode, size, value, extra=None):
        extra = dict(extra or {})
        if mode == "decode" and read_gbs:
            context = PROMPT_LEN + 2 + DECODE_STEPS / 2  # the timed steps' mean cached length
            step_bytes = decode_step_bytes(shape, size, context, itemsize)
            extra.update(step_bytes=step_bytes, read_gbs=read_gbs,
                         roofline=step_bytes * value / size / 1e9 / read_gbs)
        rows.append({"shape": name, "variant": variant, "mode": mode, "size": size, "tokens_per_s": value, **extra})
        print(f"{name} {variant} {mode} {size}: {value:,.0f} tok/s {extra}", file=sys.stderr, flush=True)

    if variant == "ours-local":
        from expertmesh.workers.local import load_local_model

        t0 = time.perf_counter()
        # A KV budget for the largest step of the run (its default, 4096 blocks of 16, holds 64k tokens).
        blocks = max(max(prefill, default=0) // 16 + 16, max(args.decode) * -(-(PROMPT_LEN + DECODE_STEPS + 4) // 16))
        model = load_local_model(ckpt, torch_dtype, device, kv_blocks=blocks)
        notes.append(f"{name}: ours-local loaded in {time.perf_counter() - t0:.0f} s")
        for total in prefill:
            record("prefill", total, local_prefill(model, total, seq_len, vocab, rng))
        for batch in args.decode:
            record("decode", batch, local_decode(model, batch, vocab, rng))
    elif variant.startswith("ours-"):
        import ray

        from expertmesh.workers import EPGroup, GroupConfig

        G = int(variant[len("ours-")])
        os.environ["RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"] = "1"
        ray.init(num_cpus=8, num_gpus=G if device == "cuda" else 0, include_dashboard=False)
        t0 = time.perf_counter()
        # `-symm`: our NVLink exchange (kernels/symm_exchange.py), buffers sized for the largest step.
        exchange = "symm_mem" if variant.endswith("-symm") else "auto"
        max_tokens = max([*prefill, *args.decode, PROMPT_LEN]) if exchange == "symm_mem" else 0
        config = GroupConfig(model=str(ckpt), workers=G, device=device,
                             dtype="bfloat16" if device == "cuda" else "float32", exchange=exchange,
                             max_tokens=max_tokens, compiled_steps=True,
                             timeouts={"step_s": 600, "collective_s": 600})
        group = EPGroup.create(config)
        notes.append(f"{name}: ours on {G} GPU(s) created in {time.perf_counter() - t0:.0f} s")
        try:
            for total in prefill:
                record("prefill", total, *ours_prefill(group, total, seq_len, vocab, rng))
            for batch in args.decode:
                record("decode", batch, *ours_decode(group, batch, vocab, rng))
        finally:
            group.shutdown()
            ray.shutdown()
    else:
        import transformers

        t0 = time.perf_counter()
        placement = {"device_map": device} if device == "cuda" else {}
        model = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch_dtype, **placement,
                                                                  **HF_KWARGS[variant]).eval()
        impl = getattr(model.config, "_experts_implementation", "?")
        notes.append(f"{name}: {variant} loaded in {time.perf_counter() - t0:.0f} s, experts implementation "
                     f"{impl!r}, attention {model.config._attn_implementation!r}")
        # The same attention backends as our model (workers/model.py says why cuDNN is left out): with
        # cuDNN, transformers' batch-1 decode in a fresh process ran at 17.7 tok/s, without it at 294.
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
        with sdpa_kernel(backends) if args.sdpa == "no-cudnn" else contextlib.nullcontext():
            for total in prefill:
                record("prefill", total, hf_prefill(model, total, seq_len, vocab, rng, device))
            for batch in args.decode:
                record("decode", batch, hf_decode(model, batch, vocab, rng, device))


def cmd_variant(args) -> None:
    rows, notes = [], []
    try:
        measure_variant(args.shape, args.variant, args, rows, notes)
    except Exception as exc:  # noqa: BLE001 - keep the rows measured so far
        notes.append(f"{args.shape}: {args.variant} failed: {type(exc).__name__}: {exc}")
    Path(args.out).write_text(json.dumps({"rows": rows, "notes": notes}))


def cmd_measure(args) -> None:
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    num_gpus = torch.cuda.device_count() if device == "cuda" else 2
    shapes = QUICK if args.quick else SHAPES
    env = environment("torch", "triton", "ray", "transformers")
    result = {"environment": env, "device": device, "quick": args.quick,
              "command": " ".join([Path(sys.executable).name, *sys.argv]), "shapes": shapes, "rows": [],
              "notes": [], "settings": {"seq_len": SEQ_LEN, "prompt_len": PROMPT_LEN, "decode_steps": DECODE_STEPS,
                                        "reps": REPS, "process_per_variant": True,
                                        "torch_threads": args.torch_threads, "hf_sdpa": args.sdpa}}
    # Write every checkpoint first and flush it to disk: background writeback of freshly written
    # gigabytes was seen to slow launch-bound decode steps several-fold on the VM.
    for name in args.shapes:
        info = write_checkpoint(shapes[name], Path(args.workdir) / name, device)
        result["notes"].append(f"{name}: checkpoint {info['bytes'] / 1e9:.1f} GB in {info['files']} files "
                               f"written in {info['seconds']:.0f} s")
    t0 = time.perf_counter()
    os.sync()
    time.sleep(3)
    result["notes"].append(f"checkpoints flushed to disk in {time.perf_counter() - t0:.0f} s before measuring")
    # One fresh process per variant: a previous variant's leftovers (Ray's processes, allocator state, a
    # slowed host) cannot bias the next one, which an earlier in-process run showed for decode.
    passthrough = ["--workdir", args.workdir, "--prefill", *map(str, args.prefill), "--decode", *map(str, args.decode),
                   "--torch-threads", str(args.torch_threads), "--sdpa", args.sdpa]
    if args.quick:
        passthrough.append("--quick")
    variants = [v for v in args.variants if not (v.startswith("ours-2gpu") and num_gpus < 2)]
    for name in args.shapes:
        for variant in variants:
            part = Path(args.workdir) / f"{name}-{variant}.json"
            part.unlink(missing_ok=True)
            cmd = [sys.executable, __file__, "variant", "--shape", name, "--variant", variant, "--out", str(part),
                   *passthrough]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, timeout=args.variant_timeout_s, check=False)
            if part.exists():
                got = json.loads(part.read_text())
                result["rows"] += got["rows"]
                result["notes"] += got["notes"]
            else:
                result["notes"].append(f"{name}: {variant} wrote nothing (exit code {proc.returncode})")
            result["notes"].append(f"{name}: {variant} measured in its own process in "
                                   f"{time.perf_counter() - t0:.0f} s")
            Path(args.out).write_text(json.dumps(result, indent=1))
    Path(args.out).write_text(json.dumps(result, indent=1))


# ---------------------------------------------------------------------------------------------- report
def cmd_report(args) -> None:
    measured = json.loads(Path(args.measured[0]).read_text())
    # Further measurements of the same GPU session (e.g. larger decode batches for a few variants) join the
    # tables; their commands are listed with the first.
    extra = [json.loads(Path(p).read_text()) for p in args.measured[1:]]
    for more in extra:
        measured["rows"] += more["rows"]
        measured["notes"] += more["notes"]
    measured["commands"] = [m["command"] for m in [measured, *extra]]
    rows = measured["rows"]
    env = measured["environment"]
    lines = [
        "# EP runtime throughput vs transformers (bench/runtime.py)",
        "",
        describe(env),
        "",
        "Commands (GPU machine): " + ", then ".join(f"`{c}`" for c in measured["commands"])
        + "; report: `python bench/runtime.py report --measured <those jsons> --replay <ep8 json> "
        "--results bench/results`.",
        "",
        "bf16, random weights in a sharded Hugging Face checkpoint (same files for every variant), 2 decoder "
        f"layers of real dimensions. Prefill: sequences of {measured['settings']['seq_len']} tokens, all in one "
        f"step. Decode: {measured['settings']['prompt_len']}-token prompts, tokens/s over "
        f"{measured['settings']['decode_steps']} greedy steps. Medians of {measured['settings']['reps']} runs "
        f"after a warm-up. Each variant runs in its own fresh process with "
        f"{measured['settings'].get('torch_threads', 'default')} torch CPU thread(s), as an EP worker; "
        f"transformers' attention backends: {measured['settings'].get('hf_sdpa', 'default')} (cuDNN's SDPA "
        "builds a plan per new key length, ~50 ms per decode step; ours never uses it). "
        "`ours-local`: our model code in the measuring process, every expert local "
        "(`expertmesh.workers.local`, no Ray); `ours-1gpu`: an EPGroup of one Ray actor, steps through a Ray "
        "compiled graph (`compiled_steps=True`); `ours-2gpu`: "
        "sequences dealt round robin over 2 workers (data-parallel attention), experts split by the "
        "contiguous plan, NCCL all_to_all dispatch/combine; `ours-2gpu-symm`: the same with our NVLink "
        "exchange (Triton kernels writing into the peer's symmetric-memory buffers). `ours-2gpu / ours-1gpu` "
        "takes the faster 2-GPU variant.",
        "",
    ]
    for note in measured["notes"]:
        lines.append(f"- {note}")
    lines.append("")
    summary = {}
    for name, shape in measured["shapes"].items():
        mine = [r for r in rows if r["shape"] == name]
        if not mine:
            continue
        variants = [v for v in VARIANTS if any(r["variant"] == v for r in mine)]
        hf = [v for v in variants if v.startswith("hf")]
        lines += [f"## {name}: hidden {shape['hidden']}, {shape['experts']} experts, FFN {shape['ffn']}, "
                  f"top-{shape['top_k']}, {shape['layers']} layers", "",
                  "| mode | size | " + " | ".join(f"{v} tok/s" for v in variants)
                  + " | ours-1gpu / best hf | ours-local / best hf | ours-1gpu / hf-default "
                  "| ours-2gpu / ours-1gpu | ours-2gpu at 2x the size / ours-1gpu |",
                  "|---|---|" + "---|" * (len(variants) + 5)]
        nan = float("nan")
        two_gpu = _two_gpu_rates(mine)

        for mode in ("prefill", "decode"):
            for size in sorted({r["size"] for r in mine if r["mode"] == mode}):
                val = {r["variant"]: r["tokens_per_s"] for r in mine if r["mode"] == mode and r["size"] == size}
                best_hf = max((val[v] for v in hf if v in val), default=nan)
                o1, loc = val.get("ours-1gpu", nan), val.get("ours-local", nan)
                o2 = two_gpu.get((mode, size), nan)
                default = val.get("hf-default", nan)
                # Same work per GPU: 2 GPUs with twice the sequences (decode), or twice the tokens (prefill).
                scaled = two_gpu.get((mode, 2 * size), nan) / o1
                cells = " | ".join(f"{val[v]:,.0f}" if v in val else "-" for v in variants)
                ratios = " | ".join(f"{r:.2f}x" if np.isfinite(r) else "-"
                                    for r in (o1 / best_hf, loc / best_hf, o1 / default, o2 / o1, scaled))
                lines.append(f"| {mode} | {size} | {cells} | {ratios} |")
                summary[f"{name}/{mode}/{size}"] = {"vs_best_hf": o1 / best_hf, "local_vs_best_hf": loc / best_hf,
                                                   "vs_hf_default": o1 / default, "two_over_one": o2 / o1,
                                                   "two_at_twice_over_one": scaled}
        lines += roofline_section(mine)
        timed = [r for r in mine if "step_ms" in r]
        if timed:
            lines += ["", "Where a Ray step's time goes (medians): `step` = the driver's `group.step` call, "
                      "`forward` = the slowest worker's step (batch layout, forward pass, token choice, device "
                      "sync), `in worker` = the slowest worker's whole call; `step - in worker` is Ray's "
                      "call (arguments and results both ways) and the driver's checks.", "",
                      "| variant | mode | size | step ms | forward ms | in worker ms | step - in worker ms |",
                      "|---|---|---|---|---|---|---|"]
            for r in timed:
                call = r.get("call_ms", float("nan"))
                lines.append(f"| {r['variant']} | {r['mode']} | {r['size']} | {r['step_ms']:.2f} "
                             f"| {r['worker_ms']:.2f} | {call:.2f} | {r['step_ms'] - call:.2f} |")
        lines.append("")
    if args.replay:
        lines += replay_section(json.loads(Path(args.replay).read_text()))
    print(write_report(args.results, "runtime", lines, {"measured": measured, "summary": summary}).read_text())


def roofline_section(rows: list[dict]) -> list[str]:
    """Each 1-GPU decode row against the memory roofline measured in its own process."""
    mine = sorted((r for r in rows if "roofline" in r), key=lambda r: (VARIANTS.index(r["variant"]), r["size"]))
    if not mine:
        return []
    lines = ["", "Decode against the memory roofline (issue 16, target >= 50% at batch 1 and 8): bytes one step must "
             "read (every non-expert weight, the experts the batch reaches at their expected distinct count under "
             "uniform routing, each sequence's keys and values at the timed steps' mean length) / step time "
             "(batch / tokens/s), against the read rate of a max() over 4 GiB (256 MiB with --quick) in the variant's "
             "own process.", "",
             "| variant | batch | MB one step must read | step ms | GB/s | read GB/s (same process) "
             "| share of roofline |",
             "|---|---|---|---|---|---|---|"]
    for r in mine:
        step = r["size"] / r["tokens_per_s"]
        lines.append(f"| {r['variant']} | {r['size']} | {r['step_bytes'] / 1e6:,.0f} | {step * 1e3:.2f} "
                     f"| {r['step_bytes'] / step / 1e9:,.0f} | {r['read_gbs']:,.0f} | {r['roofline']:.0%} |")
    return lines


def _two_gpu_rates(rows: list[dict]) -> dict[tuple[str, int], float]:
    """(mode, size) -> tokens/s of the faster 2-GPU variant."""
    best: dict[tuple[str, int], float] = {}
    for r in rows:
        if r["variant"] in ("ours-2gpu", "ours-2gpu-symm"):
            key = (r["mode"], r["size"])
            best[key] = max(best.get(key, 0.0), r["tokens_per_s"])
    return best


def replay_section(ep8_doc: dict) -> list[str]:
    """Routing replay on 2 GPUs (from bench/ep8.py's run): measured vs predicted reductions of ilp/eplb."""
    measured = ep8_doc.get("measured", ep8_doc)
    report = ep8_doc.get("report", {}).get("traces", {})
    lines = ["## Routing replay on 2 GPUs: contiguous vs eplb vs ilp", "",
             f"From the same GPU session's `bench/ep8.py measure` (`{measured['command']}`): each trace replayed "
             "through the whole layer stack with the gates replaced by the trace's experts. Bytes = token rows "
             "crossing the GPU link per MoE layer (both directions, all ranks); a2a = dispatch + combine time of "
             "the slowest rank per layer. `pred` = the cost model for the same plan and tokens. Target: ilp's "
             "reduction vs contiguous matches the predicted one within 10%.", "",
             "| trace | exchange | plan | bytes MB/layer (meas / pred) | a2a ms/layer (meas / pred) "
             "| bytes vs contiguous (meas / pred) | a2a vs contiguous (meas / pred) | step ms |",
             "|---|---|---|---|---|---|---|---|"]
    for trace in ("mixtral", "synth64"):
        for exchange, plans in report.get(trace, {}).items():
            base = plans.get("contiguous")
            for plan_name, r in plans.items():
                a2a = r["dispatch_ms"] + r["combine_ms"]
                pa2a = r["pred_dispatch_ms"] + r["pred_combine_ms"]
                if base:
                    b_a2a = base["dispatch_ms"] + base["combine_ms"]
                    pb_a2a = base["pred_dispatch_ms"] + base["pred_combine_ms"]
                    rb = (f"{r['dispatch_mb'] / base['dispatch_mb']:.3f} / "
                          f"{r['pred_dispatch_mb'] / base['pred_dispatch_mb']:.3f}")
                    ra = f"{a2a / b_a2a:.3f} / {pa2a / pb_a2a:.3f}"
                else:
                    rb = ra = "-"
                lines.append(f"| {trace} | {exchange} | {plan_name} | {r['dispatch_mb']:.2f} / "
                             f"{r['pred_dispatch_mb']:.2f} | {a2a:.3f} / {pa2a:.3f} | {rb} | {ra} "
                             f"| {r['step_ms']:.1f} |")
    lines.append("")
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("measure")
    m.add_argument("--out", required=True)
    m.add_argument("--shapes", nargs="+", default=list(SHAPES))
    m.add_argument("--prefill", type=int, nargs="*", default=PREFILL_TOKENS)
    m.add_argument("--decode", type=int, nargs="+", default=DECODE_BATCH)
    m.add_argument("--workdir", default="/tmp/expertmesh-runtime")
    m.add_argument("--quick", action="store_true", help="tiny shapes (CPU smoke test)")
    m.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    m.add_argument("--variant-timeout-s", type=float, default=900)
    m.add_argument("--torch-threads", type=int, default=1, help="torch intra-op threads of every variant")
    m.add_argument("--sdpa", choices=("no-cudnn", "default"), default="no-cudnn",
                   help="attention backends transformers may use (ours never uses cuDNN's)")
    v = sub.add_parser("variant", help="one variant of one shape in this process (measure runs these)")
    v.add_argument("--shape", required=True)
    v.add_argument("--variant", required=True, choices=VARIANTS)
    v.add_argument("--out", required=True)
    v.add_argument("--prefill", type=int, nargs="*", default=PREFILL_TOKENS)
    v.add_argument("--decode", type=int, nargs="+", default=DECODE_BATCH)
    v.add_argument("--workdir", default="/tmp/expertmesh-runtime")
    v.add_argument("--quick", action="store_true")
    v.add_argument("--torch-threads", type=int, default=1)
    v.add_argument("--sdpa", choices=("no-cudnn", "default"), default="no-cudnn")
    r = sub.add_parser("report")
    r.add_argument("--measured", required=True, nargs="+",
                   help="measure's json; more jsons of the same GPU session join its tables")
    r.add_argument("--replay", help="bench/results/ep8.json (or the raw measurement) of the same GPU session")
    r.add_argument("--results", default=str(ROOT / "bench/results"))
    args = ap.parse_args(argv)
    {"measure": cmd_measure, "variant": cmd_variant, "report": cmd_report}[args.cmd](args)


if __name__ == "__main__":
    main()
