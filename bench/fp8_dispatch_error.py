"""Where the logit error of FP8 dispatch comes from on bench/fp8_serving.py's random-weight models.

    python bench/fp8_dispatch_error.py [--shapes mixtral qwen3_30b] [--ffn N] [--out FILE.json]

The same random models as bench/runtime.py (2 decoder layers, N(0, 0.02^2) weights, the real dimensions; built
in memory from `RandomReader`, no checkpoint written). For each shape, bf16 against fp8-dispatch on the same
prompts (bench/fp8_serving.py's: 32 x 64 tokens):

- quantisation: the relative error of every MoE input row after the 1 x 128 E4M3 round trip (rms over the row
  and the worst element in E4M3's normal range), against E4M3's bound 2^-4 per element;
- routing: the share of tokens whose expert set differs from bf16's in each MoE layer (FP8 dispatch quantises
  after the router, so layer 0 must agree exactly; later routers see the perturbed residual stream);
- logits: the last position's max |logit error| / max |logit| with the routers free, and again with every
  layer's routing replayed from the bf16 run (`override_ids`), which removes the expert flips and leaves the
  quantisation noise alone; the bf16 top-1 - top-2 logit margin against the fp8-dispatch logit error.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import runtime  # noqa: E402  (the shapes and the config of bench/runtime.py's checkpoints)

from expertmesh.kernels.exchange import FP8_TILE  # noqa: E402
from expertmesh.kernels.fp8 import dequantize_fp8, quantize_fp8  # noqa: E402

PROMPTS, PROMPT_LEN = 32, 64


def build(shape: dict, precision: str, device: str, dtype: torch.dtype):
    """A `MoEModel` with `RandomReader` weights (the same seed and names as the checkpoints)."""
    from expertmesh.workers.checkpoint import RandomReader
    from expertmesh.workers.config import read_model_config
    from expertmesh.workers.model import MoEModel
    from expertmesh.workers.moe import EPExecutor
    from expertmesh.workers.plans import contiguous_plan
    from expertmesh.workers.weights import load_expert_shard, load_model_weights

    with tempfile.TemporaryDirectory() as tmp:
        runtime.hf_config(shape).save_pretrained(tmp)
        cfg = read_model_config(tmp)
    reader = RandomReader(cfg, device)
    plan = contiguous_plan(cfg.num_moe_layers, cfg.num_experts, 1)
    executor = EPExecutor(cfg, 0, 1, torch.device(device), dtype, precision)
    executor.load(plan, load_expert_shard(reader, cfg, plan.phy2log, 1, 0, dtype, torch.device(device)))
    return MoEModel(cfg, load_model_weights(reader, cfg, dtype, torch.device(device)), executor, dtype,
                    torch.device(device), False)


def prefill(model, prompts, override=None, capture: list | None = None):
    """(last-position logits float32 [P, V], routed ids [T, L, k]); capture: appends every MoE layer's input."""
    from expertmesh.workers.local import run_step

    hooks = []
    if capture is not None:
        for layer in model.cfg.moe_layers:
            ffn = model.module.model.layers[layer].ffn
            hooks.append(ffn.register_forward_pre_hook(lambda mod, args: capture.append(args[0].detach())))
    ids = list(range(len(prompts)))
    try:
        logits, routed = run_step(model, list(zip(ids, prompts, strict=True)), override)
    finally:
        for h in hooks:
            h.remove()
        model.cache.free(ids)
    return logits.float(), routed


def quant_error(x: torch.Tensor) -> dict:
    """The 1 x 128 E4M3 round trip of MoE input rows x [T, H]: rms relative error per row, worst element."""
    q, s = quantize_fp8(x, FP8_TILE)
    xf = x.float()
    d = dequantize_fp8(q, s, FP8_TILE, torch.float32) - xf
    rel_rows = d.norm(dim=1) / xf.norm(dim=1)
    tiny = s.repeat_interleave(FP8_TILE, 1)[:, :x.shape[1]] * 2.0 ** -6  # E4M3's smallest normal, per tile
    normal = xf.abs() >= tiny
    worst = float((d.abs() / xf.abs().clamp(min=1e-30))[normal].max())
    amax_over_rms = float((xf.abs().amax(1) / xf.pow(2).mean(1).sqrt()).median())
    return {"row_rms_rel_median": float(rel_rows.median()), "row_rms_rel_max": float(rel_rows.max()),
            "worst_elem_rel_normal": worst, "bound": 2.0 ** -4, "row_amax_over_rms_median": amax_over_rms}


def _rel(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    return ((a - b).abs().amax(1) / b.abs().amax(1)).cpu().numpy()


def analyse(name: str, shape: dict, device: str, dtype: torch.dtype) -> dict:
    rng = np.random.default_rng(0)  # the prompts of bench/fp8_serving.py
    prompts = [rng.integers(0, shape["vocab"], PROMPT_LEN).tolist() for _ in range(PROMPTS)]
    ref = build(shape, "bf16", device, dtype)
    inputs: list[torch.Tensor] = []
    ref_logits, ref_routed = prefill(ref, prompts, capture=inputs)
    del ref
    fp8 = build(shape, "fp8-dispatch", device, dtype)
    logits, routed = prefill(fp8, prompts)
    replay_logits, _ = prefill(fp8, prompts, override=ref_routed)
    same = (ref_routed.sort(-1).values == routed.sort(-1).values).all(-1)  # [T, L]
    last = torch.arange(1, PROMPTS + 1, device=same.device) * PROMPT_LEN - 1
    err, err_replay = _rel(logits, ref_logits), _rel(replay_logits, ref_logits)
    top2 = ref_logits.topk(2, dim=-1).values
    margin = ((top2[:, 0] - top2[:, 1]) / ref_logits.abs().amax(1)).cpu().numpy()
    flipped_last = (~same[last]).any(-1).cpu().numpy()
    first_equal = (logits.argmax(-1) == ref_logits.argmax(-1)).float().mean().item()
    first_equal_replay = (replay_logits.argmax(-1) == ref_logits.argmax(-1)).float().mean().item()
    res = {
        "quantisation": [quant_error(x) for x in inputs],
        "tokens_rerouted_per_layer": [float(v) for v in (~same).float().mean(0).cpu()],
        "logit_err_max": float(err.max()), "logit_err_median": float(np.median(err)),
        "logit_err_replay_max": float(err_replay.max()), "logit_err_replay_median": float(np.median(err_replay)),
        "logit_err_median_last_token_rerouted": float(np.median(err[flipped_last])) if flipped_last.any() else None,
        "logit_err_median_last_token_same": float(np.median(err[~flipped_last])) if (~flipped_last).any() else None,
        "last_tokens_rerouted": float(flipped_last.mean()),
        "first_token_equal": first_equal, "first_token_equal_replay": first_equal_replay,
        "margin_over_max_logit_median": float(np.median(margin)),
        "prompts_margin_below_err": float((margin < 2 * err).mean()),
    }
    print(name, json.dumps(res, indent=1), flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", nargs="+", default=["mixtral", "qwen3_30b"])
    ap.add_argument("--ffn", type=int, default=0, help="override the expert FFN width (a smaller CPU model)")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    results = {}
    for name in args.shapes:
        shape = dict(runtime.SHAPES[name], **({"ffn": args.ffn} if args.ffn else {}))
        results[name] = dict(analyse(name, shape, device, dtype), shape=shape, dtype=str(dtype))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
