"""expertmesh.kernels: the data path of expert parallelism (EP) on one rank, torch reference + fast paths.

Every op has a plain-torch reference (runs on CPU, fp32/bf16, gloo) and, where it applies, a fast path
(Triton on CUDA, `torch._grouped_mm`, torch symmetric memory) picked by one dispatch point: `impl="auto"`
(default) takes the fast path for CUDA tensors -- or for CPU tensors under `TRITON_INTERPRET=1` -- and
the reference elsewhere; `impl="torch"` / `impl="triton"` force one.

Notation: T tokens on this rank, k experts per token (top-k), H hidden size, E logical experts, G ranks
(GPUs) of the EP group (`rank` = this GPU's index), S expert slots per GPU (R = G * S slots per layer),
D = min(k, G), N rows received by this rank, M expert-input rows, F expert FFN width.

Per MoE layer, inside a worker (`moe.moe_forward` is this pipeline; the runtime, benchmarks and training
call it):

    emap     = ExpertMap.from_placement(placement, layer, device)     # once per placement version
    exchange = AllToAllExchange(group, fp8=False)                      # or SymmMemExchange / LocalExchange
    experts  = make_experts(w13 [S, 2F, H], w2 [S, H, F], precision)   # DenseExperts or FP8Experts
    layout   = build_layout(topk_ids [T, k], topk_weights [T, k], emap, rank)        # DispatchLayout
    recv     = exchange.dispatch(x [T, H], layout)                                   # Received, N rows
    el       = build_expert_layout(recv.slots [N, k], S, recv.valid, align=1)        # ExpertLayout, M rows
    y        = experts(recv, el, x.dtype)   # permute (+ dequant of FP8 dispatch) and SwiGLU grouped GEMMs
    out      = exchange.combine(y, el, recv, layout)                                 # [T, H]

    out[t] == sum_j topk_weights[t, j] * expert_{topk_ids[t, j]}(x[t])

Which GPU serves a pair: `choose_replicas` (torch port of `expertmesh.placement.routing.choose_replicas`,
tested equal): the replica on the token's own GPU, else one on its node, else spread by (token index +
expert) mod replicas. Source = rank, token index = position
of the token on this rank. With `emap.replica_rule == "balanced"` (the run-time hedge), `choose_balanced`
instead: from every rank's pairs per expert (`exchange.gather_counts(expert_counts(topk_ids, E))`, one
[G, E] all-gather before the layout, done by `moe_forward`; `build_layout(..., counts=...)`), each replicated
expert's pairs are split over its replicas to balance the GPUs' loads in this batch, locality kept where it
costs no balance (placement/routing.py states the rule; `choose_balanced` is tested equal to it).

Exact layout (details in `layout.py`, `expert_map.py`):
- Local expert index = physical slot: local slot s of GPU g is global slot g * S + s of `phy2log[layer]`;
  expert compute on a GPU runs its S slots in slot order (`el.offsets[s]` = end row of slot s). A
  logical expert with several slots on one GPU is served by its lowest local slot there.
- Dispatch sends each token ONCE to each rank serving one of its experts (`layout.dests` [T, D]),
  destination-major (block d has `layout.send_counts[d]` rows, tokens in order), each copy with its k
  pairs' local slots (-1: served elsewhere) and weights. `layout.send_counts` equals row `rank` of
  `placement.routing.dispatch_counts` (entry `rank` = the copy kept local).
- The receiver groups pairs by slot (`el`), runs the experts, reduces each received row's outputs with
  the pair weights, and combine returns one row per copy; the source sums a token's copies.

Measuring bytes: after each call `exchange.last_dispatch` / `last_combine` is a `Traffic` with per
destination rank `rows` [G], `payload` [G] bytes (rows x H x element size: the cost model's copies x
hidden x bytes, exactly) and `extra` [G] bytes (FP8 scales + metadata); `wire_bytes()` excludes the local
copy. `layout.send_counts` is available before sending.

FP8: `quantize_fp8(x, tile=128)` -> (float8_e4m3fn [N, H], float32 scales [N, H/128]), DeepSeek-V3's
1x128 format; `exchange(fp8=True)` dispatches FP8 and combines in the activation dtype (BF16).
`swiglu_experts_fp8` runs `torch._scaled_grouped_mm` (rowwise) with `quantize_weights_fp8` weights; feed
it groups padded to 16 rows (`build_expert_layout(..., align=16)`). `scaled_grouped_mm_blockwise` takes the
1x128 activations as dispatched and `quantize_weights_fp8_blockwise` weights (one scale per 128x128 block,
DeepSeek-V3's training format) through our Triton kernel. A layer's `Precision` picks the combination:
"bf16" (no FP8), "fp8-dispatch" (FP8 exchange, experts in the activations' dtype), "fp8" (FP8 exchange and
`FP8Experts`, whose GEMMs are `scaled_grouped_mm_blockwise`).

Training: the same `moe_forward` with `TrainableExperts(w13, w2, recipe)` (parameters) and grad enabled runs
dispatch, the experts' row gather and combine as autograd Functions (`autograd.py`) whose backward is the
reverse exchange (`Exchange.combine_backward`: a dispatch of gradients; `dispatch_backward`: a combine of
row and pair-weight gradients), with `unpermute_combine_backward` and the grouped weight-gradient GEMM
(`grouped_wgrad`) as backward kernels. `grouped_linear(x, w, offsets, recipe)` runs a grouped layer's
forward, input-gradient and weight-gradient GEMMs in a `Recipe`: "bf16", "fp8-blockwise" (1x128 / 128x128,
DeepSeek-V3; operands quantised along the dimension each GEMM reduces) or "fp8-rowwise" (torchao).

Exchanges (one interface, `Exchange`):
- `LocalExchange()`: one rank, no communication.
- `AllToAllExchange(group, fp8)`: `torch.distributed.all_to_all_single` with split sizes; gloo or NCCL.
- `SymmMemExchange(group, max_tokens, hidden, top_k, dtype, fp8)`: Triton kernels store rows straight into
  peers' torch symmetric-memory buffers over NVLink (one node, CUDA; multicast never used). `max_tokens`
  bounds T per call; buffers are allocated once (collective). `Received` fields are views of this rank's
  buffer (slots int32, weights strided), valid until its next dispatch; dispatch and combine must
  alternate. No host synchronisation, so a layer's dispatch + combine can be captured in a CUDA graph.

Shapes of `Received`: x [N, H], scales float32 [N, H/128] or None, slots int32/int64 [N, k] (-1: pair not
served here), weights float32 [N, k], counts int64 [G] (rows from each source), valid bool [N] or None.
"""

from .exchange import AllToAllExchange, Exchange, LocalExchange, Received, Traffic
from .expert_map import ExpertMap
from .experts import (
    FP8BlockWeights,
    FP8Weights,
    grouped_mm,
    quantize_weights_fp8,
    quantize_weights_fp8_blockwise,
    scaled_grouped_mm,
    scaled_grouped_mm_blockwise,
    swiglu_experts,
    swiglu_experts_fp8,
)
from .fp8 import FP8_DTYPE, FP8_MAX, dequantize_fp8, quantize_fp8
from .grouped_linear import Recipe, grouped_linear
from .grouped_wgrad import grouped_wgrad
from .layout import DispatchLayout, ExpertLayout, build_expert_layout, build_layout
from .moe import DenseExperts, Experts, FP8Experts, PhaseProbe, Precision, TrainableExperts, make_experts, moe_forward
from .permute import permute, permute_dequant, unpermute_combine, unpermute_combine_backward
from .replicas import REPLICA_RULES, choose_balanced, choose_replicas, expert_counts, local_token_index
from .symm_exchange import SymmMemExchange

__all__ = [
    "AllToAllExchange",
    "DispatchLayout",
    "Exchange",
    "ExpertLayout",
    "ExpertMap",
    "DenseExperts",
    "Experts",
    "FP8Experts",
    "FP8BlockWeights",
    "FP8Weights",
    "FP8_DTYPE",
    "FP8_MAX",
    "LocalExchange",
    "PhaseProbe",
    "Precision",
    "REPLICA_RULES",
    "Received",
    "Recipe",
    "SymmMemExchange",
    "Traffic",
    "TrainableExperts",
    "build_expert_layout",
    "build_layout",
    "choose_balanced",
    "choose_replicas",
    "dequantize_fp8",
    "expert_counts",
    "grouped_linear",
    "grouped_mm",
    "grouped_wgrad",
    "local_token_index",
    "make_experts",
    "moe_forward",
    "permute",
    "permute_dequant",
    "quantize_fp8",
    "quantize_weights_fp8",
    "quantize_weights_fp8_blockwise",
    "scaled_grouped_mm",
    "scaled_grouped_mm_blockwise",
    "swiglu_experts",
    "swiglu_experts_fp8",
    "unpermute_combine",
    "unpermute_combine_backward",
]
