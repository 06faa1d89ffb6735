"""Structured output on /ws and `proxy.ai`, and instruction mapping for a deployment without native
json_schema support; /v1 stays a passthrough."""

import json
import textwrap
import time

import pytest

from conftest import FAKE_HEADERS
from proxy import ai
from proxy.gateway import health
from proxy.gateway.instructions import SCHEMA_INSTRUCTIONS
from proxy.structured import RETRY_INSTRUCTION, ResponseFormatInvalid, StructuredOutputError
from proxy.tests.test_ws_rpc import send, ws_run
from testing.fake_upstream import FakeUpstream

pytestmark = pytest.mark.django_db

SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "celsius": {"type": "number"}},
    "required": ["city", "celsius"],
}
WEATHER = {"type": "json_schema", "json_schema": {"name": "weather", "schema": SCHEMA}}
GOOD = {"city": "Oslo", "celsius": -3}
INSTRUCTION_START = SCHEMA_INSTRUCTIONS.split("{name}")[0]


@pytest.fixture
def rpc(signup, upstream):
    """rpc(scenario): `await scenario(ws)` on /ws for a new user, in process in the test's transaction."""
    token, _, _ = signup()
    return lambda scenario: ws_run(token, scenario)


async def frames_until(ws, request_id: str, last: str) -> list[dict]:
    frames: list[dict] = []
    while not frames or frames[-1]["type"] not in (last, "error"):
        frame = json.loads(await ws.receive_from(timeout=15))
        if frame.get("request_id") == request_id:
            frames.append(frame)
    return frames


def asking(text: str, **extra) -> dict:
    return {"messages": [{"role": "user", "content": text}], "model": "gpt-4o-mini", **extra}


def completions(fake) -> list[dict]:
    return [json.loads(r.body) for r in fake.requests if r.path == "/v1/chat/completions"]


# --- /ws ------------------------------------------------------------------------------------------------


def test_ws_chat_completion_returns_the_parsed_reply(rpc, upstream):
    async def scenario(ws):
        await send(ws, "chat_completion", "c1", asking("echo: " + json.dumps(GOOD), response_format=WEATHER))
        return await frames_until(ws, "c1", "chat_completion")

    (frame,) = rpc(scenario)
    message = frame["data"]["choices"][0]["message"]
    assert frame["type"] == "chat_completion" and message["parsed"] == GOOD
    assert json.loads(message["content"]) == GOOD
    (sent,) = completions(upstream)
    assert sent["response_format"] == WEATHER


def test_ws_retries_with_the_errors_then_refuses(rpc, upstream, settings):
    async def scenario(ws):
        await send(
            ws,
            "chat_completion",
            "c1",
            asking('sequence: {"city": "Oslo"} ||| ' + json.dumps(GOOD), response_format=WEATHER),
        )
        (frame,) = await frames_until(ws, "c1", "chat_completion")
        assert frame["data"]["choices"][0]["message"]["parsed"] == GOOD
        _, retried = completions(upstream)
        assert retried["messages"][-1]["content"].startswith(RETRY_INSTRUCTION)
        assert "'celsius' is a required property" in retried["messages"][-1]["content"]

        settings.STRUCTURED_RETRIES = 0
        await send(ws, "chat_completion", "c2", asking('echo: {"city": 5, "celsius": 1}', response_format=WEATHER))
        return await frames_until(ws, "c2", "chat_completion")

    (error,) = rpc(scenario)
    assert error["type"] == "error" and error["error"]["code"] == "invalid_structured_output"
    assert "at $.city: 5 is not of type 'string'" in error["error"]["message"]
    assert len(completions(upstream)) == 3  # no retry with STRUCTURED_RETRIES=0


def test_ws_stream_shows_a_retry_then_the_parsed_reply(rpc, upstream):
    async def scenario(ws):
        ask = asking("sequence: nope ||| " + json.dumps(GOOD), response_format=WEATHER)
        await send(ws, "chat_completion_stream", "s1", ask)
        return await frames_until(ws, "s1", "chat_completion_done")

    frames = rpc(scenario)
    kinds = [frame["type"] for frame in frames]
    assert kinds.count("chat_completion_retry") == 1
    retry = frames[kinds.index("chat_completion_retry")]["data"]
    assert retry["attempt"] == 1 and retry["errors"][0].startswith("the reply is not valid JSON")
    done = frames[-1]["data"]
    assert done["parsed"] == GOOD and json.loads(done["content"]) == GOOD


def test_ws_refuses_a_bad_schema_without_calling_the_model(rpc, upstream):
    bad = {"type": "json_schema", "json_schema": {"name": "w", "schema": {"type": "object", "minProperties": -1}}}

    async def scenario(ws):
        await send(ws, "chat_completion", "c1", asking("hi", response_format=bad))
        return await frames_until(ws, "c1", "chat_completion")

    (error,) = rpc(scenario)
    assert error["type"] == "error" and error["error"]["code"] == "invalid_response_format"
    assert "json_schema.schema.minProperties" in error["error"]["message"]
    assert completions(upstream) == []


# --- proxy.ai -------------------------------------------------------------------------------------------


def test_ai_structured_returns_the_parsed_value(upstream):
    assert ai.structured("echo: " + json.dumps(GOOD), schema=SCHEMA) == GOOD
    assert ai.complete("echo: " + json.dumps(GOOD), response_format=WEATHER) == json.dumps(GOOD)
    with pytest.raises(StructuredOutputError) as refused:
        ai.structured("sequence: [1, 2]", schema=SCHEMA)  # the same wrong reply every time
    assert refused.value.status == 502 and refused.value.errors == ["at $: [1, 2] is not of type 'object'"]
    assert len(completions(upstream)) == 2 + 3  # the refused one was asked STRUCTURED_RETRIES (2) more times
    with pytest.raises(ResponseFormatInvalid, match="json_schema.schema.type"):
        ai.structured("hi", schema={"type": 12})


# --- instruction mapping ----------------------------------------------------------------------------------


@pytest.fixture
def fake():
    started = FakeUpstream().start()
    yield started
    started.stop()


@pytest.fixture
def configured(settings, tmp_path, fake):
    """Two public models on one fake upstream: `native` (json_schema supported) and `plain` (not)."""
    health.forget()
    path = tmp_path / f"turbo-{time.monotonic_ns()}.yaml"
    path.write_text(
        textwrap.dedent(f"""
        upstreams:
          - {{name: up, base_url: {fake.url}/v1, api_key: sk-up}}
        models:
          - name: native
            deployments: [{{upstream: up, model: gpt-4o}}]
          - name: plain
            deployments: [{{upstream: up, model: llama}}]
            capabilities: [tools]
          - name: auto
            router: {{candidates: [plain], pick: cheapest}}
        """)
    )
    settings.TURBO_CONFIG = str(path)
    settings.GATEWAY_HEALTH_SYNC_SECONDS = 0
    settings.PROXY_FORWARD_HEADERS = FAKE_HEADERS
    yield fake
    health.forget()


def test_a_deployment_without_json_schema_gets_the_schema_as_instructions(configured):
    reply = "echo: " + json.dumps(GOOD)
    assert ai.structured(reply, schema=SCHEMA, model="native", system="Be brief.") == GOOD
    assert ai.structured(reply, schema=SCHEMA, model="plain", system="Be brief.") == GOOD
    assert ai.structured(reply, schema=SCHEMA, model="auto") == GOOD  # a router need not find native support
    native, plain, routed = completions(configured)
    assert native["response_format"]["json_schema"]["schema"] == SCHEMA
    assert native["messages"][0] == {"role": "system", "content": "Be brief."}
    assert "response_format" not in plain and "response_format" not in routed
    system = plain["messages"][0]
    assert system["role"] == "system" and system["content"].startswith("Be brief.\n\n" + INSTRUCTION_START)
    assert json.dumps(SCHEMA, sort_keys=True) in system["content"] and "'weather'" not in system["content"]
    assert routed["messages"][0]["content"].startswith(INSTRUCTION_START)  # a system message of its own


def test_instruction_mapped_replies_are_validated_and_retried_too(configured):
    value = ai.structured('sequence: ```json\n{"city": 1}\n``` ||| ' + json.dumps(GOOD), schema=SCHEMA, model="plain")
    assert value == GOOD
    first, second = completions(configured)
    assert "response_format" not in second and second["messages"][0]["content"].startswith(INSTRUCTION_START)
    assert "at $.city: 1 is not of type 'string'" in second["messages"][-1]["content"]


def test_v1_stays_a_passthrough(client, signup, configured):
    token, _, _ = signup()
    body = {"model": "plain", "messages": [{"role": "user", "content": "echo: not json"}], "response_format": WEATHER}
    response = client.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "not json"  # not validated
    (sent,) = completions(configured)
    assert sent["response_format"] == WEATHER and sent["messages"] == body["messages"]  # not mapped
