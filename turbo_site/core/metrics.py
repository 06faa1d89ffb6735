"""Prometheus metrics: the metric objects, and the small calls the code paths make to move them.

Every name starts with `turbo_`, and every label comes from a small set (route groups, methods,
statuses, deployments and models of the gateway's file, outcomes): never a user, a key or a prompt.
A model name a client made up (the zero-config gateway forwards any) is kept as is for the first
MAX_LABEL_VALUES names a process sees, then reported as "other".

Metrics are collected only while `/metrics` is on (METRICS_TOKEN or METRICS_ALLOWED_IPS set); off,
each call below returns at its first line. With METRICS_MULTIPROC_DIR set, prometheus-client's
multiprocess mode is used: each process writes its figures to memory-mapped files there and a scrape
of any process sums them all. PROMETHEUS_MULTIPROC_DIR must be in the environment before
prometheus_client makes its first metric, hence it is set here, above the import. At start, a process
removes the live gauges (in flight, open streams, queue depth) that dead processes left behind;
their counters stay, so totals never go backwards.
"""

import os
import re
import time
from collections.abc import Callable

from django.conf import settings
from django.core.signals import setting_changed
from django.dispatch import receiver

MULTIPROC_DIR = settings.METRICS_MULTIPROC_DIR
if MULTIPROC_DIR:
    os.makedirs(MULTIPROC_DIR, exist_ok=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = MULTIPROC_DIR

import prometheus_client  # noqa: E402
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, values  # noqa: E402
from prometheus_client.multiprocess import MultiProcessCollector  # noqa: E402

from turbo_site.core.text import storable  # noqa: E402

if MULTIPROC_DIR and not getattr(values.ValueClass, "_multiprocess", False):
    values.ValueClass = values.get_value_class()  # prometheus_client was imported before the setting was read
prometheus_client.disable_created_metrics()  # `_created` series: not kept in multiprocess mode either

MAX_LABEL_VALUES = 100
_LIVE_GAUGE_FILE = re.compile(r"^gauge_live\w+?_(\d+)\.db$")


def _is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _dead_live_gauges_remove(directory: str) -> None:
    """Live gauges of processes that are gone (or of an earlier process that had this pid) would count forever."""
    for name in os.listdir(directory):
        found = _LIVE_GAUGE_FILE.match(name)
        if found and (int(found.group(1)) == os.getpid() or not _is_running(int(found.group(1)))):
            try:
                os.remove(os.path.join(directory, name))
            except FileNotFoundError:
                pass


if MULTIPROC_DIR:
    _dead_live_gauges_remove(MULTIPROC_DIR)

# Ours alone (no process_* or python_* collectors, which multiprocess mode cannot sum): every name is turbo_.
REGISTRY = CollectorRegistry(auto_describe=True)

_on = bool(settings.METRICS_TOKEN or settings.METRICS_ALLOWED_IPS)


@receiver(setting_changed)
def _setting_changed(*, setting, **kwargs) -> None:
    global _on
    if setting in ("METRICS_TOKEN", "METRICS_ALLOWED_IPS"):
        _on = bool(settings.METRICS_TOKEN or settings.METRICS_ALLOWED_IPS)


def is_on() -> bool:
    return _on


def exposition() -> bytes:
    """The Prometheus text of every process (multiprocess mode) or of this one."""
    # The setting, read now: the directory this process writes to, and a test's shared with its server processes.
    directory = settings.METRICS_MULTIPROC_DIR
    if directory:
        registry = CollectorRegistry()
        collector = MultiProcessCollector(registry, path=directory)
    else:
        registry, collector = REGISTRY, REGISTRY
    try:
        return prometheus_client.generate_latest(registry)
    except UnicodeEncodeError:
        # A label written before labels were made storable (or by an older process sharing the
        # directory): the scrape answers, with that label cleaned, rather than fail until restarted.
        cleaned = CollectorRegistry()
        cleaned.register(_StorableLabels(collector))
        return prometheus_client.generate_latest(cleaned)


class _StorableLabels:
    """A collector's metrics with every label value made storable."""

    def __init__(self, collector):
        self.collector = collector

    def collect(self):
        for family in self.collector.collect():
            family.samples = [
                sample._replace(labels={name: storable(value) for name, value in sample.labels.items()})
                for sample in family.samples
            ]
            yield family


CONTENT_TYPE = prometheus_client.CONTENT_TYPE_PLAIN_0_0_4

# --- the metrics ----------------------------------------------------------------------------------------------------

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
OVERHEAD_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.02, 0.05, 0.1, 0.25, 1)
UPSTREAM_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
FANOUT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)

http_requests = Counter(
    "turbo_http_requests",
    "HTTP requests (and WebSocket handshakes) answered",
    ["route", "method", "status"],
    registry=REGISTRY,
)
http_latency = Histogram(
    "turbo_http_request_duration_seconds",
    "Time from a request's arrival to its response's start (status and headers; a WebSocket's accept)",
    ["route"],
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
http_in_flight = Gauge(
    "turbo_http_requests_in_flight",
    "Requests being served (a stream until it ends)",
    ["route"],
    multiprocess_mode="livesum",
    registry=REGISTRY,
)
streams_open = Gauge(
    "turbo_streams_open",
    "Open server-sent event streams and WebSockets",
    ["protocol", "route"],
    multiprocess_mode="livesum",
    registry=REGISTRY,
)
fanout_delay = Histogram(
    "turbo_stream_fanout_delay_seconds",
    "Time from an event's append to its delivery to a subscriber (live events, per subscriber)",
    buckets=FANOUT_BUCKETS,
    registry=REGISTRY,
)
proxy_overhead = Histogram(
    "turbo_proxy_overhead_seconds",
    "The proxy's own time on a /v1 call (X-Turbo-Overhead-Ms): everything but waiting on the upstream",
    buckets=OVERHEAD_BUCKETS,
    registry=REGISTRY,
)
upstream_attempts = Counter(
    "turbo_upstream_attempts",
    "Calls sent to an upstream deployment, by how they ended",
    ["deployment", "model", "outcome"],
    registry=REGISTRY,
)
upstream_ttfb = Histogram(
    "turbo_upstream_ttfb_seconds",
    "Time from sending a call upstream to its status and first bytes",
    ["deployment", "model"],
    buckets=UPSTREAM_BUCKETS,
    registry=REGISTRY,
)
upstream_total = Histogram(
    "turbo_upstream_duration_seconds",
    "Time from sending a call upstream to the end of its answer",
    ["deployment", "model"],
    buckets=UPSTREAM_BUCKETS,
    registry=REGISTRY,
)
upstream_retries = Counter(
    "turbo_upstream_retries", "Attempts after a call's first (the one before failed)", ["model"], registry=REGISTRY
)
upstream_failovers = Counter(
    "turbo_upstream_failovers",
    "Calls answered by a deployment other than the first one tried",
    ["model"],
    registry=REGISTRY,
)
upstream_cooldowns = Counter(
    "turbo_upstream_cooldowns", "Times a deployment was put to rest after a failure", ["deployment"], registry=REGISTRY
)
tokens = Counter("turbo_tokens", "Tokens used by model calls", ["model", "direction"], registry=REGISTRY)
cost = Counter("turbo_cost_usd", "What model calls cost, in US dollars", ["model"], registry=REGISTRY)
budget_refusals = Counter(
    "turbo_budget_refusals",
    "Calls refused because a budget was used up (429 budget_exceeded)",
    ["scope"],
    registry=REGISTRY,
)
ratelimit_refusals = Counter(
    "turbo_ratelimit_refusals",
    "Calls refused by a rate limit (429 rate_limited)",
    ["scope", "kind"],
    registry=REGISTRY,
)
event_queue_depth = Gauge(
    "turbo_event_queue_depth", "Events waiting for the event writer", multiprocess_mode="livesum", registry=REGISTRY
)
event_batches = Counter("turbo_event_batches_written", "Batches the event writer saved", registry=REGISTRY)
events_written = Counter("turbo_events_written", "Events the event writer saved", registry=REGISTRY)
events_dropped = Counter(
    "turbo_events_dropped",
    "Events lost: refused by the database, or over EVENT_QUEUE_MAX",
    ["reason"],
    registry=REGISTRY,
)
usage_records_dropped = Counter(
    "turbo_usage_records_dropped",
    "Usage records lost: refused by the database, over the queue's limit, or unwritten at shutdown",
    ["reason"],
    registry=REGISTRY,
)
object_owners_dropped = Counter(
    "turbo_object_owners_dropped",
    "Owners of stored /v1 objects lost: refused by the database, over the queue's limit, or unwritten at shutdown",
    ["reason"],
    registry=REGISTRY,
)
spans_dropped = Counter(
    "turbo_spans_dropped",
    "Spans the trace exporter could not encode, dropped alone rather than with their whole batch",
    ["reason"],
    registry=REGISTRY,
)

grpc_requests = Counter(
    "turbo_grpc_requests",
    "gRPC calls answered, by service, method and status code",
    ["grpc_service", "grpc_method", "grpc_code"],
    registry=REGISTRY,
)
grpc_latency = Histogram(
    "turbo_grpc_request_duration_seconds",
    "Time from a gRPC call's arrival to its status (a server stream: until it ends)",
    ["grpc_service", "grpc_method"],
    buckets=UPSTREAM_BUCKETS,
    registry=REGISTRY,
)
grpc_in_flight = Gauge(
    "turbo_grpc_requests_in_flight",
    "gRPC calls being served (a server stream until it ends)",
    ["grpc_service", "grpc_method"],
    multiprocess_mode="livesum",
    registry=REGISTRY,
)


class _Children:
    """A metric's labelled children, looked up once: `labels()` takes a lock and builds a key on every call."""

    __slots__ = ("metric", "children")

    def __init__(self, metric):
        self.metric = metric
        self.children: dict[tuple, object] = {}

    def __call__(self, *label_values):
        child = self.children.get(label_values)
        if child is None:
            child = self.children[label_values] = self.metric.labels(*label_values)
        return child


_http_requests = _Children(http_requests)
_http_latency = _Children(http_latency)
_http_in_flight = _Children(http_in_flight)
_streams_open = _Children(streams_open)
_upstream_attempts = _Children(upstream_attempts)
_upstream_ttfb = _Children(upstream_ttfb)
_upstream_total = _Children(upstream_total)
_upstream_retries = _Children(upstream_retries)
_upstream_failovers = _Children(upstream_failovers)
_upstream_cooldowns = _Children(upstream_cooldowns)
_tokens = _Children(tokens)
_cost = _Children(cost)
_grpc_requests = _Children(grpc_requests)
_grpc_latency = _Children(grpc_latency)
_grpc_in_flight = _Children(grpc_in_flight)

_seen: dict[str, set[str]] = {"model": set(), "deployment": set()}


def _bounded(kind: str, value: str) -> str:
    """`value` as a label, unless this process has already seen MAX_LABEL_VALUES others of its kind."""
    # Storable first: a lone surrogate in a label breaks every later scrape of every process.
    value = storable(value, 100)
    if not value:
        return "none"
    seen = _seen[kind]
    if value in seen:
        return value
    if len(seen) >= MAX_LABEL_VALUES:
        return "other"
    seen.add(value)
    return value


# --- HTTP and WebSocket, at the ASGI edge (the /v1 fast path included) --------------------------------------------

ROUTE_GROUPS = {
    "v1": "v1",
    "chat": "chat",
    "user": "user",
    "group": "group",
    "ws": "ws",
    "graphql": "graphql",
    "api": "api",
    "usage": "usage",
    "admin": "admin",
    "static": "static",
    "health": "health",
    "info": "info",
    "metrics": "metrics",
    "": "web",
    "chats": "web",
    "groups": "web",
    "keys": "web",
    "login": "web",
    "signup": "web",
    "logout": "web",
}
METHODS = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"}


def route_group(path: str) -> str:
    """The first segment of the path, as one of ROUTE_GROUPS' values ("other" for anything else)."""
    end = path.find("/", 1)
    return ROUTE_GROUPS.get(path[1:end] if end > 0 else path[1:], "other")


def asgi_middleware(app):
    """ASGI: count and time every HTTP request and WebSocket handshake, and follow open streams."""

    async def metered(scope, receive, send):
        kind = scope["type"]
        if not _on or kind not in ("http", "websocket"):
            await app(scope, receive, send)
            return
        route = route_group(scope["path"])
        is_http = kind == "http"
        method = (scope["method"] if scope["method"] in METHODS else "other") if is_http else "WEBSOCKET"
        started = time.perf_counter()
        in_flight = _http_in_flight(route)
        in_flight.inc()
        status = None
        stream = None

        def answered(code: int) -> None:
            nonlocal status
            status = code
            _http_latency(route).observe(time.perf_counter() - started)
            _http_requests(route, method, str(code)).inc()

        async def metered_send(message):
            nonlocal stream
            if status is None:
                message_type = message["type"]
                if message_type == "http.response.start":
                    answered(message["status"])
                    for name, value in message.get("headers", ()):
                        if name.lower() == b"content-type" and value.startswith(b"text/event-stream"):
                            stream = _streams_open("sse", route)
                            stream.inc()
                elif message_type == "websocket.accept":
                    answered(101)
                    stream = _streams_open("websocket", route)
                    stream.inc()
                elif message_type == "websocket.close":
                    answered(403)  # before the accept: the handshake is refused
                elif message_type == "websocket.http.response.start":
                    answered(message["status"])
            await send(message)

        try:
            await app(scope, receive, metered_send)
        except BaseException:
            if status is None:
                answered(500)
            raise
        finally:
            in_flight.dec()
            if stream is not None:
                stream.dec()
        if status is None:
            answered(499 if is_http else 403)  # the client left before an answer (as the event log says)

    return metered


# --- gRPC, at the server's interceptor (turbo_site.core.grpc_calls) ------------------------------------------------


def grpc_call_start(service: str, method: str) -> Callable[[str], None] | None:
    """A gRPC call of `service`/`method` (names of the server's own handlers) has arrived: it is in flight
    until the returned function is called with its status code's name (OK, UNAUTHENTICATED...)."""
    if not _on:
        return None
    started = time.perf_counter()
    in_flight = _grpc_in_flight(service, method)
    in_flight.inc()

    def ended(code: str) -> None:
        in_flight.dec()
        _grpc_latency(service, method).observe(time.perf_counter() - started)
        _grpc_requests(service, method, code).inc()

    return ended


# --- the model gateway ----------------------------------------------------------------------------------------------


def _outcome(status: int) -> str:
    if status < 400:
        return "ok"
    if status == 429:
        return "rate_limited"
    return "server_error" if status >= 500 else "client_error"


def _model_label(model: str, asked: str) -> str:
    return _bounded("model", asked if model == "*" else model)  # "*": the zero-config gateway, any name


def upstream_answered(response, deployment: str, model: str, asked: str, began: float, *, attempt: int) -> None:
    """An upstream answered attempt number `attempt` of a call for `asked` (served as the gateway's
    `model`; `began`: time.perf_counter() when sent). Its total time is taken when the answer is closed
    (`response.on_close`, which is kept)."""
    if not _on:
        return
    now = time.perf_counter()
    deployment, model = _bounded("deployment", deployment), _model_label(model, asked)
    outcome = _outcome(response.status)
    _upstream_attempts(deployment, model, outcome).inc()
    if outcome == "ok":
        _upstream_ttfb(deployment, model).observe(now - began)
    if attempt > 1:
        _upstream_retries(model).inc()
        if outcome == "ok":
            _upstream_failovers(model).inc()
    previous = response.on_close
    total = _upstream_total(deployment, model)

    def closed() -> None:
        if previous is not None:
            previous()
        total.observe(time.perf_counter() - began)

    response.on_close = closed


def upstream_unreachable(deployment: str, model: str, asked: str, timeout: bool, attempt: int) -> None:
    """Attempt number `attempt` of a call got no answer (it timed out, or could not connect or read)."""
    if not _on:
        return
    model = _model_label(model, asked)
    _upstream_attempts(_bounded("deployment", deployment), model, "timeout" if timeout else "unreachable").inc()
    if attempt > 1:
        _upstream_retries(model).inc()


def upstream_cooldown(deployment: str) -> None:
    if _on:
        _upstream_cooldowns(_bounded("deployment", deployment)).inc()


def usage_counted(model: str, input_tokens: int, output_tokens: int, cost_usd) -> None:
    """A call's tokens and cost, once known (at once, or when the event writer has counted them)."""
    if not _on:
        return
    model = _bounded("model", model)
    if input_tokens:
        _tokens(model, "input").inc(input_tokens)
    if output_tokens:
        _tokens(model, "output").inc(output_tokens)
    if cost_usd:
        _cost(model).inc(float(cost_usd))


def budget_refused(scope: str) -> None:
    if _on:
        budget_refusals.labels(scope).inc()


def ratelimit_refused(scope: str, kind: str) -> None:
    if _on:
        ratelimit_refusals.labels(scope, kind).inc()


def proxy_overhead_observe(seconds: float) -> None:
    if _on:
        proxy_overhead.observe(seconds)


# --- streams and the event writer -----------------------------------------------------------------------------------


def stream_delivered(appended_at: float) -> None:
    """A live event reached a subscriber; `appended_at`: time.time() when it was appended (any process)."""
    if _on:
        fanout_delay.observe(max(time.time() - appended_at, 0.0))


def events_queued(depth: int) -> None:
    if _on:
        event_queue_depth.set(depth)


def events_batch_written(count: int) -> None:
    if _on:
        event_batches.inc()
        events_written.inc(count)


def events_lost(reason: str, count: int = 1) -> None:
    if _on:
        events_dropped.labels(reason).inc(count)


def spans_lost(reason: str, count: int = 1) -> None:
    if _on:
        spans_dropped.labels(reason).inc(count)


def usage_lost(reason: str, count: int = 1) -> None:
    if _on:
        usage_records_dropped.labels(reason).inc(count)


def object_owners_lost(reason: str, count: int = 1) -> None:
    if _on:
        object_owners_dropped.labels(reason).inc(count)
