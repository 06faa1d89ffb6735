"""The fake OpenAI upstream behaves like the real API for real clients (httpx and the official SDK) over a socket."""

import json
import threading
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from testing.fake_upstream import DEFAULT_REPLY, FakeUpstream, fake_embedding


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeUpstream]:
    with FakeUpstream() as upstream:
        yield upstream


@pytest.fixture(autouse=True)
def _fresh(fake: FakeUpstream) -> None:
    fake.reset()


@pytest.fixture
def http(fake: FakeUpstream) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=fake.url, timeout=10) as client:
        yield client


@pytest.fixture
def sdk(fake: FakeUpstream) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=fake.url + "/v1", api_key="sk-test", max_retries=0) as client:
        yield client


def chat(content: str = "hi", **extra) -> dict:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": content}], **extra}


def scenario(name: str, **knobs: str) -> dict[str, str]:
    return {"x-fake-scenario": name, **{f"x-fake-{key.replace('_', '-')}": value for key, value in knobs.items()}}


def events(lines: Iterator[str] | list[str]) -> list[dict | str]:
    """The SSE `data:` payloads among `lines`, JSON-decoded except the final `[DONE]`."""
    found: list[dict | str] = []
    for line in lines:
        if line.startswith("data: "):
            data = line.removeprefix("data: ")
            found.append(data if data == "[DONE]" else json.loads(data))
    return found


def content_of(chunks: list[dict | str]) -> str:
    return "".join(
        chunk["choices"][0]["delta"].get("content") or ""
        for chunk in chunks
        if isinstance(chunk, dict) and chunk["choices"]
    )


def in_background(work) -> tuple[threading.Event, list]:
    """Run `work()` in a thread; returns (done, [its result, or the exception it raised])."""
    done, result = threading.Event(), []

    def run() -> None:
        try:
            result.append(work())
        except Exception as exc:
            result.append(exc)
        finally:
            done.set()

    threading.Thread(target=run, daemon=True).start()
    return done, result


# --- plain routes over httpx ---------------------------------------------------------------------------------------


def test_models_list_with_openai_headers(http):
    response = http.get("/v1/models")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.headers["x-request-id"].startswith("req_")
    assert response.headers["openai-processing-ms"] == "1"
    assert response.headers["x-ratelimit-remaining-requests"] == "99"
    body = response.json()
    assert body["object"] == "list"
    assert [model["id"] for model in body["data"]] == ["gpt-4o-mini", "gpt-4o"]
    assert all(model["object"] == "model" and model["owned_by"] == "fake" for model in body["data"])
    assert http.get("/v1/models").headers["x-request-id"] != response.headers["x-request-id"]


def test_requests_are_recorded(fake, http):
    http.post(
        "/v1/chat/completions?trace=1&x=y",
        content=json.dumps(chat("hello there")),
        headers=[("Content-Type", "application/json"), ("X-Dup", "first"), ("X-Dup", "second")],
    )
    (recorded,) = fake.requests
    assert (recorded.method, recorded.path, recorded.query) == ("POST", "/v1/chat/completions", "trace=1&x=y")
    assert recorded.headers["content-type"] == "application/json"
    assert recorded.headers["x-dup"] == "second"
    assert recorded.json() == chat("hello there")
    assert recorded.aborted is False
    assert fake.wait_for_abort(timeout=0.1) is False


def test_chat_completion(fake, http):
    response = http.post("/v1/chat/completions", json=chat("say something nice", model="gpt-4o"))
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    assert body["model"] == "gpt-4o"
    (choice,) = body["choices"]
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == DEFAULT_REPLY
    assert choice["finish_reason"] == "stop"
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}


def test_chat_completion_echo_counts_words_in_all_messages(http):
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "echo: one two three"}]},
    ]
    body = http.post("/v1/chat/completions", json={"model": "m", "messages": messages}).json()
    assert body["choices"][0]["message"]["content"] == "one two three"
    assert body["usage"] == {"prompt_tokens": 6, "completion_tokens": 3, "total_tokens": 9}


def test_chat_completion_rejects_bad_input(http):
    response = http.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert http.post("/v1/chat/completions", json={"model": "m"}).status_code == 400


def test_streamed_chunks_arrive_separately(http):
    body = chat("echo: one two three", stream=True, stream_options={"include_usage": True})
    arrivals: list[tuple[float, str]] = []
    with http.stream("POST", "/v1/chat/completions", json=body, headers={"x-fake-chunk-delay": "0.05"}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/event-stream"
        assert response.headers["x-request-id"].startswith("req_")
        for line in response.iter_lines():
            if line:
                arrivals.append((time.monotonic(), line))
    chunks = events(line for _, line in arrivals)
    assert chunks[-1] == "[DONE]"
    first, *words, finish, usage, _ = chunks
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [chunk["choices"][0]["delta"]["content"] for chunk in words] == ["one ", "two ", "three"]
    assert all(chunk["object"] == "chat.completion.chunk" and chunk["model"] == "gpt-4o-mini" for chunk in words)
    assert finish["choices"][0]["finish_reason"] == "stop"
    assert usage["choices"] == []
    assert usage["usage"] == {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7}
    gaps = [later - earlier for (earlier, _), (later, _) in zip(arrivals, arrivals[1:], strict=False)]
    # Streamed, not buffered: the events arrive spread over the ~300 ms the fake spends sending them (a loaded
    # machine may deliver two of them in one read, so most gaps, not every one, show the 50 ms delay).
    assert len(gaps) == 6 and sum(gap > 0.025 for gap in gaps) >= 4


def test_stream_without_usage_option(http):
    with http.stream("POST", "/v1/chat/completions", json=chat(stream=True)) as response:
        chunks = events(response.iter_lines())
    assert content_of(chunks) == DEFAULT_REPLY
    assert len(chunks) == 1 + 4 + 1 + 1  # role, four words, finish, [DONE]
    assert all("usage" not in chunk for chunk in chunks if isinstance(chunk, dict))


def test_embeddings(http):
    single = http.post("/v1/embeddings", json={"model": "text-embedding-3-small", "input": "hello world"}).json()
    assert single["object"] == "list"
    assert single["model"] == "text-embedding-3-small"
    assert single["usage"] == {"prompt_tokens": 2, "total_tokens": 2}
    (item,) = single["data"]
    assert item["object"] == "embedding" and item["index"] == 0
    assert len(item["embedding"]) == 8 and all(isinstance(value, float) for value in item["embedding"])

    batch = http.post("/v1/embeddings", json={"model": "e", "input": ["hello world", "other"]}).json()
    assert [entry["index"] for entry in batch["data"]] == [0, 1]
    assert batch["data"][0]["embedding"] == item["embedding"]  # deterministic
    assert batch["data"][1]["embedding"] != item["embedding"]
    assert batch["usage"]["prompt_tokens"] == 3
    assert http.post("/v1/embeddings", json={"model": "e", "input": [1, 2]}).status_code == 400


def test_file_upload_multipart(fake, http):
    content = b'{"a": 1}\r\n--not-a-boundary\n\x00\xff binary\r\n'
    response = http.post("/v1/files", files={"file": ("train.jsonl", content)}, data={"purpose": "fine-tune"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["id"].startswith("file-")
    assert body["object"] == "file"
    assert (body["bytes"], body["filename"], body["purpose"]) == (len(content), "train.jsonl", "fine-tune")
    assert fake.requests[-1].headers["content-type"].startswith("multipart/form-data; boundary=")


def test_file_upload_requires_a_file(http):
    assert http.post("/v1/files", data={"purpose": "fine-tune"}).status_code == 400
    assert http.post("/v1/files", json={"purpose": "fine-tune"}).status_code == 400


def test_unknown_path_is_openai_404(fake, http):
    for response in (http.get("/v1/nothing"), http.post("/v1/models"), http.get("/")):
        assert response.status_code == 404
        assert response.json()["error"] == {
            "message": "Unknown path",
            "type": "invalid_request_error",
            "param": None,
            "code": "not_found",
        }
    assert len(fake.requests) == 3


# --- scenarios -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "status", "kind", "code"),
    [
        ("error_400", 400, "invalid_request_error", "bad_thing"),
        ("error_429", 429, "rate_limit_exceeded", "rate_limit_exceeded"),
        ("error_500", 500, "server_error", "server_error"),
    ],
)
def test_error_scenarios(http, name, status, kind, code):
    for response in (
        http.post("/v1/chat/completions", json=chat(), headers=scenario(name)),
        http.post("/v1/chat/completions", json=chat(metadata={"scenario": name})),
        http.get("/v1/models", headers=scenario(name)),
    ):
        assert response.status_code == status
        assert response.headers["x-request-id"].startswith("req_")
        error = response.json()["error"]
        assert (error["type"], error["code"]) == (kind, code)
        assert error["message"]
        assert response.headers.get("retry-after") == ("7" if status == 429 else None)


def test_unknown_scenario_is_refused(http):
    response = http.get("/v1/models", headers=scenario("no_such_thing"))
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "unknown_scenario"


def test_slow_delays_the_headers(http):
    started = time.monotonic()
    response = http.get("/v1/models", headers=scenario("slow", delay="0.3"))
    assert response.status_code == 200
    assert time.monotonic() - started >= 0.3


def test_slow_request_abandoned_by_a_timeout_is_marked_aborted(fake, http):
    with pytest.raises(httpx.ReadTimeout):
        http.get("/v1/models", headers=scenario("slow"), timeout=0.2)
    assert fake.wait_for_abort()


def test_gated_stream_waits_for_release(fake, http):
    with http.stream("POST", "/v1/chat/completions", json=chat(stream=True), headers=scenario("gated")) as response:
        lines = response.iter_lines()
        head = []
        while not content_of(events(head)):
            head.append(next(lines))
        assert content_of(events(head)) == "Hello "

        done, rest = in_background(lambda: list(lines))
        assert not done.wait(0.3), "the stream went on without waiting for the gate"
        assert not response.is_closed
        fake.release()
        assert done.wait(5)
    chunks = events(head + rest[0])
    assert content_of(chunks) == DEFAULT_REPLY
    assert chunks[-1] == "[DONE]"
    assert fake.requests[-1].aborted is False


def test_gated_plain_request_waits_and_reset_closes_the_gate(fake, http):
    done, result = in_background(lambda: http.get("/v1/models", headers=scenario("gated")))
    assert not done.wait(0.3)
    fake.release()
    assert done.wait(5) and result[0].status_code == 200

    fake.reset()
    assert fake.requests == []
    done, result = in_background(lambda: http.get("/v1/models", headers=scenario("gated")))
    assert not done.wait(0.3), "reset() should have closed the gate again"
    fake.release()
    assert done.wait(5) and result[0].status_code == 200


def test_stall_then_client_disconnect_is_detected(fake, http):
    with http.stream("POST", "/v1/chat/completions", json=chat(stream=True), headers=scenario("stall")) as response:
        lines = response.iter_lines()  # kept referenced: a collected generator would close the connection
        first = next(lines)
        assert json.loads(first.removeprefix("data: "))["choices"][0]["delta"]["role"] == "assistant"
        assert not fake.wait_for_abort(timeout=0.3), "marked aborted while the client was still reading"
    assert fake.wait_for_abort()


def test_die_mid_stream_breaks_the_client(fake, http):
    received: list[str] = []
    with pytest.raises(httpx.RemoteProtocolError):
        with http.stream(
            "POST", "/v1/chat/completions", json=chat(stream=True), headers=scenario("die_mid_stream")
        ) as r:
            for line in r.iter_lines():
                received.append(line)
    chunks = events(received)
    assert len(chunks) == 3 and "[DONE]" not in chunks
    assert content_of(chunks) == "Hello from "


def test_die_mid_plain_response_breaks_the_client(http):
    with pytest.raises(httpx.RemoteProtocolError):
        http.post("/v1/chat/completions", json=chat(), headers=scenario("die_mid_stream"))


def test_tool_call_then_tool_result(http):
    headers = scenario("tool_call", tool="weather", tool_args='{"city": "Paris"}')
    body = http.post("/v1/chat/completions", json=chat("weather?"), headers=headers).json()
    (choice,) = body["choices"]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    assert choice["message"]["tool_calls"] == [
        {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}
    ]

    messages = [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": choice["message"]["tool_calls"]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    follow_up = http.post("/v1/chat/completions", json={"model": "m", "messages": messages}, headers=headers).json()
    assert follow_up["choices"][0]["message"]["content"] == "Tool said: sunny"
    assert follow_up["choices"][0]["finish_reason"] == "stop"


def test_streamed_tool_call(http):
    with http.stream(
        "POST", "/v1/chat/completions", json=chat(stream=True, metadata={"scenario": "tool_call"})
    ) as response:
        chunks = [chunk for chunk in events(response.iter_lines()) if chunk != "[DONE]"]
    calls = [call for chunk in chunks for call in chunk["choices"][0]["delta"].get("tool_calls") or []]
    assert calls[0]["id"] == "call_1" and calls[0]["function"]["name"] == "calculator"
    pieces = [call["function"]["arguments"] for call in calls]
    assert len([piece for piece in pieces if piece]) == 2
    assert "".join(pieces) == '{"expression": "2+2"}'
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_stop_drops_requests_still_in_flight():
    upstream = FakeUpstream().start()
    done, result = in_background(
        lambda: httpx.get(upstream.url + "/v1/models", headers=scenario("stall"), timeout=10).read()
    )
    while not upstream.requests:
        time.sleep(0.01)
    started = time.monotonic()
    upstream.stop()
    assert time.monotonic() - started < 5
    assert done.wait(5)
    assert isinstance(result[0], httpx.HTTPError)  # the client got an error, not a response


# --- the official SDK ----------------------------------------------------------------------------------------------


def test_sdk_models(fake, sdk):
    assert [model.id for model in sdk.models.list()] == ["gpt-4o-mini", "gpt-4o"]
    assert fake.requests[-1].headers["authorization"] == "Bearer sk-test"


def test_sdk_chat_completion(sdk):
    completion = sdk.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "echo: hi there"}])
    assert completion.model == "gpt-4o"
    assert completion.choices[0].message.content == "hi there"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None and completion.usage.total_tokens == 5


def test_sdk_chat_completion_stream(sdk):
    stream = sdk.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices) == DEFAULT_REPLY
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4


def test_sdk_embeddings(sdk):
    # The SDK asks for base64 by default and decodes it; an explicit float request gets the same numbers.
    default = sdk.embeddings.create(model="text-embedding-3-small", input=["a b", "c"])
    floats = sdk.embeddings.create(model="text-embedding-3-small", input=["a b", "c"], encoding_format="float")
    assert [item.embedding for item in default.data] == [fake_embedding("a b"), fake_embedding("c")]
    assert [item.embedding for item in floats.data] == [fake_embedding("a b"), fake_embedding("c")]
    assert default.usage.prompt_tokens == 3


def test_sdk_tool_call_and_errors(sdk):
    completion = sdk.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "2+2?"}], extra_headers=scenario("tool_call")
    )
    (call,) = completion.choices[0].message.tool_calls
    assert (call.id, call.function.name, call.function.arguments) == ("call_1", "calculator", '{"expression": "2+2"}')

    with pytest.raises(openai.RateLimitError) as caught:
        sdk.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "x"}], metadata={"scenario": "error_429"}
        )
    assert caught.value.code == "rate_limit_exceeded"
    with pytest.raises(openai.BadRequestError):
        sdk.models.list(extra_headers=scenario("error_400"))


def test_error_401_echo_quotes_the_key_it_was_sent(http):
    response = http.post(
        "/v1/chat/completions", json=chat(), headers={**scenario("error_401_echo"), "Authorization": "Bearer sk-abc123"}
    )
    assert response.status_code == 401
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("invalid_request_error", "invalid_api_key")
    assert "Incorrect API key provided: sk-abc123." in error["message"]
