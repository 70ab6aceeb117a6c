"""The model description the runtime needs, read from a Hugging Face `config.json`.

Families (the `model_type` field):

| family      | gate: softmax, top-k, then | shared expert        | q/k norm            | MoE block key      |
|-------------|----------------------------|----------------------|---------------------|--------------------|
| `mixtral`   | renormalised               | none                 | none                | `block_sparse_moe` |
| `qwen2_moe` | `norm_topk_prob`           | sigmoid-gated SwiGLU | none                | `mlp`              |
| `qwen3_moe` | `norm_topk_prob`           | none                 | per head (head_dim) | `mlp`              |
| `olmoe`     | `norm_topk_prob`           | none                 | whole projection    | `mlp`              |

Qwen families may keep some decoder layers dense (`mlp_only_layers`, `decoder_sparse_step`); `moe_layers`
lists the decoder layers that are MoE, in order, and MoE layer `l` of a plan is decoder layer `moe_layers[l]`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ModelConfig", "ModelConfigError", "FAMILIES", "read_model_config"]

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")


class ModelConfigError(ValueError):
    """A `config.json` the runtime cannot serve; the message names the field."""


@dataclass(frozen=True)
class ModelConfig:
    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int  # decoder layers
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    num_experts: int
    top_k: int
    expert_ffn: int  # intermediate size of one routed expert
    dense_ffn: int  # intermediate size of a dense (non-MoE) layer's MLP
    shared_ffn: int  # intermediate size of the shared expert, 0 if none
    norm_topk_prob: bool
    qk_norm: str  # "none" | "head" | "full"
    clip_qkv: float | None
    moe_layers: tuple[int, ...]
    tie_word_embeddings: bool
    dtype: str  # checkpoint dtype as named in config.json ("bfloat16", "float32", ...)
    quantization: str | None = None  # "fp8": block-scaled FP8 weights (fp8_checkpoint.py); None: plain

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ModelConfigError(f"model_type: expected one of {FAMILIES}, got {self.family!r}")
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                     "num_experts", "top_k", "expert_ffn"):
            if int(getattr(self, name)) < 1:
                raise ModelConfigError(f"{name}: expected a positive integer, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ModelConfigError(
                f"num_key_value_heads: expected a divisor of num_attention_heads={self.num_heads}, "
                f"got {self.num_kv_heads}"
            )
        if self.top_k > self.num_experts:
            raise ModelConfigError(
                f"num_experts_per_tok: expected <= {self.num_experts} experts, got {self.top_k}"
            )
        if self.head_dim % 2:
            raise ModelConfigError(f"head_dim: rotary embeddings need an even head_dim, got {self.head_dim}")
        if not self.moe_layers:
            raise ModelConfigError("mlp_only_layers/decoder_sparse_step: the model has no MoE layer")
        if self.qk_norm not in ("none", "head", "full"):
            raise ModelConfigError(f"qk_norm: expected 'none', 'head' or 'full', got {self.qk_norm!r}")

    @property
    def num_moe_layers(self) -> int:
        return len(self.moe_layers)

    @property
    def moe_prefix(self) -> str:
        """Name of the MoE block inside a decoder layer's checkpoint keys."""
        return "block_sparse_moe" if self.family == "mixtral" else "mlp"

    def expert_bytes(self, bytes_per_element: int) -> int:
        """Bytes of one routed expert's three matrices."""
        return 3 * self.hidden_size * self.expert_ffn * bytes_per_element


def _field(doc: dict, *names: str, default=None, required: bool = True):
    for name in names:
        if doc.get(name) is not None:
            return doc[name]
    if default is not None or not required:
        return default
    raise ModelConfigError(f"{names[0]}: missing from config.json")


def _rope_theta(doc: dict) -> float:
    params = doc.get("rope_parameters") or doc.get("rope_scaling") or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise ModelConfigError(
            f"rope_parameters.rope_type: only 'default' rotary embeddings are supported, got {rope_type!r}"
        )
    theta = params.get("rope_theta", doc.get("rope_theta"))
    if theta is None:
        raise ModelConfigError("rope_theta: missing from config.json (neither rope_parameters nor top level)")
    return float(theta)


def _sliding_window_active(doc: dict, family: str) -> bool:
    if family == "mixtral":
        return doc.get("sliding_window") is not None
    if family in ("qwen2_moe", "qwen3_moe"):
        return bool(doc.get("use_sliding_window")) and doc.get("sliding_window") not in (None, 0)
    return False


def _quantization(doc: dict) -> str | None:
    """None for a plain checkpoint, "fp8" for block-scaled E4M3 (128 x 128); anything else is refused."""
    q = doc.get("quantization_config")
    if not q:
        return None
    method, block = q.get("quant_method"), q.get("weight_block_size")
    if method != "fp8" or q.get("fmt", "e4m3") != "e4m3" or list(block or []) != [128, 128]:
        raise ModelConfigError(
            "quantization_config: only block-scaled FP8 is supported (quant_method 'fp8', fmt 'e4m3', "
            f"weight_block_size [128, 128]), got {json.dumps(q)}")
    return "fp8"


def read_model_config(model_dir: str | Path) -> ModelConfig:
    """Parse `model_dir/config.json` into a `ModelConfig`, refusing what the runtime does not implement."""
    path = Path(model_dir) / "config.json"
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelConfigError(f"{path}: no config.json in the model directory") from None
    except json.JSONDecodeError as exc:
        raise ModelConfigError(f"{path}: not valid JSON ({exc})") from None
    family = doc.get("model_type")
    if family not in FAMILIES:
        raise ModelConfigError(f"model_type: expected one of {FAMILIES}, got {family!r}")
    if doc.get("hidden_act", "silu") != "silu":
        raise ModelConfigError(f"hidden_act: expected 'silu' (SwiGLU experts), got {doc.get('hidden_act')!r}")
    if _sliding_window_active(doc, family):
        raise ModelConfigError(
            "sliding_window: sliding-window attention is not implemented; expected null, "
            f"got {doc.get('sliding_window')}"
        )

    hidden = int(_field(doc, "hidden_size"))
    heads = int(_field(doc, "num_attention_heads"))
    layers = int(_field(doc, "num_hidden_layers"))
    experts = int(_field(doc, "num_local_experts" if family == "mixtral" else "num_experts",
                         "num_experts", "num_local_experts"))
    dense_ffn = int(_field(doc, "intermediate_size"))
    if family in ("qwen2_moe", "qwen3_moe"):
        expert_ffn = int(_field(doc, "moe_intermediate_size"))
        mlp_only = set(doc.get("mlp_only_layers") or [])
        step = int(doc.get("decoder_sparse_step") or 1)
        moe_layers = tuple(i for i in range(layers) if i not in mlp_only and (i + 1) % step == 0)
    else:
        expert_ffn = dense_ffn
        moe_layers = tuple(range(layers))
    qk_norm = {"qwen3_moe": "head", "olmoe": "full"}.get(family, "none")
    norm_topk = True if family == "mixtral" else bool(doc.get("norm_topk_prob", False))
    shared = int(doc.get("shared_expert_intermediate_size") or 0) if family == "qwen2_moe" else 0
    return ModelConfig(
        family=family,
        vocab_size=int(_field(doc, "vocab_size")),
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=int(_field(doc, "num_key_value_heads", default=heads)),
        head_dim=int(_field(doc, "head_dim", default=hidden // heads)),
        rms_norm_eps=float(_field(doc, "rms_norm_eps", default=1e-6)),
        rope_theta=_rope_theta(doc),
        num_experts=experts,
        top_k=int(_field(doc, "num_experts_per_tok")),
        expert_ffn=expert_ffn,
        dense_ffn=dense_ffn,
        shared_ffn=shared,
        norm_topk_prob=norm_topk,
        qk_norm=qk_norm,
        clip_qkv=None if doc.get("clip_qkv") is None else float(doc["clip_qkv"]),
        moe_layers=moe_layers,
        tie_word_embeddings=bool(doc.get("tie_word_embeddings", False)),
        dtype=str(doc.get("dtype") or doc.get("torch_dtype") or "float32"),
        quantization=_quantization(doc),
    )
