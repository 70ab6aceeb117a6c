"""FP8 serving on one GPU: prefill throughput of precision fp8 against bf16 on the same checkpoint, and how far
FP8 moves the logits and the greedy tokens (bench/results/fp8-serving.md, issue 16 target 1).

    python bench/fp8_serving.py --out bench/results [--quick]     # --quick: tiny shapes, CPU, prints only

The checkpoints are bench/runtime.py's (random bf16 weights in a sharded Hugging Face checkpoint, 2 decoder
layers of the real Mixtral-8x7B and Qwen3-30B-A3B dimensions). Variants, each `ours-local` (the model code
in this process, every expert local): bf16; fp8-dispatch (tokens quantised to E4M3 with 1 x 128 scales,
experts in bf16); fp8 (also FP8 expert GEMMs, 128 x 128 weight blocks; our Triton kernel); fp8-ckpt (the
checkpoint written by `expertmesh quantize`, every projection stored in FP8, served at its default fp8).
Accuracy: logits of the last prompt position against bf16's on the same prompts (max |difference| over max
|bf16 logit|), and greedy continuations compared token by token.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import runtime  # noqa: E402  (the checkpoints, shapes and prefill timing of bench/runtime.py)
from report import describe, environment, write_report  # noqa: E402

PREFILL = [4096, 8192, 16384, 32768]
VARIANTS = ("bf16", "fp8-dispatch", "fp8", "fp8-ckpt")
PROMPTS, PROMPT_LEN, GREEDY_STEPS = 32, 64, 16


def _load(path: Path, variant: str, device: str):
    import torch

    from expertmesh.workers.local import load_local_model

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    precision = None if variant == "fp8-ckpt" else variant  # an FP8 checkpoint's default is fp8
    return load_local_model(path, dtype, device, precision=precision)


def _greedy(model, prompts: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """(last-position logits of the prompts [P, V], greedy continuations [P, GREEDY_STEPS])."""
    from expertmesh.workers.local import run_step

    ids = list(range(len(prompts)))
    logits, _ = run_step(model, list(zip(ids, prompts, strict=True)))
    first = logits.float().cpu().numpy()
    tokens = [logits.argmax(-1).tolist()]
    for _ in range(GREEDY_STEPS - 1):
        logits, _ = run_step(model, [(s, [t]) for s, t in zip(ids, tokens[-1], strict=True)])
        tokens.append(logits.argmax(-1).tolist())
    model.cache.free(ids)
    return first, np.array(tokens).T


def measure(shape_name: str, shape: dict, args, device: str) -> dict:
    from expertmesh.workers.fp8_checkpoint import write_fp8_checkpoint

    workdir = Path(args.workdir)
    ckpt = workdir / shape_name
    if not (ckpt / "config.json").exists():
        runtime.write_checkpoint(shape, ckpt, device)
    fp8_ckpt = workdir / f"{shape_name}-fp8"
    if not (fp8_ckpt / "config.json").exists():
        write_fp8_checkpoint(ckpt, fp8_ckpt)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, shape["vocab"], PROMPT_LEN).tolist() for _ in range(PROMPTS)]
    seq_len = runtime.SEQ_LEN if not args.quick else 32
    sizes = PREFILL if not args.quick else [64, 128]
    out = {"prefill": {}, "accuracy": {}}
    reference = None
    for variant in VARIANTS:
        model = _load(fp8_ckpt if variant == "fp8-ckpt" else ckpt, variant, device)
        logits, tokens = _greedy(model, prompts)
        if reference is None:
            reference = (logits, tokens)
        else:
            ref_logits, ref_tokens = reference
            err = np.abs(logits - ref_logits).max(axis=1) / np.abs(ref_logits).max(axis=1)
            same = tokens == ref_tokens
            out["accuracy"][variant] = {
                "max_rel_logit_err": float(err.max()), "median_rel_logit_err": float(np.median(err)),
                "first_token_equal": float(same[:, 0].mean()), "all_tokens_equal": float(same.all(1).mean()),
                "tokens_equal": float(same.mean())}
        out["prefill"][variant] = {}
        for total in sizes:
            t0 = time.perf_counter()
            out["prefill"][variant][total] = runtime.local_prefill(model, total, seq_len, shape["vocab"], rng)
            print(f"{shape_name} {variant} prefill {total}: {out['prefill'][variant][total]:,.0f} tok/s "
                  f"({time.perf_counter() - t0:.1f} s)", file=sys.stderr, flush=True)
        del model
        if device == "cuda":
            import torch

            torch.cuda.empty_cache()
    return out


def render(results: dict, env: dict) -> list[str]:
    lines = ["# FP8 serving on one GPU (bench/fp8_serving.py)", "", describe(env), "",
             f"Command: `{env['command']}`.", "", __doc__.split("\n\n", 2)[2].strip(), "",
             "Target (issue 16): prefill tokens/s fp8 >= 1.3x bf16 at the Qwen3-30B shape.", ""]
    for name, res in results.items():
        sizes = sorted(next(iter(res["prefill"].values())), key=int)
        lines += [f"## {name}", "", "| prefill tokens | " + " | ".join(f"{v} tok/s" for v in VARIANTS)
                  + " | fp8 / bf16 | fp8-dispatch / bf16 |", "|---|" + "---|" * (len(VARIANTS) + 2)]
        for size in sizes:
            val = {v: res["prefill"][v][size] for v in VARIANTS}
            lines.append(f"| {size} | " + " | ".join(f"{val[v]:,.0f}" for v in VARIANTS)
                         + f" | {val['fp8'] / val['bf16']:.2f}x | {val['fp8-dispatch'] / val['bf16']:.2f}x |")
        lines += ["", f"Accuracy against bf16 ({PROMPTS} prompts of {PROMPT_LEN} tokens, {GREEDY_STEPS} greedy "
                  "tokens each):", "",
                  "| variant | max / median logit error (of max \\|logit\\|) | first token equal | all tokens equal "
                  "| tokens equal |", "|---|---|---|---|---|"]
        for v, a in res["accuracy"].items():
            lines.append(f"| {v} | {a['max_rel_logit_err']:.3f} / {a['median_rel_logit_err']:.3f} "
                         f"| {a['first_token_equal']:.0%} | {a['all_tokens_equal']:.0%} | {a['tokens_equal']:.0%} |")
        lines.append("")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--workdir", default="/tmp/expertmesh-runtime")
    ap.add_argument("--shapes", nargs="+", default=list(runtime.SHAPES))
    ap.add_argument("--quick", action="store_true", help="tiny shapes on any device, print only")
    args = ap.parse_args()
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    shapes = runtime.QUICK if args.quick else runtime.SHAPES
    if args.quick:  # FP8 expert GEMMs take 128 x 128 weight blocks
        shapes = {n: dict(s, hidden=128, ffn=128, head_dim=32) for n, s in shapes.items()}
    env = environment("torch", "triton")
    results = {name: measure(name, shapes[name], args, device) for name in args.shapes}
    lines = render(results, env)
    if args.quick:
        print("\n".join(lines))
        return
    print(write_report(args.out, "fp8-serving", lines, {"environment": env, "results": results}).read_text())


if __name__ == "__main__":
    main()
