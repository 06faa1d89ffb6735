"""`/v1/*`: an OpenAI-compatible passthrough that keeps the provider key on the server.

Requests that proxy.paths allows (its table of paths and methods, within PROXY_ALLOWED_PATHS and, for
staff, PROXY_ADMIN_PATHS) are forwarded with their method, query string and body unchanged; anything
else is refused before the upstream hears of it, since every call upstream carries the server's key.
An object the upstream stores (a chat completion, a response...) is reachable only by the user whose
call created it (proxy.owners records the ids in the answers). The upstream's status, headers and
body come back as they arrive (server-sent events chunk by chunk). The request is logged once its
response has ended, off the hot path.

`exchange()` is the proxy itself, shared by its two front doors: `proxy.fast` (raw ASGI, for API
clients with a token in the Authorization header: the hot path) and `proxy_view` below (Django, for
everything else: browsers with an Origin and CORS, cookies, preflights, requests without a token).
"""

import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import unquote

from django.conf import settings
from django.http import HttpResponse, StreamingHttpResponse
from django.utils.encoding import escape_uri_path
from django.views.decorators.csrf import csrf_exempt

from accounts.auth import AuthRefused, arequest_authenticate
from proxy import gateway
from proxy.events import capture_body, event_record
from proxy.owners import object_is_users, object_record
from proxy.paths import Access, Decision, Route, path_decision
from proxy.redaction import (
    EventStreamRedactor,
    encoding_readable,
    error_body_decoded,
    response_headers_allowed,
)
from proxy.requests import ModelRequest, RequestUnreadable, v1_request_read
from proxy.usage.caller import Caller
from proxy.usage.limits import limits_settle
from proxy.usage.passthrough import UsageStripper, exchange_usage_record, usage_asked_for
from turbo_site.core import metrics, tracing
from turbo_site.core.acache import CachedCheck
from turbo_site.core.errors import Outcome, outcome_of
from turbo_site.core.http import client_ip
from turbo_site.core.parsers import JSONTooDeep, client_json_loads

logger = logging.getLogger("turbo.proxy")

# Client headers an OpenAI client needs upstream; everything else (Authorization, Cookie, Host,
# hop-by-hop and forwarding headers) stays here.
FORWARDED_REQUEST_HEADERS = {
    "content-type",
    "accept",
    "user-agent",
    "idempotency-key",
    "openai-beta",
}
FORWARDED_REQUEST_PREFIXES = ("openai-", "x-stainless-")
# They pick whose account the server's key bills: the server's to set (OPENAI_ORGANIZATION,
# OPENAI_PROJECT), never a client's, even if PROXY_FORWARD_HEADERS names them.
SERVER_ONLY_REQUEST_HEADERS = {"openai-organization", "openai-project"}


def openai_error_body(message: str, error_type: str, code: str) -> bytes:
    """An error in the shape OpenAI clients parse (which also has Turbo's code and message)."""
    return json.dumps({"error": {"message": message, "type": error_type, "code": code}}).encode()


def openai_error(outcome: Outcome) -> HttpResponse:
    """A failure's outcome (turbo_site.core.errors) as /v1 answers it."""
    body = openai_error_body(outcome.message, outcome.openai_type, outcome.code)
    return HttpResponse(body, status=outcome.status, content_type="application/json", headers=outcome.all_headers())


def _request_headers(client_headers: dict[str, str]) -> dict[str, str]:
    extra = {name.lower() for name in settings.PROXY_FORWARD_HEADERS}
    headers = {
        name: value
        for name, value in client_headers.items()
        if (name in FORWARDED_REQUEST_HEADERS or name.startswith(FORWARDED_REQUEST_PREFIXES) or name in extra)
        and name not in SERVER_ONLY_REQUEST_HEADERS
    }
    return headers  # the gateway adds the upstream's credentials, and asks for bytes untouched


def _response_headers(upstream_headers: list[tuple[str, str]]) -> dict[str, str]:
    # An allowlist (proxy.redaction): a header an upstream invents tomorrow stays here.
    return response_headers_allowed(upstream_headers, gateway.secrets_known())


def _has_dot_segment(path: str) -> bool:
    return any(segment in (".", "..") for segment in unquote(path).split("/"))


def _referred(route: Route, body: bytes) -> list[tuple[str, object]] | None:
    """The objects (collection, id) a `creates` route's body names by its `refers` fields; None when it
    may name one that cannot be read for sure (a body that is not a JSON object, or a field given twice),
    since the upstream's parser might read it where ours does not."""
    fields = route.refers
    # No field name in it, no escape that could spell one, no UTF-16/32: it names none.
    if not fields or not (any(name.encode() in body for name in fields) or b"\\u" in body or b"\x00" in body):
        return []
    twice = False

    def pairs(items: list) -> dict:
        nonlocal twice
        names = [name for name, _ in items if name in fields]
        twice = twice or len(names) != len(set(names))
        return dict(items)

    try:
        client_json_loads(body)  # its limits (depth, no NaN) first
        data = json.loads(body, object_pairs_hook=pairs)
    except (ValueError, UnicodeDecodeError):
        return None
    if twice or not isinstance(data, dict):
        return None
    return [(collection, data[name]) for name, collection in fields.items() if data.get(name) is not None]


async def _foreign_object(decision: Decision, request: "ProxyRequest", referred: list) -> object | None:
    """An object id this request would reach that is not the caller's (then a 404), or None."""
    route = decision.route
    reached = [(route.collection, decision.object_id)] if route is not None and route.access is Access.OWNER else []
    for collection, object_id in reached + referred:
        if not isinstance(object_id, str) or not await object_is_users(collection, object_id, request.user_id):
            return object_id
    return None


def _stored_by(route: Route | None, payload: dict | None) -> str:
    """The collection whose new object this call's answer holds, if the upstream stores it; else ""."""
    if route is None or route.access is not Access.CREATES:
        return ""
    store = payload.get("store") if payload is not None else None
    return route.collection if (store is True or (store is None and route.store_default)) else ""


@dataclass(slots=True)
class ProxyRequest:
    """What the proxy needs of a client's request, from either front door."""

    user_id: object
    is_staff: bool
    method: str
    path: str  # the part after /v1/, percent-decoded
    request_path: str  # the whole path, for the log
    query: str
    headers: dict[str, str]  # names in lower case
    body: bytes
    client_ip: str | None
    started: float  # time.perf_counter() when the request arrived
    allowed_models: frozenset[str] | None = None  # the user's groups' limit; None: any model
    caller: Caller | None = None  # who the call is for: user, group (a group key's) and API key
    # The hot path's token lookup as this process read it last (turbo_site.core.acache): confirmed on
    # Redis before any answer (in the admission's script when the call gets that far); CacheChanged
    # from exchange() means it changed, and the request must be authenticated again.
    token_check: CachedCheck | None = None


@dataclass(slots=True)
class ProxyReply:
    """The answer: status and headers, then either `content` (an error of ours) or `stream`."""

    status: int
    headers: dict[str, str]
    content: bytes = b""
    stream: AsyncIterator[bytes] | None = None


async def exchange(request: ProxyRequest) -> ProxyReply:
    """Forward one authenticated request through the gateway; the reply streams the answer back."""
    content_type = request.headers.get("content-type", "")
    try:
        requested = v1_request_read(request.path, request.method, request.body, content_type)
    except (JSONTooDeep, RequestUnreadable) as exc:
        requested, unreadable = ModelRequest(None, ""), exc
    else:
        unreadable = None
    payload, model = requested.payload, requested.model

    def log(
        status: int, reader: gateway.UsageReader | None = None, response_body: str = "", attempts: tuple = ()
    ) -> None:
        event_record(
            type="proxy",
            user_id=request.user_id,
            method=request.method,
            path=request.request_path,
            query=request.query,
            status=status,
            duration_ms=(time.perf_counter() - request.started) * 1000,
            client_ip=request.client_ip,
            model=(reader.model if reader and reader.model else model),
            prompt_tokens=reader.token("prompt_tokens") if reader else None,
            completion_tokens=reader.token("completion_tokens") if reader else None,
            total_tokens=reader.token("total_tokens") if reader else None,
            request_body=capture_body(request.body, content_type) if settings.EVENT_CAPTURE_BODIES else "",
            response_body=response_body,
            attempts=attempts,
        )

    async def confirmed() -> None:
        """A refusal (or an answer of our own) waits for the token's check: a revoked one gets its 401."""
        if request.token_check is not None:
            await request.token_check.confirm()

    async def fail(
        status: int, message: str, error_type: str, code: str, headers: dict | None = None, attempts=()
    ) -> ProxyReply:
        await confirmed()
        log(status, attempts=attempts)
        return ProxyReply(
            status,
            {"Content-Type": "application/json", **(headers or {})},
            openai_error_body(message, error_type, code),
        )

    if _has_dot_segment(request.path):
        return await fail(400, "the path may not contain '.' or '..' segments", "invalid_request_error", "invalid_path")
    decision = path_decision(request.method, request.path, is_staff=request.is_staff)
    if decision.refused:
        return await fail(decision.status, decision.message, "invalid_request_error", decision.code, decision.headers)
    if unreadable is not None:  # a model call policy cannot read is never forwarded unchecked
        code = unreadable.code if isinstance(unreadable, RequestUnreadable) else "invalid_json"
        return await fail(400, str(unreadable), "invalid_request_error", code)
    referred = _referred(decision.route, request.body) if decision.route is not None else []
    if referred is None:
        message = "the body must be one JSON object that names each object once"
        return await fail(400, message, "invalid_request_error", "invalid_json")
    if referred or (decision.route is not None and decision.route.access is Access.OWNER):
        await confirmed()  # a revoked token learns nothing of whose objects exist
    foreign = await _foreign_object(decision, request, referred)
    if foreign is not None:  # as if it did not exist: whether another user's id is real is not told
        return await fail(404, f"no such object: {foreign!r}", "invalid_request_error", "not_found")
    stores = _stored_by(decision.route, payload)

    try:
        listed = _models_answer(request)
        if listed is not None:
            await confirmed()
            log(listed.status)
            return listed
        sent = time.perf_counter()
        # A stream that did not ask for its usage is asked for it anyway; the client never sees it.
        asked = usage_asked_for(request.path, payload, request.body) if request.method == "POST" else None
        answer = await gateway.send(
            gateway.Call(
                path=escape_uri_path(request.path),
                method=request.method,
                query=request.query,
                headers=_request_headers(request.headers),
                body=asked[1] if asked else request.body,
                payload=asked[0] if asked else payload,
                model=model,
                allowed_models=request.allowed_models,
                caller=request.caller,
                token_check=request.token_check,
            )
        )
    except gateway.GatewayError as exc:
        outcome = outcome_of(exc)
        if outcome.status >= 500 and not exc.is_logged:
            logger.warning("upstream request failed: %s", exc.message)
        headers = {"X-Turbo-Attempts": str(len(exc.attempts))} if exc.attempts else {}
        headers.update(outcome.all_headers())  # Retry-After, a rate limit's x-ratelimit-*
        return await fail(outcome.status, outcome.message, outcome.openai_type, outcome.code, headers, exc.attempts)
    answered = time.perf_counter()

    upstream = answer.response
    response_type = upstream.header("content-type")
    is_event_stream = response_type.startswith("text/event-stream")
    reader = gateway.UsageReader(is_event_stream)
    stripper = UsageStripper() if asked and is_event_stream and upstream.status < 400 else None
    capture_limit = settings.EVENT_BODY_MAX_BYTES if settings.EVENT_CAPTURE_BODIES else 0
    # A stream's error event may quote the key, split over two chunks: taken out event by event.
    redactor = EventStreamRedactor(gateway.secrets_known()) if is_event_stream and upstream.status < 400 else None
    encoding = upstream.header("content-encoding")

    async def relay():
        captured = bytearray()
        status = upstream.status
        # An error's body may quote the key it was sent ("Incorrect API key provided: sk-..."): the
        # gateway has read it whole (errors are small), and it is sent on with keys taken out.
        is_error = upstream.status >= 400
        try:
            if is_error:
                body = await upstream.read_all(gateway.ERROR_BODY_MAX_BYTES)
                reader.feed(body)
                # Read without its content coding (the header is not passed on), to take keys out.
                readable = error_body_decoded(body, encoding, gateway.ERROR_BODY_MAX_BYTES)
                if readable is None:
                    message = f"the upstream answered {upstream.status} in a form Turbo cannot read ({encoding})"
                    readable = openai_error_body(message, "server_error", "upstream_error")
                captured += readable[:capture_limit]
                yield gateway.text_redact(readable.decode("utf-8", "replace")).encode()
            else:
                async for chunk in upstream.chunks():
                    reader.feed(chunk)
                    if len(captured) < capture_limit:
                        captured += chunk[: capture_limit - len(captured)]
                    if redactor is not None:
                        chunk = redactor.feed(chunk)
                    if stripper is not None:
                        chunk = stripper.feed(chunk)
                    if chunk:
                        yield chunk
                if rest := _stream_rest(redactor, stripper):
                    yield rest
        except gateway.TransportError as exc:
            status = 504 if exc.timeout else 502
            logger.warning("upstream stream broke: %s", exc)
            if rest := _stream_rest(redactor, stripper):
                yield rest
            if is_event_stream:
                error = {
                    "error": {
                        "message": "the upstream stream ended early",
                        "type": "server_error",
                        "code": "upstream_stream_error",
                    }
                }
                yield f"event: error\ndata: {json.dumps(error)}\n\n".encode()
        except BaseException:
            status = 499  # the client went away: the upstream request is closed below
            raise
        finally:
            await upstream.aclose()
            reader.finish()
            tracing.answer_end(
                answer,
                response_model=reader.model,
                usage=reader.usage,
                finish_reasons=reader.finish_reasons,
                error="" if status == upstream.status else f"the exchange ended {status}",
            )
            log(status, reader, capture_body(bytes(captured), response_type) if captured else "", answer.attempts)
            if stores and upstream.status < 400 and reader.object_id:
                object_record(stores, reader.object_id, request.user_id)
            cost = exchange_usage_record(
                caller=request.caller,
                path=request.path,
                model=model,
                payload=payload,
                answer=answer,
                reader=reader,
                form=requested.form,
                body_size=len(request.body),
            )
            await limits_settle(answer.admission, answer.reservation, cost=cost, tokens=reader.token("total_tokens"))

    headers = _response_headers(upstream.headers)
    if upstream.status >= 400 and encoding:  # the error body goes out decoded (or replaced): see relay
        headers.pop("content-encoding", None)
        if not encoding_readable(encoding):
            headers["content-type"] = "application/json"
    if answer.admission is not None and answer.admission.readings:  # the caller's limits apply, not the upstream's
        headers = {name: value for name, value in headers.items() if not name.startswith("x-ratelimit-")}
        headers.update(answer.admission.headers)
    if is_event_stream:
        headers["X-Accel-Buffering"] = "no"
    overhead_ms = (sent - request.started + time.perf_counter() - answered) * 1000
    headers["X-Turbo-Overhead-Ms"] = f"{overhead_ms:.3f}"
    metrics.proxy_overhead_observe(overhead_ms / 1000)
    headers["X-Turbo-Upstream"] = answer.deployment.id
    headers["X-Turbo-Attempts"] = str(len(answer.attempts))
    return ProxyReply(upstream.status, headers, stream=relay())


def _stream_rest(redactor: EventStreamRedactor | None, stripper: UsageStripper | None) -> bytes:
    """What the redactor and the usage stripper still hold once the stream has ended."""
    rest = redactor.finish() if redactor is not None else b""
    if stripper is not None:
        rest = stripper.feed(rest) + stripper.finish() if rest else stripper.finish()
    return rest


def _models_answer(request: ProxyRequest) -> ProxyReply | None:
    """/v1/models from the gateway's file: the public names, no upstream asked (None: not that)."""
    path = request.path.strip("/")
    if request.method != "GET" or not (path == "models" or path.startswith("models/")):
        return None
    if not gateway.gateway_config().is_file:
        return None  # one upstream serving every model: its own list is the answer
    listed = gateway.models_list(request.allowed_models)
    if path == "models":
        body = listed
    else:
        name = path[len("models/") :]
        found = [entry for entry in listed["data"] if entry["id"] == name]
        if not found:
            message = f"the model {name!r} does not exist on this server"
            return ProxyReply(
                404,
                {"Content-Type": "application/json"},
                openai_error_body(message, "invalid_request_error", "model_not_found"),
            )
        body = found[0]
    return ProxyReply(200, {"Content-Type": "application/json"}, json.dumps(body).encode())


def _django_headers(request) -> dict[str, str]:
    headers = {}
    for meta_key, value in request.META.items():
        if meta_key.startswith("HTTP_"):
            headers[meta_key[5:].replace("_", "-").lower()] = value
        elif meta_key == "CONTENT_TYPE":
            headers["content-type"] = value
    return headers


def caller_fields(found) -> dict:
    """Who a /v1 request is for, as ProxyRequest takes it (from either front door's authentication)."""
    return {
        "user_id": found.user.pk,
        "is_staff": found.user.is_staff,
        "allowed_models": found.allowed_models,
        "caller": Caller.of(found),
    }


@csrf_exempt
async def proxy_view(request, path: str = ""):
    """The proxy behind Django's middleware (CORS, cookies, sessions); `proxy.fast` takes the rest."""
    started = time.perf_counter()
    try:
        found = await arequest_authenticate(request, "proxy")
    except AuthRefused as refused:
        return openai_error(outcome_of(refused))
    request.turbo_event_handled = True  # the proxy logs its own, once the stream has ended
    reply = await exchange(
        ProxyRequest(
            **caller_fields(found),
            method=request.method,
            path=path,
            request_path=request.path,
            query=request.META.get("QUERY_STRING", ""),
            headers=_django_headers(request),
            body=request.body,
            client_ip=client_ip(request),
            started=started,
        )
    )
    if reply.stream is None:
        return HttpResponse(reply.content, status=reply.status, headers=reply.headers)
    return StreamingHttpResponse(reply.stream, status=reply.status, headers=reply.headers)
