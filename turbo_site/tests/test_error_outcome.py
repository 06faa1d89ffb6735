"""One error outcome: each failure kind, raised through each front's renderer, has the same code (and the
matching HTTP and gRPC status) on every front; the Errors page's table (docs/api/errors.md) is the code's table."""

import json
import logging
import re
from pathlib import Path

import grpc
import pytest
import redis
from asgiref.sync import async_to_sync
from django.core.exceptions import PermissionDenied, RequestDataTooBig
from django.db import InterfaceError, OperationalError
from django.http import Http404
from django.test import AsyncRequestFactory
from graphql import GraphQLError
from rest_framework import exceptions as drf_exceptions

from accounts.auth import AuthRefused
from accounts.models import User
from accounts.services import session_create, session_lookup
from chats.api import async_endpoint
from chats.consumers import ChatStreamConsumer
from chats.conversations import _error_frame
from proxy.consumers import RpcConsumer, RpcError
from proxy.gateway import GatewayError
from proxy.structured import StructuredOutputError
from proxy.views import openai_error
from turbo_site.core.errors import (
    CODES,
    Conflict,
    Forbidden,
    Invalid,
    NotFound,
    RateLimited,
    ServiceUnavailable,
    TurboError,
    Unauthorized,
    codes_markdown,
    exception_handler,
    outcome_of,
)
from turbo_site.core.grpc import grpc_status
from turbo_site.core.streams import StreamUnavailable
from turbo_site.graphql import ErrorCodes

README = Path(__file__).resolve().parents[2] / "docs" / "api" / "errors.md"
SECRET = "db password hunter2 in a traceback"


class SessionRefused(TurboError):
    """A TurboError of its own status and headers (as accounts.auth's refusal becomes one)."""

    status_code = 401
    code = "session_ended"


# (failure, code, HTTP status, gRPC status, retry-after) - the expectations are written out, not derived.
KINDS = [
    pytest.param(lambda: Invalid("prompt: may not be empty"), "invalid", 400, "INVALID_ARGUMENT", None, id="invalid"),
    pytest.param(lambda: Unauthorized("who are you"), "unauthorized", 401, "UNAUTHENTICATED", None, id="unauthorized"),
    pytest.param(lambda: Forbidden("no"), "forbidden", 403, "PERMISSION_DENIED", None, id="forbidden"),
    pytest.param(lambda: NotFound("no such chat"), "not_found", 404, "NOT_FOUND", None, id="not_found"),
    pytest.param(lambda: Conflict("taken", code="username_taken"), "username_taken", 409, "FAILED_PRECONDITION", None),
    pytest.param(lambda: RateLimited("slow down", retry_after=7), "rate_limited", 429, "RESOURCE_EXHAUSTED", 7),
    pytest.param(
        lambda: ServiceUnavailable("stopping"), "unavailable", 503, "UNAVAILABLE", 2, id="service_unavailable"
    ),
    pytest.param(lambda: redis.exceptions.ConnectionError("refused"), "unavailable", 503, "UNAVAILABLE", 2, id="redis"),
    pytest.param(lambda: StreamUnavailable("down"), "unavailable", 503, "UNAVAILABLE", 2, id="stream"),
    pytest.param(lambda: OperationalError("server closed"), "unavailable", 503, "UNAVAILABLE", 2, id="db_operational"),
    pytest.param(lambda: InterfaceError("connection closed"), "unavailable", 503, "UNAVAILABLE", 2, id="db_interface"),
    pytest.param(
        lambda: drf_exceptions.ValidationError({"name": ["required"]}), "invalid", 400, "INVALID_ARGUMENT", None
    ),
    pytest.param(lambda: Http404("gone"), "not_found", 404, "NOT_FOUND", None, id="http404"),
    pytest.param(lambda: PermissionDenied(), "forbidden", 403, "PERMISSION_DENIED", None, id="permission_denied"),
    pytest.param(lambda: RequestDataTooBig(), "body_too_large", 413, "INVALID_ARGUMENT", None, id="too_big"),
    pytest.param(lambda: AuthRefused("bad token"), "unauthorized", 401, "UNAUTHENTICATED", None, id="auth-refused"),
    pytest.param(lambda: SessionRefused("the session ended"), "session_ended", 401, "UNAUTHENTICATED", None),
    pytest.param(
        lambda: RpcError("invalid_payload", "payload.x: bad"), "invalid_payload", 400, "INVALID_ARGUMENT", None
    ),
    pytest.param(
        lambda: GatewayError("no", status=403, code="model_not_allowed"),
        "model_not_allowed",
        403,
        "PERMISSION_DENIED",
        None,
    ),
    pytest.param(
        lambda: GatewayError("spent", status=429, code="budget_exceeded", retry_after=30.5),
        "budget_exceeded",
        429,
        "RESOURCE_EXHAUSTED",
        30,
    ),
    pytest.param(
        lambda: GatewayError("away", status=502, code="upstream_unreachable"),
        "upstream_unreachable",
        502,
        "UNAVAILABLE",
        None,
    ),
    pytest.param(
        lambda: GatewayError("slow", status=504, code="upstream_timeout"),
        "upstream_timeout",
        504,
        "DEADLINE_EXCEEDED",
        None,
    ),
    pytest.param(
        lambda: GatewayError("busy", status=503, code="upstream_unavailable", retry_after=1),
        "upstream_unavailable",
        503,
        "UNAVAILABLE",
        1,
    ),
    # The upstream refused the server's own key: nothing the caller can fix.
    pytest.param(
        lambda: GatewayError("upstream error 401: bad key", status=401), "upstream_error", 502, "UNAVAILABLE", None
    ),
    # The upstream refused the request as asked (a context too long): the caller's to fix.
    pytest.param(
        lambda: GatewayError("upstream error 400: too long", status=400),
        "upstream_error",
        400,
        "INVALID_ARGUMENT",
        None,
    ),
    pytest.param(
        lambda: GatewayError("the reply was stopped", status=409, code="stopped"), "stopped", 409, "ABORTED", None
    ),
    pytest.param(
        lambda: StructuredOutputError(["$.x: required"]), "invalid_structured_output", 502, "UNAVAILABLE", None
    ),
    pytest.param(lambda: RuntimeError(SECRET), "internal_error", 500, "INTERNAL", None, id="unexpected"),
]


def _rest(exc):
    response = exception_handler(exc, {})
    return response.status_code, json.loads(response.content)["error"], response.headers.get("Retry-After")


def _async_view(exc, token):
    @async_endpoint(("POST",))
    async def view(request):
        raise exc

    request = AsyncRequestFactory().post("/x", headers={"Authorization": f"Bearer {token}"})
    response = async_to_sync(view)(request)
    return response.status_code, json.loads(response.content)["error"], response.headers.get("Retry-After")


def _v1(exc):
    response = openai_error(outcome_of(exc))
    error = json.loads(response.content)["error"]
    assert set(error) == {"message", "type", "code"}
    assert error["type"] == ("server_error" if response.status_code >= 500 else error["type"])
    return response.status_code, error, response.headers.get("Retry-After")


def _sse(exc):
    frame = _error_frame(outcome_of(exc)).decode()
    assert frame.startswith("event: error\n")
    error = json.loads(re.search(r"^data: (.*)$", frame, re.M).group(1))["error"]
    return None, error, error.get("retry_after")


def _sent_frames(consumer, call) -> list[dict]:
    sent = []

    async def base_send(message):
        sent.append(json.loads(message["text"]))

    async def run():
        await call()

    consumer.base_send = base_send
    async_to_sync(run)()
    return sent


def _ws(exc):
    consumer = RpcConsumer()
    [frame] = _sent_frames(consumer, lambda: consumer.send_outcome("r1", outcome_of(exc)))
    assert frame["type"] == "error" and frame["request_id"] == "r1"
    return None, frame["error"], frame["error"].get("retry_after")


def _chat_ws(exc):
    consumer = ChatStreamConsumer()
    [frame] = _sent_frames(consumer, lambda: consumer._send_failure(exc))
    assert frame["type"] == "stream.error"
    return None, frame, frame.get("retry_after")


def _graphql(exc):
    error = ErrorCodes().anonymise_error(GraphQLError("resolver failed", path=["chat"], original_error=exc))
    extensions = error.extensions
    return None, {"code": extensions["code"], "message": error.message}, extensions.get("retryAfter")


def _grpc(exc):
    code, details, trailing = grpc_status(exc)
    return code, {"code": None, "message": details}, dict(trailing).get("retry-after")


FRONTS = {
    "rest": _rest,
    "async_view": _async_view,
    "v1": _v1,
    "sse": _sse,
    "ws": _ws,
    "chat_ws": _chat_ws,
    "graphql": _graphql,
    "grpc": _grpc,
}


@pytest.fixture
def token(db):
    user = User.objects.create(username="outcome-matrix")
    token = session_create(user=user)[1]
    # Looked up once here, the async view finds the session in the cache: no query from its thread hop
    # (which would close this test's in-memory database).
    assert session_lookup(token) is not None
    return token


@pytest.mark.django_db
@pytest.mark.parametrize(("make", "code", "status", "grpc_name", "retry_after"), KINDS)
@pytest.mark.parametrize("front", list(FRONTS))
def test_a_failure_has_the_same_outcome_on_every_front(
    front, make, code, status, grpc_name, retry_after, token, caplog
):
    exc = make()
    render = FRONTS[front]
    with caplog.at_level(logging.WARNING):
        http_status, error, retry = render(exc, token) if front == "async_view" else render(exc)
    if front == "grpc":
        assert http_status == grpc.StatusCode[grpc_name]
    else:
        assert error["code"] == code
        assert http_status in (None, status)
    assert code in CODES
    assert error["message"] and SECRET not in error["message"]
    assert (int(retry) if retry is not None else None) == retry_after
    if code == "internal_error":  # logged once, with its traceback
        faults = [record for record in caplog.records if record.exc_info]
        assert len(faults) == 1 and SECRET in str(faults[0].exc_info[1])
    else:
        assert not [record for record in caplog.records if record.levelno >= logging.ERROR]


def test_an_http_answer_carries_the_outcome_s_headers():
    status, error, _ = _rest(SessionRefused("ended", headers={"WWW-Authenticate": 'Bearer realm="turbo"'}))
    response = exception_handler(SessionRefused("ended", headers={"WWW-Authenticate": 'Bearer realm="turbo"'}), {})
    assert (status, error["code"]) == (401, "session_ended")
    assert response["WWW-Authenticate"] == 'Bearer realm="turbo"'
    limited = exception_handler(
        GatewayError("slow", status=429, code="rate_limited", headers={"x-ratelimit-limit-requests": "5"}), {}
    )
    assert limited["x-ratelimit-limit-requests"] == "5"


def test_structured_output_errors_travel_with_the_outcome():
    status, error, _ = _rest(StructuredOutputError(["$.name: required"]))
    assert status == 502 and error["errors"] == ["$.name: required"]
    assert _ws(StructuredOutputError(["$.name: required"]))[1]["errors"] == ["$.name: required"]


def test_the_readme_table_is_the_code_table():
    text = README.read_text()
    assert codes_markdown() in text
    rows = re.findall(r"^\| `([a-z_]+)` \| (\d{3}) \| `([A-Z_]+)` \|", text, re.M)
    assert {code: (int(status), name) for code, status, name in rows} == {
        code: (known.status, grpc_status_name(code, known.status)) for code, known in CODES.items()
    }


def grpc_status_name(code: str, status: int) -> str:
    """What gRPC status a client sees for the code, through the gRPC front itself."""

    class Coded(TurboError):
        pass

    failure = Coded("x", code=code)
    failure.status_code = status
    return grpc_status(failure)[0].name
