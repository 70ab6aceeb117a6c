"""Bearer-token authentication for the gRPC server, as an interceptor; health and reflection stay open.

Clients send the metadata `authorization: Bearer <token>` (`expertmesh.client` does when given a token);
a call without it, or with another token, ends UNAUTHENTICATED before any servicer runs. Health stays open
for load balancers and Kubernetes probes, reflection for grpcurl (it shows only the public .proto API).
Send tokens over TLS: on a plaintext port anyone on the path reads them.
"""

from __future__ import annotations

import hmac

import grpc

from .exporter import ServiceMetrics

__all__ = ["BearerTokenInterceptor", "OPEN_SERVICES"]

OPEN_SERVICES = frozenset({
    "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.ServerReflection"})


def _refusal(handler: grpc.RpcMethodHandler, details: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` (unary or streaming) that ends the call UNAUTHENTICATED."""
    async def refuse(request_or_iterator, context: grpc.aio.ServicerContext):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, details)

    kind = {(False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler}
    make = kind[(handler.request_streaming, handler.response_streaming)]
    return make(refuse, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, token: str, metrics: ServiceMetrics | None = None) -> None:
        if not token:
            raise ValueError("token: expected a non-empty string")
        self._expected = f"Bearer {token}".encode()
        self._metrics = metrics

    async def intercept_service(self, continuation, handler_call_details: grpc.HandlerCallDetails):
        _, service, method = handler_call_details.method.split("/", 2)
        handler = await continuation(handler_call_details)
        if service in OPEN_SERVICES or handler is None:  # None: unknown method, gRPC answers UNIMPLEMENTED
            return handler
        supplied = next((value for key, value in handler_call_details.invocation_metadata or ()
                         if key == "authorization"), None)
        if isinstance(supplied, str) and hmac.compare_digest(supplied.encode(), self._expected):
            return handler
        if self._metrics is not None:
            self._metrics.handled(method, "UNAUTHENTICATED")
        reason = "missing" if supplied is None else "invalid"
        return _refusal(handler, f"authorization: {reason} bearer token (expected metadata 'authorization: "
                                 "Bearer <token>')")
