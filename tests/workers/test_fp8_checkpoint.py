"""FP8 checkpoints (DeepSeek-V3 / Qwen3-FP8 block format): the writer, the reader, and serving from them.

    .venv/bin/python -m pytest tests/workers/test_fp8_checkpoint.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from expertmesh.workers import ModelConfigError, load_local_model, read_model_config, run_step
from expertmesh.workers.checkpoint import CheckpointError, CheckpointReader, expert_keys
from expertmesh.workers.fp8_checkpoint import (
    SCALE_SUFFIX,
    dequantize_blockwise,
    is_quantized_name,
    quantize_blockwise,
    write_fp8_checkpoint,
)

PROMPT = [5, 17, 3, 44, 9, 2, 8, 61, 7]


@pytest.mark.parametrize("shape", [(128, 256), (130, 33), (1, 1), (3, 200, 129)])
def test_blockwise_round_trip(shape):
    """Dequantising then quantising again gives the same codes and factors (each block's largest element is
    exact), and every element is within 2^-4 of its block's largest magnitude."""
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * torch.rand(shape) * 5
    q, s = quantize_blockwise(w)
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape
    assert s.shape == (*shape[:-2], -(-shape[-2] // 128), -(-shape[-1] // 128))
    back = dequantize_blockwise(q, s, torch.float32)
    q2, s2 = quantize_blockwise(back)
    assert torch.equal(q2.view(torch.uint8), q.view(torch.uint8)) and torch.equal(s2, s)
    block_max = (s * 448).repeat_interleave(128, -2).repeat_interleave(128, -1)[..., : shape[-2], : shape[-1]]
    assert bool(((back - w).abs() <= block_max * 2**-4 + 1e-12).all())


def test_quantised_names_are_the_projections_only():
    yes = ["model.layers.0.self_attn.q_proj.weight", "model.layers.3.mlp.down_proj.weight",
           "model.layers.1.block_sparse_moe.experts.7.w2.weight", "model.layers.1.mlp.experts.12.up_proj.weight",
           "model.layers.1.mlp.shared_expert.gate_proj.weight", "model.layers.2.mlp.experts.gate_up_proj"]
    no = ["model.embed_tokens.weight", "lm_head.weight", "model.layers.0.input_layernorm.weight",
          "model.layers.1.mlp.gate.weight", "model.layers.1.block_sparse_moe.gate.weight",
          "model.layers.1.mlp.shared_expert_gate.weight", "model.layers.0.self_attn.q_norm.weight",
          "model.layers.0.self_attn.q_proj.bias"]
    assert all(is_quantized_name(n) for n in yes) and not any(is_quantized_name(n) for n in no)


@pytest.fixture(scope="module")
def fp8_wide(wide_model, tmp_path_factory) -> Path:
    return write_fp8_checkpoint(wide_model.path, tmp_path_factory.mktemp("fp8") / "wide-fp8")


def test_written_checkpoint_has_the_format(fp8_wide, wide_model):
    config = json.loads((fp8_wide / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                             "weight_block_size": [128, 128]}
    assert read_model_config(fp8_wide).quantization == "fp8"
    index = json.loads((fp8_wide / "model.safetensors.index.json").read_text())["weight_map"]
    with safe_open(fp8_wide / index["model.layers.0.self_attn.q_proj.weight"], framework="pt") as f:
        q = f.get_tensor("model.layers.0.self_attn.q_proj.weight")
        scale = f.get_tensor("model.layers.0.self_attn.q_proj.weight" + SCALE_SUFFIX)
        router = f.get_tensor("model.layers.0.mlp.gate.weight")
    assert q.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32 and router.dtype == torch.float32
    with pytest.raises(ValueError, match="already quantised"):
        write_fp8_checkpoint(fp8_wide, fp8_wide.parent / "again")


@pytest.fixture(scope="module")
def dequantized(fp8_wide, wide_model, tmp_path_factory):
    """The source checkpoint with every weight replaced by the FP8 checkpoint's dequantised value, loaded by
    `transformers`: the exact reference for serving the FP8 checkpoint."""
    import transformers
    from safetensors.torch import save_file

    reader = CheckpointReader(fp8_wide)
    path = tmp_path_factory.mktemp("dequantized")
    names = [n for n in reader._file_of if not n.endswith(SCALE_SUFFIX)]
    save_file({n: reader.get(n, torch.float32) for n in names}, path / "model.safetensors", metadata={"format": "pt"})
    (path / "config.json").write_text((wide_model.path / "config.json").read_text())
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def test_serving_an_fp8_checkpoint(fp8_wide, wide_model, dequantized):
    """Read back dequantised (precision bf16), the FP8 checkpoint gives exactly the logits of `transformers`
    on the dequantised weights; at its default precision (fp8) the experts run exactly the checkpoint's
    codes and factors, and the logits stay within the FP8 activation tolerance of that reference."""
    with torch.no_grad():
        want = dequantized(torch.tensor([PROMPT])).logits[0, -1]
    dense = load_local_model(fp8_wide, precision="bf16")
    got, _ = run_step(dense, [(0, PROMPT)])
    torch.testing.assert_close(got[0], want, atol=1e-5, rtol=1e-4)
    fp8 = load_local_model(fp8_wide)
    assert fp8.executor.precision == "fp8"
    cfg = read_model_config(fp8_wide)
    reader = CheckpointReader(fp8_wide)
    F = cfg.expert_ffn
    for layer in range(cfg.num_moe_layers):
        experts = fp8.executor.experts[layer]
        for slot, e in enumerate(fp8.executor.slot_expert[layer].tolist()):
            gate, up, down = expert_keys(cfg, cfg.moe_layers[layer], e)
            for name, q, s in ((gate, experts.w13.q[slot, :F], experts.w13.scale[slot, : F // 128]),
                               (up, experts.w13.q[slot, F:], experts.w13.scale[slot, F // 128 :]),
                               (down, experts.w2.q[slot], experts.w2.scale[slot])):
                stored = reader._handle(name).get_tensor(name)
                assert torch.equal(q.view(torch.uint8), stored.view(torch.uint8)), name
                assert torch.equal(s, reader._handle(name + SCALE_SUFFIX).get_tensor(name + SCALE_SUFFIX)), name
    logits, _ = run_step(fp8, [(0, PROMPT)])
    assert float((logits[0] - want).abs().max()) <= 0.12 * float(want.abs().max())


def test_bad_fp8_checkpoints_are_named(fp8_wide, tmp_path):
    config = json.loads((fp8_wide / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "awq"}}))
    with pytest.raises(ModelConfigError, match="quantization_config: only block-scaled FP8"):
        read_model_config(tmp_path)
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(4, 4, dtype=torch.float8_e4m3fn)}, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="an FP8 tensor without its block factors 'w_scale_inv'"):
        CheckpointReader(tmp_path).get("w", torch.float32)


def test_quantize_command(wide_model, tmp_path):
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "expertmesh", "quantize", str(wide_model.path), str(tmp_path / "out")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"fp8 checkpoint\t{tmp_path / 'out'}"
    assert read_model_config(tmp_path / "out").quantization == "fp8"
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2
    assert again.stderr.strip() == f"error: {tmp_path / 'out'}: exists and is not an empty folder"
    (tmp_path / "file").write_text("x")  # a file as the destination: the same one line, no traceback
    onto_file = subprocess.run(cmd[:4] + [str(wide_model.path), str(tmp_path / "file")], capture_output=True,
                               text=True, timeout=120)
    assert onto_file.returncode == 2 and onto_file.stderr.strip() == (
        f"error: {tmp_path / 'file'}: exists and is not an empty folder")
    missing = subprocess.run(cmd[:4] + [str(tmp_path), str(tmp_path / "other")], capture_output=True, text=True)
    assert missing.returncode == 2 and "no config.json" in missing.stderr
