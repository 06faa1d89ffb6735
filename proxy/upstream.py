"""The upstream: where it is, how to authenticate to it, and the one pooled HTTP client per process.

`OPENAI_API_URL` may end in `/v1` or not; `upstream_base()` always ends in `/v1`, so the proxy never
builds `/v1/v1/...` and the `openai` SDK (used by `proxy.ai`) takes the same value as its base URL.
"""

import asyncio
import weakref
from urllib.parse import urlsplit

import httpx
from django.conf import settings


class UpstreamNotConfigured(Exception):
    """No upstream to send to; the message says which variable to set."""


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


def auth_headers() -> dict[str, str]:
    """The server's credentials for the upstream (never the client's)."""
    key = settings.OPENAI_API_KEY
    if not key:
        return {}
    if is_azure():
        return {"api-key": key}
    return {"Authorization": f"Bearer {key}"}


# One client per event loop: a connection pool cannot be shared between loops, and production
# runs one loop per process, so this is one pooled client per process there.
_clients: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, tuple[tuple, httpx.AsyncClient]]" = (
    weakref.WeakKeyDictionary()
)


def client() -> httpx.AsyncClient:
    """The pooled, keep-alive client of the running event loop (rebuilt if its settings change)."""
    loop = asyncio.get_running_loop()
    options = (settings.PROXY_CONNECT_TIMEOUT, settings.PROXY_READ_TIMEOUT, settings.PROXY_MAX_CONNECTIONS)
    cached = _clients.get(loop)
    if cached is not None and cached[0] == options and not cached[1].is_closed:
        return cached[1]
    connect, read, max_connections = options
    http = httpx.AsyncClient(
        timeout=httpx.Timeout(connect=connect, read=read, write=read, pool=connect),
        limits=httpx.Limits(
            max_connections=max_connections, max_keepalive_connections=max_connections, keepalive_expiry=30
        ),
        follow_redirects=False,
        trust_env=False,
    )
    _clients[loop] = (options, http)
    return http
