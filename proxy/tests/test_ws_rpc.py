"""/ws: RPC requests multiplexed on one authenticated WebSocket, against a fake upstream.

Each test's frames go through Channels' WebsocketCommunicator to Turbo's whole ASGI app in process, in
the test's transaction (`rpc`: the test's scenario runs on an event loop of asgiref's, and the app's
ORM calls on the test's own connection); the handshake's refusals, which a client sees as HTTP
statuses, are read by a real client over the live server's socket.
"""

import asyncio
import json

import pytest
from channels.testing import WebsocketCommunicator
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from testing.inprocess import run_in_process

pytestmark = pytest.mark.django_db


def ws_run(token: str, scenario):
    """`await scenario(ws)` on a /ws connection for `token` served in process; returns what it returns.
    Called from a sync test, so that the app's thread-sensitive calls run on the test's thread."""

    async def run():
        from turbo_site.asgi import application

        ws = WebsocketCommunicator(application, f"/ws?token={token}")
        ws.scope["client"] = ("127.0.0.1", 40000)  # as a server would say
        connected, code = await ws.connect(timeout=10)
        assert connected, f"the handshake was refused ({code})"
        try:
            return await scenario(ws)
        finally:
            await ws.disconnect()

    return run_in_process(run)


@pytest.fixture
def rpc(signup, upstream):
    """rpc(scenario): runs `await scenario(ws)` on a /ws connection of a new user (ws_run)."""
    token, _, _ = signup()
    return lambda scenario: ws_run(token, scenario)


async def send(ws, kind: str, request_id, payload=None) -> None:
    frame = {"type": kind, "request_id": request_id, "payload": payload if payload is not None else {}}
    await ws.send_to(text_data=json.dumps(frame))


async def recv(ws) -> dict:
    return json.loads(await ws.receive_from(timeout=15))


async def recv_for(ws, request_id: str, until: str) -> list[dict]:
    frames = []
    while not frames or frames[-1]["type"] not in (until, "error"):
        frame = await recv(ws)
        if frame["request_id"] == request_id:
            frames.append(frame)
    return frames


def user(text: str) -> dict:
    return {"messages": [{"role": "user", "content": text}], "model": "gpt-4o-mini"}


def test_ping(rpc):
    async def scenario(ws):
        await send(ws, "ping", "p1")
        assert await recv(ws) == {"type": "pong", "request_id": "p1", "data": {}}

    rpc(scenario)


def test_chat_completion(rpc, upstream):
    async def scenario(ws):
        await send(ws, "chat_completion", "c1", {**user("echo: hello there"), "max_tokens": 20, "temperature": 0.2})
        return await recv(ws)

    frame = rpc(scenario)
    assert frame["type"] == "chat_completion" and frame["request_id"] == "c1"
    assert frame["data"]["choices"][0]["message"]["content"] == "hello there"
    sent = json.loads(upstream.requests[-1].body)
    assert sent["max_tokens"] == 20 and sent["temperature"] == 0.2


def test_chat_completion_stream_chunks_then_done(rpc):
    async def scenario(ws):
        await send(ws, "chat_completion_stream", "s1", user("echo: one two three"))
        return await recv_for(ws, "s1", "chat_completion_done")

    frames = rpc(scenario)
    assert {f["type"] for f in frames[:-1]} == {"chat_completion_chunk"}
    done = frames[-1]["data"]
    assert done["content"] == "one two three"
    assert done["usage"]["completion_tokens"] == 3


def test_embedding(rpc):
    async def scenario(ws):
        await send(ws, "embedding", "e1", {"input": ["a", "b"], "model": "text-embedding-3-small"})
        return await recv(ws)

    frame = rpc(scenario)
    assert frame["type"] == "embedding" and len(frame["data"]["data"]) == 2


def test_tools_list_and_execute(rpc):
    call = {
        "id": "call_9",
        "type": "function",
        "function": {"name": "calculator", "arguments": '{"expression": "6*7"}'},
    }
    bad = {**call, "function": {"name": "calculator", "arguments": "{}"}}

    async def scenario(ws):
        await send(ws, "tools_list", "t1")
        names = {tool["name"] for tool in (await recv(ws))["data"]["tools"]}
        assert {"get_current_time", "calculator", "get_weather"} <= names
        await send(ws, "tool_execute", "t2", {"tool_call": call})
        result = (await recv(ws))["data"]
        assert result["tool_call_id"] == "call_9" and json.loads(result["content"])["result"] == 42
        await send(ws, "tool_execute", "t3", {"tool_call": bad})
        assert (await recv(ws))["data"]["is_error"] is True

    rpc(scenario)


def test_concurrent_requests_are_answered_as_they_finish(rpc, upstream):
    async def scenario(ws):
        await send(ws, "chat_completion_stream", "slow", user("[scenario:gated] echo: slow reply here"))
        await send(ws, "chat_completion", "fast", user("echo: quick"))
        await send(ws, "ping", "p")
        seen = []
        while "fast" not in seen or "p" not in seen:
            seen.append((await recv(ws))["request_id"])
        upstream.release()
        return await recv_for(ws, "slow", "chat_completion_done")

    frames = rpc(scenario)
    assert frames[-1]["data"]["content"] == "slow reply here"


def test_cancel_stops_an_in_flight_stream(rpc, upstream):
    async def scenario(ws):
        await send(ws, "chat_completion_stream", "s", user("[scenario:stall] echo: never ends"))
        assert (await recv(ws))["type"] == "chat_completion_chunk"
        await send(ws, "cancel", "s")
        assert await recv(ws) == {"type": "cancelled", "request_id": "s", "data": {}}
        assert await asyncio.to_thread(upstream.wait_for_abort, timeout=10)
        await send(ws, "ping", "after")
        assert (await recv(ws))["type"] == "pong"

    rpc(scenario)


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
def test_bad_frames_get_an_error_and_the_socket_stays_usable(rpc, raw, code):
    async def scenario(ws):
        await ws.send_to(text_data=raw)
        frame = await recv(ws)
        assert frame["type"] == "error" and frame["error"]["code"] == code, frame
        assert frame["error"]["message"]
        await send(ws, "ping", "still-there")
        assert (await recv(ws))["type"] == "pong"

    rpc(scenario)


def test_oversized_frame(rpc, settings):
    settings.WS_MAX_FRAME_BYTES = 1000

    async def scenario(ws):
        await send(ws, "chat_completion", "big", user("x" * 2000))
        return await recv(ws)

    assert rpc(scenario)["error"]["code"] == "frame_too_large"


def test_in_flight_cap(rpc, upstream, settings):
    settings.WS_MAX_IN_FLIGHT = 2

    async def scenario(ws):
        for n in range(2):
            await send(ws, "chat_completion_stream", f"g{n}", user("[scenario:gated] echo: wait"))
        await send(ws, "chat_completion", "third", user("echo: x"))
        # The gated streams' first chunks and the refusal arrive in any order.
        frames = [await recv(ws)]
        while frames[-1]["request_id"] != "third" and len(frames) < 10:
            frames.append(await recv(ws))
        upstream.release()
        return frames

    frames = rpc(scenario)
    refusal = frames[-1]
    assert refusal["request_id"] == "third" and refusal["error"]["code"] == "too_many_requests"
    assert all(f["type"] == "chat_completion_chunk" for f in frames[:-1]), frames


def test_upstream_failure_is_an_error_frame(rpc, settings):
    settings.OPENAI_API_URL = "http://127.0.0.1:9/v1"

    async def scenario(ws):
        await send(ws, "chat_completion", "down", user("hi"))
        return await recv(ws)

    frame = rpc(scenario)
    assert (
        frame["type"] == "error" and frame["error"]["code"] == "upstream_unreachable"
    )  # the same code as /v1 and every front


@pytest.mark.django_db(transaction=True)  # a real client's handshake over the live server's socket
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
        ok.send(json.dumps({"type": "ping", "request_id": "1", "payload": {}}))
        assert json.loads(ok.recv(timeout=15))["type"] == "pong"


WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


@pytest.mark.parametrize("kind", ["chat_completion", "chat_completion_stream"])
def test_seed_003_flat_tools_reach_the_upstream_in_openai_shape(rpc, upstream, kind):
    already_openai = {"type": "function", "function": {"name": "now", "parameters": {"type": "object"}}}

    async def scenario(ws):
        await send(ws, kind, "t1", {**user("echo: hi"), "tools": [WEATHER, already_openai], "tool_choice": "auto"})
        await recv_for(ws, "t1", "chat_completion_done" if kind.endswith("stream") else "chat_completion")

    rpc(scenario)
    sent = json.loads(upstream.requests[-1].body)
    assert sent["tools"] == [{"type": "function", "function": WEATHER}, already_openai]
    assert sent["tool_choice"] == "auto"
