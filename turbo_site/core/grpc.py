"""The gRPC side of the one error shape: an error becomes a gRPC status whose details are our message.

Turbo's errors carry an HTTP status (TurboError's `status_code`; GatewayError's and AuthRefused's
`status`, with a `message` and a `code`); `grpc_status` turns that into a gRPC status code in one table.
Anything else is INTERNAL "internal error" (logged here, never sent: no traceback reaches a client).
"""

import logging

import grpc
from rest_framework import exceptions as drf_exceptions

from turbo_site.core.errors import TurboError, _flatten_validation, is_unavailable

logger = logging.getLogger("turbo.grpc")

STATUS_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    409: grpc.StatusCode.FAILED_PRECONDITION,
    413: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    502: grpc.StatusCode.UNAVAILABLE,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}
# HTTP statuses for the event log, the other way round (what a gRPC failure counts as).
HTTP_STATUSES = {code: status for status, code in reversed(STATUS_CODES.items())} | {
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.CANCELLED: 499,
}
UNAVAILABLE_MESSAGE = "a service Turbo depends on is unavailable; try again shortly"


def grpc_status(exc: BaseException) -> tuple[grpc.StatusCode, str, tuple[tuple[str, str], ...]]:
    """(status code, details, trailing metadata) for an error raised under a gRPC handler.

    A 429 carries `retry-after` (seconds) in the trailing metadata when the error says when to retry.
    """
    if isinstance(exc, drf_exceptions.ValidationError):  # a serializer shared with REST parsed the input
        pairs = _flatten_validation(exc.detail)
        field, problem = pairs[0] if pairs else ("", "invalid input")
        return grpc.StatusCode.INVALID_ARGUMENT, f"{field}: {problem}" if field else problem, ()
    if isinstance(exc, TurboError):
        status, code, message = exc.status_code, exc.code, exc.message
        retry_after = exc.headers.get("Retry-After")
    elif isinstance(getattr(exc, "status", None), int) and isinstance(getattr(exc, "message", None), str):
        status, code, message = exc.status, str(getattr(exc, "code", "")), exc.message  # GatewayError, AuthRefused
        retry_after = getattr(exc, "retry_after", None)
    elif is_unavailable(exc):
        logger.warning("a backing service is unavailable: %s", exc)
        return grpc.StatusCode.UNAVAILABLE, UNAVAILABLE_MESSAGE, ()
    else:
        logger.error("unhandled error under a gRPC handler", exc_info=exc)
        return grpc.StatusCode.INTERNAL, "internal error", ()
    if code == "stopped":  # a member stopped the reply (409 `stopped` on REST)
        return grpc.StatusCode.ABORTED, "the reply was stopped", ()
    if code == "upstream_error" and status in (401, 407):
        # The upstream refused the server's own key: nothing the caller can fix.
        return grpc.StatusCode.UNAVAILABLE, message, ()
    found = STATUS_CODES.get(status)
    if found is None:
        found = grpc.StatusCode.INVALID_ARGUMENT if status < 500 else grpc.StatusCode.UNAVAILABLE
    trailing = ()
    if found == grpc.StatusCode.RESOURCE_EXHAUSTED and retry_after:
        trailing = (("retry-after", str(max(1, int(float(retry_after))))),)
    return found, message, trailing
