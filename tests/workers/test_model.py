"""Model code, checkpoint reading, cache and sampling in one process, against `transformers` (no Ray).

    .venv/bin/python -m pytest tests/workers/test_model.py -q

Tolerance: fp32 logits within atol 1e-5 + rtol 1e-4 of the reference (observed differences ~1e-7: only the
order of float additions differs).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from expertmesh.placement.plan import Placement
from expertmesh.workers.checkpoint import CheckpointError, CheckpointReader, expert_keys
from expertmesh.workers.config import ModelConfigError, read_model_config
from expertmesh.workers.kvcache import KVCacheFull, SequenceError
from expertmesh.workers.local import load_local_model, run_step
from expertmesh.workers.sampling import SamplingParams, sample
from expertmesh.workers.weights import load_expert_shard

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")  # the checkpoints tests/workers/conftest.py writes

ATOL, RTOL = 1e-5, 1e-4


def hf_last_logits(model, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0, -1]


def hf_topk(model, tokens: list[int], top_k: int) -> np.ndarray:
    """int [T, L_moe, k] experts the reference router picks for every token (as a set per row: sorted)."""
    with torch.no_grad():
        out = model(torch.tensor([tokens]), output_router_logits=True)
    ids = [torch.topk(torch.softmax(lg.float(), -1), top_k, -1).indices for lg in out.router_logits]
    return np.sort(torch.stack(ids, 1).numpy(), axis=-1)


# ---- config --------------------------------------------------------------------------------------------
def test_config_reads_each_family(tiny_models):
    cfgs = {f: read_model_config(tiny_models[f].path) for f in FAMILIES}
    assert cfgs["mixtral"].moe_prefix == "block_sparse_moe" and cfgs["mixtral"].norm_topk_prob
    assert cfgs["qwen2_moe"].moe_layers == (0, 2) and cfgs["qwen2_moe"].shared_ffn == 40
    assert cfgs["qwen3_moe"].head_dim == 16 and cfgs["qwen3_moe"].qk_norm == "head"
    assert cfgs["olmoe"].qk_norm == "full" and cfgs["olmoe"].clip_qkv == pytest.approx(0.3)
    assert all(c.num_experts == 8 and c.top_k == 2 for c in cfgs.values())


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        ({"model_type": "llama"}, "model_type"),
        ({"sliding_window": 64}, "sliding_window"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, "rope_type"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
        ({"num_experts_per_tok": None}, "num_experts_per_tok"),
    ],
)
def test_config_refuses_what_is_not_implemented(tmp_path, tiny_models, edit, field):
    doc = json.loads((tiny_models["mixtral"].path / "config.json").read_text())
    doc.update(edit)
    (tmp_path / "config.json").write_text(json.dumps(doc))
    with pytest.raises(ModelConfigError, match=field):
        read_model_config(tmp_path)


# ---- forward pass against the reference ----------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_reference_through_prefill_decode_and_chunks(tiny_models, reference, family):
    """Mixed steps: prefills of different lengths, decodes with different cache lengths, a chunked
    continuation (several new tokens on a cache) and a sequence that joins late, all in shared steps."""
    model = load_local_model(tiny_models[family].path)
    ref = reference(family)
    seqs = {0: [5, 17, 3, 44, 9], 1: [2, 8], 2: [61, 7, 7, 30, 12, 90, 1]}
    steps = [
        {0: seqs[0], 1: seqs[1], 2: seqs[2]},
        {0: [11], 1: [12], 2: [13]},
        {0: [14], 1: [15, 16, 17], 3: [4, 4, 9]},  # chunk on a cache + a new sequence
        {1: [18], 3: [19], 2: [20]},
    ]
    history: dict[int, list[int]] = {}
    for step in steps:
        logits, _ = run_step(model, list(step.items()))
        for row, (seq, new) in enumerate(step.items()):
            history.setdefault(seq, []).extend(new)
            torch.testing.assert_close(logits[row], hf_last_logits(ref, history[seq]), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("family", FAMILIES)
def test_fixed_shape_decode_matches_reference_with_padding_and_growing_sequences(tiny_models, reference, family):
    """Decode-only steps through `DecodeGraphs` (run eagerly on the CPU): padded batches (3 rows -> 4, 5 ->
    8), a sequence joining with a one-token prompt (a decode-shaped prefill), sequences crossing block
    boundaries (blocks of 4 tokens), and rows in another order than their cache rows."""
    model = load_local_model(tiny_models[family].path, decode_graphs=True, kv_blocks=64, kv_block_size=4)
    storage = model.cache.storage.data_ptr()
    ref = reference(family)
    history = {0: [5, 17, 3, 44, 9], 1: [2, 8], 2: [61, 7, 7, 30, 12, 90, 1]}
    run_step(model, list(history.items()))  # prefill: the general path
    for step in range(12):
        if step in (4, 8):
            history[step // 4 + 2] = []  # joins with one token
        order = sorted(history, reverse=step % 2 == 1)
        new = {s: [(7 * step + 3 * s) % 96] for s in order}
        logits, _ = run_step(model, list(new.items()))
        for row, seq in enumerate(order):
            history[seq] += new[seq]
            torch.testing.assert_close(logits[row], hf_last_logits(ref, history[seq]), atol=ATOL, rtol=RTOL)
    # Growing sequences and more of them drop nothing: both sizes stay, the cache is the one made at setup.
    assert sorted(model.decoder.entries) == [4, 8]
    assert model.cache.storage.data_ptr() == storage and model.cache.used_blocks == sum(
        model.cache.blocks_for(n) for n in model.cache.length.values())
    # A new shard or exchange (the executor's version) makes the recorded steps stale too.
    before = model.decoder.entries[8]
    model.executor.exchange = model.executor.exchange
    run_step(model, [(s, [1]) for s in sorted(history)])
    assert model.decoder.entries[8] is not before


def test_decode_past_the_graphs_table_runs_eagerly_with_the_same_logits(tiny_models, reference, monkeypatch):
    """A decode step whose longest sequence needs more table columns than the graphs hold runs the same
    fixed-shape step eagerly at its own width; the other steps keep their shapes."""
    from expertmesh.workers import decode_graph

    monkeypatch.setattr(decode_graph, "GRAPH_KEYS", 8)  # the graphs' tables: 2 blocks of 4 tokens
    model = load_local_model(tiny_models["qwen3_moe"].path, decode_graphs=True, kv_blocks=16, kv_block_size=4)
    assert model.decoder.width == 2
    ref = reference("qwen3_moe")
    history = {0: [5, 17, 3, 44, 9, 3], 1: [2]}
    run_step(model, list(history.items()))
    for step in range(4):  # sequence 0 writes positions 6 .. 9: the last two need a third block
        new = {s: [(3 * step + s) % 96] for s in history}
        logits, _ = run_step(model, list(new.items()))
        for row, seq in enumerate(new):
            history[seq] += new[seq]
            torch.testing.assert_close(logits[row], hf_last_logits(ref, history[seq]), atol=ATOL, rtol=RTOL)
    assert (model.decoder.steps, model.decoder.long_steps) == (4, 2) and sorted(model.decoder.entries) == [2]


@pytest.mark.parametrize("decode_graphs", [False, True])
def test_freed_blocks_are_reused_without_their_old_keys_and_the_cache_never_grows(tiny_models, reference,
                                                                                   decode_graphs):
    """Blocks of 4 tokens, 6 in all: sequences that fill them are freed, new ones take the same blocks (their
    old keys still there, past the new lengths) and match the reference; a step past the budget is refused
    whole and the storage is the one allocated at setup."""
    model = load_local_model(tiny_models["olmoe"].path, decode_graphs=decode_graphs, kv_blocks=6, kv_block_size=4)
    ref = reference("olmoe")
    storage = model.cache.storage.data_ptr()
    run_step(model, [(0, [5, 17, 3, 44, 9, 2, 8, 1, 7]), (1, [61, 7, 7, 30, 12, 90])])  # 3 + 2 blocks
    old = model.cache.blocks(0) + model.cache.blocks(1)
    with pytest.raises(KVCacheFull, match="needs 2 more KV blocks of 4 tokens, 1 of the worker's 6"):
        run_step(model, [(1, [4, 4, 4]), (2, [3])])  # 9 tokens -> a third block for 1, one for 2
    assert 2 not in model.cache and model.cache.length[1] == 6
    model.cache.free([0, 1])
    history = {3: [9, 9, 4], 4: [33]}
    run_step(model, list(history.items()))
    for step in range(6):
        new = {s: [(11 * step + s) % 96] for s in history}
        logits, _ = run_step(model, list(new.items()))
        for row, seq in enumerate(new):
            history[seq] += new[seq]
            torch.testing.assert_close(logits[row], hf_last_logits(ref, history[seq]), atol=ATOL, rtol=RTOL)
    assert set(model.cache.blocks(3) + model.cache.blocks(4)) <= set(old)  # the freed blocks, lowest first
    assert model.cache.storage.data_ptr() == storage


@pytest.mark.parametrize("family", FAMILIES)
def test_routed_experts_match_reference_router(tiny_models, reference, family):
    model = load_local_model(tiny_models[family].path)
    tokens = [3, 14, 15, 92, 65, 35, 89, 79, 32, 38]
    _, ids = run_step(model, [(0, tokens)])
    assert np.array_equal(np.sort(ids.numpy(), -1), hf_topk(reference(family), tokens, 2))


def test_routing_override_replaces_the_gate(tiny_models):
    model = load_local_model(tiny_models["olmoe"].path)
    tokens = [1, 2, 3, 4]
    forced = torch.tensor([[[0, 1], [2, 3], [4, 5]], [[6, 7], [1, 0], [3, 2]],
                           [[7, 6], [5, 4], [0, 7]], [[2, 5], [3, 6], [1, 4]]])
    _, ids = run_step(model, [(0, tokens)], override_ids=forced)
    assert torch.equal(ids, forced)
    with pytest.raises(ValueError, match="topk_ids"):
        run_step(model, [(1, tokens)], override_ids=forced[:, :2])


def test_worker_without_tokens_runs_an_empty_step(tiny_models):
    model = load_local_model(tiny_models["qwen2_moe"].path)
    logits, ids = run_step(model, [])
    assert logits.shape == (0, 96) and ids.shape == (0, 2, 2)


def test_packed_inputs_run_the_same_step_as_lists(tiny_models):
    """The group ships a step as three arrays (PackedTokens); the worker must see the same batch."""
    from expertmesh.workers.model import PackedTokens

    path = tiny_models["qwen3_moe"].path
    inputs = [(4, [5, 6, 7]), (9, [1]), (2, [8, 9])]
    packed = PackedTokens.pack(inputs)
    assert packed.seq_ids.tolist() == [4, 9, 2] and packed.lengths.tolist() == [3, 1, 2]
    assert packed.tokens.dtype == np.int32 and packed.tokens.tolist() == [5, 6, 7, 1, 8, 9]
    want, want_ids = run_step(load_local_model(path), inputs)
    got, got_ids = run_step(load_local_model(path), packed)
    assert torch.equal(got, want) and torch.equal(got_ids, want_ids)


def test_bad_step_inputs_name_the_problem(tiny_models):
    model = load_local_model(tiny_models["mixtral"].path)
    with pytest.raises(SequenceError, match="twice"):
        run_step(model, [(1, [2]), (1, [3])])
    with pytest.raises(SequenceError, match="no new token"):
        run_step(model, [(1, [])])


# ---- checkpoint reading ----------------------------------------------------------------------------------
def _plan_with_replicas() -> Placement:
    # 2 GPUs x 5 slots; layer 0 replicates expert 5 across GPUs and expert 2 twice on GPU 0.
    phy2log = np.array([[2, 3, 4, 5, 2, 0, 1, 5, 6, 7],
                        [0, 1, 2, 3, 7, 4, 5, 6, 7, 3],
                        [7, 6, 5, 4, 3, 2, 1, 0, 0, 1]])
    return Placement(phy2log, num_gpus=2, num_experts=8)


def test_shard_reads_exactly_the_experts_of_its_rank(tiny_models):
    path = tiny_models["mixtral"].path  # sharded: an index and several files
    cfg = read_model_config(path)
    plan = _plan_with_replicas()
    for rank in range(2):
        reader = CheckpointReader(path)
        shard = load_expert_shard(reader, cfg, plan.phy2log, 2, rank, torch.float32, "cpu")
        want = {key for layer in range(3) for e in set(plan.phy2log[layer, rank * 5:(rank + 1) * 5].tolist())
                for key in expert_keys(cfg, cfg.moe_layers[layer], e)}
        assert reader.names_read == want
        assert [s.tolist() for s in shard.slot_expert] == plan.phy2log[:, rank * 5:(rank + 1) * 5].tolist()
        key = "model.layers.0.block_sparse_moe.experts.5.w2.weight"
        full = load_file(next(p for p in path.glob("*.safetensors") if key in load_file(p)))
        if rank == 0:  # slot 3 holds expert 5 of layer 0: its down projection is the checkpoint's
            assert torch.equal(shard.w_down[0][3], full[key])
            assert torch.equal(shard.w_gate_up[0][4], shard.w_gate_up[0][0])  # second replica of expert 2


def test_fused_expert_layout_reads_the_same_weights_slice_by_slice(tmp_path, tiny_models):
    src = tiny_models["qwen3_moe"].path
    cfg = read_model_config(src)
    tensors = load_file(src / "model.safetensors")
    fused = {k: v for k, v in tensors.items() if ".experts." not in k}
    for layer in cfg.moe_layers:
        keys = [expert_keys(cfg, layer, e) for e in range(8)]
        fused[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([tensors[g], tensors[u]]) for g, u, _ in keys])
        fused[f"model.layers.{layer}.mlp.experts.down_proj"] = torch.stack([tensors[d] for _, _, d in keys])
    save_file(fused, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((src / "config.json").read_text())
    plan = _plan_with_replicas()
    a = load_expert_shard(CheckpointReader(src), cfg, plan.phy2log, 2, 1, torch.float32, "cpu")
    reader = CheckpointReader(tmp_path)
    b = load_expert_shard(reader, cfg, plan.phy2log, 2, 1, torch.float32, "cpu")
    for x, y in zip(a.w_gate_up + a.w_down, b.w_gate_up + b.w_down, strict=True):
        assert torch.equal(x, y)
    assert all(".experts." not in n or "[" in n for n in reader.names_read)  # only slices of the stacks


def test_missing_tensor_is_named(tmp_path, tiny_models):
    src = tiny_models["olmoe"].path
    tensors = load_file(src / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_norm.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((src / "config.json").read_text())
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.self_attn\.k_norm\.weight"):
        load_local_model(tmp_path)


# ---- sampling ------------------------------------------------------------------------------------------
def test_sampling_greedy_top_p_seed_and_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]]))
    greedy = sample(logits, [SamplingParams()] * 2, [0, 0])
    assert greedy.tolist() == [0, 2]
    tight = SamplingParams(temperature=1.0, top_p=1e-6)
    assert sample(logits, [tight] * 2, [0, 0]).tolist() == [0, 2]  # top-p keeps only the top token
    seeded = [SamplingParams(temperature=1.0, seed=3)] * 2
    assert sample(logits, seeded, [5, 5]).tolist() == sample(logits, seeded, [5, 5]).tolist()
    gen = torch.Generator().manual_seed(0)
    warm = [SamplingParams(temperature=1.0)]
    draws = torch.stack([sample(logits[:1], warm, [0], gen) for _ in range(4000)])
    freq = torch.bincount(draws.flatten(), minlength=3).float() / 4000
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.2]), atol=0.03)
    nucleus = torch.stack([sample(logits[:1], [SamplingParams(temperature=1.0, top_p=0.7)], [0], gen)
                           for _ in range(500)])
    assert set(nucleus.flatten().tolist()) == {0, 1}  # 0.5 + 0.3 reaches 0.7; token 2 is cut
    top2 = torch.stack([sample(logits[:1], [SamplingParams(temperature=1.0, top_k=2)], [0], gen)
                        for _ in range(2000)])
    freq = torch.bincount(top2.flatten(), minlength=3).float() / 2000
    assert torch.allclose(freq, torch.tensor([0.625, 0.375, 0.0]), atol=0.04)  # 0.5 : 0.3 renormalised
    both = SamplingParams(temperature=1.0, top_k=2, top_p=0.55)  # top-k first: 0.625 alone reaches 0.55
    assert {int(sample(logits[:1], [both], [0], gen)) for _ in range(200)} == {0}
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="top_k: expected an integer >= 0"):
        SamplingParams(top_k=-1)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_flat_steps_mix_prompt_chunks_into_fixed_shape_decode_steps_with_the_reference_logits(
        tiny_models, reference, family):
    """Steps where the driver allows prompt rows at fixed shapes (`group_batch`): a new prompt, a prompt's
    second chunk over its past and decodes in one padded step (blocks of 4 tokens crossed), each sequence's
    logits those of its last token; a step beyond the driver's rows takes the general path."""
    model = load_local_model(tiny_models[family].path, decode_graphs=True, kv_blocks=64, kv_block_size=4)
    ref = reference(family)
    history = {0: [5, 17, 3, 44, 9], 1: [2, 8, 61]}
    run_step(model, list(history.items()))  # the general path
    steps = [{0: [7], 1: [30], 2: [12, 90, 1, 4, 4, 70]},  # decodes and a new prompt: 8 rows
             {2: [33, 8, 6], 0: [11], 3: [1]},  # a second chunk over a past of 6, a one-token prompt
             {3: [9, 9, 2, 5, 5], 1: [3], 2: [40]}]
    for new in steps:
        rows = sum(map(len, new.values()))
        result = model.step(list(new.items()), group_batch=rows)
        for row, (seq, tokens) in enumerate(new.items()):
            history[seq] = history.get(seq, []) + tokens
            torch.testing.assert_close(result.logits[row], hf_last_logits(ref, history[seq]), atol=ATOL, rtol=RTOL)
        assert result.num_tokens == rows and result.routed.shape[0] == rows
    assert (model.decoder.steps, model.decoder.flat_steps) == (3, 3) and sorted(model.decoder.entries) == [8]
    model.step([(0, [2, 3]), (1, [4])], group_batch=2)  # 3 rows > 2: the general path
    assert model.decoder.steps == 3
