"""`expertmesh serve` in a subprocess, drained by SIGTERM: health turns NOT_SERVING, new requests are refused
UNAVAILABLE, a stream that fits the grace period completes, one that does not ends UNAVAILABLE when the
grace period is over, and the process exits 0.

    .venv/bin/python -m pytest -q tests/serve/test_service_drain.py
"""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
import time

import pytest
from service_cases import wait_for

from expertmesh.client import AsyncClient, Client
from expertmesh.cluster.serve.types import EngineError, FinishReason, Unavailable

GRACE_S = 6.0
PROMPT = [5, 17, 3, 44, 9]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def served(tmp_path):
    """The serve command on a free loopback port (the tiny random model on one CPU worker): (process, target)."""
    port = _free_port()
    log = open(tmp_path / "serve.log", "w")  # noqa: SIM115 - closed below, after the process
    proc = subprocess.Popen([sys.executable, "-m", "expertmesh", "serve", "--workers", "1", "--port", str(port),
                             "--metrics-port", "0", "--grace-s", str(GRACE_S)], stdout=log, stderr=subprocess.STDOUT)
    target = f"127.0.0.1:{port}"

    def ready() -> bool:
        assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
        with Client(target, timeout_s=2) as client:
            try:
                return client.health() == "SERVING"
            except EngineError:
                return False

    try:
        wait_for(ready, 240, every_s=0.25)
        yield proc, target
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)
        log.close()


async def _stream(client: AsyncClient, max_new_tokens: int, started: asyncio.Event):
    tokens = []
    try:
        async for chunk in client.generate(PROMPT, max_new_tokens=max_new_tokens, ignore_eos=True):
            tokens += chunk.token_ids
            started.set()
            if chunk.finish_reason is not None:
                return tokens, chunk.finish_reason
    except EngineError as exc:
        return tokens, exc
    return tokens, None


def test_sigterm_drains_then_exits(served):
    proc, target = served

    async def scenario():
        async with AsyncClient(target, timeout_s=120) as client:
            short_started, long_started = asyncio.Event(), asyncio.Event()
            short = asyncio.create_task(_stream(client, 20, short_started))
            long = asyncio.create_task(_stream(client, 3000, long_started))
            await asyncio.wait_for(asyncio.gather(short_started.wait(), long_started.wait()), 60)
            proc.send_signal(signal.SIGTERM)
            sent = time.monotonic()
            while await client.health() == "SERVING":
                assert time.monotonic() - sent < 5, "health still SERVING 5 s after SIGTERM"
                await asyncio.sleep(0.02)
            with pytest.raises(Unavailable, match="draining"):
                await client.complete(PROMPT, max_new_tokens=2)
            return await short, await long, sent

    (short_tokens, short_end), (long_tokens, long_end), sent = asyncio.run(scenario())
    assert short_end is FinishReason.LENGTH and len(short_tokens) == 20
    assert isinstance(long_end, Unavailable) and 0 < len(long_tokens) < 3000
    assert proc.wait(GRACE_S + 60) == 0
    assert time.monotonic() - sent >= GRACE_S  # the long stream had its whole grace period
