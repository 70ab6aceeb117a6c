"""`expertmesh serve`, `expertmesh infer` and `expertmesh demo`: the serving commands.

    expertmesh serve --config engine.yaml --port 50051        # the engine on a local Ray, behind gRPC
    expertmesh serve                                           # no model: a tiny random one, on CPU workers
    expertmesh infer "Hello" --max-new-tokens 32 --temperature 0.8 --seed 1
    expertmesh infer --prompt-ids 1,2,3 --ids --json
    expertmesh demo                                            # serve, a burst of requests, a placement from them

`serve` reads `ServeConfig` (the engine's settings and a `server:` section); flags override the file.
Results go to stdout, progress and errors to stderr. Exit codes: 0 ok, 1 failure, 2 usage or invalid input
(the message names the field). Heavy imports (torch, Ray, gRPC) happen inside the commands.
"""

from __future__ import annotations

import contextlib
import json
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from expertmesh.placement.exits import EXIT_FAILURE, EXIT_USAGE, PlainCommand, fail

__all__ = ["register", "serve", "infer", "serve_demo", "serve_config"]

TOKEN_ENV = "EXPERTMESH_TOKEN"
err = Console(stderr=True, soft_wrap=True)
_FLAG = ""  # metavar of an on/off flag: nothing to show after its name


@contextlib.contextmanager
def _exit_codes(extra: str = "serve", server: str | None = None) -> Iterator[None]:
    """The planning commands' error format (`placement.exits`): one `error:` line, exit 2 for bad input and
    1 for anything else that failed; a missing extra names the pip install, an unreachable `server` says so."""
    from expertmesh.cluster.serve.types import EngineError, InvalidRequest, Unavailable

    try:
        yield
    except typer.Exit:
        raise
    except ModuleNotFoundError as exc:
        fail(f"this command needs the '{exc.name}' package: pip install 'expertmesh[{extra}]'", EXIT_USAGE)
    except (InvalidRequest, ValueError) as exc:  # ConfigError is a ValueError
        fail(str(exc), EXIT_USAGE)
    except Unavailable as exc:
        if server is not None and "failed to connect" in str(exc):
            fail(f"cannot reach expertmesh serve at {server} ({str(exc).rsplit(': ', 1)[-1].rstrip('.')}); is it "
                 "running, is the address right (--server or EXPERTMESH_SERVER)?", EXIT_FAILURE)
        fail(f"UNAVAILABLE: {exc}", EXIT_FAILURE)
    except EngineError as exc:  # the server's status code says what kind of failure (RpcError's text has it)
        text = str(exc)
        fail(text if text.startswith(f"{exc.code}:") else f"{exc.code}: {text}", EXIT_FAILURE)
    except (OSError, RuntimeError) as exc:
        fail(str(exc) or "the command failed without a message", EXIT_FAILURE)


# ---- serve -------------------------------------------------------------------------------------------
def _set(doc: dict, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for key in parents:
        child = doc.get(key)
        doc[key] = child = dict(child) if isinstance(child, dict) else {}
        doc = child
    doc[last] = value


def serve_config(path: Path | None, overrides: dict[str, Any], tiny_dir: Path):
    """The `ServeConfig` of `path` (none: defaults) with the non-None `overrides` (dotted names) applied.

    Without a model anywhere, the tiny random model is written to `tiny_dir` and served (random weights)."""
    from expertmesh.cluster.serve.serve_config import ServeConfig
    from expertmesh.cluster.serve.tiny import write_tiny_model
    from expertmesh.schema import ConfigError, read_file

    doc = {} if path is None else read_file(path)
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: expected a mapping of fields, got {type(doc).__name__}")
    for name, value in overrides.items():
        if value is not None:
            _set(doc, name, value)
    group = doc.get("group") if isinstance(doc.get("group"), dict) else None
    if group is None or not group.get("model"):
        _set(doc, "group.model", str(write_tiny_model(tiny_dir)))
        _set(doc, "group.weights", "random")
    return ServeConfig.from_dict(doc, str(path) if path is not None else "flags")


def serve(
    config: Annotated[Path | None, typer.Option("--config", "-c", metavar="FILE",
                                                help="ServeConfig YAML/JSON (engine settings, server:).")] = None,
    model: Annotated[str | None, typer.Option("--model", metavar="DIR", help="Checkpoint folder (Hugging Face format); "
                                              "none: a tiny random model.")] = None,
    plan: Annotated[str | None, typer.Option("--plan", metavar="PLAN",
                                             help="Plan file (expertmesh plan --out).")] = None,
    workers: Annotated[int | None, typer.Option("--workers", "-w", metavar="N",
                                                help="Workers (GPUs) per EP group.")] = None,
    replicas: Annotated[int | None, typer.Option("--replicas", "-r", metavar="N",
                                                 help="Data-parallel EP groups.")] = None,
    device: Annotated[str | None, typer.Option("--device", metavar="cpu|cuda",
                                               help="cpu (gloo) or cuda (NCCL).")] = None,
    redis: Annotated[str | None, typer.Option("--redis", metavar="URL", help="Record routing statistics in this Redis "
                                              "(redis://host:port/db).")] = None,
    address: Annotated[str | None, typer.Option("--address", metavar="HOST", help="Interface to listen on.")] = None,
    port: Annotated[int | None, typer.Option("--port", "-p", metavar="PORT", help="gRPC port (0: a free one).")] = None,
    metrics_port: Annotated[int | None, typer.Option("--metrics-port", metavar="PORT", help="Prometheus port.")] = None,
    token: Annotated[str | None, typer.Option("--token", metavar="TOKEN", envvar=TOKEN_ENV, show_envvar=True,
                                              help="Bearer token every call must carry.")] = None,
    tls_cert: Annotated[str | None, typer.Option("--tls-cert", metavar="PEM",
                                                 help="PEM certificate chain (TLS).")] = None,
    tls_key: Annotated[str | None, typer.Option("--tls-key", metavar="PEM", help="PEM private key (TLS).")] = None,
    tls_client_ca: Annotated[str | None, typer.Option("--tls-client-ca", metavar="PEM",
                                                      help="PEM CA of client certificates (mutual TLS).")] = None,
    grace_s: Annotated[float | None, typer.Option("--grace-s", metavar="SECONDS", help="Seconds running streams get on "
                                                  "SIGTERM.")] = None,
) -> None:
    """Serve a model over gRPC on a local Ray (health, reflection, metrics; drains on SIGTERM)."""
    with _exit_codes(), tempfile.TemporaryDirectory(prefix="expertmesh-tiny-") as tiny:
        overrides = {"group.model": model, "group.plan": plan, "group.workers": workers, "replicas": replicas,
                     "group.device": device, "stats.redis_url": redis, "server.address": address,
                     "server.port": port, "server.metrics_port": metrics_port, "server.token": token,
                     "server.tls.cert": tls_cert, "server.tls.key": tls_key, "server.tls.client_ca": tls_client_ca,
                     "server.grace_s": grace_s}
        settings = serve_config(config, overrides, Path(tiny) / "tiny")
        import asyncio

        asyncio.run(_serve(settings))


async def _serve(settings) -> None:
    import logging

    import ray

    from expertmesh.cluster.serve.engine import Engine
    from expertmesh.cluster.serve.server import serve as serve_loop
    from expertmesh.workers.group import EPGroup

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    started = time.monotonic()
    EPGroup.check(settings.engine.group)  # a bad checkpoint or plan fails in a second, before Ray starts
    if not ray.is_initialized():
        ray.init(include_dashboard=False)
    engine = await Engine.start(settings.engine)
    try:
        def listening(server) -> None:
            info = engine.models()[0]
            s = settings.server
            metrics = f", metrics http://{s.address}:{server.metrics_port}/metrics" if server.metrics_port else ""
            err.print(f"[bold]expertmesh serve[/]: {info.name} ({info.family}, {info.num_experts} experts, "
                      f"top-{info.top_k}) on {settings.replicas} x {engine.status().workers_per_replica} "
                      f"{settings.group.device} workers; gRPC {'TLS' if s.tls else 'plaintext'} "
                      f"{s.address}:{server.port}{metrics}; ready in {time.monotonic() - started:.1f} s")

        await serve_loop(engine, settings.server, started=listening)
    finally:
        await engine.stop()
        ray.shutdown()


# ---- infer -------------------------------------------------------------------------------------------
def _ids(text: str | None, field: str) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise ValueError(f"{field}: expected comma-separated token ids, got {text!r}") from None


def infer(
    prompt: Annotated[str | None, typer.Argument(metavar="PROMPT",
                                                 help="Prompt text ('-': read stdin).", show_default=False)] = None,
    prompt_ids: Annotated[str | None, typer.Option("--prompt-ids", metavar="IDS",
                                                   help="Prompt as token ids: 1,2,3.")] = None,
    server: Annotated[str, typer.Option("--server", "-s", metavar="HOST:PORT", envvar="EXPERTMESH_SERVER",
                                        help="host:port of expertmesh serve.")] = "127.0.0.1:50051",
    max_new_tokens: Annotated[int | None, typer.Option("--max-new-tokens", "-n", metavar="N", help="Tokens to generate "
                                                       "(server default: 16).")] = None,
    temperature: Annotated[float, typer.Option("--temperature", "-t", metavar="T", help="0 = greedy.")] = 0.0,
    top_k: Annotated[int, typer.Option("--top-k", metavar="K", help="Sample from the k likeliest (0 = off).")] = 0,
    top_p: Annotated[float | None, typer.Option("--top-p", metavar="P", help="Nucleus mass in (0, 1].")] = None,
    seed: Annotated[int | None, typer.Option("--seed", metavar="INT", help="Same seed, same tokens.")] = None,
    stop_ids: Annotated[str | None, typer.Option("--stop-ids", metavar="IDS",
                                                 help="Token ids that end the completion.")] = None,
    ignore_eos: Annotated[bool, typer.Option("--ignore-eos", metavar=_FLAG,
                                             help="Do not stop at the model's EOS.")] = False,
    show_ids: Annotated[bool, typer.Option("--ids", metavar=_FLAG, help="Print token ids instead of text.")] = False,
    json_out: Annotated[bool, typer.Option("--json", metavar=_FLAG,
                                           help="One JSON object on stdout at the end.")] = False,
    token: Annotated[str | None, typer.Option("--token", metavar="TOKEN", envvar=TOKEN_ENV, show_envvar=True,
                                              help="Bearer token.")] = None,
    tls: Annotated[bool, typer.Option("--tls", metavar=_FLAG,
                                      help="Connect with TLS (system roots unless --ca).")] = False,
    ca: Annotated[Path | None, typer.Option("--ca", metavar="PEM", help="PEM roots to trust (implies --tls).")] = None,
    cert: Annotated[Path | None, typer.Option("--cert", metavar="PEM", help="Client certificate (mutual TLS).")] = None,
    key: Annotated[Path | None, typer.Option("--key", metavar="PEM", help="Client key (mutual TLS).")] = None,
    timeout_s: Annotated[float, typer.Option("--timeout-s", metavar="SECONDS", help="Deadline of the call.")] = 300.0,
) -> None:
    """Stream a completion from `expertmesh serve` to the terminal."""
    with _exit_codes("client", server):
        from expertmesh.client import Client

        ids = _ids(prompt_ids, "--prompt-ids")
        if (prompt is None) == (ids is None):
            raise ValueError("prompt: expected a PROMPT argument or --prompt-ids (one of them)")
        source = sys.stdin.read() if prompt == "-" else prompt if ids is None else ids
        params = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                      stop_token_ids=_ids(stop_ids, "--stop-ids") or (), ignore_eos=ignore_eos)
        tokens, text, last = [], [], None
        first: float | None = None
        with Client(server, token=token, tls=tls, ca=ca, cert=cert, key=key, timeout_s=timeout_s) as client:
            show_ids = show_ids or not client.models()[0].has_tokenizer  # no tokenizer: ids are all there is
            start = time.monotonic()
            for chunk in client.generate(source, **params):
                first = first if first is not None or not chunk.token_ids else time.monotonic() - start
                tokens += chunk.token_ids
                text.append(chunk.text)
                last = chunk
                if not json_out:
                    sys.stdout.write("".join(f"{t} " for t in chunk.token_ids) if show_ids else chunk.text)
                    sys.stdout.flush()
        elapsed = time.monotonic() - start
        result = {"token_ids": tokens, "text": "".join(text),
                  "finish_reason": last.finish_reason.value if last and last.finish_reason else None,
                  "prompt_tokens": last.usage.prompt_tokens if last and last.usage else None,
                  "generated_tokens": len(tokens), "ttft_s": first, "elapsed_s": elapsed}
        if json_out:
            print(json.dumps(result))
        else:
            print()
            rate = len(tokens) / elapsed if elapsed > 0 else float("nan")
            err.print(f"[dim]{result['finish_reason']}: {len(tokens)} tokens, first after {first or 0:.3f} s, "
                      f"{rate:.1f} tokens/s[/]")


# ---- demo --------------------------------------------------------------------------------------------
def serve_demo(
    requests: Annotated[int, typer.Option("--requests", metavar="N", help="Requests in the burst.")] = 64,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", metavar="N", help="Tokens per request.")] = 32,
    gpus: Annotated[int, typer.Option("--gpus", metavar="N", help="GPUs to plan the placement for.")] = 4,
    json_out: Annotated[bool, typer.Option("--json", metavar=_FLAG, help="Figures as JSON on stdout.")] = False,
) -> None:
    """Serve the tiny model on 2 CPU workers, send a burst of concurrent requests through the gRPC client,
    print throughput and latency, then plan a placement from the routing recorded in Redis."""
    with _exit_codes():
        from expertmesh.cluster.serve.demo import run_demo

        figures = run_demo(requests=requests, max_new_tokens=max_new_tokens, gpus=gpus, console=err)
        if json_out:
            print(json.dumps(figures))


def register(app: typer.Typer) -> None:
    """Mount the serving commands on the `expertmesh` app."""
    app.command("serve", cls=PlainCommand)(serve)
    app.command("infer", cls=PlainCommand)(infer)
    app.command("demo", cls=PlainCommand)(serve_demo)
