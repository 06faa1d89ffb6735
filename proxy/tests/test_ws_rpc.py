"""/ws: RPC requests multiplexed on one authenticated WebSocket, with a real client and a fake upstream."""

import json

import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def ws(turbo_server, signup, upstream):
    token, _, _ = signup()
    with connect(f"ws://127.0.0.1:{turbo_server.port}/ws?token={token}", open_timeout=10) as socket:
        yield socket


def send(ws, kind: str, request_id, payload=None) -> None:
    ws.send(json.dumps({"type": kind, "request_id": request_id, "payload": payload if payload is not None else {}}))


def recv(ws) -> dict:
    return json.loads(ws.recv(timeout=15))


def recv_for(ws, request_id: str, until: str) -> list[dict]:
    frames = []
    while not frames or frames[-1]["type"] not in (until, "error"):
        frame = recv(ws)
        if frame["request_id"] == request_id:
            frames.append(frame)
    return frames


def user(text: str) -> dict:
    return {"messages": [{"role": "user", "content": text}], "model": "gpt-4o-mini"}


def test_ping(ws):
    send(ws, "ping", "p1")
    assert recv(ws) == {"type": "pong", "request_id": "p1", "data": {}}


def test_chat_completion(ws, upstream):
    send(ws, "chat_completion", "c1", {**user("echo: hello there"), "max_tokens": 20, "temperature": 0.2})
    frame = recv(ws)
    assert frame["type"] == "chat_completion" and frame["request_id"] == "c1"
    assert frame["data"]["choices"][0]["message"]["content"] == "hello there"
    sent = json.loads(upstream.requests[-1].body)
    assert sent["max_tokens"] == 20 and sent["temperature"] == 0.2


def test_chat_completion_stream_chunks_then_done(ws):
    send(ws, "chat_completion_stream", "s1", user("echo: one two three"))
    frames = recv_for(ws, "s1", "chat_completion_done")
    assert {f["type"] for f in frames[:-1]} == {"chat_completion_chunk"}
    done = frames[-1]["data"]
    assert done["content"] == "one two three"
    assert done["usage"]["completion_tokens"] == 3


def test_embedding(ws):
    send(ws, "embedding", "e1", {"input": ["a", "b"], "model": "text-embedding-3-small"})
    frame = recv(ws)
    assert frame["type"] == "embedding" and len(frame["data"]["data"]) == 2


def test_tools_list_and_execute(ws):
    send(ws, "tools_list", "t1")
    names = {tool["name"] for tool in recv(ws)["data"]["tools"]}
    assert {"get_current_time", "calculator", "get_weather"} <= names
    call = {
        "id": "call_9",
        "type": "function",
        "function": {"name": "calculator", "arguments": '{"expression": "6*7"}'},
    }
    send(ws, "tool_execute", "t2", {"tool_call": call})
    result = recv(ws)["data"]
    assert result["tool_call_id"] == "call_9" and json.loads(result["content"])["result"] == 42
    bad = {**call, "function": {"name": "calculator", "arguments": "{}"}}
    send(ws, "tool_execute", "t3", {"tool_call": bad})
    assert recv(ws)["data"]["is_error"] is True


def test_concurrent_requests_are_answered_as_they_finish(ws, upstream):
    send(ws, "chat_completion_stream", "slow", user("[scenario:gated] echo: slow reply here"))
    send(ws, "chat_completion", "fast", user("echo: quick"))
    send(ws, "ping", "p")
    seen = []
    while "fast" not in seen or "p" not in seen:
        seen.append(recv(ws)["request_id"])
    upstream.release()
    frames = recv_for(ws, "slow", "chat_completion_done")
    assert frames[-1]["data"]["content"] == "slow reply here"


def test_cancel_stops_an_in_flight_stream(ws, upstream):
    send(ws, "chat_completion_stream", "s", user("[scenario:stall] echo: never ends"))
    assert recv(ws)["type"] == "chat_completion_chunk"
    send(ws, "cancel", "s")
    assert recv(ws) == {"type": "cancelled", "request_id": "s", "data": {}}
    assert upstream.wait_for_abort(timeout=10)
    send(ws, "ping", "after")
    assert recv(ws)["type"] == "pong"


@pytest.mark.parametrize(
    "raw, code",
    [
        ("not json", "invalid_json"),
        ("[1, 2]", "invalid_frame"),
        (json.dumps({"type": "ping"}), "missing_request_id"),
        (json.dumps({"type": "ping", "request_id": 5}), "missing_request_id"),
        (json.dumps({"type": "teleport", "request_id": "x"}), "unknown_type"),
        (json.dumps({"type": "ping", "request_id": "x", "payload": [1]}), "invalid_payload"),
        (json.dumps({"type": "chat_completion", "request_id": "x", "payload": {"messages": "hi"}}), "invalid_payload"),
        (json.dumps({"type": "chat_completion", "request_id": "x", "payload": {"messages": []}}), "invalid_payload"),
        (
            json.dumps({"type": "chat_completion", "request_id": "x", "payload": {**user("hi"), "temperature": "hot"}}),
            "invalid_payload",
        ),
        (json.dumps({"type": "embedding", "request_id": "x", "payload": {"input": 5}}), "invalid_payload"),
        (json.dumps({"type": "cancel", "request_id": "nothing"}), "not_found"),
    ],
)
def test_bad_frames_get_an_error_and_the_socket_stays_usable(ws, raw, code):
    ws.send(raw)
    frame = recv(ws)
    assert frame["type"] == "error" and frame["error"]["code"] == code, frame
    assert frame["error"]["message"]
    send(ws, "ping", "still-there")
    assert recv(ws)["type"] == "pong"


def test_oversized_frame(ws, settings):
    settings.WS_MAX_FRAME_BYTES = 1000
    send(ws, "chat_completion", "big", user("x" * 2000))
    assert recv(ws)["error"]["code"] == "frame_too_large"


def test_in_flight_cap(ws, upstream, settings):
    settings.WS_MAX_IN_FLIGHT = 2
    for n in range(2):
        send(ws, "chat_completion_stream", f"g{n}", user("[scenario:gated] echo: wait"))
    send(ws, "chat_completion", "third", user("echo: x"))
    # The gated streams' first chunks and the refusal arrive in any order.
    frames = [recv(ws)]
    while frames[-1]["request_id"] != "third" and len(frames) < 10:
        frames.append(recv(ws))
    refusal = frames[-1]
    assert refusal["request_id"] == "third" and refusal["error"]["code"] == "too_many_requests"
    assert all(f["type"] == "chat_completion_chunk" for f in frames[:-1]), frames
    upstream.release()


def test_upstream_failure_is_an_error_frame(ws, settings):
    settings.OPENAI_API_URL = "http://127.0.0.1:9/v1"
    send(ws, "chat_completion", "down", user("hi"))
    frame = recv(ws)
    assert (
        frame["type"] == "error" and frame["error"]["code"] == "upstream_unreachable"
    )  # the same code as /v1 and every front


def test_handshake_needs_a_token_and_an_allowed_origin(turbo_server, signup):
    token, _, _ = signup()
    base = f"ws://127.0.0.1:{turbo_server.port}/ws"
    for url, headers in (
        (base, {}),
        (base + "?token=wrong", {}),
        (f"{base}?token={token}", {"Origin": "https://evil.example"}),
    ):
        with pytest.raises(InvalidStatus) as refused:
            connect(url, additional_headers=headers, open_timeout=10)
        assert refused.value.response.status_code == 403
    with connect(f"{base}?token={token}", additional_headers={"Origin": f"http://127.0.0.1:{turbo_server.port}"}) as ok:
        send(ok, "ping", "1")
        assert recv(ok)["type"] == "pong"


WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


@pytest.mark.parametrize("kind", ["chat_completion", "chat_completion_stream"])
def test_seed_003_flat_tools_reach_the_upstream_in_openai_shape(ws, upstream, kind):
    already_openai = {"type": "function", "function": {"name": "now", "parameters": {"type": "object"}}}
    send(ws, kind, "t1", {**user("echo: hi"), "tools": [WEATHER, already_openai], "tool_choice": "auto"})
    recv_for(ws, "t1", "chat_completion_done" if kind.endswith("stream") else "chat_completion")
    sent = json.loads(upstream.requests[-1].body)
    assert sent["tools"] == [{"type": "function", "function": WEATHER}, already_openai]
    assert sent["tool_choice"] == "auto"
