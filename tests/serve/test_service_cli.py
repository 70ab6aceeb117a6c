"""`expertmesh serve`'s configuration: a file, flags over it, the tiny model when none is given, and errors
that name the field (no Ray, no server: the commands themselves run in test_service.py and
test_service_drain.py).

    .venv/bin/python -m pytest -q tests/serve/test_service_cli.py
"""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from expertmesh.cli import app
from expertmesh.cluster.serve.cli import serve_config
from expertmesh.cluster.serve.serve_config import ServeConfig
from expertmesh.schema import ConfigError


def test_flags_override_the_file(tmp_path):
    path = tmp_path / "engine.yaml"
    path.write_text(yaml.safe_dump({"group": {"model": "/models/m", "workers": 2}, "replicas": 2,
                                    "server": {"port": 6000, "grace_s": 5.0, "token": "from-file"}}))
    config = serve_config(path, {"server.port": 7000, "group.workers": 4, "server.token": None}, tmp_path / "tiny")
    assert (config.server.port, config.group.workers) == (7000, 4)  # flags win
    assert (config.replicas, config.server.grace_s, config.server.token) == (2, 5.0, "from-file")  # unset flags don't
    assert config.group.model == "/models/m" and config.group.weights == "checkpoint"
    assert config.engine.replicas == 2 and not hasattr(config.engine, "server")


def test_no_model_serves_the_tiny_random_one(tmp_path):
    config = serve_config(None, {"server.tls.cert": None}, tmp_path / "tiny")
    assert config.group.model == str(tmp_path / "tiny") and config.group.weights == "random"
    assert {"config.json", "tokenizer.json"} <= {p.name for p in (tmp_path / "tiny").iterdir()}
    assert config.server.address == "127.0.0.1" and config.server.tls is None


@pytest.mark.parametrize(("doc", "overrides", "message"), [
    ({"server": {"port": 70000}}, {}, "server.port: expected a value less than or equal to 65535, got 70000"),
    ({"server": {"prot": 1}}, {}, "server.prot: unknown field"),
    ({}, {"server.tls.cert": "c.pem"}, "server.tls.key: required field missing"),
    ({"server": {"grace_s": -1}}, {}, "server.grace_s: expected a value greater than or equal to 0, got -1"),
    ({"server": {"max_message_bytes": 10}}, {}, "server.max_message_bytes: expected a value greater than or equal"),
    ({"replicas": 0}, {}, "replicas: expected a value greater than or equal to 1, got 0"),
])
def test_errors_name_the_field(tmp_path, doc, overrides, message):
    path = tmp_path / "engine.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match=f"^{path}: {message}".replace(".", r"\.").replace("(", r"\(")):
        serve_config(path, overrides, tmp_path / "tiny")


def test_serve_exits_2_naming_the_field_before_starting_anything(tmp_path):
    path = tmp_path / "engine.yaml"
    path.write_text("server: {port: -5}\n")
    out = CliRunner().invoke(app, ["serve", "--config", str(path)])
    assert out.exit_code == 2 and "server.port: expected a value greater than or equal to 0" in out.stderr


def test_the_schema_has_the_server_section():
    schema = json.dumps(ServeConfig.json_schema())
    assert '"server"' in schema and '"metrics_port"' in schema and '"group"' in schema


def test_infer_refuses_a_prompt_and_ids_together_without_a_server():
    out = CliRunner().invoke(app, ["infer", "Hello", "--prompt-ids", "1,2", "--server", "127.0.0.1:1"])
    assert out.exit_code == 2 and "prompt: expected a PROMPT argument or --prompt-ids" in out.stderr
    out = CliRunner().invoke(app, ["infer", "--prompt-ids", "1,x", "--server", "127.0.0.1:1"])
    assert out.exit_code == 2 and "--prompt-ids: expected comma-separated token ids" in out.stderr


def test_infer_without_a_server_says_so_in_one_line():
    out = CliRunner().invoke(app, ["infer", "Hello", "--server", "127.0.0.1:1", "--timeout-s", "10"])
    assert out.exit_code == 1
    assert out.stderr.startswith("error: cannot reach expertmesh serve at 127.0.0.1:1 (")
    assert out.stderr.count("\n") == 1 and "Unavailable" not in out.stderr  # one line, no class name


@pytest.mark.parametrize("command", ["serve", "infer", "demo"])
def test_serving_help_shows_value_names_and_whole_texts(command):
    out = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200"})
    assert out.exit_code == 0
    assert "<bool>" not in out.stdout and "<str>  " not in out.stdout.split("Options")[-1]
    if command == "infer":  # "[...]" in a help text is rich markup: it vanished, leaving "generate ."
        assert "Tokens to generate (server default: 16)." in out.stdout and "HOST:PORT" in out.stdout


def test_serve_checks_the_checkpoint_before_starting_ray(tmp_path, monkeypatch):
    """A folder with config.json and no tensors fails at once (exit 2), without starting a Ray first."""
    import ray

    from expertmesh.cluster.serve.tiny import write_tiny_model

    model = write_tiny_model(tmp_path / "model")  # config and tokenizer only: the tiny model has no tensors
    started = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda *args, **kwargs: started.append(True))
    out = CliRunner().invoke(app, ["serve", "--model", str(model), "--port", "0"])
    assert out.exit_code == 2 and "no *.safetensors files" in out.stderr
    assert started == []
