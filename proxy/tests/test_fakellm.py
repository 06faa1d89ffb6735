"""proxy.fakellm, the stand-in `manage.py fakellm` serves (`make demo`), driven in process.

turbo_site/tests/test_first_run.py runs the command itself on a socket, through the openai SDK.
"""

import base64
import json
import struct

import httpx

from proxy import fakellm


def client() -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=fakellm.app), base_url="http://fake")


async def test_models_and_an_echoed_chat_completion():
    async with client() as fake:
        models = (await fake.get("/v1/models")).json()
        answer = await fake.post(
            "/v1/chat/completions",
            json={"model": "gpt-4o", "messages": [{"role": "user", "content": "echo: some words"}]},
        )
    assert [model["id"] for model in models["data"]] == list(fakellm.MODELS)
    assert answer.status_code == 200
    completion = answer.json()
    assert completion["object"] == "chat.completion" and completion["model"] == "gpt-4o"
    assert completion["choices"][0]["message"]["content"] == "some words"
    assert completion["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}


async def test_a_streamed_reply_ends_with_its_usage_when_asked_then_done():
    body = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi there"}]}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    async with client() as fake:
        answer = await fake.post("/v1/chat/completions", json=body)
    assert answer.headers["content-type"] == "text/event-stream"
    events = [event.removeprefix("data: ") for event in answer.text.split("\n\n") if event]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    text = "".join(chunk["choices"][0]["delta"].get("content") or "" for chunk in chunks if chunk["choices"])
    assert text == fakellm.DEFAULT_REPLY
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["prompt_tokens"] == 2
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"


async def test_embeddings_as_floats_and_as_base64_are_the_same_vector():
    async with client() as fake:
        floats = (await fake.post("/v1/embeddings", json={"input": ["a", "b c"]})).json()
        packed = (await fake.post("/v1/embeddings", json={"input": "a", "encoding_format": "base64"})).json()
    assert [item["index"] for item in floats["data"]] == [0, 1]
    assert floats["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
    vector = floats["data"][0]["embedding"]
    assert vector == fakellm.fake_embedding("a") and len(vector) == 8
    raw = base64.b64decode(packed["data"][0]["embedding"])
    assert list(struct.unpack(f"<{len(raw) // 4}f", raw)) == vector


async def test_bad_input_and_unknown_paths_are_json_errors():
    async with client() as fake:
        not_json = await fake.post("/v1/chat/completions", content=b"{nope")
        no_messages = await fake.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": []})
        bad_input = await fake.post("/v1/embeddings", json={"input": 5})
        unknown = await fake.post("/v1/responses", json={"input": "hi"})
    assert (not_json.status_code, not_json.json()["error"]["code"]) == (400, "invalid_json")
    assert (no_messages.status_code, no_messages.json()["error"]["code"]) == (400, "invalid_messages")
    assert (bad_input.status_code, bad_input.json()["error"]["code"]) == (400, "invalid_input")
    assert (unknown.status_code, unknown.json()["error"]["code"]) == (404, "not_found")
