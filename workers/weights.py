"""The tensors one worker holds: every non-expert weight (attention is data-parallel) and its expert shard.

Notation: H hidden, F routed-expert FFN, V vocabulary, E logical experts, n_l experts held at MoE layer l.

    ExpertShard.slot_expert[l] int64 [S]       logical expert in each local slot of MoE layer l
                                               (`phy2log[l, rank * S : (rank + 1) * S]`)
    ExpertShard.w_gate_up[l]   [S, 2F, H]      gate rows then up rows (the `transformers` 5 fused layout)
    ExpertShard.w_down[l]      [S, H, F]

Weights are indexed by local slot, as the kernels' expert layout groups rows by slot. A second replica
of an expert on the same GPU is read from disk once and copied; it gets no tokens (the replica-choice
rule picks GPUs, and a GPU serves an expert from its lowest slot).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .checkpoint import CheckpointReader
from .config import ModelConfig

__all__ = [
    "AttentionWeights", "MLPWeights", "LayerWeights", "ModelWeights", "ExpertShard",
    "load_model_weights", "load_expert_shard",
]


@dataclass
class AttentionWeights:
    q: torch.Tensor  # [heads * D, H]
    k: torch.Tensor  # [kv_heads * D, H]
    v: torch.Tensor  # [kv_heads * D, H]
    o: torch.Tensor  # [H, heads * D]
    q_bias: torch.Tensor | None = None
    k_bias: torch.Tensor | None = None
    v_bias: torch.Tensor | None = None
    o_bias: torch.Tensor | None = None
    q_norm: torch.Tensor | None = None  # [D] (per head) or [heads * D] (whole projection)
    k_norm: torch.Tensor | None = None


@dataclass
class MLPWeights:
    """A SwiGLU MLP: down(silu(gate x) * up x)."""

    gate: torch.Tensor  # [F, H]
    up: torch.Tensor  # [F, H]
    down: torch.Tensor  # [H, F]


@dataclass
class LayerWeights:
    input_norm: torch.Tensor  # [H]
    post_norm: torch.Tensor  # [H]
    attn: AttentionWeights
    dense: MLPWeights | None = None  # dense decoder layers only
    router: torch.Tensor | None = None  # [E, H], MoE layers only
    shared: MLPWeights | None = None  # Qwen2-MoE shared expert
    shared_gate: torch.Tensor | None = None  # [1, H]


@dataclass
class ModelWeights:
    embed: torch.Tensor  # [V, H]
    final_norm: torch.Tensor  # [H]
    lm_head: torch.Tensor  # [V, H] (the embedding itself when tied)
    layers: list[LayerWeights]


@dataclass
class ExpertShard:
    slot_expert: list[torch.Tensor]  # per MoE layer, int64 [S]
    w_gate_up: list[torch.Tensor]  # per MoE layer, [S, 2F, H]
    w_down: list[torch.Tensor]  # per MoE layer, [S, H, F]

    def nbytes(self) -> int:
        return sum(w.numel() * w.element_size() for w in (*self.w_gate_up, *self.w_down))


class _OnDevice:
    """A reader whose tensors land on `device` (one copy per tensor: a tied lm_head stays the embedding)."""

    def __init__(self, reader: CheckpointReader, device: torch.device | str) -> None:
        self.reader, self.device = reader, torch.device(device)

    def __contains__(self, name: str) -> bool:
        return name in self.reader

    def get(self, name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        return self.reader.get(name, dtype, shape).to(self.device)

    def get_optional(self, name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor | None:
        return self.get(name, dtype, shape) if name in self.reader else None


def _mlp(reader: CheckpointReader, prefix: str, H: int, F: int, dtype: torch.dtype) -> MLPWeights:
    return MLPWeights(
        reader.get(f"{prefix}.gate_proj.weight", dtype, (F, H)),
        reader.get(f"{prefix}.up_proj.weight", dtype, (F, H)),
        reader.get(f"{prefix}.down_proj.weight", dtype, (H, F)),
    )


def load_model_weights(reader: CheckpointReader, cfg: ModelConfig, dtype: torch.dtype,
                       device: torch.device | str = "cpu") -> ModelWeights:
    """Every non-expert tensor of the checkpoint (embeddings, attention, norms, routers, shared experts)."""
    reader = _OnDevice(reader, device)
    H, D = cfg.hidden_size, cfg.head_dim
    qd, kvd = cfg.num_heads * D, cfg.num_kv_heads * D
    layers = []
    moe = set(cfg.moe_layers)
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}"
        a = f"{p}.self_attn"
        norm_dims = {"head": (D, D), "full": (qd, kvd)}.get(cfg.qk_norm)
        attn = AttentionWeights(
            q=reader.get(f"{a}.q_proj.weight", dtype, (qd, H)),
            k=reader.get(f"{a}.k_proj.weight", dtype, (kvd, H)),
            v=reader.get(f"{a}.v_proj.weight", dtype, (kvd, H)),
            o=reader.get(f"{a}.o_proj.weight", dtype, (H, qd)),
            q_bias=reader.get_optional(f"{a}.q_proj.bias", dtype, (qd,)),
            k_bias=reader.get_optional(f"{a}.k_proj.bias", dtype, (kvd,)),
            v_bias=reader.get_optional(f"{a}.v_proj.bias", dtype, (kvd,)),
            o_bias=reader.get_optional(f"{a}.o_proj.bias", dtype, (H,)),
            q_norm=None if norm_dims is None else reader.get(f"{a}.q_norm.weight", dtype, (norm_dims[0],)),
            k_norm=None if norm_dims is None else reader.get(f"{a}.k_norm.weight", dtype, (norm_dims[1],)),
        )
        layer = LayerWeights(
            input_norm=reader.get(f"{p}.input_layernorm.weight", dtype, (H,)),
            post_norm=reader.get(f"{p}.post_attention_layernorm.weight", dtype, (H,)),
            attn=attn,
        )
        if i in moe:
            m = f"{p}.{cfg.moe_prefix}"
            layer.router = reader.get(f"{m}.gate.weight", dtype, (cfg.num_experts, H))
            if cfg.shared_ffn:
                layer.shared = _mlp(reader, f"{m}.shared_expert", H, cfg.shared_ffn, dtype)
                layer.shared_gate = reader.get(f"{m}.shared_expert_gate.weight", dtype, (1, H))
        else:
            layer.dense = _mlp(reader, f"{p}.mlp", H, cfg.dense_ffn, dtype)
        layers.append(layer)
    embed = reader.get("model.embed_tokens.weight", dtype, (cfg.vocab_size, H))
    if cfg.tie_word_embeddings or "lm_head.weight" not in reader:
        lm_head = embed
    else:
        lm_head = reader.get("lm_head.weight", dtype, (cfg.vocab_size, H))
    return ModelWeights(embed, reader.get("model.norm.weight", dtype, (H,)), lm_head, layers)


def load_expert_shard(reader: CheckpointReader, cfg: ModelConfig, phy2log: np.ndarray, num_gpus: int,
                      rank: int, dtype: torch.dtype, device: torch.device | str,
                      previous: ExpertShard | None = None) -> ExpertShard:
    """Read exactly the experts the plan's slots give `rank` (phy2log [L, R]), and nothing of the others.

    With `previous` (the shard of the plan being replaced), experts this rank already holds are copied on
    the device instead of read, and each layer of `previous` is released as soon as its replacement is
    built, so a re-placement needs one layer of extra memory, not a second shard.
    """
    F, H = cfg.expert_ffn, cfg.hidden_size
    S = phy2log.shape[1] // num_gpus
    slot_expert, gate_up, down = [], [], []
    for moe_layer in range(phy2log.shape[0]):
        decoder_layer = cfg.moe_layers[moe_layer]
        slots = phy2log[moe_layer, rank * S : (rank + 1) * S]
        w13 = torch.empty((S, 2 * F, H), dtype=dtype, device=device)
        w2 = torch.empty((S, H, F), dtype=dtype, device=device)
        held: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        if previous is not None:
            for s, e in enumerate(previous.slot_expert[moe_layer].tolist()):
                held.setdefault(e, (previous.w_gate_up[moe_layer][s], previous.w_down[moe_layer][s]))
        for s, e in enumerate(slots.tolist()):
            if e in held:  # already on this device: a second replica here, or kept from the last plan
                w13[s].copy_(held[e][0])
                w2[s].copy_(held[e][1])
                continue
            g, u, d = reader.expert(cfg, decoder_layer, e, dtype)
            w13[s, :F].copy_(g)
            w13[s, F:].copy_(u)
            w2[s].copy_(d)
            held[e] = (w13[s], w2[s])
        if previous is not None:  # release the replaced layer before building the next one
            previous.w_gate_up[moe_layer] = previous.w_down[moe_layer] = None
        slot_expert.append(torch.tensor(slots.tolist(), dtype=torch.int64, device=device))
        gate_up.append(w13)
        down.append(w2)
    return ExpertShard(slot_expert, gate_up, down)
