"""`GroupConfig`: YAML/JSON round trips, field-named refusals, the JSON Schema, and `EPGroup.create`'s checks
before any process starts.

    .venv/bin/python -m pytest tests/workers/test_group_config.py -q
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from expertmesh.schema import ConfigError
from expertmesh.workers import GroupConfig

FULL = {
    "model": "/models/mixtral", "plan": "plan.json", "workers": 4, "device": "cuda", "dtype": "bfloat16",
    "precision": "fp8", "exchange": "symm_mem", "replica_rule": "balanced", "max_tokens": 8192, "weights": "random",
    "seed": 3,
    "kv_block_size": 32, "kv_blocks": 1000, "kv_memory_fraction": 0.8,
    "decode_graphs": False, "compiled_steps": True, "cpus_per_worker": 2.0, "placement_strategy": "STRICT_PACK",
    "timeouts": {"step_s": 30.0, "setup_s": 90.0, "collective_s": 20.0},
    "stats": {"flush_every": 8, "shares": False, "run": "r1"},
}


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_round_trip_through_a_file(tmp_path: Path, suffix: str):
    config = GroupConfig.from_dict(FULL)
    path = tmp_path / f"engine{suffix}"
    config.dump(path)
    assert GroupConfig.load(path) == config
    assert config.to_dict() == FULL  # every field set above survives, nothing added
    defaults = GroupConfig(model="m")
    defaults.dump(path)
    assert GroupConfig.load(path) == defaults


@pytest.mark.parametrize("change, message", [
    ({"bogus": 1}, "bogus: unknown field"),
    ({"timeouts": {"step_sec": 3}}, "timeouts.step_sec: unknown field"),
    ({"exchange": "nccl"}, "exchange: expected 'auto', 'all_to_all' or 'symm_mem', got 'nccl'"),
    ({"precision": "int8"}, "precision: expected 'bf16', 'fp8-dispatch' or 'fp8', got 'int8'"),
    ({"replica_rule": "lplb"}, "replica_rule: expected 'fixed' or 'balanced', got 'lplb'"),
    ({"workers": "4"}, "workers: expected an integer, got '4'"),
    ({"workers": 1.5}, "workers: expected an integer, got 1.5"),
    ({"workers": 0}, "workers: expected a value greater than or equal to 1, got 0"),
    ({"timeouts": {"step_s": -1}}, "timeouts.step_s: expected a value greater than 0, got -1"),
    ({"stats": {"flush_every": 0}}, "stats.flush_every: expected a value greater than or equal to 1, got 0"),
    ({"compiled_steps": "yes"}, "compiled_steps: expected true or false, got 'yes'"),
    ({"device": "tpu"}, "device: expected 'cpu' or 'cuda', got 'tpu'"),
    ({"exchange": "symm_mem", "device": "cpu"}, "exchange: 'symm_mem' needs device 'cuda' and max_tokens >= 1"),
    ({"model": None}, "model: expected a string, got None"),
])
def test_bad_fields_are_named(change: dict, message: str):
    with pytest.raises(ConfigError) as err:
        GroupConfig.from_dict({**FULL, **change}, "engine.yaml")
    assert f"engine.yaml: {message}" in str(err.value)


def test_every_problem_is_reported_at_once_and_files_are_named(tmp_path: Path):
    path = tmp_path / "engine.yaml"
    path.write_text("model: m\nworkers: two\nbogus: 1\n")
    with pytest.raises(ConfigError) as err:
        GroupConfig.load(path)
    assert str(err.value).splitlines() == [f"{path}: workers: expected an integer, got 'two'",
                                           f"{path}: bogus: unknown field"]
    path.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        GroupConfig.load(path)
    path.write_text("- a list\n")
    with pytest.raises(ConfigError, match="expected a mapping of fields, got list"):
        GroupConfig.load(path)
    with pytest.raises(ConfigError, match="cannot read"):
        GroupConfig.load(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="model: required field missing"):
        GroupConfig.from_dict({})


def test_config_is_frozen_and_replace_validates():
    config = GroupConfig(model="m")
    with pytest.raises(Exception, match="frozen"):
        config.workers = 3
    assert config.replace(workers=3).workers == 3 and config.workers is None
    with pytest.raises(ConfigError, match="workers: expected an integer"):
        config.replace(workers="3")


def test_json_schema_describes_every_field():
    schema = GroupConfig.json_schema()
    assert schema["additionalProperties"] is False and schema["required"] == ["model"]
    assert set(schema["properties"]) == set(GroupConfig.model_fields)
    assert schema["properties"]["exchange"]["enum"] == ["auto", "all_to_all", "symm_mem"]
    assert all(p.get("description") for name, p in schema["properties"].items() if name not in ("timeouts", "stats"))
    assert schema["$defs"]["Timeouts"]["properties"]["step_s"]["exclusiveMinimum"] == 0
    json.dumps(schema)  # serialisable as a values.schema.json


def test_create_checks_the_checkpoint_before_starting_ray(tmp_path: Path, tiny_models):
    """A folder with config.json but no weights fails before Ray starts; a failure after Ray started (a
    tensor missing from the checkpoint, found by the workers) shuts down the Ray that create started."""
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((tiny_models["mixtral"].path / "config.json").read_text())
    broken = tmp_path / "broken"
    broken.mkdir()
    import safetensors.torch

    tensors = safetensors.torch.load_file(tiny_models["olmoe"].path / "model.safetensors")
    del tensors["model.layers.1.self_attn.q_proj.weight"]
    safetensors.torch.save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    (broken / "config.json").write_text((tiny_models["olmoe"].path / "config.json").read_text())
    code = """
import sys, ray
from expertmesh.workers import EPGroup, GroupConfig
for path in sys.argv[1:]:
    try:
        EPGroup.create(GroupConfig(model=path, workers=2, cpus_per_worker=0.5))
    except Exception as exc:
        print(type(exc).__name__, "|", str(exc).splitlines()[0], "|", ray.is_initialized())
"""
    out = subprocess.run([sys.executable, "-c", code, str(no_weights), str(broken)], capture_output=True,
                         text=True, timeout=300)
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 2, out.stdout + out.stderr
    assert lines[0].startswith("CheckpointError") and "no *.safetensors" in lines[0] and lines[0].endswith("False")
    assert lines[1].startswith("CheckpointError") and "q_proj" in lines[1] and lines[1].endswith("False")
