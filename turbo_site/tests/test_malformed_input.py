"""Malformed client input is a 400 with our error shape (an error frame on a WebSocket), never a 500.

Deeply nested JSON made Python's parser raise RecursionError; text the database or UTF-8 cannot hold
(NUL, lone surrogates) reached the database or the response encoder. Every body and frame a client
sends is parsed by turbo_site.core.parsers.client_json_loads, and text fields are StrictCharFields.
"""

import json

import pytest
from channels.testing import WebsocketCommunicator

from testing.inprocess import run_in_process

pytestmark = pytest.mark.django_db

DEEP = "[" * 5000 + "]" * 5000
DEEP_OBJECT = '{"a":' * 5000 + "1" + "}" * 5000
# The chat stream takes frames of at most 4096 bytes; 1,500 levels is still past Python's recursion limit.
DEEP_SMALL = "[" * 1500 + "]" * 1500


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def assert_turbo_error(response, status: int = 400) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] and error["message"]
    return error


JSON_ENDPOINTS = [
    ("/user/signup", False, "application/json"),  # DRF, before authentication
    ("/user/login", False, "application/x-www-form-urlencoded"),  # JSON under curl's default type
    ("/chat/create", True, "application/json"),  # DRF, authenticated
    ("/chat/prompt", True, "application/json"),  # a plain async view
    ("/api/conversations/create", True, "application/json"),
    ("/api/chat/1", True, "application/json"),
]


@pytest.mark.parametrize(
    "path, authenticated, content_type, body",
    [(*endpoint, DEEP_OBJECT) for endpoint in JSON_ENDPOINTS]
    # under the form type, only a body that starts with { is read as JSON
    + [(*endpoint, DEEP) for endpoint in JSON_ENDPOINTS if endpoint[2] == "application/json"],
)
def test_deeply_nested_json_is_a_400(client, signup, path, authenticated, content_type, body):
    headers = {"Content-Type": content_type}
    if authenticated:
        token, _, _ = signup()
        headers |= bearer(token)
        if path == "/api/chat/1":
            client.post("/api/conversations/create", json={"title": "t"}, headers=bearer(token))
    error = assert_turbo_error(client.post(path, content=body, headers=headers))
    assert error["code"] == "invalid_json"  # as /v1, /ws and GraphQL answer it (test_front_matrix.py)


@pytest.mark.parametrize("through_django", [False, True], ids=["fast", "django"])
def test_deeply_nested_json_to_the_proxy_is_a_400_that_never_reaches_the_upstream(
    client, signup, upstream, settings, through_django
):
    token, _, _ = signup()
    headers = {**bearer(token), "Content-Type": "application/json"}
    if through_django:
        settings.CORS_ALLOWED_ORIGINS = ["https://app.example.com"]
        headers["Origin"] = "https://app.example.com"
    response = client.post("/v1/chat/completions", content=DEEP_OBJECT, headers=headers)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert response.json()["error"]["code"] == "invalid_json"
    assert upstream.requests == []


@pytest.mark.parametrize("text", ["a\\u0000b", "\\ud800", "x\\udfffy"], ids=["nul", "high-surrogate", "low-surrogate"])
def test_conversation_message_with_nul_or_a_lone_surrogate_is_a_400(client, signup, upstream, text):
    token, _, _ = signup()
    client.post("/api/conversations/create", json={"title": "t"}, headers=bearer(token))
    response = client.post(
        "/api/chat/1", content=f'{{"message": "{text}"}}', headers={**bearer(token), "Content-Type": "application/json"}
    )
    error = assert_turbo_error(response)
    assert error["code"] == "invalid" and "message" in error["fields"]
    assert upstream.requests == []  # nothing was stored or sent to the model
    history = client.get("/api/conversations/history/1", headers=bearer(token)).json()
    assert history["messages"] == []


# JSON values kept as given (a chat's settings and program context, a response format, a prompt's client
# functions and tool results): a NUL or a lone surrogate anywhere in them, keys included, is a 400 on
# both databases, not a value SQLite keeps and Postgres's jsonb refuses, nor one no response can encode.
KEPT_JSON = {
    "settings": ("/chat/update", lambda text: {"settings": {"stop": [f"a{text}b"]}}),
    "settings-key": ("/chat/update", lambda text: {"settings": {f"k{text}": 1}}),
    "program-context": ("/chat/create", lambda text: {"program": "horoscope", "program_context": {"a": text}}),
    "chat-response-format": ("/chat/update", lambda text: {"response_format": schema_format(text)}),
    "prompt-response-format": ("/chat/prompt", lambda text: {"prompt": "hi", "response_format": schema_format(text)}),
    "prompt-tools": ("/chat/prompt", lambda text: {"prompt": "hi", "tools": [{"name": "f", "description": text}]}),
    "tool-results": ("/chat/prompt", lambda text: {"tool_results": [{"tool_call_id": "c", "content": {"a": text}}]}),
}


def schema_format(text: str) -> dict:
    schema = {"type": "object", "properties": {"a": {"type": "string", "description": text}}}
    return {"type": "json_schema", "json_schema": {"name": "n", "schema": schema}}


@pytest.mark.parametrize("text", ["\x00", "\ud800"], ids=["nul", "lone-surrogate"])
@pytest.mark.parametrize("where", KEPT_JSON.values(), ids=KEPT_JSON.keys())
def test_kept_json_with_nul_or_a_lone_surrogate_is_a_400(client, signup, upstream, where, text):
    token, _, _ = signup()
    chat = client.post("/chat/create", json={"name": "kept"}, headers=bearer(token)).json()
    path, body = where
    sent = {"name": "new", **body(text)} if path == "/chat/create" else {"id": chat["id"], **body(text)}
    response = client.post(
        path, content=json.dumps(sent), headers={**bearer(token), "Content-Type": "application/json"}
    )
    error = assert_turbo_error(response)
    assert "NUL" in error["message"] or "surrogate" in error["message"], error
    assert upstream.requests == []
    read = client.post("/chat/read", json={"id": chat["id"]}, headers=bearer(token)).json()
    assert (read["chat"]["settings"], read["messages"]) == ({}, [])  # nothing changed
    assert [listed["name"] for listed in client.get("/chat/index", headers=bearer(token)).json()["chats"]] == ["kept"]


async def ws_send_and_expect_error(socket: WebsocketCommunicator, frame: str) -> dict:
    await socket.send_to(text_data=frame)
    while True:
        reply = await socket.receive_json_from(timeout=10)
        if reply["type"] == "error":
            return reply


def over_the_socket(path: str, scenario) -> None:
    """`scenario(socket)` on a WebSocket to Turbo's whole ASGI app, in process (testing/inprocess.py): the
    consumer's database calls run on this thread's connection, inside the test's transaction."""

    async def run():
        from turbo_site.asgi import application

        socket = WebsocketCommunicator(application, path)
        connected, close_code = await socket.connect(timeout=10)
        assert connected, close_code
        try:
            await scenario(socket)
        finally:
            await socket.disconnect()

    run_in_process(run)


@pytest.mark.parametrize(
    "frame, code",
    [
        (DEEP, "invalid_json"),
        (json.dumps({"type": ["ping"], "request_id": "r1"}), "unknown_type"),
        (json.dumps({"type": {"ping": 1}, "request_id": "r1"}), "unknown_type"),
    ],
    ids=["deep", "type-list", "type-object"],
)
def test_rpc_socket_answers_malformed_frames_with_an_error_and_stays_open(signup, frame, code):
    token, _, _ = signup()

    async def scenario(socket):
        error = await ws_send_and_expect_error(socket, frame)
        assert error["error"]["code"] == code
        await socket.send_json_to({"type": "ping", "request_id": "p1"})
        assert await socket.receive_json_from(timeout=10) == {"type": "pong", "request_id": "p1", "data": {}}

    over_the_socket(f"/ws?token={token}", scenario)


def test_chat_stream_socket_answers_deep_json_with_an_error_and_stays_open(client, signup):
    token, _, _ = signup()
    chat = client.post("/chat/create", data={"name": "c"}, headers=bearer(token)).json()

    async def scenario(socket):
        error = await ws_send_and_expect_error(socket, DEEP_SMALL)
        assert error["message"]
        await socket.send_json_to({"type": "ping"})
        while (reply := await socket.receive_json_from(timeout=10))["type"] != "pong":
            assert reply["type"] != "error", reply

    over_the_socket(f"/chat/stream?id={chat['id']}&token={token}", scenario)


def test_nesting_a_real_request_needs_is_still_accepted(client, signup, upstream):
    token, _, _ = signup()
    schema = {"type": "string"}
    for _ in range(40):  # a tool's JSON schema, nested deeper than any real one
        schema = {"type": "object", "properties": {"inner": schema}}
    completion = {
        "model": "gpt-4o",
        "messages": [{"role": "user", "content": "hi"}],
        "tools": [{"type": "function", "function": {"name": "f", "parameters": schema}}],
    }
    response = client.post("/v1/chat/completions", json=completion, headers=bearer(token))
    assert response.status_code == 200, response.text
    assert upstream.requests[-1].json()["tools"][0]["function"]["parameters"] == schema


def test_client_json_reads_exactly_as_the_standard_parser_did():
    """The fast parser (orjson) or the standard one: the same values, the same refusals."""
    from turbo_site.core.parsers import client_json_loads

    same = [
        b'{"model": "m", "messages": [{"role": "user", "content": "h\\u00e9"}], "max_tokens": 5}',
        b'{"a": 1, "a": 2}',
        b'{"big": 123456789012345678901234567890, "neg": -98765432109876543210}',
        b'{"f": 1.5e300, "e": 1e999}',
        b'"\\ud800"',
        '{"u": "é"}'.encode("utf-16"),
        b"\xef\xbb\xbf{}",
        b' [1, 2.0, true, null, "x"] ',
    ]
    for raw in same:
        try:
            expected = json.loads(raw)
        except ValueError:
            expected = ValueError
        got = client_json_loads(raw)
        assert got == expected and type(got) is type(expected), raw
        if isinstance(expected, dict) and "big" in expected:
            assert type(got["big"]) is int and type(got["neg"]) is int
    for raw in (b"NaN", b"[Infinity]", b'{"a": -Infinity}', b"{", b"", b"\xff"):
        with pytest.raises(ValueError):
            client_json_loads(raw)
