"""How the servicers map failures to gRPC status codes and count them, over a real loopback server.

The engine here is a stand-in with no plan and a failing `status()`: the states it fakes (an engine still
starting, a bug inside a call) are the ones a real engine reaches only by timing or by accident.

    .venv/bin/python -m pytest -q tests/serve/test_service_status.py
"""

from __future__ import annotations

import asyncio

import grpc
import pytest

from expertmesh.cluster.serve.exporter import ServiceMetrics
from expertmesh.cluster.serve.service import AdminServicer
from expertmesh.protos.v1 import admin_pb2, admin_pb2_grpc


class StartingEngine:
    """No replica is up yet (`plan()` is None); `status()` fails as an engine bug would."""

    def plan(self):
        return None

    def status(self):
        raise RuntimeError("replica table is empty")


def handled(metrics: ServiceMetrics, method: str, code: str) -> float:
    value = metrics.registry.get_sample_value("expertmesh_grpc_server_handled_total",
                                              {"method": method, "code": code})
    return value or 0.0


async def call_each(metrics: ServiceMetrics) -> dict[str, tuple[grpc.StatusCode, str, float]]:
    """Each method's (status code, details, the count under that code as soon as the client had its error)."""
    server = grpc.aio.server()
    admin_pb2_grpc.add_AdminServiceServicer_to_server(AdminServicer(StartingEngine(), metrics, lambda _: None),
                                                      server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = admin_pb2_grpc.AdminServiceStub(channel)
            calls = {"GetPlan": (stub.GetPlan, admin_pb2.GetPlanRequest(), "UNAVAILABLE"),
                     "GetStatus": (stub.GetStatus, admin_pb2.GetStatusRequest(), "INTERNAL")}
            seen = {}
            for method, (rpc, request, code) in calls.items():
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await rpc(request, timeout=10)
                seen[method] = (err.value.code(), err.value.details(), handled(metrics, method, code))
            return seen
    finally:
        await server.stop(0)


def test_failures_map_to_their_status_and_are_counted_before_the_client_sees_them():
    metrics = ServiceMetrics()
    seen = asyncio.run(call_each(metrics))
    code, details, count = seen["GetPlan"]
    assert code == grpc.StatusCode.UNAVAILABLE and "no plan yet" in details
    assert count == 1  # counted before the status went out, so a scrape right after the error includes it
    code, details, count = seen["GetStatus"]
    assert code == grpc.StatusCode.INTERNAL and details == "RuntimeError: replica table is empty"
    assert count == 1
    # one count per call: an abort inside the body is not counted a second time as INTERNAL
    assert handled(metrics, "GetPlan", "INTERNAL") == 0
