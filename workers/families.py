"""The Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE families as `nn.Module`s: one definition of each family's math,
run by serving (`model.MoEModel`, under inference mode) and by training (`train.TrainableMoE`, with autograd).

Modules and parameters carry the names of the Hugging Face checkpoint, so loading copies every parameter from
the tensor of the same name (`weights.load_model_weights`) and gradients compare with `transformers` by name:

    model.embed_tokens                     [V, H]
    model.layers[i].input_layernorm        [H]        post_attention_layernorm [H]
    model.layers[i].self_attn.{q,k,v,o}_proj          (q/k/v biases where the checkpoint has them: Qwen2-MoE)
    model.layers[i].self_attn.{q,k}_norm   [D] per head (Qwen3-MoE) or [Q*D] / [KV*D] whole projection (OLMoE)
    model.layers[i].mlp                    a dense SwiGLU layer, or the MoE block (`block_sparse_moe` for Mixtral):
        .gate                              [E, H] router
        .experts.gate_up_proj              [S, 2F, H] this rank's routed expert slots (gate rows, then up)
        .experts.down_proj                 [S, H, F]
        .shared_expert, .shared_expert_gate       Qwen2-MoE's sigmoid-gated shared SwiGLU
    model.norm                             [H]
    lm_head                                [V, H] (the embedding's parameter when tied)

Routed experts are held by local slot (slot s holds expert `experts.slot_expert[s]`), as the kernels group
rows; `transformers` holds them by expert ([E, 2F, H]). A serving module holds none (`num_slots=None`): its
worker's `EPExecutor` owns them, possibly in FP8, and replaces them when the plan changes.

The stack runs over a flat batch x [T, H]. What differs between serving and training comes in as two functions:
`attend(layer, q [T, Q, D], k [T, KV, D], v [T, KV, D]) -> [T, Q, D]` (rotated q/k in: the paged KV cache when
serving, causal over whole sequences when training) and `routed(moe_layer, x [T, H], ids [T, k], weights [T, k])
-> [T, H]` (the routed experts' weighted sum: `EPExecutor` when serving, the differentiable pipeline when
training). Notation: T tokens, H hidden, Q heads, KV key/value heads, D head dim, E experts, k top-k, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig

__all__ = [
    "AttendFn", "RoutedFn", "Routing", "rms_norm", "route", "gate_weights", "RMSNorm", "SwiGLU", "Attention",
    "SlotExperts", "SparseMoeBlock", "DecoderLayer", "MoEDecoder", "MoECausalLM",
]

AttendFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
RoutedFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim, in fp32, cast back before the weight (as the reference does)."""
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def route(logits: torch.Tensor, top_k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax top-k gate: logits [T, E] -> (ids int64 [T, k], weights float32 [T, k]), highest first."""
    probs = torch.softmax(logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if normalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return ids, weights


def gate_weights(logits: torch.Tensor, ids: torch.Tensor, normalize: bool) -> torch.Tensor:
    """The gate weights the router would give to experts `ids` [T, k] (for routing replay)."""
    weights = torch.softmax(logits.float(), dim=-1).gather(-1, ids)
    if normalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return weights


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@dataclass(frozen=True)
class Routing:
    """One MoE layer's routing of T tokens: what the losses (training) and the statistics (serving) read."""

    logits: torch.Tensor  # [T, E] router logits, in the activations' dtype
    ids: torch.Tensor  # int64 [T, k]
    weights: torch.Tensor  # float32 [T, k]


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class SwiGLU(nn.Module):
    """down(silu(gate x) * up x): a dense layer's MLP and Qwen2-MoE's shared expert."""

    def __init__(self, hidden: int, ffn: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, ffn, bias=False)
        self.up_proj = nn.Linear(hidden, ffn, bias=False)
        self.down_proj = nn.Linear(ffn, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Attention(nn.Module):
    """Projections, the family's q/k norm, clipping and rotary embedding around an attention core."""

    def __init__(self, cfg: ModelConfig, qkv_bias: bool, o_bias: bool) -> None:
        super().__init__()
        self.cfg = cfg
        H, D = cfg.hidden_size, cfg.head_dim
        qd, kvd = cfg.num_heads * D, cfg.num_kv_heads * D
        self.q_proj = nn.Linear(H, qd, bias=qkv_bias)
        self.k_proj = nn.Linear(H, kvd, bias=qkv_bias)
        self.v_proj = nn.Linear(H, kvd, bias=qkv_bias)
        self.o_proj = nn.Linear(qd, H, bias=o_bias)
        norm_dims = {"head": (D, D), "full": (qd, kvd)}.get(cfg.qk_norm)
        if norm_dims is not None:
            self.q_norm = RMSNorm(norm_dims[0], cfg.rms_norm_eps)
            self.k_norm = RMSNorm(norm_dims[1], cfg.rms_norm_eps)

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """q [T, Q, D], k and v [T, KV, D] of x [T, H], normalised and rotated as the family does."""
        cfg = self.cfg
        T, Q, KV, D = x.shape[0], cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if cfg.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if cfg.clip_qkv is not None:
            q, k, v = (t.clamp(-cfg.clip_qkv, cfg.clip_qkv) for t in (q, k, v))
        q, k, v = q.view(T, Q, D), k.view(T, KV, D), v.view(T, KV, D)
        if cfg.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin, v

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                core: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        q, k, v = self.project(x, cos, sin)
        return self.o_proj(core(q, k, v).reshape(x.shape[0], self.o_proj.in_features))


class SlotExperts(nn.Module):
    """This rank's S routed-expert slots of one MoE layer, fused: gate_up_proj [S, 2F, H], down_proj [S, H, F]."""

    def __init__(self, num_slots: int, hidden: int, ffn: int) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_slots, 2 * ffn, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_slots, hidden, ffn))
        self.register_buffer("slot_expert", torch.zeros(num_slots, dtype=torch.int64), persistent=False)

    @property
    def num_slots(self) -> int:
        return self.gate_up_proj.shape[0]


class SparseMoeBlock(nn.Module):
    """Router, routed experts (computed by the caller's `routed`) and the optional gated shared expert."""

    def __init__(self, cfg: ModelConfig, num_slots: int | None) -> None:
        super().__init__()
        self.cfg = cfg
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.experts = None if num_slots is None else SlotExperts(num_slots, cfg.hidden_size, cfg.expert_ffn)
        if cfg.shared_ffn:
            self.shared_expert = SwiGLU(cfg.hidden_size, cfg.shared_ffn)
            self.shared_expert_gate = nn.Linear(cfg.hidden_size, 1, bias=False)

    def route(self, x: torch.Tensor, override: torch.Tensor | None = None) -> Routing:
        """The router's choice for x [T, H]; `override` int64 [T, k] replaces the chosen ids (routing replay)."""
        logits = self.gate(x)
        if override is None:
            ids, weights = route(logits, self.cfg.top_k, self.cfg.norm_topk_prob)
        else:
            ids, weights = override, gate_weights(logits, override, self.cfg.norm_topk_prob)
        return Routing(logits, ids, weights)

    def forward(self, x: torch.Tensor, moe_layer: int, routed: RoutedFn,
                override: torch.Tensor | None = None) -> tuple[torch.Tensor, Routing]:
        r = self.route(x, override)
        out = routed(moe_layer, x, r.ids, r.weights)
        if self.cfg.shared_ffn:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out, r


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, num_slots: int | None, qkv_bias: bool, o_bias: bool) -> None:
        super().__init__()
        self.layer = layer
        self.self_attn = Attention(cfg, qkv_bias, o_bias)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.moe_layer = cfg.moe_layers.index(layer) if layer in cfg.moe_layers else None
        # Registered under the checkpoint's name of the block: `block_sparse_moe` (Mixtral) or `mlp`.
        self.ffn_name = cfg.moe_prefix if self.moe_layer is not None else "mlp"
        ffn = SwiGLU(cfg.hidden_size, cfg.dense_ffn) if self.moe_layer is None else SparseMoeBlock(cfg, num_slots)
        self.add_module(self.ffn_name, ffn)

    @property
    def ffn(self) -> SwiGLU | SparseMoeBlock:
        return getattr(self, self.ffn_name)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend: AttendFn, routed: RoutedFn,
                override: torch.Tensor | None = None) -> tuple[torch.Tensor, Routing | None]:
        """x [T, H] after this layer, and its routing (None for a dense layer). override: int64 [T, k] ids."""
        h = self.input_layernorm(x)
        x = x + self.self_attn(h, cos, sin, lambda q, k, v: attend(self.layer, q, k, v))
        h = self.post_attention_layernorm(x)
        if self.moe_layer is None:
            return x + self.ffn(h), None
        out, r = self.ffn(h, self.moe_layer, routed, override)
        return x + out, r


class MoEDecoder(nn.Module):
    """`model.*` of the checkpoint: embeddings, decoder layers, final norm."""

    def __init__(self, cfg: ModelConfig, num_slots: int | None, qkv_bias: bool, o_bias: bool) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, num_slots, qkv_bias, o_bias) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend: AttendFn, routed: RoutedFn,
                override_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, list[Routing]]:
        """Every decoder layer over x [T, H] (not the final norm); override_ids int64 [T, L_moe, k] replaces the
        routers' choices. Returns (x after the last layer, the routing of each MoE layer)."""
        routings = []
        for layer in self.layers:
            m = layer.moe_layer
            x, r = layer(x, cos, sin, attend, routed, None if override_ids is None or m is None else override_ids[:, m])
            if r is not None:
                routings.append(r)
        return x, routings


class MoECausalLM(nn.Module):
    """A whole checkpoint's model. num_slots: routed-expert slots per MoE layer held here (None: none, serving);
    qkv_bias / o_bias: whether the attention projections have biases; tie: lm_head shares the embedding."""

    def __init__(self, cfg: ModelConfig, num_slots: int | None = None, qkv_bias: bool = False, o_bias: bool = False,
                 tie: bool = False) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = MoEDecoder(cfg, num_slots, qkv_bias, o_bias)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tied = tie
        self.tie()
        self._inv_freq: torch.Tensor | None = None

    def tie(self) -> None:
        """Make lm_head share the embedding's parameter when tied (again after moving to another device)."""
        if self.tied:
            self.lm_head.weight = self.model.embed_tokens.weight

    def moe_blocks(self) -> list[SparseMoeBlock]:
        """The MoE blocks in MoE-layer order (MoE layer l is decoder layer `cfg.moe_layers[l]`)."""
        return [self.model.layers[i].ffn for i in self.cfg.moe_layers]

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, 1, D] in `dtype` for int64 positions [T] (frequencies in fp32, cached per device)."""
        if self._inv_freq is None or self._inv_freq.device != positions.device:
            D = self.cfg.head_dim
            exponents = torch.arange(0, D, 2, dtype=torch.float32, device=positions.device) / D
            self._inv_freq = 1.0 / (self.cfg.rope_theta**exponents)
        freqs = positions[:, None].float() * self._inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)  # [T, D]
        return emb.cos().to(dtype)[:, None, :], emb.sin().to(dtype)[:, None, :]

    def hidden(self, token_ids: torch.Tensor, positions: torch.Tensor, attend: AttendFn, routed: RoutedFn,
               override_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, list[Routing]]:
        """Final hidden states [T, H] (before the final norm) of flat tokens and positions (int64 [T])."""
        x = self.model.embed_tokens(token_ids)
        cos, sin = self.rope(positions, x.dtype)
        return self.model(x, cos, sin, attend, routed, override_ids)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 [N, V] next-token logits of final hidden states [N, H]."""
        return self.lm_head(self.model.norm(hidden)).float()
