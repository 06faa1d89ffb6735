"""One error shape for every endpoint: `{"error": {"code": ..., "message": ...}}`.

Services raise the domain errors below; DRF's exception handler and the Django error views turn
them, and anything else that goes wrong, into that shape.
"""

import logging

import redis
from django.core.exceptions import PermissionDenied, RequestDataTooBig, SuspiciousOperation
from django.http import Http404, JsonResponse
from rest_framework import exceptions as drf_exceptions
from rest_framework import status

from turbo_site.core.streams import StreamUnavailable

logger = logging.getLogger("turbo")


class TurboError(Exception):
    """A failure the client caused or must hear about, with its HTTP status and a stable code."""

    status_code = status.HTTP_400_BAD_REQUEST
    code = "bad_request"

    def __init__(self, message: str, *, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.message = message
        if code:
            self.code = code
        self.headers = headers or {}


class Invalid(TurboError):
    status_code = status.HTTP_400_BAD_REQUEST
    code = "invalid"


class Unauthorized(TurboError):
    status_code = status.HTTP_401_UNAUTHORIZED
    code = "unauthorized"


class Forbidden(TurboError):
    status_code = status.HTTP_403_FORBIDDEN
    code = "forbidden"


class NotFound(TurboError):
    status_code = status.HTTP_404_NOT_FOUND
    code = "not_found"


class Conflict(TurboError):
    status_code = status.HTTP_409_CONFLICT
    code = "conflict"


class RateLimited(TurboError):
    status_code = status.HTTP_429_TOO_MANY_REQUESTS
    code = "rate_limited"

    def __init__(self, message: str, *, retry_after: int | None, code: str | None = None):
        headers = {"Retry-After": str(max(1, int(retry_after)))} if retry_after else {}
        super().__init__(message, code=code, headers=headers)
        self.retry_after = retry_after


class ServiceUnavailable(TurboError):
    """A service Turbo needs (Redis, the database) is away, or the server is stopping: try again soon."""

    status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    code = "unavailable"

    def __init__(self, message: str, *, retry_after: int = 2):
        super().__init__(message, headers={"Retry-After": str(max(1, int(retry_after)))})


# Failures of a backing service that mean "try again later", not a bug (redis-py's, the stream's).
UNAVAILABLE_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, StreamUnavailable)


def unavailable_response(exc: BaseException | None = None):
    """503 `unavailable` with Retry-After, for a backing service that is away."""
    logger.warning("a backing service is unavailable: %s", exc)
    return error_response(
        503, "unavailable", "a service Turbo depends on is unavailable; try again shortly", {"Retry-After": "2"}
    )


def is_unavailable(exc: BaseException) -> bool:
    return isinstance(exc, UNAVAILABLE_ERRORS)


def error_body(code: str, message: str, **extra) -> dict:
    return {"error": {"code": code, "message": message, **extra}}


def error_response(status_code: int, code: str, message: str, headers: dict | None = None, **extra) -> JsonResponse:
    response = JsonResponse(error_body(code, message, **extra), status=status_code)
    for name, value in (headers or {}).items():
        response[name] = value
    return response


def _flatten_validation(detail, prefix: str = "") -> list[tuple[str, str]]:
    """Turn DRF's nested ValidationError detail into (field, message) pairs."""
    pairs: list[tuple[str, str]] = []
    if isinstance(detail, dict):
        for key, value in detail.items():
            name = f"{prefix}.{key}" if prefix else str(key)
            if key == "non_field_errors":
                name = prefix
            pairs.extend(_flatten_validation(value, name))
    elif isinstance(detail, list):
        for item in detail:
            pairs.extend(_flatten_validation(item, prefix))
    else:
        pairs.append((prefix, str(detail)))
    return pairs


_DRF_CODES = {
    drf_exceptions.NotAuthenticated: "unauthorized",
    drf_exceptions.AuthenticationFailed: "unauthorized",
    drf_exceptions.PermissionDenied: "forbidden",
    drf_exceptions.NotFound: "not_found",
    drf_exceptions.MethodNotAllowed: "method_not_allowed",
    drf_exceptions.UnsupportedMediaType: "unsupported_media_type",
    drf_exceptions.NotAcceptable: "not_acceptable",
    drf_exceptions.ParseError: "malformed_body",
    drf_exceptions.Throttled: "rate_limited",
}


def exception_handler(exc, context):
    """DRF's EXCEPTION_HANDLER: every error leaves as our JSON shape, never a 500 page."""
    if isinstance(exc, TurboError):
        return error_response(exc.status_code, exc.code, exc.message, exc.headers)
    if isinstance(exc, Http404):
        return error_response(404, "not_found", "not found")
    if isinstance(exc, PermissionDenied):
        return error_response(403, "forbidden", "you may not do that")
    if isinstance(exc, RequestDataTooBig):
        return error_response(413, "body_too_large", "request body is too large")
    if isinstance(exc, SuspiciousOperation):
        return error_response(400, "bad_request", "the request was refused as malformed")
    if isinstance(exc, drf_exceptions.ValidationError):
        pairs = _flatten_validation(exc.detail)
        fields = {}
        for name, message in pairs:
            fields.setdefault(name or "request", []).append(message)
        first_name, first_message = pairs[0] if pairs else ("", "invalid input")
        message = f"{first_name}: {first_message}" if first_name else first_message
        return error_response(400, "invalid", message, fields=fields)
    if isinstance(exc, drf_exceptions.APIException):
        code = next((c for cls, c in _DRF_CODES.items() if isinstance(exc, cls)), "error")
        headers = {}
        if isinstance(exc, drf_exceptions.Throttled) and exc.wait:
            headers["Retry-After"] = str(int(exc.wait))
        if isinstance(exc, (drf_exceptions.NotAuthenticated, drf_exceptions.AuthenticationFailed)):
            headers["WWW-Authenticate"] = 'Bearer realm="turbo"'
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        return error_response(exc.status_code, code, str(detail), headers)
    if is_unavailable(exc):
        return unavailable_response(exc)
    logger.exception("unhandled error in %s", context.get("view").__class__.__name__)
    return error_response(500, "internal_error", "internal server error")


# Django's own error views (handler400/403/404/500), for paths DRF does not serve.
def bad_request(request, exception=None):
    return error_response(400, "bad_request", "the request was malformed")


def permission_denied(request, exception=None):
    return error_response(403, "forbidden", "you may not do that")


def page_not_found(request, exception=None):
    return error_response(404, "not_found", f"no endpoint at {request.path}")


def server_error(request):
    return error_response(500, "internal_error", "internal server error")
