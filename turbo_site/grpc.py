"""The gRPC server, assembled in one place (as urls.py is for HTTP): Turbo's services (one line per app),
the standard health service, server reflection, and the interceptors: one that turns errors into statuses,
and around it one that traces and counts each call (turbo_site/core/grpc_calls.py).

    server = await server_start("127.0.0.1:50051")     # `manage.py grpcserve` runs this
    ...
    await server_stop(server, grace=5)
"""

import logging
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from chats.grpc import ChatsServicer
from protos.turbo.v1 import turbo_pb2, turbo_pb2_grpc
from proxy.grpc import CompletionsServicer
from turbo_site.core.grpc import grpc_status
from turbo_site.core.grpc_calls import CallInstruments

logger = logging.getLogger("turbo.grpc")

SERVICES = [
    (turbo_pb2_grpc.add_CompletionsServicer_to_server, CompletionsServicer, "Completions"),
    (turbo_pb2_grpc.add_ChatsServicer_to_server, ChatsServicer, "Chats"),
]
SERVICE_NAMES = [turbo_pb2.DESCRIPTOR.services_by_name[name].full_name for _, _, name in SERVICES]
OUR_METHODS = "/turbo.v1."


async def _abort(context, exc: Exception) -> None:
    if isinstance(exc, grpc.aio.AbortError):  # the handler chose its status itself
        raise exc
    code, details, trailing = grpc_status(exc)
    await context.abort(code, details, trailing_metadata=trailing)


def _with_error_statuses(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    """The same handler, its errors answered as gRPC statuses with our message (never a traceback).
    Cancellation (the client went away) is not an error: it goes through
    and cancels the work."""
    if handler.unary_unary is not None:
        unary = handler.unary_unary

        async def unary_unary(request, context):
            try:
                return await unary(request, context)
            except Exception as exc:
                await _abort(context, exc)

        return grpc.unary_unary_rpc_method_handler(
            unary_unary,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    if handler.unary_stream is not None:
        stream = handler.unary_stream

        async def unary_stream(request, context):
            try:
                async for item in stream(request, context):
                    yield item
            except Exception as exc:
                await _abort(context, exc)

        return grpc.unary_stream_rpc_method_handler(
            unary_stream,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    return handler


class ErrorStatuses(grpc.aio.ServerInterceptor):
    """Turbo's methods (turbo.v1.*) answer errors with the status turbo_site.core.grpc maps them to."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith(OUR_METHODS):
            return handler
        return _with_error_statuses(handler, handler_call_details.method)


@dataclass
class Running:
    """A started server, the port it listens on, and its health service (to say NOT_SERVING at stop)."""

    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer


async def server_start(address: str) -> Running:
    """Serve Turbo's gRPC services on `address` (host:port; port 0 picks a free one). Raises OSError
    when it cannot listen there."""
    # Outermost first: the span and the metrics see the status the error interceptor settled on.
    server = grpc.aio.server(interceptors=[CallInstruments((OUR_METHODS,)), ErrorStatuses()])
    for add, servicer, _ in SERVICES:
        add(servicer(), server)
    health_service = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_service, server)
    reflection.enable_server_reflection(
        [*SERVICE_NAMES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
        server,
    )
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as exc:  # grpc says "Failed to bind to address ..."
        raise OSError(f"cannot listen on {address}: {exc}") from None
    if not port:
        raise OSError(f"cannot listen on {address}")
    await server.start()
    for name in ["", *SERVICE_NAMES]:
        await health_service.set(name, health_pb2.HealthCheckResponse.SERVING)
    return Running(server, port, health_service)


async def server_stop(running: Running, *, grace: float) -> None:
    """Say NOT_SERVING, end the chats' open streams (they get `server.shutdown` and UNAVAILABLE) after
    running generations finish or are saved, then stop; calls still open after `grace` are cancelled."""
    from turbo_site.lifespan import drain, on_shutdown

    await running.health.enter_graceful_shutdown()
    await drain()
    await running.server.stop(grace)
    await on_shutdown()  # the event log written, the loop's clients closed
