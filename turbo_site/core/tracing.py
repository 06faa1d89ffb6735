"""Traces (OpenTelemetry): one span per HTTP request, a child span per upstream attempt, chat prompts.

Off unless OTEL_EXPORTER_OTLP_ENDPOINT is set; then spans go out over OTLP/HTTP in batches (the SDK
reads the other standard OTEL_* variables itself: sampler, headers, batch sizes, propagators). Off, a
hook is one boolean check (`enabled`, or a span that is None) and no span object is ever made.

Attributes follow OpenTelemetry's GenAI semantic conventions (`gen_ai.*`); Turbo's own are `turbo.*`.
Prompt and reply text go into spans only with OTEL_CAPTURE_CONTENT=1.

A request's span is current (contextvars) for everything the request runs, so an attempt span is its
child and the event log reads its trace id; a chat's generation runs as its own task, so it is handed
the prompt span explicitly (`task_context`).
"""

import asyncio
import contextlib
import contextvars
import functools
import json
import logging
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from django.conf import settings
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from turbo_site.core import metrics
from turbo_site.core.text import storable, storable_value

logger = logging.getLogger("turbo.tracing")

# Read on every hook: False until `tracing_setup()` (or a test) installs a span processor.
enabled = False
capture_content = False
_tracer: trace.Tracer | None = None
_provider = None  # the SDK's TracerProvider in force

TRACE_ID_HEADER = b"x-turbo-trace-id"
_PROPAGATION_HEADERS = (b"traceparent", b"tracestate")
_NO_SPAN = contextlib.nullcontext()
# Attribute values (captured prompts too) and span names are cut to these many characters.
ATTRIBUTE_MAX = 65536
NAME_MAX = 200
# The public path under /v1/ -> gen_ai.operation.name.
_OPERATIONS = {
    "chat/completions": "chat",
    "completions": "text_completion",
    "embeddings": "embeddings",
    "responses": "chat",
}


# --- setup --------------------------------------------------------------------------------------------


def tracing_setup(process: str = "") -> None:
    """Turn tracing on at start when OTEL_EXPORTER_OTLP_ENDPOINT is set (OTLP over HTTP); `process` (asgi,
    grpc, command) goes into the spans' resource as `turbo.process`. Called by core.startup.process_start."""
    if not settings.OTEL_EXPORTER_OTLP_ENDPOINT or enabled:
        return
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    # No endpoint given here: the exporter reads OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, or the
    # OTEL_EXPORTER_OTLP_ENDPOINT base + /v1/traces, and the other OTEL_EXPORTER_OTLP_* variables.
    resource = {"turbo.process": process} if process else {}
    tracing_install(
        BatchSpanProcessor(EncodableSpans(OTLPSpanExporter())), capture=settings.OTEL_CAPTURE_CONTENT, resource=resource
    )


class EncodableSpans:
    """An OTLP span exporter that drops (and counts: `turbo_spans_dropped_total`) the spans it cannot
    encode, instead of the whole batch with them.

    Turbo's own attributes are made storable where they are set (below); this is for whatever got
    past that (a library's span). The batch is re-encoded only when an export has failed.
    """

    def __init__(self, exporter):
        self.exporter = exporter

    def export(self, spans):
        from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
        from opentelemetry.sdk.trace.export import SpanExportResult

        result = self.exporter.export(spans)
        if result == SpanExportResult.SUCCESS:
            return result
        try:
            encode_spans(spans).SerializeToString()
            return result  # the batch encodes: the export failed for another reason (the exporter says)
        except Exception:
            pass
        kept = []
        for span in spans:
            try:
                encode_spans([span]).SerializeToString()
                kept.append(span)
            except Exception:
                metrics.spans_lost("refused")
        logger.error("dropped %d spans the exporter could not encode", len(spans) - len(kept))
        return self.exporter.export(kept) if kept else SpanExportResult.SUCCESS

    def shutdown(self):
        self.exporter.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.exporter.force_flush(timeout_millis)


def tracing_install(processor, *, capture: bool = False, resource: dict[str, str] | None = None) -> Callable[[], None]:
    """Send spans to `processor` from now on (tests pass a SimpleSpanProcessor over an
    InMemorySpanExporter); returns a function that turns tracing off again."""
    global enabled, capture_content, _tracer, _provider
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import SpanLimits, TracerProvider

    attributes = {SERVICE_NAME: settings.OTEL_SERVICE_NAME, **(resource or {})}
    provider = TracerProvider(
        resource=Resource.create(attributes), span_limits=SpanLimits(max_attribute_length=ATTRIBUTE_MAX)
    )
    provider.add_span_processor(processor)
    _provider, _tracer = provider, provider.get_tracer("turbo")
    capture_content, enabled = capture, True

    def uninstall() -> None:
        global enabled, capture_content, _tracer, _provider
        enabled, capture_content = False, False
        if _provider is provider:
            _tracer, _provider = None, None
        provider.shutdown()

    return uninstall


def tracing_shutdown(timeout_seconds: float = 5) -> None:
    """Export the spans still buffered (within `timeout_seconds`), then stop tracing. Called on the
    server's lifespan shutdown: uvicorn ends by raising SIGTERM again, so the SDK's atexit hook never runs."""
    global enabled
    provider = _provider
    if provider is None:
        return
    enabled = False
    provider.force_flush(int(timeout_seconds * 1000))
    provider.shutdown()


# --- ids and propagation -------------------------------------------------------------------------------


def trace_id_of(span: Span | None) -> str:
    """The span's trace id as 32 hex digits ("" for none)."""
    if span is None:
        return ""
    context = span.get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else ""


def trace_id_current() -> str:
    """The trace id of the span in force here ("" when tracing is off or there is none)."""
    if not enabled:
        return ""
    return trace_id_of(trace.get_current_span())


def headers_inject(headers: dict[str, str], span: Span | None = None) -> None:
    """Add `traceparent` (and `tracestate`) for `span` (else the span in force) to outgoing headers,
    replacing any the client sent: the upstream continues our trace, under our span."""
    if not enabled:
        return
    for name in ("traceparent", "tracestate"):
        headers.pop(name, None)
    propagate.inject(headers, context=trace.set_span_in_context(span) if span is not None else None)


def _storable(attributes: dict[str, Any] | None) -> dict[str, Any] | None:
    """Attributes the exporter can encode: a lone surrogate in one (a model name a client made up)
    would make it drop its whole batch, other requests' spans with it."""
    if not attributes:
        return attributes
    return {storable(name, NAME_MAX): storable_value(value, ATTRIBUTE_MAX) for name, value in attributes.items()}


def _set(span: Span, name: str, value: Any) -> None:
    span.set_attribute(name, storable_value(value, ATTRIBUTE_MAX))


def _error(span: Span, kind: str, message: str = "") -> None:
    _set(span, "error.type", kind)
    span.set_status(Status(StatusCode.ERROR, storable(message or kind, ATTRIBUTE_MAX)))


def _content(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)


# --- a request ----------------------------------------------------------------------------------------


class TracedHTTP:
    """ASGI: one SERVER span per HTTP request (Django's and the /v1 fast path alike), continuing the
    client's `traceparent`, current while the request runs; its trace id goes back in X-Turbo-Trace-Id."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if not enabled:
            await self.app(scope, receive, send)
            return
        await _traced_request(self.app, scope, receive, send)


async def _traced_request(app, scope, receive, send) -> None:
    carrier = {
        name.decode("latin1"): value.decode("latin1")
        for name, value in scope.get("headers", ())
        if name in _PROPAGATION_HEADERS
    }
    parent = propagate.extract(carrier) if carrier else otel_context.Context()
    method, path = scope.get("method", ""), scope.get("path", "")
    attributes = {"http.request.method": method, "url.path": path, "url.scheme": scope.get("scheme", "http")}
    client = scope.get("client")
    if client:
        attributes["client.address"] = client[0]
    span = _tracer.start_span(
        storable(f"{method} {path}", NAME_MAX), context=parent, kind=SpanKind.SERVER, attributes=_storable(attributes)
    )
    header = (TRACE_ID_HEADER, trace_id_of(span).encode())
    status = 0

    async def sending(message) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
            message = {**message, "headers": [*message.get("headers", ()), header]}
        await send(message)

    token = otel_context.attach(trace.set_span_in_context(span, parent))
    try:
        await app(scope, receive, sending)
    except BaseException as exc:
        _error(span, type(exc).__qualname__, str(exc))
        raise
    finally:
        otel_context.detach(token)
        if status:
            span.set_attribute("http.response.status_code", status)
            if status >= 500:
                _error(span, str(status))
        span.end()


# --- an upstream attempt -------------------------------------------------------------------------------


def attempt_start(call, deployment, headers: dict[str, str]) -> Span:
    """A CLIENT span for one attempt of a gateway `call` at a `deployment` (proxy.gateway's), child of
    the span in force; `traceparent` for it goes into `headers`. End it with `attempt_failed` or
    `attempt_end`. Call only when `enabled`."""
    path, payload, public_model = call.path, call.payload, call.model
    operation = _OPERATIONS.get(path.strip("/"), path.strip("/"))
    model = deployment.model or public_model
    location = urlsplit(deployment.upstream.base_url)
    attributes: dict[str, Any] = {
        "gen_ai.operation.name": operation,
        # Every upstream speaks OpenAI's API; gen_ai.provider.name is the newer name of gen_ai.system.
        "gen_ai.system": "openai",
        "gen_ai.provider.name": "openai",
        "turbo.deployment": deployment.id,
        "turbo.upstream": deployment.upstream.name,
        "http.request.method": call.method,
        "server.address": location.hostname or "",
    }
    if location.port:
        attributes["server.port"] = location.port
    if model:
        attributes["gen_ai.request.model"] = model
    if public_model:
        attributes["turbo.model"] = public_model
    if isinstance(payload, dict):
        for name, attribute in (
            ("max_tokens", "gen_ai.request.max_tokens"),
            ("max_completion_tokens", "gen_ai.request.max_tokens"),
            ("temperature", "gen_ai.request.temperature"),
            ("top_p", "gen_ai.request.top_p"),
        ):
            value = payload.get(name)
            if isinstance(value, int | float) and not isinstance(value, bool):
                attributes[attribute] = value
        if payload.get("stream") is True:
            attributes["turbo.stream"] = True
        if capture_content and "messages" in payload:
            attributes["gen_ai.input.messages"] = _content(payload["messages"])
        elif capture_content and "input" in payload:
            attributes["gen_ai.input.messages"] = _content(payload["input"])
    span = _tracer.start_span(
        storable(f"{operation} {model}".strip(), NAME_MAX), kind=SpanKind.CLIENT, attributes=_storable(attributes)
    )
    headers_inject(headers, span)
    return span


def attempt_answered(span: Span | None, response) -> Span | None:
    """The attempt whose answer is handed on: its reader ends the span with the answer's GenAI attributes
    (`answer_end`); one that does not (a front reading the upstream's bytes itself) still has it ended,
    with the status only, once the answer is closed (a client.Response's `on_close`)."""
    if span is None:
        return None
    closing = response.on_close

    def closed() -> None:
        if closing is not None:
            closing()
        # Soon, not now: the reader sets the attributes right after closing, before the loop runs this.
        asyncio.get_running_loop().call_soon(functools.partial(attempt_end, span, status=response.status))

    response.on_close = closed
    return span


def attempt_failed(span: Span | None, reason: str, status: int | None = None) -> None:
    """End an attempt that was not the answer (failed over, or gave up)."""
    if span is None:
        return
    if status is not None:
        span.set_attribute("http.response.status_code", status)
    _error(span, str(status) if status is not None else "transport", reason)
    span.end()


def attempt_end(
    span: Span | None,
    *,
    status: int,
    response_model: Any = "",
    usage: Any = None,
    finish_reasons: Any = (),
    response_id: Any = "",
    output: Any = None,
    error: str = "",
) -> None:
    """End the attempt that answered, with what its answer said (GenAI attributes). Once only."""
    if span is None or not span.is_recording():
        return
    span.set_attribute("http.response.status_code", status)
    if isinstance(response_model, str) and response_model:
        _set(span, "gen_ai.response.model", response_model)
    if isinstance(response_id, str) and response_id:
        _set(span, "gen_ai.response.id", response_id)
    if isinstance(usage, dict):
        for name, attribute in (
            ("prompt_tokens", "gen_ai.usage.input_tokens"),
            ("input_tokens", "gen_ai.usage.input_tokens"),  # the Responses API's names
            ("completion_tokens", "gen_ai.usage.output_tokens"),
            ("output_tokens", "gen_ai.usage.output_tokens"),
        ):
            value = usage.get(name)
            if isinstance(value, int) and not isinstance(value, bool):
                span.set_attribute(attribute, value)
    reasons = [reason for reason in finish_reasons or () if isinstance(reason, str) and reason]
    if reasons:
        _set(span, "gen_ai.response.finish_reasons", reasons)
    if capture_content and output:
        _set(span, "gen_ai.output.messages", _content(output))
    if status >= 400:
        _error(span, str(status), error)
    elif error:
        _error(span, "incomplete", error)
    span.end()


# --- spans around Turbo's own work (chat prompts) ------------------------------------------------------


def span_start(name: str, attributes: dict[str, Any], *, content: dict[str, Any] | None = None) -> Span | None:
    """A span, child of the span in force, that the caller ends (`task_span_end`); None when off.
    `content` (prompt text) is added only with OTEL_CAPTURE_CONTENT=1."""
    if not enabled:
        return None
    span = _tracer.start_span(storable(name, NAME_MAX), attributes=_storable(attributes))
    if capture_content and content:
        span.set_attributes(_storable({key: _content(value) for key, value in content.items() if value is not None}))
    return span


def span(name: str, attributes: dict[str, Any] | None = None, *, parent: Span | None = None):
    """`with tracing.span(...)`: a span current for the block, child of `parent` or the span in force."""
    if not enabled:
        return _NO_SPAN
    context = trace.set_span_in_context(parent) if parent is not None else None
    return _tracer.start_as_current_span(storable(name, NAME_MAX), context=context, attributes=_storable(attributes))


def request_span(name: str, attributes: dict[str, Any], carrier: dict[str, str] | None = None):
    """`with tracing.request_span(...)`: a SERVER span for a request outside HTTP (a /ws request, a gRPC
    call), continuing the `traceparent` in `carrier` (metadata) when there is one, else a new trace."""
    if not enabled:
        return _NO_SPAN
    parent = propagate.extract(carrier) if carrier else otel_context.Context()
    return _tracer.start_as_current_span(
        storable(name, NAME_MAX), context=parent, kind=SpanKind.SERVER, attributes=_storable(attributes)
    )


def server_span_start(name: str, attributes: dict[str, Any], carrier: dict[str, str] | None = None) -> Span | None:
    """A SERVER span for a call outside HTTP whose outcome the caller sets and which the caller ends (a gRPC
    call: its status code is not an exception), continuing the `traceparent` in `carrier`; None when off.
    Make it current for the call with `trace.use_span(span, end_on_exit=False)`."""
    if not enabled:
        return None
    parent = propagate.extract(carrier) if carrier else otel_context.Context()
    return _tracer.start_span(name, context=parent, kind=SpanKind.SERVER, attributes=attributes)


def traced(name: str, attributes: Callable[..., dict[str, Any]] | None = None):
    """Decorate a coroutine function: each call runs in a span named `name` ("{key}" in it is filled
    from the attributes), its attributes made from the call's arguments."""

    def decorate(function):
        @functools.wraps(function)
        async def wrapper(*args, **kwargs):
            if not enabled:
                return await function(*args, **kwargs)
            values = attributes(*args, **kwargs) if attributes else {}
            title = name
            for key, value in values.items() if "{" in name else ():
                title = title.replace("{" + key + "}", str(value))
            with _tracer.start_as_current_span(storable(title, NAME_MAX), attributes=_storable(values)):
                return await function(*args, **kwargs)

        return wrapper

    return decorate


def task_context(span: Span | None) -> contextvars.Context:
    """A fresh context for a background task, with `span` in force in it (a generation outlives the
    request that started it, so it starts from nothing but its prompt's span)."""
    context = contextvars.Context()
    if span is not None:
        context.run(otel_context.attach, trace.set_span_in_context(span))
    return context


def task_span_end(span: Span | None, task: asyncio.Task) -> None:
    """End `span` when `task` ends: an error if it was cancelled, raised, or returned an object whose
    `error` is set (a generation's Outcome)."""
    if span is None:
        return

    def end(done: asyncio.Task) -> None:
        if done.cancelled():
            _error(span, "cancelled")
        elif done.exception() is not None:
            _error(span, type(done.exception()).__qualname__, str(done.exception()))
        elif (failure := getattr(done.result(), "error", None)) is not None:
            _error(span, str(getattr(failure, "code", "") or "error"), str(getattr(failure, "message", failure)))
        span.end()

    task.add_done_callback(end)


def answer_end(answer, **results: Any) -> None:
    """`attempt_end` for a gateway Answer (proxy.gateway's): its attempt's span, with its status."""
    if answer.span is not None:
        attempt_end(answer.span, status=answer.response.status, **results)
