"""Turbo's fronts, driven in process, for the tests that run one rule through every front.

One adapter per front: it sends an `Ask` (who is calling, what they ask for, or a malformed form of it)
the way that front's clients do, and reads what came back as a `Seen` (the status and Turbo's code,
where the transport carries them). Everything runs in this process: Django's async client (DRF, the
async chat views, SSE, /v1 through Django, GraphQL over HTTP), `httpx.ASGITransport` (the /v1 fast
path), Channels' communicators (/ws, /chat/stream, GraphQL's socket) and the gRPC servicers called
with the call's metadata (their statuses from turbo_site.core.grpc, as the server's interceptor does).

A new front joins by adding its adapter here and naming it in the matrix (turbo_site/tests/test_front_matrix.py).
"""

import asyncio
import json
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import grpc
import httpx
from channels.routing import URLRouter
from channels.testing import WebsocketCommunicator
from django.conf import settings
from django.test import AsyncClient

from turbo_site.core.errors import CODES
from turbo_site.core.grpc import grpc_status

HOST = "testserver"
OURS = f"http://{HOST}"
PROMPT = "hello there"
DEEP = 300  # levels of nesting: past client_json_loads' MAX_JSON_DEPTH, short of a RecursionError


@dataclass(frozen=True)
class Sent:
    """What a client sends: a token (or none) in one way, maybe from a foreign browser page."""

    token: str | None
    way: str = "header"  # header, cookie or parameter
    origin: str | None = None


@dataclass(frozen=True)
class Seen:
    """What a client saw: a status (HTTP; a socket's close code 44xx as xx; a refused handshake as 403;
    a gRPC status's name; None where the transport carries none) and Turbo's code (None: not carried)."""

    status: int | str | None
    code: str | None


@dataclass(frozen=True)
class Ask:
    """A call as the matrix asks it of a front; each adapter spells it its own way."""

    token: str | None
    model: str = "gpt-4o-mini"
    response_format: dict | None = None
    chat_id: uuid.UUID | None = None  # the chat a chat front prompts or reads
    chat_number: int | None = None  # its number, for the conversation API's /api/chat/<number>
    bad: str | None = None  # a malformed request: "deep", "oversize" or "wrong_type"
    origin: str | None = None
    prompt: str = PROMPT  # "[scenario:NAME] ..." picks the fake upstream's behaviour for this call alone

    def sent(self) -> Sent:
        return Sent(self.token, origin=self.origin)


# --- transport pieces ------------------------------------------------------------------------------------


def session_tokens_of(user) -> tuple[str, str, str]:
    """Three session tokens of `user`: a live one, a revoked one and an expired one."""
    from datetime import timedelta

    from django.utils import timezone

    from accounts.models import Session
    from accounts.services import session_create, session_revoke

    _, live = session_create(user=user)
    revoked_session, revoked = session_create(user=user)
    session_revoke(session_id=revoked_session.pk)
    expired_session, expired = session_create(user=user)
    Session.objects.filter(pk=expired_session.pk).update(expires_at=timezone.now() - timedelta(minutes=1))
    return live, revoked, expired


def http_parts(sent: Sent, path: str) -> tuple[str, dict]:
    headers = {}
    if sent.origin:
        headers["origin"] = sent.origin
    if sent.token is not None:
        if sent.way == "header":
            headers["authorization"] = f"Bearer {sent.token}"
        elif sent.way == "cookie":
            headers["cookie"] = f"sess={sent.token}"
        else:
            path += ("&" if "?" in path else "?") + f"token={sent.token}"
    return path, headers


def django_client(headers: dict) -> AsyncClient:
    """Django's async client; a cookie goes through its jar (it sends a cookie header of its own)."""
    client = AsyncClient()
    if "cookie" in headers:
        client.cookies["sess"] = headers.pop("cookie").removeprefix("sess=")
    return client


def socket_parts(sent: Sent, path: str) -> tuple[str, list]:
    path, headers = http_parts(sent, path)
    headers.setdefault("origin", OURS)
    headers["host"] = HOST
    return path, [(name.encode(), value.encode()) for name, value in headers.items()]


class CallContext:
    """What a gRPC servicer reads of its call here: the metadata (and initial metadata it may send)."""

    def __init__(self, metadata):
        self.metadata = metadata

    def invocation_metadata(self):
        return self.metadata

    async def send_initial_metadata(self, metadata):
        pass

    async def abort(self, code, details, trailing_metadata=()):
        raise Aborted(code, details)


class Aborted(Exception):
    """A servicer ended its call with `context.abort(code, details)`."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(details)
        self.code = code


def grpc_metadata(sent: Sent):
    assert sent.way == "header", "gRPC carries only metadata"
    return (("authorization", f"Bearer {sent.token}"),) if sent.token is not None else ()


async def grpc_seen(call: Awaitable) -> Seen:
    """A servicer's answer as its client sees it: OK, or the status the server's interceptor sends."""
    try:
        await call
    except Aborted as aborted:
        return Seen(aborted.code.name, None)
    except Exception as exc:
        status, _, _ = grpc_status(exc)
        return Seen(status.name, None)
    return Seen("OK", None)


async def _drained(stream) -> None:
    async for _ in stream:
        pass


def _json_error_code(content: bytes) -> str | None:
    try:
        body = json.loads(content)
    except ValueError:
        return None
    error = body.get("error") if isinstance(body, dict) else None
    return error.get("code") if isinstance(error, dict) else None


async def _streamed(response, limit: float = 15) -> bytes:
    """A streaming response's body, read until it ends (or `limit` seconds: a stream that never ends)."""
    chunks = []

    async def read():
        async for chunk in response.streaming_content:
            chunks.append(chunk)

    try:
        await asyncio.wait_for(read(), limit)
    except TimeoutError:
        pass
    return b"".join(chunks)


def sse_error_code(text: str) -> str | None:
    """The code of the first SSE `error` event in `text` (None: no error event)."""
    for block in text.split("\n\n"):
        lines = block.split("\n")
        if "event: error" in lines:
            data = "\n".join(line.removeprefix("data: ") for line in lines if line.startswith("data: "))
            return json.loads(data)["error"]["code"]
    return None


async def django_seen(response) -> Seen:
    """An HTTP answer: its status, and the code of a JSON error body (or of an SSE error event)."""
    if response.streaming:
        body = await _streamed(response)
        if response.get("content-type", "").startswith("text/event-stream"):
            return Seen(response.status_code, sse_error_code(body.decode()))
        return Seen(response.status_code, _json_error_code(body))
    if response.status_code == 401:
        assert response["www-authenticate"] == 'Bearer realm="turbo"'
    return Seen(response.status_code, _json_error_code(response.content))


async def django_post(path: str, sent: Sent, body: bytes, content_type: str = "application/json") -> Seen:
    path, headers = http_parts(sent, path)
    response = await django_client(headers).post(path, body, content_type=content_type, headers=headers)
    return await django_seen(response)


def padding() -> str:
    """Text that takes a body, a frame or a GraphQL document over its limit."""
    return "x" * (max(settings.MAX_BODY_BYTES, settings.PROXY_MAX_BODY_BYTES, settings.WS_MAX_FRAME_BYTES) + 1)


def deep_json(fields: dict) -> bytes:
    """`fields` as a JSON object with one more member nested DEEP levels (json.dumps would refuse it)."""
    text = json.dumps(fields)
    return (text[:-1] + ', "nested": ' + "[" * DEEP + "]" * DEEP + "}").encode()


# --- model calls -------------------------------------------------------------------------------------------


def chat_fields(ask: Ask) -> dict:
    """A chat completion's fields as /v1, /ws and GraphQL take them (OpenAI's shape)."""
    fields: dict = {"model": ask.model, "messages": [{"role": "user", "content": ask.prompt}]}
    if ask.response_format is not None:
        fields["response_format"] = ask.response_format
    return fields


def v1_body(ask: Ask) -> bytes:
    fields = chat_fields(ask)
    if ask.bad == "deep":
        return deep_json(fields)
    if ask.bad == "oversize":
        fields["messages"][0]["content"] = padding()
    if ask.bad == "wrong_type":
        fields["model"] = 42  # the one field /v1's policy reads: the rest are the upstream's to check
    return json.dumps(fields).encode()


async def v1_django(ask: Ask) -> Seen:
    """POST /v1/chat/completions through Django (what a browser, or a client without a token, reaches)."""
    return await django_post("/v1/chat/completions", ask.sent(), v1_body(ask))


async def v1_fast(ask: Ask) -> Seen:
    """POST /v1/chat/completions through the raw ASGI fast path (proxy.fast): API clients with a token."""
    from proxy.fast import ProxyFastPath

    path, headers = http_parts(ask.sent(), "/v1/chat/completions")
    assert "authorization" in headers, "the fast path takes only requests with an Authorization header"
    reached = []

    async def django_instead(scope, receive, send):  # the fast path must not hand these on
        reached.append(scope["path"])

    transport = httpx.ASGITransport(app=ProxyFastPath(django_instead))
    headers["content-type"] = "application/json"
    async with httpx.AsyncClient(transport=transport, base_url=OURS, timeout=30) as client:
        response = await client.post(path, headers=headers, content=v1_body(ask))
    assert not reached
    if response.status_code == 401:
        assert response.headers["www-authenticate"] == 'Bearer realm="turbo"'
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        return Seen(response.status_code, sse_error_code(response.text))
    return Seen(response.status_code, _json_error_code(response.content))


async def _socket_open(application, path: str, sent: Sent, **options) -> tuple[WebsocketCommunicator, Seen | None]:
    """A communicator, connected; or the Seen of a refused handshake (a close code 44xx, else 403)."""
    path, headers = socket_parts(sent, path)
    communicator = WebsocketCommunicator(application, path, headers=headers, **options)
    connected, close_code = await communicator.connect(timeout=10)
    if connected:
        return communicator, None
    if isinstance(close_code, int) and 4400 <= close_code < 4500:
        return communicator, Seen(close_code - 4000, None)
    return communicator, Seen(403, None)


def _rpc_frame(ask: Ask, kind: str) -> str:
    frame = {"type": kind, "request_id": "r1", "payload": chat_fields(ask)}
    if ask.bad == "deep":
        return deep_json(frame).decode()
    if ask.bad == "oversize":
        frame["payload"]["messages"][0]["content"] = padding()
    if ask.bad == "wrong_type":
        frame["payload"]["messages"] = PROMPT
    return json.dumps(frame)


async def _rpc(ask: Ask, kind: str, done: str) -> Seen:
    from proxy.routing import websocket_urlpatterns

    communicator, refused = await _socket_open(URLRouter(websocket_urlpatterns), "/ws", ask.sent())
    if refused is not None:
        return refused
    try:
        await communicator.send_to(text_data=_rpc_frame(ask, kind))
        while True:
            frame = await communicator.receive_json_from(timeout=15)
            if frame["type"] == "error":
                return Seen(None, frame["error"]["code"])
            if frame["type"] == done:
                return Seen(None, None)
    finally:
        await communicator.disconnect()


async def ws_complete(ask: Ask) -> Seen:
    """/ws RPC `chat_completion`: one error frame, or the answer."""
    return await _rpc(ask, "chat_completion", "chat_completion")


async def ws_stream(ask: Ask) -> Seen:
    """/ws RPC `chat_completion_stream`: chunks, then `chat_completion_done` or an error frame."""
    return await _rpc(ask, "chat_completion_stream", "chat_completion_done")


COMPLETE = "mutation($input: CompletionInput!) { complete(input: $input) { text } }"
COMPLETION_STREAM = "subscription($input: CompletionInput!) { completionStream(input: $input) { text done } }"


def graphql_variables(ask: Ask) -> dict:
    fields = {"model": ask.model, "messages": [{"role": "user", "content": ask.prompt}]}
    if ask.response_format is not None:
        fields["responseFormat"] = ask.response_format
    if ask.bad == "oversize":
        fields["messages"][0]["content"] = padding()
    if ask.bad == "wrong_type":
        fields["maxTokens"] = "ten"
    return {"input": fields}


def graphql_errors_seen(errors: list | None) -> Seen:
    if not errors:
        return Seen(None, None)
    return Seen(None, errors[0]["extensions"]["code"])


async def graphql_http(ask: Ask, query: str, variables: dict) -> Seen:
    path, headers = http_parts(ask.sent(), "/graphql")
    body = {"query": query, "variables": variables}
    raw = deep_json(body) if ask.bad == "deep" else json.dumps(body).encode()
    response = await django_client(headers).post(path, raw, content_type="application/json", headers=headers)
    if response.status_code != 200:  # refused before any GraphQL: Turbo's JSON envelope, the code's status
        code = _json_error_code(response.content)
        assert code in CODES and CODES[code].status == response.status_code, (response.status_code, code)
        return Seen(None, code)
    return graphql_errors_seen(response.json().get("errors"))


async def graphql_complete(ask: Ask) -> Seen:
    """GraphQL over HTTP: the `complete` mutation."""
    return await graphql_http(ask, COMPLETE, graphql_variables(ask))


async def graphql_socket(ask: Ask, query: str, variables: dict) -> Seen:
    """graphql-transport-ws: connection_init carries the token; one subscription, read to its end."""
    from turbo_site.graphql_server import websocket_urlpatterns

    handshake = Sent(None, origin=ask.origin)
    communicator, refused = await _socket_open(
        URLRouter(websocket_urlpatterns), "/graphql", handshake, subprotocols=["graphql-transport-ws"]
    )
    if refused is not None:
        return refused
    try:
        payload = {"authorization": f"Bearer {ask.token}"} if ask.token is not None else {}
        await communicator.send_json_to({"type": "connection_init", "payload": payload})
        answer = await communicator.receive_output(timeout=10)
        if answer["type"] == "websocket.close":
            return Seen(answer["code"] - 4000 if answer["code"] >= 4000 else answer["code"], None)
        subscribe = {"id": "1", "type": "subscribe", "payload": {"query": query, "variables": variables}}
        if ask.bad == "deep":
            await communicator.send_to(text_data=deep_json(subscribe).decode())
        else:
            await communicator.send_to(text_data=json.dumps(subscribe))
        while True:
            output = await communicator.receive_output(timeout=15)
            if output["type"] == "websocket.close":
                code = output.get("code", 1000)
                return Seen(code - 4000 if code >= 4000 else code, None)
            message = json.loads(output["text"])
            if message["type"] == "error":
                return graphql_errors_seen(message["payload"])
            if message["type"] == "next" and message["payload"].get("errors"):
                return graphql_errors_seen(message["payload"]["errors"])
            if message["type"] == "complete":
                return Seen(None, None)
    finally:
        await communicator.disconnect()


async def graphql_stream(ask: Ask) -> Seen:
    """GraphQL over its socket: the `completionStream` subscription."""
    return await graphql_socket(ask, COMPLETION_STREAM, graphql_variables(ask))


def _grpc_request(ask: Ask):
    from protos.turbo.v1 import turbo_pb2

    request = turbo_pb2.CompleteRequest(model=ask.model, messages=[turbo_pb2.Message(role="user", content=ask.prompt)])
    _grpc_schema(request, ask)
    return request


def _grpc_schema(request, ask: Ask) -> None:
    """The request's JSON Schema text: the one field that holds JSON (protobuf itself does not nest
    without end), so deep nesting goes there."""
    if ask.response_format is not None:
        request.response_format_json_schema = json.dumps(ask.response_format["json_schema"])
    if ask.bad == "deep":
        request.response_format_json_schema = deep_json({"type": "object"}).decode()


async def grpc_complete(ask: Ask) -> Seen:
    """gRPC Completions.Complete."""
    from proxy.grpc import CompletionsServicer

    call = CompletionsServicer().Complete(_grpc_request(ask), CallContext(grpc_metadata(ask.sent())))
    return await grpc_seen(call)


async def grpc_stream(ask: Ask) -> Seen:
    """gRPC Completions.CompleteStream, read to its end."""
    from proxy.grpc import CompletionsServicer

    stream = CompletionsServicer().CompleteStream(_grpc_request(ask), CallContext(grpc_metadata(ask.sent())))
    return await grpc_seen(_drained(stream))


# --- chats: prompts and the chat's objects -------------------------------------------------------------


def _prompt_fields(ask: Ask) -> dict:
    fields: dict = {"id": str(ask.chat_id or uuid.uuid4()), "prompt": ask.prompt}
    if ask.response_format is not None:
        fields["response_format"] = ask.response_format
    if ask.bad == "oversize":
        fields["prompt"] = padding()
    if ask.bad == "wrong_type":
        fields["stream"] = "maybe"
    return fields


async def chat_prompt(ask: Ask) -> Seen:
    """POST /chat/prompt (stream: false): the reply, or the failure, in the answer."""
    fields = _prompt_fields(ask)
    body = deep_json(fields) if ask.bad == "deep" else json.dumps(fields).encode()
    return await django_post("/chat/prompt", ask.sent(), body)


async def chat_sse(ask: Ask) -> Seen:
    """The conversation API's POST /api/chat/<number>: a refusal as a JSON answer; a failure mid-reply as the SSE
    `error` event."""
    fields: dict = {"message": ask.prompt}
    if ask.bad == "oversize":
        fields["message"] = padding()
    if ask.bad == "wrong_type":
        fields["message"] = 42
    body = deep_json(fields) if ask.bad == "deep" else json.dumps(fields).encode()
    return await django_post(f"/api/chat/{ask.chat_number or 999999}", ask.sent(), body)


PROMPT_MUTATION = "mutation($chatId: ID!, $prompt: String!) { prompt(chatId: $chatId, prompt: $prompt) { id } }"


async def graphql_prompt(ask: Ask) -> Seen:
    """GraphQL over HTTP: the `prompt` mutation (stream: false)."""
    variables = {"chatId": str(ask.chat_id or uuid.uuid4()), "prompt": ask.prompt}
    if ask.bad == "oversize":
        variables["prompt"] = padding()
    if ask.bad == "wrong_type":
        variables["prompt"] = 42
    return await graphql_http(ask, PROMPT_MUTATION, variables)


async def grpc_prompt(ask: Ask) -> Seen:
    """gRPC Chats.Prompt (stream: false)."""
    from chats.grpc import ChatsServicer
    from protos.turbo.v1 import turbo_pb2

    request = turbo_pb2.PromptRequest(chat_id=str(ask.chat_id or uuid.uuid4()), prompt=ask.prompt)
    _grpc_schema(request, ask)
    return await grpc_seen(ChatsServicer().Prompt(request, CallContext(grpc_metadata(ask.sent()))))


async def chat_read(ask: Ask) -> Seen:
    """POST /chat/read (DRF)."""
    return await django_post("/chat/read", ask.sent(), json.dumps({"id": str(ask.chat_id or uuid.uuid4())}).encode())


async def chat_stream_sse(ask: Ask) -> Seen:
    """GET /chat/stream?id=...: the chat's events as SSE (a refusal comes before the stream)."""
    path, headers = http_parts(ask.sent(), f"/chat/stream?id={ask.chat_id or uuid.uuid4()}")
    response = await django_client(headers).get(path, headers=headers)
    if response.streaming:  # the stream opened: the caller may see the chat
        await response.streaming_content.aclose()
        return Seen(response.status_code, None)
    return await django_seen(response)


async def chat_socket(ask: Ask) -> Seen:
    """The /chat/stream WebSocket: refused at the handshake, or open."""
    from chats.routing import websocket_urlpatterns

    path = f"/chat/stream?id={ask.chat_id or uuid.uuid4()}"
    communicator, refused = await _socket_open(URLRouter(websocket_urlpatterns), path, ask.sent())
    if refused is not None:
        return refused
    await communicator.disconnect()
    return Seen(101, None)


CHAT_QUERY = "query($id: ID!) { chat(id: $id) { id } }"
CHAT_EVENTS = "subscription($chatId: ID!) { chatEvents(chatId: $chatId) { type } }"


async def graphql_chat(ask: Ask) -> Seen:
    """GraphQL over HTTP: the `chat` query."""
    return await graphql_http(ask, CHAT_QUERY, {"id": str(ask.chat_id or uuid.uuid4())})


async def graphql_chat_events(ask: Ask) -> Seen:
    """GraphQL over its socket: the `chatEvents` subscription."""
    return await graphql_socket(ask, CHAT_EVENTS, {"chatId": str(ask.chat_id or uuid.uuid4())})


async def grpc_events(ask: Ask) -> Seen:
    """gRPC Chats.Events: its first event (or the status it ends with at once)."""
    from chats.grpc import ChatsServicer
    from protos.turbo.v1 import turbo_pb2

    request = turbo_pb2.EventsRequest(chat_id=str(ask.chat_id or uuid.uuid4()))
    events = ChatsServicer().Events(request, CallContext(grpc_metadata(ask.sent())))
    try:
        return await grpc_seen(asyncio.wait_for(anext(events), 2))
    finally:
        await events.aclose()


@dataclass(frozen=True, eq=False)  # one per front: compared and hashed by identity
class Front:
    """One front's adapter and how it spells an outcome: `carries` says whether a status, Turbo's code
    or a gRPC status reaches its client; `dialect` renames a code the front's own protocol names otherwise."""

    name: str
    call: Callable[[Ask], Awaitable[Seen]]
    carries: str  # "http" (status and code), "code" (code only), "grpc" (a gRPC status), "socket" (close codes)
    dialect: dict[str, str] = field(default_factory=dict)

    def __repr__(self) -> str:
        return self.name
