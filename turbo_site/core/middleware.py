"""Middleware that keeps every response in Turbo's shape, on sync and async paths alike."""

import logging

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.conf import settings

from turbo_site.core.errors import error_response, is_unavailable, unavailable_response
from turbo_site.core.http import is_trusted_proxy

logger = logging.getLogger("turbo")

# Pages meant for people keep Django's HTML.
HTML_PREFIXES = ("/admin/", "/api/docs", "/static/")


class TurboMiddleware:
    """Works in both modes, so async views (the proxy, SSE) are never pushed onto a thread."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response):
        self.get_response = get_response
        if iscoroutinefunction(get_response):
            markcoroutinefunction(self)

    def __call__(self, request):
        if iscoroutinefunction(self):
            return self.__acall__(request)
        early = self.before(request)
        if early is not None:
            return early
        return self.after(request, self.get_response(request))

    async def __acall__(self, request):
        early = self.before(request)
        if early is not None:
            return early
        return self.after(request, await self.get_response(request))

    def before(self, request):
        return None

    def after(self, request, response):
        return response


class body_size_limit(TurboMiddleware):
    """413 for bodies over the limit: PROXY_MAX_BODY_BYTES under /v1/, MAX_BODY_BYTES elsewhere."""

    def before(self, request):
        limit = settings.PROXY_MAX_BODY_BYTES if request.path.startswith("/v1/") else settings.MAX_BODY_BYTES
        length = request.META.get("CONTENT_LENGTH")
        try:
            declared = int(length) if length else None
        except ValueError:
            return error_response(400, "bad_request", "Content-Length is not a number")
        if declared is not None and declared > limit:
            return self._too_large(limit)
        if declared is None and request.method not in ("GET", "HEAD", "OPTIONS"):
            # A chunked body has no declared length: measure what actually arrived.
            stream = getattr(request, "_stream", None)
            size = _stream_size(stream)
            if size is not None and size > limit:
                return self._too_large(limit)
        return None

    @staticmethod
    def _too_large(limit: int):
        return error_response(413, "body_too_large", f"request body is larger than {limit} bytes")


def _stream_size(stream) -> int | None:
    """Bytes left in an ASGI request's spooled body, without reading it."""
    inner = getattr(stream, "stream", stream)
    try:
        position = inner.tell()
        inner.seek(0, 2)
        end = inner.tell()
        inner.seek(position)
        return end - position
    except (AttributeError, OSError, ValueError):
        return None


class json_errors(TurboMiddleware):
    """Any HTML error page (Django's 404/500, DEBUG pages) becomes the JSON error shape; a backing
    service that is away (Redis) is a 503 with Retry-After, not a 500."""

    def process_exception(self, request, exception):
        if is_unavailable(exception):
            return unavailable_response(exception)
        return None

    def after(self, request, response):
        if response.status_code < 400 or request.path.startswith(HTML_PREFIXES):
            return response
        if getattr(response, "is_page", False):  # the web app's own error pages (404, 403) stay HTML
            return response
        content_type = response.get("Content-Type", "")
        if content_type.startswith("application/json") or getattr(response, "streaming", False):
            return response
        status = response.status_code
        codes = {
            400: ("bad_request", "the request was malformed"),
            403: ("forbidden", "you may not do that"),
            404: ("not_found", f"no endpoint at {request.path}"),
            405: ("method_not_allowed", f"method {request.method} is not allowed here"),
            413: ("body_too_large", "request body is too large"),
        }
        code, message = codes.get(status, ("internal_error" if status >= 500 else "error", "request failed"))
        replacement = error_response(status, code, message)
        for header in ("Allow", "Retry-After", "WWW-Authenticate"):
            if header in response:
                replacement[header] = response[header]
        return replacement


class secure_transport(TurboMiddleware):
    """Before Django's SecurityMiddleware: `X-Forwarded-Proto` is believed from TRUSTED_PROXIES only (so a
    client cannot call itself secure, nor dodge SECURE_SSL_REDIRECT); after: every cookie of a secure
    request's response (sess, csrftoken, sessionid, any other) is Secure."""

    def before(self, request):
        if "HTTP_X_FORWARDED_PROTO" in request.META and not is_trusted_proxy(request.META.get("REMOTE_ADDR")):
            del request.META["HTTP_X_FORWARDED_PROTO"]
        return None

    def after(self, request, response):
        if response.cookies and request.is_secure():
            for cookie in response.cookies.values():
                cookie["secure"] = True
        return response
