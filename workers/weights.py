"""What one worker holds: the family module with every non-expert weight (attention is data-parallel), and its
expert shard.

Notation: H hidden, F routed-expert FFN, V vocabulary, E logical experts, S expert slots per GPU and MoE layer.

    load_model_weights(reader, cfg, dtype, device)  -> MoECausalLM, every parameter read by its checkpoint name
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
from .families import MoECausalLM

__all__ = ["ExpertShard", "load_model_weights", "load_expert_shard"]


@dataclass
class ExpertShard:
    slot_expert: list[torch.Tensor]  # per MoE layer, int64 [S]
    w_gate_up: list[torch.Tensor]  # per MoE layer, [S, 2F, H]
    w_down: list[torch.Tensor]  # per MoE layer, [S, H, F]

    def nbytes(self) -> int:
        return sum(w.numel() * w.element_size() for w in (*self.w_gate_up, *self.w_down))


def load_model_weights(reader: CheckpointReader, cfg: ModelConfig, dtype: torch.dtype,
                       device: torch.device | str = "cpu", num_slots: int | None = None) -> MoECausalLM:
    """The family module of the checkpoint with every non-expert tensor read by its parameter's name.

    Routed expert slots (`num_slots` per MoE layer; None: none, as serving holds them in its executor) are
    allocated but not read: `load_expert_shard` reads them by plan. lm_head is the embedding when the config
    ties them or the checkpoint has none. The module is built on the meta device, then each parameter is
    allocated on `device` and filled from the checkpoint: one copy of every weight, never a random init.
    """
    attn = "model.layers.0.self_attn"
    tie = cfg.tie_word_embeddings or "lm_head.weight" not in reader
    with torch.device("meta"):
        module = MoECausalLM(cfg, num_slots, qkv_bias=f"{attn}.q_proj.bias" in reader,
                             o_bias=f"{attn}.o_proj.bias" in reader, tie=tie)
    module = module.to(dtype).to_empty(device=device)
    module.tie()
    with torch.no_grad():
        for name, param in module.named_parameters():  # a tied lm_head is the embedding: read once
            if ".experts." not in name:
                param.copy_(reader.get(name, dtype, tuple(param.shape)))
        for buf in module.buffers():  # the slots' expert ids, set with the experts
            buf.zero_()
    return module


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
