"""The trainable model: a family's `MoECausalLM` over whole sequences with autograd, its routed experts expert-
parallel through the one MoE pipeline.

    model = TrainableMoE.from_checkpoint(path, plan, rank, world_size, TrainSettings(precision="fp8"))
    out = model(input_ids [B, L], labels [B, L])        # TrainOutput: this rank's loss share and its parts
    out.loss.backward()
    model.sum_replica_grads()                           # a replicated expert's slots: the sum over replicas

Parameters carry the checkpoint's names (`model.layers.3.mlp.experts.gate_up_proj` holds this rank's S slots
of MoE layer 1, ...), so optimisers, DeepSpeed and checkpoints see the family's module. Attention is causal
within each sequence (no KV cache, data-parallel: every rank runs its own batch); each MoE layer's routed
experts run `moe_forward` with `TrainableExperts`, whose dispatch and combine backward run the reverse exchanges.

Loss convention (`losses.py`): each rank's `loss` is its share of the group's batch loss (the shares sum to
it), so routed experts' gradients are exact after backward, and every other parameter's gradient must be
SUMMED over the ranks (`sum_dense_grads`; a data-parallel engine that averages must scale by the world size).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from expertmesh.kernels.expert_map import ExpertMap
from expertmesh.kernels.grouped_linear import Recipe
from expertmesh.kernels.moe import TrainableExperts, moe_forward
from expertmesh.placement.plan import Placement

from ..checkpoint import CheckpointReader, RandomReader
from ..config import ModelConfig, read_model_config
from ..families import MoECausalLM
from ..group_config import EXCHANGES
from ..moe import make_exchange
from ..plans import check_plan
from ..weights import load_expert_shard, module_options, read_parameters
from .grads import ReplicaPlan, sum_grads, sum_replica_grads
from .losses import loss_shares

__all__ = ["TrainSettings", "TrainOutput", "TrainableMoE", "PRECISIONS", "FP8_RECIPES"]

PRECISIONS = ("bf16", "fp8")
FP8_RECIPES = ("blockwise", "rowwise")


@dataclass(frozen=True)
class TrainSettings:
    """How a run trains (the same on every rank).

    precision: "bf16" (the model's dtype throughout) or "fp8" (FP8 dispatch and FP8 expert GEMMs in
    `fp8_recipe`: "blockwise", DeepSeek-V3's 1x128 / 128x128 scales, or "rowwise", torchao's). aux_loss_coef:
    None takes the checkpoint's `router_aux_loss_coef`. z_loss_coef: the router z-loss (0: off). exchange:
    "auto" (all_to_all on several ranks) or "symm_mem" (one node, CUDA; `max_tokens` per rank and step).
    """

    precision: str = "bf16"
    fp8_recipe: str = "blockwise"
    aux_loss_coef: float | None = None
    z_loss_coef: float = 0.0
    exchange: str = "auto"
    max_tokens: int = 0

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision: expected one of {PRECISIONS}, got {self.precision!r}")
        if self.fp8_recipe not in FP8_RECIPES:
            raise ValueError(f"fp8_recipe: expected one of {FP8_RECIPES}, got {self.fp8_recipe!r}")
        if self.exchange not in EXCHANGES:
            raise ValueError(f"exchange: expected one of {EXCHANGES}, got {self.exchange!r}")
        if self.z_loss_coef < 0 or (self.aux_loss_coef is not None and self.aux_loss_coef < 0):
            raise ValueError("aux_loss_coef, z_loss_coef: expected >= 0")

    @property
    def recipe(self) -> Recipe:
        return Recipe.BF16 if self.precision == "bf16" else Recipe(f"fp8-{self.fp8_recipe}")


@dataclass(frozen=True)
class TrainOutput:
    """This rank's shares of the group's batch losses (0-dim float32; summed over ranks: the batch's). Only
    `loss` carries gradients; its parts are detached, for logging."""

    loss: torch.Tensor  # lm + aux_coef * aux + z_coef * z: call backward on it
    lm_loss: torch.Tensor
    aux_loss: torch.Tensor  # before its coefficient
    z_loss: torch.Tensor  # before its coefficient
    routed: torch.Tensor  # int64 [B * L, L_moe, k] experts each token chose (routing statistics)


class TrainableMoE(MoECausalLM):
    """`MoECausalLM` with this rank's expert slots of `plan` as parameters, trained expert-parallel over the
    default process group (rank of world_size). Weights come from `reader` (a checkpoint, or seeded random
    ones that agree on every rank: `RandomReader`)."""

    def __init__(self, cfg: ModelConfig, plan: Placement, rank: int = 0, world_size: int = 1,
                 settings: TrainSettings = TrainSettings(), *, reader: CheckpointReader | RandomReader | None = None,
                 dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu") -> None:
        check_plan(plan, cfg, world_size, "the model config")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank: expected 0 <= rank < {world_size}, got {rank}")
        _check_fp8_shape(cfg, settings)
        device = torch.device(device)
        reader = RandomReader(cfg, device) if reader is None else reader
        with torch.device("meta"):
            super().__init__(cfg, plan.slots_per_gpu, **module_options(reader, cfg))
        self.to(dtype).to_empty(device=device)
        self.tie()
        read_parameters(self, reader, dtype)
        shard = load_expert_shard(reader, cfg, plan.phy2log, world_size, rank, dtype, device)
        with torch.no_grad():
            for layer, block in enumerate(self.moe_blocks()):
                block.experts.gate_up_proj.copy_(shard.w_gate_up[layer])
                block.experts.down_proj.copy_(shard.w_down[layer])
                block.experts.slot_expert.copy_(shard.slot_expert[layer])
        self.plan, self.rank, self.world_size, self.settings = plan, rank, world_size, settings
        self.aux_coef = cfg.router_aux_loss_coef if settings.aux_loss_coef is None else settings.aux_loss_coef
        self.maps = [ExpertMap.from_placement(plan, layer, device) for layer in range(plan.num_layers)]
        self.replicas = ReplicaPlan.build(plan, rank, device)
        self.exchange = make_exchange(world_size, settings.exchange, settings.precision == "fp8",
                                      settings.max_tokens, cfg, dtype)

    @classmethod
    def from_checkpoint(cls, model_dir: str | Path, plan: Placement, rank: int = 0, world_size: int = 1,
                        settings: TrainSettings = TrainSettings(), **kwargs) -> TrainableMoE:
        """The model of a Hugging Face checkpoint folder (config.json + safetensors)."""
        return cls(read_model_config(model_dir), plan, rank, world_size, settings,
                   reader=CheckpointReader(model_dir), **kwargs)

    # ---- forward ---------------------------------------------------------------------------------------
    def _attend(self, batch: int):
        cfg = self.cfg

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            T, Q, D = q.shape
            if T == 0:  # a rank without sequences this step still takes part in every exchange
                return q
            L = T // batch
            qb, kb, vb = (t.view(batch, L, t.shape[1], D).transpose(1, 2) for t in (q, k, v))
            o = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, enable_gqa=cfg.num_kv_heads != Q)
            return o.transpose(1, 2).reshape(T, Q, D)
        return attend

    def _routed(self, moe_layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        slots = self.model.layers[self.cfg.moe_layers[moe_layer]].ffn.experts
        experts = TrainableExperts(slots.gate_up_proj, slots.down_proj, self.settings.recipe)
        return moe_forward(x, ids, weights, self.maps[moe_layer], self.exchange, experts)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                override_ids: torch.Tensor | None = None) -> TrainOutput:
        """Losses of B sequences of L tokens (int64 [B, L]; labels default to input_ids, -100 ignored), every
        rank its own batch (collective: every rank of the group calls it, with any B, same number of layers).
        override_ids: int64 [B * L, L_moe, k] experts that replace the routers' choices (routing replay; the
        gate weights are still the routers' probabilities of those experts, with their gradients)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids: expected shape [B, L], got {list(input_ids.shape)}")
        labels = input_ids if labels is None else labels
        if labels.shape != input_ids.shape:
            raise ValueError(f"labels: expected shape {list(input_ids.shape)} like input_ids, got {list(labels.shape)}")
        B, L = input_ids.shape
        positions = torch.arange(L, device=input_ids.device).repeat(B)
        want = (B * L, self.cfg.num_moe_layers, self.cfg.top_k)
        if override_ids is not None and tuple(override_ids.shape) != want:
            raise ValueError(f"override_ids: expected shape {list(want)}, got {list(override_ids.shape)}")
        hidden, routings = self.hidden(input_ids.reshape(-1), positions, self._attend(B), self._routed, override_ids)
        logits = self.logits(hidden).view(B, L, self.cfg.vocab_size)
        shares = loss_shares(logits, labels, routings, self.cfg.num_experts, self.aux_coef,
                             self.settings.z_loss_coef, self.world_size)
        return TrainOutput(shares.loss, shares.lm.detach(), shares.aux.detach(), shares.z.detach(),
                           torch.stack([r.ids for r in routings], 1))

    # ---- gradients -------------------------------------------------------------------------------------
    def expert_parameters(self) -> list[nn.Parameter]:
        """This rank's routed-expert parameters (slot-indexed; reduced within their expert's replicas)."""
        return [p for b in self.moe_blocks() for p in (b.experts.gate_up_proj, b.experts.down_proj)]

    def dense_parameters(self) -> list[nn.Parameter]:
        """Every other parameter (replicated on every rank; data-parallel)."""
        experts = {id(p) for p in self.expert_parameters()}
        return [p for p in self.parameters() if id(p) not in experts]

    def sum_replica_grads(self) -> None:
        """After backward: every slot of a replicated expert gets the sum of its replicas' gradients (collective)."""
        params = [(b.experts.gate_up_proj, b.experts.down_proj) for b in self.moe_blocks()]
        sum_replica_grads(params, self.replicas, self.world_size)

    def sum_dense_grads(self) -> None:
        """After backward: sum the dense parameters' gradients over the ranks (collective; see the loss
        convention in the module docstring)."""
        sum_grads(self.dense_parameters(), self.world_size)


def _check_fp8_shape(cfg: ModelConfig, settings: TrainSettings) -> None:
    if settings.precision != "fp8":
        return
    multiple = 16 if settings.recipe is Recipe.FP8_ROWWISE else 128
    for name, value in (("hidden_size", cfg.hidden_size), ("moe_intermediate_size", cfg.expert_ffn)):
        if value % multiple:
            raise ValueError(f"{name}: FP8 {settings.fp8_recipe} expert GEMMs need a multiple of {multiple}, "
                             f"got {value}")

