"""The upstream: where it is, how to authenticate to it, and the one pooled HTTP client per process.

`OPENAI_API_URL` may end in `/v1` or not; `upstream_base()` always ends in `/v1`, so the proxy never
builds `/v1/v1/...` and the `openai` SDK (used by `proxy.ai`) takes the same value as its base URL.

The proxy talks to the upstream through one small interface, `upstream_send()`, which returns an
`UpstreamResponse` (status, headers, the body chunk by chunk as it arrives, `aclose()`). Two clients
implement it: aiohttp (the default: it costs about half the CPU per request of httpx, see
bench/README.md) and httpx; `PROXY_HTTP_CLIENT` picks one.
"""

import abc
from collections.abc import AsyncIterator
from http.cookiejar import CookieJar, DefaultCookiePolicy
from urllib.parse import urlsplit

import aiohttp
import httpx
from django.conf import settings

from turbo_site.core.http import redact_keys
from turbo_site.core.loops import loop_client


class UpstreamNotConfigured(Exception):
    """No upstream to send to; the message says which variable to set."""


class UpstreamError(Exception):
    """The upstream could not be reached, or its answer broke off; `timeout` says if it was too slow."""

    def __init__(self, message: str, *, timeout: bool = False):
        super().__init__(message)
        self.timeout = timeout


def upstream_base() -> str:
    """The upstream's base URL, ending in /v1 and without a trailing slash."""
    url = (settings.OPENAI_API_URL or "").strip().rstrip("/")
    if not url:
        raise UpstreamNotConfigured("no upstream is configured: set OPENAI_API_URL")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise UpstreamNotConfigured("OPENAI_API_URL must be an http:// or https:// URL")
    if parts.netloc.endswith("api.openai.com") and not settings.OPENAI_API_KEY:
        raise UpstreamNotConfigured("no key for the OpenAI API: set OPENAI_API_KEY")
    return url if url.endswith("/v1") else url + "/v1"


def is_azure() -> bool:
    return "openai.azure.com" in (urlsplit(settings.OPENAI_API_URL or "").netloc or "")


def upstream_text_redact(text: str) -> str:
    """Upstream error text with keys taken out: the configured server key, and anything key-like
    (an upstream may quote the key it was sent: "Incorrect API key provided: sk-...")."""
    return redact_keys(text, settings.OPENAI_API_KEY)


def auth_headers() -> dict[str, str]:
    """The server's credentials for the upstream (never the client's): key, organization and project."""
    headers = {}
    key = settings.OPENAI_API_KEY
    if key and is_azure():
        headers["api-key"] = key
    elif key:
        headers["Authorization"] = f"Bearer {key}"
    if settings.OPENAI_ORGANIZATION:
        headers["OpenAI-Organization"] = settings.OPENAI_ORGANIZATION
    if settings.OPENAI_PROJECT:
        headers["OpenAI-Project"] = settings.OPENAI_PROJECT
    return headers


# --- the interface --------------------------------------------------------------------------------


class UpstreamResponse(abc.ABC):
    """An upstream answer whose headers have arrived; the body is read with `chunks()`."""

    status: int
    headers: list[tuple[str, str]]  # names in lower case, in the upstream's order

    def header(self, name: str) -> str:
        for key, value in self.headers:
            if key == name:
                return value
        return ""

    @abc.abstractmethod
    def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives (transfer coding removed, content coding kept). Raises UpstreamError."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Give the connection back if the body was read to its end, else close it (the upstream sees it)."""


async def upstream_send(method: str, url: str, headers: dict[str, str], body: bytes) -> UpstreamResponse:
    """Send one request and wait for the answer's headers. Raises UpstreamError."""
    if settings.PROXY_HTTP_CLIENT == "httpx":
        return await _httpx_send(method, url, headers, body)
    return await _aiohttp_send(method, url, headers, body)


def _options() -> tuple[int, int, int]:
    return settings.PROXY_CONNECT_TIMEOUT, settings.PROXY_READ_TIMEOUT, settings.PROXY_MAX_CONNECTIONS


# --- aiohttp --------------------------------------------------------------------------------------


def _aiohttp_session() -> aiohttp.ClientSession:
    connect, read, max_connections = options = _options()

    def make() -> aiohttp.ClientSession:
        return aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=max_connections, keepalive_timeout=30, ttl_dns_cache=300),
            timeout=aiohttp.ClientTimeout(total=None, connect=connect, sock_read=read),
            auto_decompress=False,
            trust_env=False,
            skip_auto_headers=("User-Agent",),
            # One client serves every user: a cookie an upstream sets must never ride on the next request.
            cookie_jar=aiohttp.DummyCookieJar(),
        )

    return loop_client("upstream-aiohttp", options, make, lambda session: session.closed)


class _AiohttpResponse(UpstreamResponse):
    def __init__(self, response: aiohttp.ClientResponse):
        self._response = response
        self._done = False
        self.status = response.status
        self.headers = [(name.lower(), value) for name, value in response.headers.items()]

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.content.iter_any():
                yield chunk
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise UpstreamError("the upstream stopped sending", timeout=True) from exc
        except aiohttp.ClientError as exc:
            raise UpstreamError(f"the upstream's answer broke off: {type(exc).__name__}") from exc
        self._done = True

    async def aclose(self) -> None:
        if self._done:
            self._response.release()
        else:
            self._response.close()


async def _aiohttp_send(method: str, url: str, headers: dict[str, str], body: bytes) -> UpstreamResponse:
    try:
        response = await _aiohttp_session().request(
            method, url, headers=headers, data=body or None, allow_redirects=False
        )
    except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
        raise UpstreamError("the upstream did not answer in time", timeout=True) from exc
    except (aiohttp.ClientError, OSError, ValueError) as exc:
        raise UpstreamError(f"the upstream could not be reached: {type(exc).__name__}") from exc
    return _AiohttpResponse(response)


# --- httpx ----------------------------------------------------------------------------------------


def _httpx_client() -> httpx.AsyncClient:
    connect, read, max_connections = options = _options()

    def make() -> httpx.AsyncClient:
        return httpx.AsyncClient(
            timeout=httpx.Timeout(connect=connect, read=read, write=read, pool=connect),
            limits=httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections, keepalive_expiry=30
            ),
            follow_redirects=False,
            trust_env=False,
            # One client serves every user: a cookie an upstream sets must never ride on the next request.
            cookies=CookieJar(policy=DefaultCookiePolicy(allowed_domains=[])),
        )

    return loop_client("upstream-httpx", options, make, lambda client: client.is_closed)


class _HttpxResponse(UpstreamResponse):
    def __init__(self, response: httpx.Response):
        self._response = response
        self.status = response.status_code
        self.headers = [(name.lower(), value) for name, value in response.headers.items()]

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.aiter_raw():
                yield chunk
        except httpx.TimeoutException as exc:
            raise UpstreamError("the upstream stopped sending", timeout=True) from exc
        except httpx.HTTPError as exc:
            raise UpstreamError(f"the upstream's answer broke off: {type(exc).__name__}") from exc

    async def aclose(self) -> None:
        await self._response.aclose()


async def _httpx_send(method: str, url: str, headers: dict[str, str], body: bytes) -> UpstreamResponse:
    client = _httpx_client()
    try:
        request = client.build_request(method, url, headers=headers, content=body)
        response = await client.send(request, stream=True)
    except httpx.TimeoutException as exc:
        raise UpstreamError("the upstream did not answer in time", timeout=True) from exc
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        raise UpstreamError(f"the upstream could not be reached: {type(exc).__name__}") from exc
    return _HttpxResponse(response)
