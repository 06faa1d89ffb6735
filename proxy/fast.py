"""The proxy's hot path: `/v1/*` as a plain ASGI app, in front of Django.

Django's middleware stack costs a dozen thread hops per request (every `MiddlewareMixin` runs its
hooks through `sync_to_async`), several milliseconds of CPU that an API client with a token gains
nothing from. So a request to `/v1/` that carries its token in the Authorization header and no
Origin (a program, not a browser page) is served here: the same checks the Django path makes
(allowed host, body size limit, token), then `proxy.views.exchange`, the proxy both paths share.

Everything else under `/v1/` goes to Django and `proxy.views.proxy_view`: browsers (Origin, CORS,
preflights, cookies) and requests without a token, which get Django's answers.
"""

import asyncio
import logging
import time

from django.conf import settings
from django.http.request import split_domain_port, validate_host

from accounts.auth import AuthRefused, Credentials, aauthenticate, aauthenticate_unconfirmed
from accounts.tokens import AuthSession
from proxy.views import ProxyReply, ProxyRequest, caller_fields, exchange, openai_error_body
from turbo_site.core.acache import CacheChanged, CachedCheck
from turbo_site.core.errors import outcome_of
from turbo_site.core.http import client_ip_from, is_trusted_proxy, scope_headers

logger = logging.getLogger("turbo.proxy")

PREFIX = "/v1/"
# What Django's SecurityMiddleware and XFrameOptionsMiddleware add to every response (and, by the same
# settings, Referrer-Policy and, on a secure request, Strict-Transport-Security: security_headers()).
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
]
TOKEN_SCHEMES = (b"bearer ", b"basic ")


def takes(scope) -> bool:
    """Is this request for the hot path? Only token-bearing, non-browser calls to /v1/."""
    if scope["type"] != "http" or not scope["path"].startswith(PREFIX) or scope["method"] == "OPTIONS":
        return False
    authorized = False
    for name, value in scope["headers"]:
        if name == b"origin":
            return False
        if name == b"authorization":
            authorized = value[:7].lower().startswith(TOKEN_SCHEMES)
    return authorized


class Refused(Exception):
    def __init__(self, status: int, body: bytes, headers: dict | None = None):
        self.status = status
        self.body = body
        self.headers = [
            (name.lower().encode("latin1"), value.encode("latin1")) for name, value in (headers or {}).items()
        ]


def _turbo_error(status: int, code: str, message: str) -> Refused:
    # Under /v1 every error has OpenAI's shape (which holds Turbo's code and message too).
    return _openai_refusal(status, code, message)


def _openai_refusal(status: int, code: str, message: str, headers: dict | None = None) -> Refused:
    return Refused(status, openai_error_body(message, "invalid_request_error", code), headers)


def _allowed_hosts() -> list[str]:
    allowed = settings.ALLOWED_HOSTS
    if settings.DEBUG and not allowed:
        return [".localhost", "127.0.0.1", "[::1]"]  # as Django's HttpRequest.get_host() does
    return allowed


def _check_host(headers: dict[str, str]) -> None:
    domain, _ = split_domain_port(headers.get("host", ""))
    if not domain or not validate_host(domain, _allowed_hosts()):
        raise _turbo_error(400, "bad_request", "the Host header is not one this server answers to")


async def _read_body(receive, headers: dict[str, str]) -> bytes | None:
    """The whole body, or None if the client left; a body over PROXY_MAX_BODY_BYTES is refused unread."""
    limit = settings.PROXY_MAX_BODY_BYTES
    declared = headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise _turbo_error(400, "bad_request", "Content-Length is not a number") from None
        if size > limit:
            raise _turbo_error(413, "body_too_large", f"request body is larger than {limit} bytes")
    parts = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _turbo_error(413, "body_too_large", f"request body is larger than {limit} bytes")
        parts.append(chunk)
        if not message.get("more_body", False):
            return b"".join(parts)


def security_headers(scope, headers: dict[str, str]) -> list[tuple[bytes, bytes]]:
    """The headers Django's SecurityMiddleware would add to this request's response, from the same settings:
    a request is secure by its scheme, or by `X-Forwarded-Proto: https` from TRUSTED_PROXIES only."""
    found = list(SECURITY_HEADERS)
    if settings.SECURE_REFERRER_POLICY:
        policy = settings.SECURE_REFERRER_POLICY
        policy = policy if isinstance(policy, str) else ",".join(policy)
        found.append((b"referrer-policy", policy.encode("latin1")))
    if settings.SECURE_HSTS_SECONDS:
        peer = (scope.get("client") or (None,))[0]
        forwarded = headers.get("x-forwarded-proto", "") == "https" and is_trusted_proxy(peer)
        if scope.get("scheme") == "https" or forwarded:
            hsts = f"max-age={settings.SECURE_HSTS_SECONDS}"
            if settings.SECURE_HSTS_INCLUDE_SUBDOMAINS:
                hsts += "; includeSubDomains"
            if settings.SECURE_HSTS_PRELOAD:
                hsts += "; preload"
            found.append((b"strict-transport-security", hsts.encode()))
    return found


async def _send_whole(send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _relay(send, reply: ProxyReply, security: list[tuple[bytes, bytes]]) -> None:
    headers = [(name.lower().encode("latin1"), value.encode("latin1")) for name, value in reply.headers.items()]
    await send({"type": "http.response.start", "status": reply.status, "headers": headers + security})
    async for chunk in reply.stream:
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
    await send({"type": "http.response.body", "body": b""})


async def _until_disconnect(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _caller(headers: dict[str, str], *, confirmed: bool) -> tuple[AuthSession, CachedCheck | None]:
    """Who is calling; unless `confirmed`, as this process read the token last (no round trip), with the
    check every answer must wait for (accounts.auth.aauthenticate_unconfirmed)."""
    credentials = Credentials(authorization=headers.get("authorization", ""))
    try:
        if confirmed:
            # Shared: this path only reads who is calling, so an unchanged cached lookup is not unpickled again.
            return await aauthenticate("proxy.fast", credentials, shared=True), None
        return await aauthenticate_unconfirmed("proxy.fast", credentials)
    except AuthRefused as refused:
        raise _openai_refusal(refused.status_code, refused.code, refused.message, refused.headers) from None


async def serve(scope, receive, send) -> None:
    """Answer one /v1/ request that `takes()` accepted."""
    started = time.perf_counter()
    headers = scope_headers(scope)
    check = None
    security = security_headers(scope, headers)
    try:
        _check_host(headers)
        # The token as this process read it last: the admission's script checks it is still the one in
        # Redis, so the lookup costs no round trip of its own (proxy.usage.limits).
        found, check = await _caller(headers, confirmed=False)
        body = await _read_body(receive, headers)
        if body is None:
            return
    except Refused as refused:
        answer = refused
        if check is not None:  # a refusal waits for the token's check: a revoked token gets its 401
            try:
                await check.confirm()
            except CacheChanged:
                try:
                    await _caller(headers, confirmed=True)
                except Refused as unauthenticated:
                    answer = unauthenticated
        await _send_whole(send, answer.status, answer.body, security + answer.headers)
        return
    path = scope["path"]
    while True:
        try:
            reply = await exchange(
                ProxyRequest(
                    **caller_fields(found),
                    method=scope["method"],
                    path=path[len(PREFIX) :],
                    request_path=path,
                    query=scope.get("query_string", b"").decode("latin1"),
                    headers=headers,
                    body=body,
                    client_ip=client_ip_from((scope.get("client") or (None,))[0], headers.get("x-forwarded-for")),
                    started=started,
                    token_check=check,
                )
            )
            break
        except CacheChanged:  # revoked, or the user or their groups changed: nothing was done, start again
            try:
                found, check = await _caller(headers, confirmed=True)
            except Refused as refused:
                await _send_whole(send, refused.status, refused.body, security + refused.headers)
                return
    if reply.stream is None:  # our own error: its headers (Retry-After, X-Turbo-Attempts...) go along
        extra = [
            (name.lower().encode("latin1"), str(value).encode("latin1"))
            for name, value in reply.headers.items()
            if name.lower() != "content-type"
        ]
        await _send_whole(send, reply.status, reply.content, security + extra)
        return
    # Like Django's ASGI handler: a client that hangs up cancels the relay, which closes the
    # upstream request and logs the exchange as 499.
    relay = asyncio.ensure_future(_relay(send, reply, security))
    watcher = asyncio.ensure_future(_until_disconnect(receive))
    try:
        await asyncio.wait((relay, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (relay, watcher):
            task.cancel()
        await asyncio.gather(relay, watcher, return_exceptions=True)
    if relay.done() and not relay.cancelled() and relay.exception() is not None:
        raise relay.exception()


class ProxyFastPath:
    """ASGI: the hot path for `/v1/` calls it `takes()`, everything else to the wrapped app (Django)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if not takes(scope):
            await self.app(scope, receive, send)
            return
        began = False

        async def sending(message) -> None:
            nonlocal began
            began = True
            await send(message)

        try:
            await serve(scope, receive, sending)
        except Exception as exc:
            if began:
                logger.exception("the proxy failed on %s %s", scope["method"], scope["path"])
                raise  # the answer had begun: the server closes the connection
            # Redis (the token cache) away is 503 `unavailable`; a fault is logged there, once.
            outcome = outcome_of(exc)
            body = openai_error_body(outcome.message, outcome.openai_type, outcome.code)
            headers = [
                (name.lower().encode("latin1"), value.encode("latin1")) for name, value in outcome.all_headers().items()
            ]
            await _send_whole(send, outcome.status, body, security_headers(scope, scope_headers(scope)) + headers)
