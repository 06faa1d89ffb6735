"""The one authenticate (accounts.auth) and its policy table, through every front's adapter, in process.

Each row of the matrix is a credential (none, garbage, revoked, expired, an API key, a cookie sent
cross-site, a `token` parameter) and the outcome each front gives it; every front must give the same
outcome (status, and Turbo's code where the transport carries one: an HTTP body or GraphQL's
`extensions.code`; a socket's close code 4401/4403; a gRPC status). The fronts are driven in process:
Django's async client (DRF, the async chat views, SSE, /v1 through Django, GraphQL over HTTP),
`httpx.ASGITransport` (the /v1 fast path), Channels' communicators (/ws, /chat/stream, GraphQL's
socket), and the gRPC servicers with the call's metadata (their statuses from turbo_site.core.grpc). Each
call runs through run_in_process (testing/inprocess.py): the app's database calls on the test's own
connection, inside its one transaction, rolled back after the test.
"""

import base64
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc
import httpx
import pytest
from channels.routing import URLRouter
from channels.testing import WebsocketCommunicator

from accounts.auth import FRONTS, AuthRefused, Credentials, aauthenticate, authenticate
from accounts.keys import api_key_create
from accounts.services import user_create
from chats.grpc import ChatsServicer
from chats.routing import websocket_urlpatterns as chat_websockets
from conftest import unique_name
from protos.turbo.v1 import turbo_pb2
from proxy.fast import ProxyFastPath
from proxy.fast import takes as fast_path_takes
from proxy.grpc import CompletionsServicer
from proxy.routing import websocket_urlpatterns as rpc_websockets
from testing.fronts import (
    OURS,
    CallContext,
    Sent,
    django_client,
    grpc_metadata,
    http_parts,
    session_tokens_of,
    socket_parts,
)
from testing.inprocess import run_in_process
from turbo_site.core.grpc import grpc_status
from turbo_site.graphql_server import websocket_urlpatterns as graphql_websockets

pytestmark = pytest.mark.django_db

FOREIGN = "https://evil.example"
GRPC_STATUSES = {grpc.StatusCode.UNAUTHENTICATED: 401, grpc.StatusCode.PERMISSION_DENIED: 403}
GRAPHQL_STATUSES = {"unauthorized": 401, "forbidden": 403, "key_not_allowed_here": 403}


@dataclass
class Tokens:
    live: str
    revoked: str
    expired: str
    key: str


@pytest.fixture
def tokens(db) -> Tokens:
    user = user_create(username=unique_name(), password="correct-horse-battery")
    live, revoked, expired = session_tokens_of(user)
    _, key = api_key_create(user=user, name="a program")
    return Tokens(live, revoked, expired, key)


@dataclass(frozen=True)
class Outcome:
    status: int  # an HTTP status; 101 for an accepted socket; 200 for a GraphQL answer without errors
    code: str | None  # Turbo's code, where the front carries one


def awaited(call: Callable[..., Awaitable], *args):
    """`await call(*args)` in process, as the test's requests run (testing/inprocess.py)."""

    async def scenario():
        return await call(*args)

    return run_in_process(scenario)


# --- the adapters: one function per front, sending `Sent` its way and reading the outcome --------------


async def _django(method: str, path: str, sent: Sent, **body) -> Outcome:
    path, headers = http_parts(sent, path)
    client = django_client(headers)
    if method == "GET":
        response = await client.get(path, headers=headers)
    else:
        response = await client.post(path, body, content_type="application/json", headers=headers)
    code = None
    if not response.streaming and response.get("content-type", "").startswith("application/json"):
        error = response.json().get("error") if isinstance(response.json(), dict) else None
        code = error.get("code") if isinstance(error, dict) else None
    if response.status_code == 401:
        assert response["www-authenticate"] == 'Bearer realm="turbo"'
    return Outcome(response.status_code, code)


async def rest_read(sent: Sent) -> Outcome:
    return await _django("GET", "/user/read", sent)


async def rest_update(sent: Sent) -> Outcome:
    return await _django("POST", "/user/update", sent, first_name="Mallory")


async def chat_prompt(sent: Sent) -> Outcome:
    return await _django("POST", "/chat/prompt", sent)


async def chat_stream(sent: Sent) -> Outcome:
    return await _django("POST", "/chat/stream", sent)


async def proxy_django(sent: Sent) -> Outcome:
    return await _django("POST", "/v1/chat/completions", sent, model="gpt-4o-mini", messages=[])


async def proxy_fast(sent: Sent) -> Outcome:
    path, headers = http_parts(sent, "/v1/chat/completions")
    assert "authorization" in headers, "the fast path takes only requests with an Authorization header"
    reached = []

    async def django_instead(scope, receive, send):  # the fast path must not hand these on
        reached.append(scope["path"])

    transport = httpx.ASGITransport(app=ProxyFastPath(django_instead))
    async with httpx.AsyncClient(transport=transport, base_url=OURS) as client:
        response = await client.post(path, headers=headers, json={"model": "gpt-4o-mini", "messages": []})
    assert not reached
    if response.status_code == 401:
        assert response.headers["www-authenticate"] == 'Bearer realm="turbo"'
    error = response.json().get("error") or {}
    return Outcome(response.status_code, error.get("code"))


async def graphql_http(query: str, sent: Sent) -> Outcome:
    path, headers = http_parts(sent, "/graphql")
    client = django_client(headers)
    response = await client.post(path, {"query": query}, content_type="application/json", headers=headers)
    assert response.status_code == 200, response.content
    errors = response.json().get("errors")
    if not errors:
        return Outcome(200, None)
    code = errors[0]["extensions"]["code"]
    return Outcome(GRAPHQL_STATUSES.get(code, 400), code)


async def graphql_model_field(sent: Sent) -> Outcome:
    return await graphql_http("{ me { sessionKind } }", sent)


async def graphql_account_field(sent: Sent) -> Outcome:
    return await graphql_http("{ chats { id } }", sent)


async def _socket(application, path: str, sent: Sent) -> Outcome:
    path, headers = socket_parts(sent, path)
    communicator = WebsocketCommunicator(application, path, headers=headers)
    connected, close_code = await communicator.connect()
    if connected:
        await communicator.disconnect()
        return Outcome(101, None)
    if close_code in (4401, 4403):
        return Outcome(close_code - 4000, None)
    return Outcome(404, None)  # closed for another reason than who is calling


async def rpc_socket(sent: Sent) -> Outcome:
    return await _socket(URLRouter(rpc_websockets), "/ws", sent)


async def chat_socket(sent: Sent) -> Outcome:
    # A chat that does not exist: authentication comes first, then the chat's access rule (a 404 here).
    return await _socket(URLRouter(chat_websockets), f"/chat/stream?id={uuid.uuid4()}", sent)


async def graphql_socket(sent: Sent) -> Outcome:
    """connection_init's `authorization` carries a header token; other ways ride on the handshake."""
    init_authorization = f"Bearer {sent.token}" if sent.way == "header" and sent.token else None
    handshake = Sent(None if init_authorization else sent.token, sent.way, sent.origin)
    path, headers = socket_parts(handshake, "/graphql")
    communicator = WebsocketCommunicator(
        URLRouter(graphql_websockets), path, headers=headers, subprotocols=["graphql-transport-ws"]
    )
    connected, close_code = await communicator.connect()
    if not connected:  # the handshake itself was refused: only a foreign Origin is, with HTTP 403
        return Outcome(403, None)
    payload = {"authorization": init_authorization} if init_authorization else {}
    await communicator.send_json_to({"type": "connection_init", "payload": payload})
    answer = await communicator.receive_output(timeout=10)
    await communicator.disconnect()
    if answer["type"] == "websocket.close":
        # strawberry closes every refused connection_init with 4403 (graphql-transport-ws has no 4401)
        assert answer["code"] == 4403
        return Outcome(403, None)
    return Outcome(101, None)


async def _grpc(call) -> Outcome:
    try:
        await call
    except Exception as exc:
        status, _, _ = grpc_status(exc)
        return Outcome(GRPC_STATUSES.get(status, 400), None)
    return Outcome(200, None)


async def grpc_chats(sent: Sent) -> Outcome:
    events = ChatsServicer().Events(turbo_pb2.EventsRequest(chat_id="not a chat"), CallContext(grpc_metadata(sent)))
    return await _grpc(anext(events))


async def grpc_completions(sent: Sent) -> Outcome:
    # No input: a 400 once the caller is known (no upstream is called).
    embed = CompletionsServicer().Embed(turbo_pb2.EmbedRequest(), CallContext(grpc_metadata(sent)))
    return await _grpc(embed)


SESSION_ONLY = [rest_read, chat_prompt, chat_stream, graphql_account_field, chat_socket, grpc_chats]
KEYS_WELCOME = [proxy_django, proxy_fast, graphql_model_field, rpc_socket, graphql_socket, grpc_completions]
EVERY_FRONT = SESSION_ONLY + KEYS_WELCOME
SOCKETS = [rpc_socket, chat_socket, graphql_socket]
# Fronts whose cookie a browser sends with an unsafe (state-changing) request.
COOKIE_POSTS = [rest_update, chat_prompt, chat_stream, proxy_django, graphql_account_field]
NO_PARAMETER = [rest_read, chat_prompt, proxy_django, graphql_account_field]
PARAMETER_WELCOME = [chat_stream, rpc_socket, chat_socket, graphql_socket]


def refused(outcome: Outcome, status: int, code: str) -> bool:
    return outcome.status == status and outcome.code in (code, None)


def is_unauthorized(outcome: Outcome, front) -> bool:
    if front is graphql_socket:  # strawberry closes every refused connection_init 4403 (not 4401)
        return outcome.status == 403
    return refused(outcome, 401, "unauthorized")


@pytest.mark.parametrize("front", EVERY_FRONT, ids=lambda f: f.__name__)
@pytest.mark.parametrize("which", ["none", "garbage", "revoked", "expired"])
def test_no_live_credential_is_401_unauthorized_on_every_front(front, which, tokens):
    token = {"none": None, "garbage": "not-a-token", "revoked": tokens.revoked, "expired": tokens.expired}[which]
    if which == "none" and front is proxy_fast:
        # Without an Authorization header the fast path does not take the request: Django's /v1 view
        # (the proxy_django row) answers it.
        scope = {"type": "http", "path": "/v1/chat/completions", "method": "POST", "headers": []}
        assert not fast_path_takes(scope)
        return
    outcome = awaited(front, Sent(token))
    assert is_unauthorized(outcome, front), outcome


@pytest.mark.parametrize("front", EVERY_FRONT, ids=lambda f: f.__name__)
def test_a_live_session_token_passes_every_front(front, tokens, upstream):
    outcome = awaited(front, Sent(tokens.live))
    assert outcome.status not in (401, 403), outcome


@pytest.mark.parametrize("front", SESSION_ONLY, ids=lambda f: f.__name__)
def test_an_api_key_is_403_key_not_allowed_here_where_keys_are_not_allowed(front, tokens):
    outcome = awaited(front, Sent(tokens.key))
    assert refused(outcome, 403, "key_not_allowed_here"), outcome


@pytest.mark.parametrize("front", KEYS_WELCOME, ids=lambda f: f.__name__)
def test_an_api_key_passes_the_model_fronts(front, tokens, upstream):
    outcome = awaited(front, Sent(tokens.key))
    assert outcome.status not in (401, 403), outcome


@pytest.mark.parametrize("front", COOKIE_POSTS, ids=lambda f: f.__name__)
def test_a_cross_site_post_may_not_use_the_cookie(front, tokens, upstream):
    outcome = awaited(front, Sent(tokens.live, "cookie", FOREIGN))
    assert refused(outcome, 403, "forbidden"), outcome
    same_site = awaited(front, Sent(tokens.live, "cookie", OURS))
    assert same_site.status not in (401, 403), same_site


def test_a_cross_site_post_changed_nothing(tokens):
    from accounts.models import User

    awaited(rest_update, Sent(tokens.live, "cookie", FOREIGN))
    assert not User.objects.filter(first_name="Mallory").exists()


@pytest.mark.parametrize("front", SOCKETS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("way", ["header", "cookie", "parameter"])
def test_a_cross_site_socket_is_refused_whatever_it_carries(front, way, tokens):
    outcome = awaited(front, Sent(tokens.live, way, FOREIGN))
    assert outcome.status == 403, outcome


@pytest.mark.parametrize("front", NO_PARAMETER, ids=lambda f: f.__name__)
def test_a_token_parameter_does_not_count_where_it_is_not_allowed(front, tokens):
    outcome = awaited(front, Sent(tokens.live, "parameter"))
    assert is_unauthorized(outcome, front), outcome


@pytest.mark.parametrize("front", PARAMETER_WELCOME, ids=lambda f: f.__name__)
def test_a_token_parameter_counts_where_it_is_allowed(front, tokens):
    outcome = awaited(front, Sent(tokens.live, "parameter"))
    assert outcome.status not in (401, 403), outcome


# --- the policy table itself, row by row --------------------------------------------------------


@pytest.mark.parametrize("front", sorted(FRONTS))
def test_every_row_refuses_what_no_front_may_take(front, tokens):
    for credentials in (Credentials(), Credentials(authorization="Bearer not-a-token", cookie="not-a-token")):
        with pytest.raises(AuthRefused) as refusal:
            authenticate(front, credentials)
        assert (refusal.value.status_code, refusal.value.code) == (401, "unauthorized")
        assert refusal.value.headers == {"WWW-Authenticate": 'Bearer realm="turbo"'}
    everything = Credentials(
        authorization=f"Bearer {tokens.key}", parameter=tokens.key, cookie=tokens.key, safe_method=True
    )
    if FRONTS[front].keys:
        assert authenticate(front, everything).kind == "key"
    else:
        with pytest.raises(AuthRefused) as refusal:
            authenticate(front, everything)
        assert (refusal.value.status_code, refusal.value.code) == (403, "key_not_allowed_here")


@pytest.mark.parametrize("front", sorted(FRONTS))
def test_every_row_reads_only_its_kinds_in_its_order(front, tokens):
    kinds = FRONTS[front].kinds
    basic = base64.b64encode(f"anyone:{tokens.live}".encode()).decode()
    one_each = {
        "header": Credentials(authorization=f"Basic {basic}", safe_method=True),
        "parameter": Credentials(parameter=tokens.live, safe_method=True),
        "cookie": Credentials(cookie=tokens.live, safe_method=True),
    }
    for kind, credentials in one_each.items():
        if kind in kinds:
            assert awaited(aauthenticate, front, credentials).kind == "token"
        else:
            with pytest.raises(AuthRefused) as refusal:
                awaited(aauthenticate, front, credentials)
            assert refusal.value.status_code == 401
    # Where two kinds are sent, the earlier one in the row decides (here: a dead token first).
    if len(kinds) > 1:
        first, second = kinds[0], kinds[1]
        fields = {"header": "authorization", "parameter": "parameter", "cookie": "cookie"}
        values = {first: "Bearer gone" if first == "header" else "gone"}
        values[second] = f"Bearer {tokens.live}" if second == "header" else tokens.live
        credentials = Credentials(safe_method=True, **{fields[kind]: value for kind, value in values.items()})
        with pytest.raises(AuthRefused) as refusal:
            awaited(aauthenticate, front, credentials)
        assert refusal.value.status_code == 401
