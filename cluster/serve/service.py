"""The gRPC servicers: `InferenceService` and `AdminService` of `expertmesh.v1`, thin over the engine.

Each RPC converts its message (`messages.py`), calls the engine, and maps an `EngineError` to its gRPC
status (`err.code`, the message naming the field for INVALID_ARGUMENT); anything else is INTERNAL. The
call's deadline becomes the request's; a stream whose call is cancelled or times out closes the engine's
iterator, which cancels the request and frees its sequence.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable

import grpc

from expertmesh.protos.v1 import admin_pb2, admin_pb2_grpc, inference_pb2, inference_pb2_grpc

from . import messages
from .exporter import ServiceMetrics
from .types import EngineError, InferenceEngine, InvalidRequest, Unavailable

__all__ = ["InferenceServicer", "AdminServicer", "SERVICE_NAMES"]

log = logging.getLogger(__name__)

SERVICE_NAMES = (
    inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name,
    admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name,
)


@contextlib.asynccontextmanager
async def _status(method: str, context: grpc.aio.ServicerContext, metrics: ServiceMetrics) -> AsyncIterator[None]:
    """Map what the body raises to the call's status, and count the call under that status.

    A failed call is counted before `context.abort`, which sends the status to the client at once: counted
    after it, a client could scrape the metrics before its own error is in them.
    """
    try:
        yield
    except EngineError as err:
        metrics.handled(method, err.code)
        await context.abort(grpc.StatusCode[err.code], str(err), ((messages.ERROR_KEY, type(err).__name__),))
    except (asyncio.CancelledError, GeneratorExit):  # the client cancelled, or its deadline passed
        remaining = context.time_remaining()
        metrics.handled(method, "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED")
        raise
    except Exception as err:
        metrics.handled(method, "INTERNAL")
        log.exception("%s failed", method)
        await context.abort(grpc.StatusCode.INTERNAL, f"{type(err).__name__}: {err}")
    else:
        metrics.handled(method, "OK")


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self, engine: InferenceEngine, metrics: ServiceMetrics) -> None:
        self._engine, self._metrics = engine, metrics

    async def Generate(self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext):
        async with _status("Generate", context, self._metrics):
            req = messages.generate_request(request, context.time_remaining())
            async with contextlib.aclosing(self._engine.generate(req)) as chunks:
                async for chunk in chunks:
                    yield messages.generate_response(chunk)

    async def Score(self, request: inference_pb2.ScoreRequest, context: grpc.aio.ServicerContext):
        async with _status("Score", context, self._metrics):
            result = await self._engine.score(messages.score_request(request, context.time_remaining()))
            return messages.score_response(result)

    async def ListModels(self, request: inference_pb2.ListModelsRequest, context: grpc.aio.ServicerContext):
        async with _status("ListModels", context, self._metrics):
            return messages.models_response(self._engine.models())


class AdminServicer(admin_pb2_grpc.AdminServiceServicer):
    """Operates the engine (status, plan, routing, drain).

    drain(grace_s): starts the server's drain (health, engine) without waiting for it.
    """

    def __init__(self, engine: InferenceEngine, metrics: ServiceMetrics,
                 drain: Callable[[float | None], object]) -> None:
        self._engine, self._metrics, self._drain = engine, metrics, drain

    async def GetStatus(self, request: admin_pb2.GetStatusRequest, context: grpc.aio.ServicerContext):
        async with _status("GetStatus", context, self._metrics):
            return messages.status_response(self._engine.status())

    async def GetPlan(self, request: admin_pb2.GetPlanRequest, context: grpc.aio.ServicerContext):
        async with _status("GetPlan", context, self._metrics):
            plan = self._engine.plan()
            if plan is None:
                raise Unavailable("no plan yet: the engine is starting")
            return admin_pb2.GetPlanResponse(
                version=plan.version, strategy=plan.strategy, num_layers=plan.num_layers,
                num_experts=plan.num_experts, num_gpus=plan.num_gpus, num_nodes=plan.num_nodes,
                plan_json=json.dumps(plan.to_json()))

    async def GetRoutingSummary(self, request: admin_pb2.GetRoutingSummaryRequest,
                                context: grpc.aio.ServicerContext):
        async with _status("GetRoutingSummary", context, self._metrics):
            balancedness, copies = self._engine.routing_figures()
            summary = messages.RoutingSummary(tuple(balancedness), tuple(copies))
            return messages.routing_summary_response(summary, self._engine.status().plan_version)

    async def Drain(self, request: admin_pb2.DrainRequest, context: grpc.aio.ServicerContext):
        async with _status("Drain", context, self._metrics):
            grace = request.grace_seconds if request.HasField("grace_seconds") else None
            if grace is not None and not grace >= 0:
                raise InvalidRequest(f"grace_seconds: expected a number of seconds >= 0, got {grace}")
            running = self._engine.status().running
            self._drain(grace)
            return admin_pb2.DrainResponse(running=running)
