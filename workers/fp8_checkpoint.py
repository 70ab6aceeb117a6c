"""FP8 checkpoints in the block-scaled format DeepSeek-V3 and the Qwen3 FP8 models ship, written and read.

A quantised linear weight w [N, K] is stored as two tensors under its name:

    <name>            float8_e4m3fn [N, K]
    <name>_scale_inv  float32 [ceil(N / 128), ceil(K / 128)]     w[n, k] ~= q[n, k] * scale_inv[n // 128, k // 128]

(the "inverse" is the factor that dequantises, as in those checkpoints), and `config.json` gains
`quantization_config = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
"weight_block_size": [128, 128]}`. Each block's scale is amax(|block|) / 448, so its largest element is
exact and re-quantising a dequantised block gives back the same codes and scale: a worker that reads an
FP8 checkpoint at `precision: fp8` runs exactly the checkpoint's expert weights.

What is quantised: the projection weights of attention, dense MLPs, shared experts and routed experts.
Embeddings, the LM head, norms and the router gates stay in the source dtype (as in those checkpoints).
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

__all__ = ["BLOCK", "SCALE_SUFFIX", "quantize_blockwise", "dequantize_blockwise", "is_quantized_name",
           "write_fp8_checkpoint"]

BLOCK = 128
SCALE_SUFFIX = "_scale_inv"
_FP8 = torch.float8_e4m3fn
_FP8_MAX = 448.0
# Linear weights that are quantised: attention projections, SwiGLU projections (dense, shared and routed
# experts, in both per-expert layouts and the fused one). Router gates (`mlp.gate.weight`,
# `block_sparse_moe.gate.weight`) and `shared_expert_gate` do not match.
_QUANTISED = re.compile(
    r"\.(self_attn\.[qkvo]_proj|(mlp|shared_expert|experts\.\d+)\.(gate|up|down)_proj|experts\.\d+\.w[123]"
    r"|experts\.(gate_up|down)_proj)(\.weight)?$")


def is_quantized_name(name: str) -> bool:
    return bool(_QUANTISED.search(name))


def _blocks(shape: torch.Size) -> tuple[int, int]:
    return -(-shape[-2] // BLOCK), -(-shape[-1] // BLOCK)


def quantize_blockwise(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q float8_e4m3fn like w, scale_inv float32 [..., ceil(N/128), ceil(K/128)]) of w [..., N, K]."""
    *lead, N, K = w.shape
    nb, kb = _blocks(w.shape)
    padded = torch.nn.functional.pad(w.float(), (0, kb * BLOCK - K, 0, nb * BLOCK - N))
    blocks = padded.reshape(*lead, nb, BLOCK, kb, BLOCK)
    scale = blocks.abs().amax(dim=(-3, -1)).clamp(min=1e-30) / _FP8_MAX  # [..., nb, kb]
    q = (blocks / scale[..., :, None, :, None]).clamp(-_FP8_MAX, _FP8_MAX).to(_FP8)
    return q.reshape(*lead, nb * BLOCK, kb * BLOCK)[..., :N, :K].contiguous(), scale


def dequantize_blockwise(q: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """q [..., N, K] times its block's factor, in `dtype`."""
    N, K = q.shape[-2:]
    if tuple(scale_inv.shape[-2:]) != _blocks(q.shape):
        raise ValueError(f"scale_inv: expected [..., {_blocks(q.shape)[0]}, {_blocks(q.shape)[1]}] for a weight "
                         f"of shape {list(q.shape)}, got {list(scale_inv.shape)}")
    full = scale_inv.repeat_interleave(BLOCK, -2).repeat_interleave(BLOCK, -1)[..., :N, :K]
    return (q.float() * full).to(dtype)


def write_fp8_checkpoint(src: str | Path, dst: str | Path,
                         progress: Callable[[int, int], None] | None = None) -> Path:
    """Write the FP8 form of the Hugging Face checkpoint in `src` (safetensors) to `dst`, file by file.

    Tensors keep their names and files; each quantised weight gains its `_scale_inv`. config.json gets the
    quantization_config; the other small files (tokenizer, generation config) are copied.
    """
    src, dst = Path(src), Path(dst)
    config = json.loads((src / "config.json").read_text())
    if config.get("quantization_config"):
        raise ValueError(f"{src}: already quantised ({config['quantization_config'].get('quant_method')})")
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{src}: no *.safetensors files")
    dst.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    for i, file in enumerate(files):
        out: dict[str, torch.Tensor] = {}
        with safe_open(file, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                t = f.get_tensor(name)
                if is_quantized_name(name) and t.dim() >= 2 and t.is_floating_point():
                    out[name], out[name + SCALE_SUFFIX] = quantize_blockwise(t)
                else:
                    out[name] = t
        save_file(out, dst / file.name, metadata={"format": "pt"})
        weight_map.update({name: file.name for name in out})
        if progress is not None:
            progress(i + 1, len(files))
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": [BLOCK, BLOCK]}
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    for extra in src.iterdir():
        if extra.is_file() and extra.suffix != ".safetensors" and extra.name not in (
                "config.json", "model.safetensors.index.json"):
            shutil.copy2(extra, dst / extra.name)
    return dst
