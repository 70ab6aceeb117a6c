"""The trainable model against `transformers`: losses and the gradient of every parameter, by name, on 1, 2 and 4
CPU ranks (gloo), under the contiguous plan and an `ilp` plan with replicas; FP8 training within its tolerance.

    .venv/bin/python -m pytest tests/train/test_train_model.py -q

Reference: the `transformers` model of the same checkpoint, fp32, on the whole batch in one process (loss =
cross-entropy + router_aux_loss_coef * aux, `output_router_logits=True`). Ours: each rank runs its share of the
sequences; routed experts' gradients come through the exchange, replicated experts get the sum over their
slots (`sum_replica_grads`), dense gradients are summed over the ranks (`sum_dense_grads`).

Tolerances (fp32): losses within 1e-5 relative; every gradient within 1e-4 of its tensor's largest entry
(measured <= 2e-6). FP8 (blockwise and rowwise, FP8 dispatch, the 128-wide checkpoint, routing replayed from the
fp32 run): every gradient within 25% of its norm (measured <= 16%, on the routers and norms, whose gradients
cancel most), the loss within 0.5% (measured <= 0.07%).
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from expertmesh.placement.ilp import IlpOptions, ilp
from expertmesh.placement.plan import Placement
from expertmesh.placement.stats import stats_from_trace
from expertmesh.placement.synthetic import SyntheticSpec, synthetic_trace
from expertmesh.placement.topology import Topology
from expertmesh.workers.config import read_model_config
from expertmesh.workers.plans import contiguous_plan
from expertmesh.workers.train import TrainableMoE, TrainSettings

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
BATCH = torch.randint(0, 96, (5, 11), generator=torch.Generator().manual_seed(0))  # 5 sequences of 11 tokens
REL = 1e-4
FP8_GRAD, FP8_LOSS = 0.25, 0.005  # per tensor ||g_fp8 - g_fp32|| / ||g_fp32||; loss relative


def ilp_plan(num_layers: int, num_gpus: int) -> Placement:
    """An `ilp` plan with one redundant slot per GPU (as tests/workers/test_group.py builds it)."""
    trace = synthetic_trace(SyntheticSpec(num_experts=8, top_k=2, num_layers=num_layers, num_tokens=512,
                                          num_domains=4, seed=1))
    plan = ilp(stats_from_trace(trace), Topology(num_gpus), 8 + num_gpus, IlpOptions(time_limit=1.0, workers=1))
    assert plan.num_redundant == num_gpus and plan.logcnt.max() >= 2
    return plan


def hf_reference(path, batch: torch.Tensor, z_coef: float = 0.0) -> dict:
    """The `transformers` model's losses and gradients on `batch`, gradients keyed by our parameter names."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    out = model(batch, labels=batch, output_router_logits=True)
    z = torch.stack([torch.logsumexp(lg.float(), -1).square() for lg in out.router_logits]).mean()
    (out.loss + z_coef * z).backward()
    family = model.config.model_type
    grads = {}
    for name, p in model.named_parameters():
        if family == "mixtral":
            name = name.replace(".mlp.", ".block_sparse_moe.")
        grads[name] = p.grad.detach().clone()
    return {"loss": out.loss.item(), "aux": out.aux_loss.item(), "z": z.item(), "grads": grads}


def compare_grads(model: TrainableMoE, want: dict[str, torch.Tensor], rel: float) -> float:
    """Largest gradient error of `model` (relative to each tensor's largest entry); expert slots against their
    logical expert's gradient. Asserts every parameter is compared and within `rel`."""
    worst, seen = 0.0, 0
    for name, p in model.named_parameters():
        ref = want[name]
        if ".experts." in name:
            ref = ref[name_slots(model, name)]
        err = float((p.grad.double() - ref.double()).abs().max()) / max(float(ref.abs().max()), 1e-12)
        assert err <= rel, f"{name}: gradient error {err:.2e} of its largest entry > {rel}"
        worst, seen = max(worst, err), seen + 1
    assert seen == len({k for k in want if k != "lm_head.weight" or not model.tied})
    return worst


def name_slots(model: TrainableMoE, name: str) -> torch.Tensor:
    layer = int(name.split(".")[2])
    return model.model.layers[layer].ffn.experts.slot_expert


def run_rank(model: TrainableMoE, batch: torch.Tensor, rank: int, world_size: int):
    """This rank's sequences (round robin) forward and backward, then the gradient reductions."""
    out = model(batch[rank::world_size], batch[rank::world_size])
    out.loss.backward()
    model.sum_replica_grads()
    model.sum_dense_grads()
    return out


# ---- one process --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_losses_and_every_gradient_equal_transformers(tiny_models, family):
    path = tiny_models[family].path
    cfg = read_model_config(path)
    want = hf_reference(path, BATCH)
    model = TrainableMoE.from_checkpoint(path, contiguous_plan(cfg.num_moe_layers, 8, 1), dtype=torch.float32)
    out = run_rank(model, BATCH, 0, 1)
    assert abs(float(out.lm_loss + model.aux_coef * out.aux_loss) - want["loss"]) <= 1e-5 * want["loss"]
    assert abs(float(out.aux_loss) - want["aux"]) <= 1e-5 * want["aux"]
    assert model.aux_coef == pytest.approx(0.01 if family == "olmoe" else 0.001)
    compare_grads(model, want["grads"], REL)
    assert out.routed.shape == (BATCH.numel(), cfg.num_moe_layers, 2)


def test_replicas_on_one_rank_and_the_z_loss(tiny_models):
    """An ilp plan with a redundant slot on the one GPU (the second slot of an expert gets no tokens: its
    gradient comes from the reduction), and the router z-loss added to the reference's loss."""
    path = tiny_models["qwen3_moe"].path
    cfg = read_model_config(path)
    plan = ilp_plan(cfg.num_moe_layers, 1)
    want = hf_reference(path, BATCH, z_coef=0.1)
    model = TrainableMoE.from_checkpoint(path, plan, settings=TrainSettings(z_loss_coef=0.1), dtype=torch.float32)
    out = run_rank(model, BATCH, 0, 1)
    assert abs(float(out.z_loss) - want["z"]) <= 1e-5 * want["z"]
    assert abs(out.loss.item() - (want["loss"] + 0.1 * want["z"])) <= 1e-5 * want["loss"]
    compare_grads(model, want["grads"], REL)
    # Without the reduction, the token-less replica's gradient would be zero: the test above sees it.
    assert any(len(s) for s in model.replicas.slots)


# ---- several gloo ranks ----------------------------------------------------------------------------------------
def _worker(rank: int, G: int, init_file: str, cases: list) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=G)
    try:
        for path, plan, want, batch in cases:
            model = TrainableMoE.from_checkpoint(path, plan, rank, G, dtype=torch.float32)
            out = run_rank(model, batch, rank, G)
            total = out.lm_loss + model.aux_coef * out.aux_loss
            dist.all_reduce(total)  # the shares of all ranks: the batch's loss
            assert abs(float(total) - want["loss"]) <= 1e-5 * want["loss"], (path, plan.strategy)
            compare_grads(model, want["grads"], REL)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("G", [2, 4])
def test_gradients_on_gloo_ranks_equal_transformers(tiny_models, G):
    """Every family under the contiguous plan and an ilp plan with replicas; at G=4 one rank of the 3-sequence
    batch has no sequence and still takes part in every exchange."""
    cases = []
    for family in FAMILIES:
        path = tiny_models[family].path
        cfg = read_model_config(path)
        batch = BATCH[:3] if G == 4 and family == "olmoe" else BATCH
        want = hf_reference(path, batch)
        for plan in (contiguous_plan(cfg.num_moe_layers, 8, G), ilp_plan(cfg.num_moe_layers, G)):
            cases.append((path, plan, want, batch))
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_worker, args=(G, os.path.join(tmp, "rendezvous"), cases), nprocs=G, join=True,
                           start_method="fork")


# ---- FP8 -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("recipe", ["blockwise", "rowwise"])
def test_fp8_training_tracks_fp32(wide_model, recipe):
    """FP8 dispatch and FP8 expert GEMMs (forward, input and weight gradients) on the 128-wide checkpoint (CPU:
    the kernels' torch references) against our fp32 model (itself `transformers`' to 1e-6). The fp32 run's
    expert choices are replayed: FP8 noise would otherwise flip near-tied top-k choices of the second layer,
    and a flipped choice moves gradients by far more than the format's rounding."""
    path = wide_model.path
    cfg = read_model_config(path)
    batch = torch.randint(0, 96, (4, 32), generator=torch.Generator().manual_seed(1))
    plan = ilp_plan(cfg.num_moe_layers, 1)
    fp32 = TrainableMoE.from_checkpoint(path, plan, dtype=torch.float32)
    want = run_rank(fp32, batch, 0, 1)
    assert abs(want.loss.item() - hf_reference(path, batch)["loss"]) <= 1e-5 * want.loss.item()
    settings = TrainSettings(precision="fp8", fp8_recipe=recipe)
    model = TrainableMoE.from_checkpoint(path, plan, settings=settings, dtype=torch.float32)
    assert model.exchange.fp8
    out = model(batch, batch, override_ids=want.routed)
    out.loss.backward()
    model.sum_replica_grads()
    assert abs(out.loss.item() - want.loss.item()) <= FP8_LOSS * want.loss.item()
    reference = dict(fp32.named_parameters())
    errors = []
    for name, p in model.named_parameters():
        ref = reference[name].grad
        errors.append(float((p.grad - ref).norm() / ref.norm()))
        assert errors[-1] <= FP8_GRAD, f"{recipe} {name}: gradient error {errors[-1]:.3f} of its norm"
    assert max(errors) > 1e-3  # FP8 rounding shows: the FP8 GEMMs ran


def test_settings_and_shapes_are_checked(tiny_models):
    with pytest.raises(ValueError, match="precision"):
        TrainSettings(precision="fp16")
    with pytest.raises(ValueError, match="fp8_recipe"):
        TrainSettings(fp8_recipe="tensorwise")
    path = tiny_models["mixtral"].path
    cfg = read_model_config(path)
    plan = contiguous_plan(cfg.num_moe_layers, 8, 1)
    with pytest.raises(ValueError, match="hidden_size"):  # 32 wide: no 128 x 128 weight blocks
        TrainableMoE.from_checkpoint(path, plan, settings=TrainSettings(precision="fp8"))
    with pytest.raises(ValueError, match="plan"):
        TrainableMoE.from_checkpoint(path, contiguous_plan(cfg.num_moe_layers, 8, 2), 0, 1)
    model = TrainableMoE.from_checkpoint(path, plan, dtype=torch.float32)
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.zeros(5, dtype=torch.int64))
    assert np.array_equal(model.plan.phy2log, plan.phy2log)
