"""One error outcome for every front: any failure becomes (code, status, message, retry-after, headers).

Services raise the domain errors below (TurboError and its subclasses; an app's own error type
subclasses it, or offers the same attributes: `status`, `code`, `message`). `outcome_of` turns any
exception into an `Outcome`, once; each front only renders it: the HTTP JSON envelope
`{"error": {"code", "message"}}` (DRF's exception handler, the Django error views, the async views), the
SSE error event, the `/ws` error frame, GraphQL's `extensions.code`, the gRPC status and /v1's
OpenAI-shaped body. `CODES` is the one table of codes (README's error table is checked against it).
"""

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

import redis
from django.core.exceptions import PermissionDenied, RequestDataTooBig, SuspiciousOperation
from django.db import InterfaceError, OperationalError
from django.http import Http404, JsonResponse, UnreadablePostError
from django.http.multipartparser import MultiPartParserError
from rest_framework import exceptions as drf_exceptions
from rest_framework import status

from turbo_site.core.streams import StreamUnavailable

logger = logging.getLogger("turbo")


@dataclass(frozen=True)
class Code:
    """One error code: its HTTP status, its gRPC status (by name: core imports no grpc) and what it means."""

    status: int
    meaning: str
    grpc: str = ""  # "" : the gRPC status of its HTTP status (GRPC_OF_STATUS)


# A gRPC status for each HTTP status; a code whose meaning differs says its own in CODES.
GRPC_OF_STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    405: "UNIMPLEMENTED",
    409: "FAILED_PRECONDITION",
    413: "INVALID_ARGUMENT",
    415: "INVALID_ARGUMENT",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    502: "UNAVAILABLE",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}

# Every code Turbo answers with, on every front (README's "Error codes" table is this one).
CODES: dict[str, Code] = {
    # the request itself
    "bad_request": Code(400, "the request was malformed or refused as such"),
    "invalid": Code(400, "a field failed validation (`fields` names each one)"),
    "malformed_body": Code(400, "the body is not valid JSON (or form data)"),
    "invalid_json": Code(400, "a JSON body or frame could not be read (or is nested too deeply)"),
    "invalid_path": Code(400, "a /v1 path with `.` or `..` segments"),
    "invalid_response_format": Code(400, "the response_format is not a usable JSON Schema"),
    "invalid_tools": Code(400, "the tools are not valid function definitions"),
    "invalid_tool_results": Code(400, "tool_results are malformed"),
    "unknown_tool_call": Code(400, "a tool result answers no call that waits for one"),
    "tool_results_missing": Code(400, "some pending tool calls got no result"),
    "no_model_fits": Code(400, "no configured route can serve this request"),
    "context_length_exceeded": Code(400, "the prompt and the reply's room do not fit the model's context window"),
    "invalid_query": Code(400, "a GraphQL document that does not parse or validate"),
    "query_too_costly": Code(400, "a GraphQL operation over GRAPHQL_MAX_COST or GRAPHQL_MAX_DEPTH"),
    "body_too_large": Code(413, "the request body is over the limit"),
    "unsupported_media_type": Code(415, "the Content-Type is not one Turbo reads"),
    "not_acceptable": Code(406, "no answer in a type the Accept header allows", "INVALID_ARGUMENT"),
    "method_not_allowed": Code(405, "the HTTP method is not served at this path"),
    # who is asking
    "unauthorized": Code(401, "no credential, or an invalid, expired or revoked one"),
    "invalid_credentials": Code(401, "wrong username or password"),
    "session_ended": Code(401, "the session was revoked or expired while in use"),
    "forbidden": Code(403, "the caller may not do this (e.g. an API key where keys are not allowed)"),
    "key_not_allowed_here": Code(403, "an API key where only a session token serves"),
    "model_not_allowed": Code(403, "the key, user or group may not use this model"),
    "path_not_allowed": Code(403, "a /v1 path this server does not proxy"),
    "staff_only": Code(403, "a /v1 path for staff users only"),
    "model_not_priced": Code(403, "the model has no price (UNPRICED_MODELS=refuse) and a budget applies to the caller"),
    # what they asked for
    "not_found": Code(404, "no such object (or not visible to the caller), or no endpoint at the path"),
    "user_not_found": Code(404, "no such user"),
    "model_not_found": Code(404, "no such model"),
    "conflict": Code(409, "the request conflicts with the current state"),
    "username_taken": Code(409, "the username is in use"),
    "owner_not_removable": Code(409, "a chat's owner cannot be removed from it"),
    "too_many_keys": Code(409, "the user has the most API keys allowed"),
    "ambiguous": Code(409, "the name matches more than one object"),
    "program_started": Code(409, "the chat's program has started: this cannot change now"),
    "program_busy": Code(409, "the chat's program is still answering"),
    "program_finished": Code(409, "the chat's program has finished"),
    "stopped": Code(409, "a member stopped the reply", "ABORTED"),
    "message_deleted": Code(409, "the message was deleted while its reply was running", "ABORTED"),
    # limits
    "rate_limited": Code(429, "a rate limit is reached; Retry-After says when to try again"),
    "budget_exceeded": Code(429, "a spending budget is used up; Retry-After says when it renews"),
    "too_many_requests": Code(429, "too many requests in flight on one /ws socket"),
    # /ws protocol
    "frame_too_large": Code(400, "a /ws frame over WS_MAX_FRAME_BYTES"),
    "invalid_frame": Code(400, "a /ws frame that is not a JSON object"),
    "missing_request_id": Code(400, "a /ws frame without a usable request_id"),
    "unknown_type": Code(400, "a /ws frame of an unknown type"),
    "invalid_payload": Code(400, "a /ws frame whose payload is malformed"),
    "duplicate_request_id": Code(409, "a /ws request_id already in flight"),
    # the model path
    "upstream_error": Code(502, "the upstream refused or failed the call (an upstream 400/403/404 keeps its status)"),
    "upstream_unreachable": Code(502, "no upstream could be reached"),
    "upstream_stream_error": Code(502, "the upstream's stream broke off"),
    "upstream_error_in_stream": Code(502, "the upstream reported an error in the middle of its stream"),
    "upstream_stream_incomplete": Code(502, "the upstream's stream ended without [DONE]: the reply may be cut short"),
    "upstream_empty_answer": Code(502, "the upstream answered with an empty body"),
    "upstream_html_error": Code(502, "the upstream answered with an HTML error page (its title is in the message)"),
    "invalid_structured_output": Code(502, "the model's replies never matched the schema (`errors` says how)"),
    "program_failed": Code(502, "the chat's program failed"),
    "upstream_busy": Code(503, "every upstream of the model is at its in-flight limit; try again shortly"),
    "upstream_unavailable": Code(503, "no upstream could take the request; try again shortly"),
    "upstream_not_configured": Code(503, "the model's upstream is not configured"),
    "gateway_misconfigured": Code(503, "the gateway's configuration cannot be read"),
    "upstream_timeout": Code(504, "the upstream did not answer in time"),
    # Turbo itself
    "storage_unavailable": Code(503, "the reply could not be stored in time; it is saved when the database is back"),
    "unavailable": Code(503, "a service Turbo depends on (database, Redis) is away; Retry-After says when to retry"),
    "internal_error": Code(500, "a fault in Turbo (logged with its traceback, never sent)"),
}


def codes_markdown() -> str:
    """README's "Error codes" table, made from CODES (a test checks the README holds it as is)."""
    lines = ["| code | HTTP status | gRPC status | meaning |", "|---|---|---|---|"]
    for code, known in CODES.items():
        lines.append(f"| `{code}` | {known.status} | `{grpc_name_of(code, known.status)}` | {known.meaning} |")
    return "\n".join(lines)


def grpc_name_of(code: str, http_status: int) -> str:
    """The gRPC status (its name) for an outcome: the code's own, else its HTTP status's."""
    known = CODES.get(code)
    if known is not None and known.grpc and known.status == http_status:
        return known.grpc
    return GRPC_OF_STATUS.get(http_status) or ("INVALID_ARGUMENT" if http_status < 500 else "UNAVAILABLE")


@dataclass(frozen=True)
class Outcome:
    """What a failure means to a client, whatever front it came in by."""

    code: str
    status: int
    message: str
    retry_after: int | None = None
    headers: Mapping[str, str] = field(default_factory=dict)  # to answer with (Retry-After is added)
    extra: Mapping = field(default_factory=dict)  # more fields of the error object (`fields`, `errors`)
    error_type: str = ""  # OpenAI's `type`, for /v1

    @property
    def grpc_name(self) -> str:
        return grpc_name_of(self.code, self.status)

    @property
    def openai_type(self) -> str:
        return self.error_type or ("invalid_request_error" if self.status < 500 else "server_error")

    def all_headers(self) -> dict[str, str]:
        headers = dict(self.headers)
        if self.retry_after:
            headers["Retry-After"] = str(self.retry_after)
        return headers

    def error(self) -> dict:
        """The error object every front sends: code, message, then what else the failure says."""
        error = {"code": self.code, "message": self.message, **self.extra}
        if self.retry_after:
            error.setdefault("retry_after", self.retry_after)
        return error


def refusal(code: str, message: str, *, retry_after: int | None = None, **extra) -> Outcome:
    """An outcome named by its code (its status from CODES), for a front's own refusals."""
    return Outcome(code, CODES[code].status, message, retry_after=retry_after, extra=extra)


def _seconds(value) -> int | None:
    """A Retry-After value in whole seconds (at least 1), or None."""
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return None
    return max(1, int(seconds)) if seconds > 0 else None


class TurboError(Exception):
    """A failure the client caused or must hear about, with its HTTP status and a stable code."""

    status_code = status.HTTP_400_BAD_REQUEST
    code = "bad_request"
    retry_after: int | None = None

    def __init__(self, message: str, *, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.message = message
        if code:
            self.code = code
        self.headers = headers or {}
        self.extra: dict = {}  # more fields of the error object (a subclass's details)

    def outcome(self) -> Outcome:
        """What this failure means to a client; a subclass whose status depends on more overrides it."""
        headers = {name: value for name, value in self.headers.items() if name.lower() != "retry-after"}
        retry_after = _seconds(self.retry_after or self.headers.get("Retry-After"))
        return Outcome(
            self.code,
            self.status_code,
            self.message,
            retry_after=retry_after,
            headers=headers,
            extra=self.extra,
            error_type=getattr(self, "error_type", ""),
        )


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
        self.retry_after = retry_after


# Failures of a backing service that mean "try again later", not a bug: redis-py's, the stream's, and
# the database being away (a lost or refused connection).
UNAVAILABLE_ERRORS = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    StreamUnavailable,
    OperationalError,
    InterfaceError,
)
UNAVAILABLE_MESSAGE = "a service Turbo depends on is unavailable; try again shortly"
UNAVAILABLE = Outcome("unavailable", 503, UNAVAILABLE_MESSAGE, retry_after=2)
INTERNAL = Outcome("internal_error", 500, "internal server error")


def is_unavailable(exc: BaseException) -> bool:
    return isinstance(exc, UNAVAILABLE_ERRORS)


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


def _validation_outcome(exc: drf_exceptions.ValidationError) -> Outcome:
    pairs = _flatten_validation(exc.detail)
    fields: dict[str, list[str]] = {}
    for name, message in pairs:
        fields.setdefault(name or "request", []).append(message)
    first_name, first_message = pairs[0] if pairs else ("", "invalid input")
    message = f"{first_name}: {first_message}" if first_name else first_message
    return Outcome("invalid", 400, message, extra={"fields": fields})


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


def _drf_outcome(exc: drf_exceptions.APIException) -> Outcome:
    code = next((c for cls, c in _DRF_CODES.items() if isinstance(exc, cls)), None)
    if code is None:  # an APIException of a status we name no code for
        code = "internal_error" if exc.status_code >= 500 else "bad_request"
    headers = {}
    if isinstance(exc, (drf_exceptions.NotAuthenticated, drf_exceptions.AuthenticationFailed)):
        headers["WWW-Authenticate"] = 'Bearer realm="turbo"'
    retry_after = _seconds(exc.wait) if isinstance(exc, drf_exceptions.Throttled) else None
    detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    return Outcome(code, exc.status_code, str(detail), retry_after=retry_after, headers=headers)


def _refusal_protocol(exc: BaseException) -> Outcome | None:
    """An app's error that is not (yet) a TurboError but says the same: `status`, `code`, `message`."""
    status_code, code, message = (getattr(exc, name, None) for name in ("status", "code", "message"))
    if isinstance(status_code, int) and isinstance(code, str) and code and isinstance(message, str):
        headers = getattr(exc, "headers", None) or {}
        retry_after = _seconds(getattr(exc, "retry_after", None) or headers.get("Retry-After"))
        return Outcome(code, status_code, message, retry_after=retry_after)
    return None


def outcome_of(exc: BaseException) -> Outcome:
    """What any failure means to a client. Expected ones are answers; a backing service that is away is
    503 `unavailable`; anything else is a fault: logged here, once, with its traceback, and answered
    500 `internal_error` (no trace reaches a client)."""
    if isinstance(exc, TurboError):
        return exc.outcome()
    if isinstance(exc, drf_exceptions.ValidationError):
        return _validation_outcome(exc)
    if isinstance(exc, drf_exceptions.APIException):
        return _drf_outcome(exc)
    if isinstance(exc, Http404):
        return Outcome("not_found", 404, "not found")
    if isinstance(exc, PermissionDenied):
        return Outcome("forbidden", 403, "you may not do that")
    if isinstance(exc, RequestDataTooBig):
        return Outcome("body_too_large", 413, "request body is too large")
    if isinstance(exc, SuspiciousOperation):
        return Outcome("bad_request", 400, "the request was refused as malformed")
    if isinstance(exc, MultiPartParserError | UnreadablePostError):  # e.g. multipart without a boundary
        return Outcome("malformed_body", 400, f"the body cannot be read: {exc}")
    if is_unavailable(exc):
        logger.warning("a backing service is unavailable: %s", exc)
        return UNAVAILABLE
    found = _refusal_protocol(exc)
    if found is not None:
        return found
    logger.error("unhandled error: %s", type(exc).__name__, exc_info=(type(exc), exc, exc.__traceback__))
    return INTERNAL


# --- renderers: each front's shape of one outcome --------------------------------------------------


def error_body(code: str, message: str, **extra) -> dict:
    return {"error": {"code": code, "message": message, **extra}}


def error_response(status_code: int, code: str, message: str, headers: dict | None = None, **extra) -> JsonResponse:
    response = JsonResponse(error_body(code, message, **extra), status=status_code)
    for name, value in (headers or {}).items():
        response[name] = value
    return response


def outcome_response(outcome: Outcome) -> JsonResponse:
    """The HTTP JSON envelope `{"error": {...}}`, with the outcome's status and headers."""
    response = JsonResponse({"error": outcome.error()}, status=outcome.status)
    for name, value in outcome.all_headers().items():
        response[name] = value
    return response


def failure_response(exc: BaseException) -> JsonResponse:
    """The HTTP JSON envelope for any failure."""
    outcome = outcome_of(exc)
    response = outcome_response(outcome)
    if outcome is INTERNAL:
        response._has_been_logged = True  # outcome_of logged it with its traceback: Django need not again
    return response


def unavailable_response(exc: BaseException | None = None) -> JsonResponse:
    """503 `unavailable` with Retry-After, for a backing service that is away."""
    logger.warning("a backing service is unavailable: %s", exc)
    return outcome_response(UNAVAILABLE)


def exception_handler(exc, context):
    """DRF's EXCEPTION_HANDLER: every error leaves as our JSON shape, never a 500 page."""
    return failure_response(exc)


# Django's own error views (handler400/403/404/500), for paths DRF does not serve.
def bad_request(request, exception=None):
    return outcome_response(refusal("bad_request", "the request was malformed"))


def permission_denied(request, exception=None):
    return outcome_response(refusal("forbidden", "you may not do that"))


def page_not_found(request, exception=None):
    return outcome_response(refusal("not_found", f"no endpoint at {request.path}"))


def server_error(request):
    return outcome_response(INTERNAL)
