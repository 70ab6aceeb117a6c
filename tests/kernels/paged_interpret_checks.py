"""The paged-attention Triton kernels on Triton's CPU interpreter (run by test_kernels_triton_interpret.py).

TRITON_INTERPRET must be set before Triton is imported, so this module runs in its own process:
    TRITON_INTERPRET=1 .venv/bin/python -m pytest -p no:cacheprovider tests/kernels/paged_interpret_checks.py
"""

from __future__ import annotations

import os

import paged_checks as pc
import pytest
import torch

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="needs TRITON_INTERPRET=1 set before triton is imported")

LENGTHS = [0, 1, 33, 16, 32, 17]  # empty, one token, odd, block boundaries of 16 and one past


@pytest.mark.parametrize("T,block_size,head_dim", [(1, 16, 64), (33, 16, 128), (33, 5, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kv(T, block_size, head_dim, dtype):
    pc.check_write_kv("cpu", T, 2, block_size, head_dim, dtype, "triton")


@pytest.mark.parametrize("block_size,head_dim", [(16, 64), (5, 8), (1, 128)])
def test_gather_kv(block_size, head_dim):
    pc.check_gather_kv("cpu", LENGTHS, 2, block_size, head_dim, torch.bfloat16, "triton")


@pytest.mark.parametrize("family", list(pc.GQA))
@pytest.mark.parametrize("head_dim,dtype", [(64, torch.float32), (128, torch.bfloat16)])
def test_decode_one_chunk_per_row(family, head_dim, dtype):
    pc.check_decode("cpu", LENGTHS, pc.GQA[family], 16, head_dim, dtype, "triton", splits=1)


@pytest.mark.parametrize("family", list(pc.GQA))
def test_decode_split_over_the_sequence(family):
    """Three uneven chunks per row, merged by their log-sum-exp."""
    pc.check_decode("cpu", LENGTHS, pc.GQA[family], 16, 64, torch.bfloat16, "triton", splits=3)


def test_decode_mostly_empty_chunks():
    """17 chunks of one 64-key tile: rows of length 0 and 1 leave every chunk but one empty."""
    pc.check_decode("cpu", [0, 1, 70], pc.GQA["mixtral"], 16, 64, torch.float32, "triton", splits=17)


@pytest.mark.parametrize("block_size,head_dim", [(5, 16), (4, 8), (1, 32)])
def test_decode_odd_blocks_and_small_heads(block_size, head_dim):
    """Block sizes that are not powers of two and head dims below tl.dot's 16 (the tiny test models)."""
    pc.check_decode("cpu", [1, 9, 20], (4, 2), block_size, head_dim, torch.float32, "triton", splits=2)


def test_decode_default_splits_and_a_long_row():
    pc.check_decode("cpu", [300], pc.GQA["qwen3"], 16, 128, torch.bfloat16, "triton")


@pytest.mark.parametrize("n", [1, 33])
def test_prefill(n):
    pc.check_prefill("cpu", [0, 16, 3], n, pc.GQA["mixtral"], 16, 64, torch.bfloat16, "triton")


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_tiny_model_through_the_kernels(tmp_path, family):
    """A tiny checkpoint served through the Triton kernels (every op's auto path is Triton here): prefill,
    fixed-shape decode steps (padded 3 -> 4 rows, block table transposed in the step's inputs, sequences
    crossing blocks of 4), a chunk over a past and a late joiner, against `transformers`."""
    transformers = pytest.importorskip("transformers")
    from expertmesh.workers.local import load_local_model, run_step

    common = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  num_experts_per_tok=2, initializer_range=0.1, max_position_embeddings=128)
    torch.manual_seed(3)
    if family == "mixtral":
        config = transformers.MixtralConfig(num_local_experts=4, intermediate_size=16, **common)
    else:
        config = transformers.Qwen3MoeConfig(num_experts=4, moe_intermediate_size=16, intermediate_size=32,
                                             head_dim=16, norm_topk_prob=True, **common)
    ref = transformers.AutoModelForCausalLM.from_config(config).eval()
    ref.save_pretrained(tmp_path)
    model = load_local_model(tmp_path, decode_graphs=True, kv_blocks=32, kv_block_size=4)
    history = {0: [5, 17, 3, 44, 9], 1: [2, 8], 2: [61, 7, 7, 30, 12, 9, 1]}
    steps = [dict(history)] + [{s: [(5 * i + s) % 64] for s in history} for i in range(5)]
    steps += [{0: [1, 2, 3], 3: [4]}, {0: [6], 1: [7], 2: [8], 3: [9]}]
    seen: dict[int, list[int]] = {}
    for step in steps:
        logits, _ = run_step(model, list(step.items()))
        for row, (seq, new) in enumerate(step.items()):
            seen.setdefault(seq, []).extend(new)
            with torch.no_grad():
                want = ref(torch.tensor([seen[seq]])).logits[0, -1]
            torch.testing.assert_close(logits[row], want, atol=1e-4, rtol=1e-3)
    assert model.decoder.steps == 6  # the five decode steps and the last one went through the decoder
