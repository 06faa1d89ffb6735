"""The one HTTP client Turbo talks to upstreams with: aiohttp, one pooled session per event loop.

aiohttp costs about half the CPU per request of httpx (measured: bench/README.md), which is why it is
the one. `send()` returns a `Response` once the headers have arrived; its body is read chunk by chunk
as it arrives (transfer coding removed, content coding kept: the passthrough relays bytes unchanged).

Pooled connections an upstream may have closed: idle ones are dropped after PROXY_KEEPALIVE_SECONDS,
before a model server's own keep-alive timeout (uvicorn's, behind many Python servers, is 5 s). A
request that failed on a reused connection before any of its answer arrived (the server had closed
it under us) is sent once more, on a new connection of its own: nothing was answered, so nothing is
repeated the client could see. A failure after the answer's first byte is never sent again.
"""

import asyncio
import logging
from collections.abc import AsyncIterator
from types import SimpleNamespace

import aiohttp
from django.conf import settings

from turbo_site.core.loops import loop_client

logger = logging.getLogger("turbo.gateway")


class TransportError(Exception):
    """The upstream could not be reached, or its answer broke off; `timeout` says if it was too slow."""

    def __init__(self, message: str, *, timeout: bool = False):
        super().__init__(message)
        self.timeout = timeout


async def _reused(session, context, params) -> None:
    context.trace_request_ctx.reused = True


def _trace_reuse() -> aiohttp.TraceConfig:
    """Marks a request's `trace_request_ctx` when it went out on a pooled connection."""
    config = aiohttp.TraceConfig()
    config.on_connection_reuseconn.append(_reused)
    return config


def _session(*, fresh: bool = False) -> aiohttp.ClientSession:
    """The loop's pooled session; `fresh`: one whose every request opens (and then closes) its own connection."""
    max_connections = settings.PROXY_MAX_CONNECTIONS
    keepalive = settings.PROXY_KEEPALIVE_SECONDS

    def make() -> aiohttp.ClientSession:
        if fresh:
            connector = aiohttp.TCPConnector(limit=max_connections, force_close=True, ttl_dns_cache=300)
        else:
            connector = aiohttp.TCPConnector(limit=max_connections, keepalive_timeout=keepalive, ttl_dns_cache=300)
        return aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            trust_env=False,
            skip_auto_headers=("User-Agent",),
            # One client serves every user: a cookie an upstream sets must never ride on the next request.
            cookie_jar=aiohttp.DummyCookieJar(),
            trace_configs=None if fresh else [_trace_reuse()],
        )

    name = "upstream-aiohttp-fresh" if fresh else "upstream-aiohttp"
    return loop_client(name, (max_connections, keepalive), make, lambda session: session.closed)


class Response:
    """An upstream answer whose headers have arrived; the body is read with `chunks()`.

    `prefix` holds body bytes already read (the gateway reads the first chunk, or a whole error,
    before it decides to keep this answer); `chunks()` yields them first.
    """

    def __init__(self, response: aiohttp.ClientResponse):
        self._response = response
        self._done = False
        self.status = response.status
        self.headers = [(name.lower(), value) for name, value in response.headers.items()]
        self.prefix: list[bytes] = []
        self.on_close = None  # called once when the answer is closed (the gateway's in-flight count)

    def header(self, name: str) -> str:
        for key, value in self.headers:
            if key == name:
                return value
        return ""

    async def _next(self) -> bytes:
        """The next chunk of the body, b"" at its end."""
        if self._done:
            return b""
        try:
            chunk = await self._response.content.readany()
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise TransportError("the upstream stopped sending", timeout=True) from exc
        except aiohttp.ClientError as exc:
            raise TransportError(f"the upstream's answer broke off: {type(exc).__name__}") from exc
        if not chunk:
            self._done = True
        return chunk

    async def read_some(self) -> bytes:
        """Read the next chunk ahead into `prefix` (b"" at the end of the body). Raises TransportError."""
        chunk = await self._next()
        if chunk:
            self.prefix.append(chunk)
        return chunk

    async def read_all(self, limit: int) -> bytes:
        """Read the body ahead (up to `limit` bytes) into `prefix`. Raises TransportError."""
        size = sum(len(chunk) for chunk in self.prefix)
        while size < limit and (chunk := await self.read_some()):
            size += len(chunk)
        return b"".join(self.prefix)[:limit]

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives, after what was read ahead. Raises TransportError."""
        while self.prefix:
            yield self.prefix.pop(0)
        while chunk := await self._next():
            yield chunk

    async def aclose(self) -> None:
        """Give the connection back if the body was read to its end, else close it (the upstream sees it)."""
        if self._done:
            self._response.release()
        else:
            self._response.close()
        if self.on_close is not None:
            on_close, self.on_close = self.on_close, None
            on_close()


async def send(
    method: str, url: str, headers: dict[str, str], body: bytes, *, timeout: float, connect_timeout: float
) -> Response:
    """Send one request and wait for the answer's headers. Raises TransportError.

    Sent again once, on a new connection, when a reused one was closed under it before any answer."""
    timeouts = aiohttp.ClientTimeout(total=None, connect=connect_timeout, sock_read=timeout)
    context = SimpleNamespace(reused=False)
    try:
        try:
            response = await _session().request(
                method,
                url,
                headers=headers,
                data=body or None,
                allow_redirects=False,
                timeout=timeouts,
                trace_request_ctx=context,
            )
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
            if not (context.reused and _closed_before_answer(exc)):
                raise
            where = url.split("?", 1)[0]  # a query may hold a credential: never logged
            logger.info("%s %s: the pooled connection was closed under it (%r); sent again", method, where, exc)
            response = await _session(fresh=True).request(
                method, url, headers=headers, data=body or None, allow_redirects=False, timeout=timeouts
            )
    except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
        raise TransportError("the upstream did not answer in time", timeout=True) from exc
    except (aiohttp.ClientError, OSError, ValueError) as exc:
        raise TransportError(f"the upstream could not be reached: {type(exc).__name__}") from exc
    return Response(response)


def _closed_before_answer(exc: aiohttp.ClientError) -> bool:
    """Did the connection end before any answer came? (A connect failure is the upstream's, never this.)"""
    if isinstance(exc, aiohttp.ClientConnectorError):
        return False
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return isinstance(exc.message, str)  # else the answer's head, parsed as far as it had come
    return True


async def models_get(
    upstream, *, timeout: float, max_bytes: int, connect_timeout: float | None = None
) -> tuple[int, bytes]:
    """GET an upstream's /models with the server's credentials, within `timeout` seconds in all: its status
    and body (read up to `max_bytes`). Raises TransportError, or TimeoutError. What `manage.py upstreams
    check`, the model pickers and the learned context windows read."""
    headers = {"accept": "application/json", "accept-encoding": "identity", **upstream.auth_headers()}
    async with asyncio.timeout(timeout):
        response = await send(
            "GET",
            f"{upstream.base_url}/models",
            headers,
            b"",
            timeout=timeout,
            connect_timeout=connect_timeout or timeout,
        )
        try:
            return response.status, await response.read_all(max_bytes)
        finally:
            await response.aclose()
