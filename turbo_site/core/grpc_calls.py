"""Every gRPC call the server answers, seen from outside its handler: a SERVER span and the metrics.

`CallInstruments` is the server's outermost interceptor (turbo_site/grpc.py), so it sees the status a call
really ended with, after the error statuses are settled: a trace span per call (current while the handler
runs, so each upstream attempt is its child; a client's `traceparent` metadata is continued) with the
`rpc.*` attributes and `rpc.grpc.status_code`, and `turbo_grpc_requests_total` / `_duration_seconds` /
`_in_flight` by service, method and code. Both are set up by core.startup.process_start (`grpcserve`).
"""

import asyncio
import contextlib
import inspect

import grpc
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from turbo_site.core import metrics, tracing

# The codes that say the server failed (OpenTelemetry's gRPC conventions); the others are the caller's doing.
SERVER_FAULTS = {
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DATA_LOSS,
}
_PROPAGATION_KEYS = ("traceparent", "tracestate")
_CODES = {code.value[0]: code for code in grpc.StatusCode}
_NOTHING = contextlib.nullcontext()


def _status_code(context) -> grpc.StatusCode:
    """The status the handler set (by `abort` or `set_code`); OK when it set none."""
    code = context.code()
    if isinstance(code, int):  # the status number, as some grpc versions keep it
        return _CODES.get(code, grpc.StatusCode.UNKNOWN)
    return code or grpc.StatusCode.OK


@contextlib.contextmanager
def _call(full_method: str, context):
    """Measure and trace one call while the block runs its handler."""
    service, _, method = full_method.lstrip("/").partition("/")
    ended = metrics.grpc_call_start(service, method)
    carrier = {key: value for key, value in context.invocation_metadata() or () if key in _PROPAGATION_KEYS}
    attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method}
    span = tracing.server_span_start(f"gRPC {full_method}", attributes, carrier)
    code = grpc.StatusCode.UNKNOWN
    try:
        current = trace.use_span(span, record_exception=False, set_status_on_exception=False) if span else _NOTHING
        with current:
            yield
        code = _status_code(context)
    except (asyncio.CancelledError, GeneratorExit):
        code = grpc.StatusCode.CANCELLED  # the client went away
        raise
    except grpc.aio.AbortError:
        code = _status_code(context)
        raise
    finally:
        if ended is not None:
            ended(code.name)
        if span is not None:
            span.set_attribute("rpc.grpc.status_code", code.value[0])
            if code in SERVER_FAULTS:
                span.set_attribute("error.type", code.name)
                span.set_status(Status(StatusCode.ERROR, code.name))
            span.end()


def _instrumented(behavior, full_method: str):
    """`behavior` (a handler's function, streaming or not) run inside `_call`."""
    if inspect.isasyncgenfunction(behavior):

        async def streaming(request, context):
            with _call(full_method, context):
                async for item in behavior(request, context):
                    yield item

        return streaming

    async def answering(request, context):
        with _call(full_method, context):
            return await behavior(request, context)

    return answering


_KINDS = (
    ("unary_unary", grpc.unary_unary_rpc_method_handler),
    ("unary_stream", grpc.unary_stream_rpc_method_handler),
    ("stream_unary", grpc.stream_unary_rpc_method_handler),
    ("stream_stream", grpc.stream_stream_rpc_method_handler),
)


class CallInstruments(grpc.aio.ServerInterceptor):
    """A span and the metrics for each call of a method whose name starts with one of `prefixes`."""

    def __init__(self, prefixes: tuple[str, ...]):
        self.prefixes = prefixes

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method.startswith(self.prefixes):
            return handler
        for kind, make in _KINDS:
            behavior = getattr(handler, kind)
            if inspect.iscoroutinefunction(behavior) or inspect.isasyncgenfunction(behavior):
                return make(
                    _instrumented(behavior, method),
                    request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer,
                )
        return handler  # a synchronous handler: none of ours
