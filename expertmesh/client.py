"""expertmesh.client: call an `expertmesh serve` process from an application, synchronously or with asyncio.

    from expertmesh.client import AsyncClient, Client

    with Client("127.0.0.1:50051", token="s3cret") as client:
        for chunk in client.generate("Hello", max_new_tokens=32):      # streamed as the engine samples
            print(chunk.text, end="", flush=True)
        done = client.complete([1, 2, 3], max_new_tokens=8, temperature=0.8, seed=7)   # the whole completion
        print(done.token_ids, done.finish_reason, done.usage)

    async with AsyncClient("127.0.0.1:50051") as client:
        async for chunk in client.generate("Hello"):
            ...

A prompt is text (the server tokenizes it) or a sequence of token ids. Every call has a deadline
(`timeout_s`, default the client's); stopping the iteration early cancels the request on the server.
Failures raise the engine's errors (`expertmesh.cluster.serve.types`): `InvalidRequest` (its message names
the field), `QueueFull`, `Unavailable` (safe to retry), `DeadlineExceeded`, `Cancelled`; any other status
raises `RpcError` with the status name in `.code` (e.g. UNAUTHENTICATED). Needs `pip install 'expertmesh[client]'`.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from expertmesh.cluster.serve import messages
from expertmesh.cluster.serve.types import (
    Cancelled,
    Chunk,
    DeadlineExceeded,
    EngineError,
    EngineStatus,
    FinishReason,
    InvalidRequest,
    ModelInfo,
    QueueFull,
    ScoreResult,
    Unavailable,
    Usage,
)
from expertmesh.protos.v1 import admin_pb2, admin_pb2_grpc, inference_pb2, inference_pb2_grpc

__all__ = ["Client", "AsyncClient", "Completion", "RpcError", "Prompt"]

Prompt = str | Sequence[int]
_ENGINE_ERRORS = {cls.__name__: cls for cls in (InvalidRequest, QueueFull, Unavailable, DeadlineExceeded, Cancelled)}
_BY_CODE = {cls.code: cls for cls in (InvalidRequest, Unavailable, DeadlineExceeded, Cancelled)}  # unambiguous


class RpcError(EngineError):
    """A call that ended with a status the engine does not raise (UNAUTHENTICATED, UNIMPLEMENTED, ...)."""

    def __init__(self, code: str, details: str) -> None:
        super().__init__(f"{code}: {details}")
        self.code = code


def _error(err: grpc.RpcError) -> EngineError:
    """The engine's error the server named, else one implied by the status code, else `RpcError`."""
    code, details = err.code().name, err.details() or ""
    named = dict(err.trailing_metadata() or ()).get(messages.ERROR_KEY)
    cls = _ENGINE_ERRORS.get(named) or _BY_CODE.get(code)
    return cls(details) if cls is not None else RpcError(code, details)


@dataclass(frozen=True)
class Completion:
    """A whole completion: every streamed token and text delta joined, and the last chunk's ending."""

    token_ids: tuple[int, ...]
    text: str
    finish_reason: FinishReason | None
    usage: Usage | None


def _join(chunks: Iterable[Chunk]) -> Completion:
    """The completion a stream of chunks spells."""
    ids, text, last = [], [], None
    for c in chunks:
        ids.extend(c.token_ids)
        text.append(c.text)
        last = c
    return Completion(tuple(ids), "".join(text), last.finish_reason if last else None, last.usage if last else None)


def _read(value: str | Path | bytes | None) -> bytes | None:
    return value if value is None or isinstance(value, bytes) else Path(value).read_bytes()


class _ClientBase:
    """What both clients share: the call settings and the stubs over a channel."""

    def __init__(self, target: str = "127.0.0.1:50051", *, token: str | None = None, tls: bool = False,
                 ca: str | Path | bytes | None = None, cert: str | Path | bytes | None = None,
                 key: str | Path | bytes | None = None, timeout_s: float | None = 300.0,
                 max_message_bytes: int = 16 * 2**20) -> None:
        self.target, self.timeout_s = target, timeout_s
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._options = [("grpc.max_receive_message_length", max_message_bytes),
                         ("grpc.max_send_message_length", max_message_bytes)]
        self._credentials = None
        if tls or ca is not None or cert is not None:
            self._credentials = grpc.ssl_channel_credentials(_read(ca), _read(key), _read(cert))

    def _timeout(self, timeout_s: float | None) -> float | None:
        return self.timeout_s if timeout_s is None else timeout_s

    def _stubs(self, channel) -> None:
        self._channel = channel
        self._inference = inference_pb2_grpc.InferenceServiceStub(channel)
        self._admin = admin_pb2_grpc.AdminServiceStub(channel)
        self._health = health_pb2_grpc.HealthStub(channel)


class Client(_ClientBase):
    """Blocking client (one channel, safe to share between threads).

    target: host:port. token: bearer token sent with every call. tls: use TLS (implied by ca or cert);
    ca: PEM roots to trust (default: the system's); cert, key: client certificate for mutual TLS (paths or
    bytes). timeout_s: default deadline of each call (None: none). max_message_bytes: largest message sent
    or received.
    """

    def __init__(self, target: str = "127.0.0.1:50051", **kwargs) -> None:
        super().__init__(target, **kwargs)
        self._stubs(grpc.secure_channel(target, self._credentials, self._options) if self._credentials
                    else grpc.insecure_channel(target, self._options))

    def generate(self, prompt: Prompt, *, timeout_s: float | None = None, **params) -> Iterator[Chunk]:
        """Stream a completion. params: max_new_tokens, temperature, top_k, top_p, seed, stop_token_ids,
        ignore_eos, request_id, model (see `GenerateRequest` in inference.proto)."""
        call = self._inference.Generate(messages.generate_message(prompt, **params), timeout=self._timeout(timeout_s),
                                        metadata=self._metadata)
        try:
            for msg in call:
                yield messages.chunk(msg)
        except grpc.RpcError as err:
            raise _error(err) from None
        finally:
            call.cancel()  # the consumer stopped early: the request ends on the server too

    def complete(self, prompt: Prompt, **kwargs) -> Completion:
        return _join(self.generate(prompt, **kwargs))

    def _unary(self, method, request, timeout_s: float | None):
        try:
            return method(request, timeout=self._timeout(timeout_s), metadata=self._metadata)
        except grpc.RpcError as err:
            raise _error(err) from None

    def score(self, prompt: Prompt, continuation: Prompt, *, timeout_s: float | None = None, **params) -> ScoreResult:
        """Log-probabilities of `continuation`'s tokens given `prompt`."""
        msg = self._unary(self._inference.Score, messages.score_message(prompt, continuation, **params), timeout_s)
        return messages.score_result(msg)

    def models(self, *, timeout_s: float | None = None) -> list[ModelInfo]:
        msg = self._unary(self._inference.ListModels, inference_pb2.ListModelsRequest(), timeout_s)
        return messages.model_infos(msg)

    def health(self, service: str = "", *, timeout_s: float | None = None) -> str:
        """"SERVING" or "NOT_SERVING" ("" = the whole server; or expertmesh.v1.InferenceService, ...)."""
        msg = self._unary(self._health.Check, health_pb2.HealthCheckRequest(service=service), timeout_s)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(msg.status)

    def status(self, *, timeout_s: float | None = None) -> EngineStatus:
        return messages.engine_status(self._unary(self._admin.GetStatus, admin_pb2.GetStatusRequest(), timeout_s))

    def plan(self, *, timeout_s: float | None = None) -> dict:
        """The served plan file (JSON document; `Placement.from_json` reads it)."""
        return json.loads(self._unary(self._admin.GetPlan, admin_pb2.GetPlanRequest(), timeout_s).plan_json)

    def routing_summary(self, *, timeout_s: float | None = None) -> messages.RoutingSummary:
        msg = self._unary(self._admin.GetRoutingSummary, admin_pb2.GetRoutingSummaryRequest(), timeout_s)
        return messages.routing_summary(msg)

    def drain(self, grace_s: float | None = None, *, timeout_s: float | None = None) -> int:
        """Start draining the server; returns the sequences running when it began."""
        return self._unary(self._admin.Drain, admin_pb2.DrainRequest(grace_seconds=grace_s), timeout_s).running

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncClient(_ClientBase):
    """asyncio client (create and use it on one event loop); arguments and methods as `Client`."""

    def __init__(self, target: str = "127.0.0.1:50051", **kwargs) -> None:
        super().__init__(target, **kwargs)
        self._stubs(grpc.aio.secure_channel(target, self._credentials, self._options) if self._credentials
                    else grpc.aio.insecure_channel(target, self._options))

    async def generate(self, prompt: Prompt, *, timeout_s: float | None = None, **params) -> AsyncIterator[Chunk]:
        """As `Client.generate`."""
        call = self._inference.Generate(messages.generate_message(prompt, **params), timeout=self._timeout(timeout_s),
                                        metadata=self._metadata)
        try:
            async for msg in call:
                yield messages.chunk(msg)
        except grpc.RpcError as err:
            raise _error(err) from None
        finally:
            call.cancel()

    async def complete(self, prompt: Prompt, **kwargs) -> Completion:
        return _join([c async for c in self.generate(prompt, **kwargs)])

    async def _unary(self, method, request, timeout_s: float | None):
        try:
            return await method(request, timeout=self._timeout(timeout_s), metadata=self._metadata)
        except grpc.RpcError as err:
            raise _error(err) from None

    async def score(self, prompt: Prompt, continuation: Prompt, *, timeout_s: float | None = None,
                    **params) -> ScoreResult:
        msg = await self._unary(self._inference.Score, messages.score_message(prompt, continuation, **params),
                                timeout_s)
        return messages.score_result(msg)

    async def models(self, *, timeout_s: float | None = None) -> list[ModelInfo]:
        return messages.model_infos(await self._unary(self._inference.ListModels, inference_pb2.ListModelsRequest(),
                                                      timeout_s))

    async def health(self, service: str = "", *, timeout_s: float | None = None) -> str:
        msg = await self._unary(self._health.Check, health_pb2.HealthCheckRequest(service=service), timeout_s)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(msg.status)

    async def status(self, *, timeout_s: float | None = None) -> EngineStatus:
        return messages.engine_status(await self._unary(self._admin.GetStatus, admin_pb2.GetStatusRequest(),
                                                        timeout_s))

    async def plan(self, *, timeout_s: float | None = None) -> dict:
        return json.loads((await self._unary(self._admin.GetPlan, admin_pb2.GetPlanRequest(), timeout_s)).plan_json)

    async def routing_summary(self, *, timeout_s: float | None = None) -> messages.RoutingSummary:
        msg = await self._unary(self._admin.GetRoutingSummary, admin_pb2.GetRoutingSummaryRequest(), timeout_s)
        return messages.routing_summary(msg)

    async def drain(self, grace_s: float | None = None, *, timeout_s: float | None = None) -> int:
        return (await self._unary(self._admin.Drain, admin_pb2.DrainRequest(grace_seconds=grace_s),
                                  timeout_s)).running

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
