"""Structured output in chats: a json_schema response_format per prompt or as the chat's default; the
reply validated, retried with the errors, parsed into `data`, or refused."""

import json

import pytest
from websockets.sync.client import connect

from chats.models import Chat, Message
from proxy.structured import RETRY_INSTRUCTION

pytestmark = pytest.mark.django_db

PERSON = {
    "type": "json_schema",
    "json_schema": {
        "name": "person",
        "strict": True,
        "schema": {
            "type": "object",
            "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
            "required": ["name", "age"],
            "additionalProperties": False,
        },
    },
}
ADA = {"name": "Ada", "age": 36}


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def chat(client, signup):
    token, _, _ = signup()
    created = client.post("/chat/create", json={"name": "structured"}, headers=bearer(token))
    assert created.status_code == 200, created.text
    return token, created.json()


def completions(upstream) -> list[dict]:
    return [json.loads(r.body) for r in upstream.requests if r.path == "/v1/chat/completions"]


def test_a_valid_reply_is_parsed_stored_and_read_back(client, chat, upstream):
    token, chat = chat
    response = client.post(
        "/chat/prompt",
        json={"id": chat["id"], "prompt": "echo: " + json.dumps(ADA), "response_format": PERSON},
        headers=bearer(token),
    )
    assert response.status_code == 200, response.text
    message = response.json()["message"]
    assert message["status"] == "complete" and message["data"] == ADA
    (sent,) = completions(upstream)
    assert sent["response_format"] == PERSON  # the default upstream supports json_schema natively
    read = client.get("/chat/read", params={"id": chat["id"]}, headers=bearer(token)).json()
    assert read["messages"][0]["data"] == ADA
    assert Message.objects.get(pk=message["id"]).data == ADA


@pytest.mark.django_db(transaction=True)  # a WebSocket member reads the streamed reply
def test_an_invalid_reply_is_asked_again_with_the_errors_and_members_see_it_replaced(
    client, turbo_server, chat, upstream
):
    token, chat = chat
    prompt = 'sequence: {"name": "Ada", "age": "old"} ||| ' + json.dumps(ADA)
    with connect(f"ws://127.0.0.1:{turbo_server.port}/chat/stream?id={chat['id']}&token={token}") as ws:
        response = client.post(
            "/chat/prompt",
            json={"id": chat["id"], "prompt": prompt, "response_format": PERSON, "stream": True},
            headers=bearer(token),
        )
        assert response.status_code == 200, response.text
        events = []
        while not events or events[-1]["partial"]:
            events.append(json.loads(ws.recv(timeout=15)))
    first, second = completions(upstream)
    feedback = second["messages"][-1]
    assert feedback["role"] == "user" and feedback["content"].startswith(RETRY_INSTRUCTION)
    assert "at $.age: 'old' is not of type 'integer'" in feedback["content"]
    assert second["messages"][-2] == {"role": "assistant", "content": '{"name": "Ada", "age": "old"}'}
    (retry,) = [event for event in events if event.get("retry")]
    assert retry["type"] == "message.delta" and retry["retry"]["attempt"] == 1
    assert retry["retry"]["errors"] == ["at $.age: 'old' is not of type 'integer'"]
    assert retry["message"]["reply"] == ""  # the failed attempt is gone from the reply
    final = events[-1]
    assert final["type"] == "message.completed"
    assert final["message"]["data"] == ADA and final["message"]["reply"] == json.dumps(ADA)


def test_a_reply_that_never_matches_is_refused_with_the_errors(client, chat, upstream, settings):
    settings.STRUCTURED_RETRIES = 1
    token, chat = chat
    response = client.post(
        "/chat/prompt",
        json={"id": chat["id"], "prompt": "echo: not json at all", "response_format": PERSON},
        headers=bearer(token),
    )
    assert response.status_code == 502, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_structured_output"
    assert error["errors"] == ["the reply is not valid JSON: Expecting value: line 1 column 1 (char 0)"]
    assert "not valid JSON" in error["message"]
    assert len(completions(upstream)) == 2  # the first try and one retry
    (message,) = Message.objects.filter(chat_id=chat["id"])
    assert message.status == "error" and message.data is None and "not valid JSON" in message.error


def test_a_schema_that_is_not_json_schema_is_a_400_storing_nothing(client, chat, upstream):
    token, chat = chat
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "required": "name"}}}
    response = client.post(
        "/chat/prompt", json={"id": chat["id"], "prompt": "hi", "response_format": bad}, headers=bearer(token)
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_response_format"
    assert "json_schema.schema.required" in error["message"] and "is not of type 'array'" in error["message"]
    no_type = client.post(
        "/chat/prompt",
        data={"id": chat["id"], "prompt": "hi", "response_format": '{"type": "xml"}'},  # a form sends JSON text
        headers=bearer(token),
    )
    assert no_type.status_code == 400 and "type must be one of" in no_type.json()["error"]["message"]
    assert not Message.objects.filter(chat_id=chat["id"]).exists()
    assert completions(upstream) == []


def test_the_chats_default_applies_until_a_prompt_says_otherwise(client, signup, upstream):
    token, _, _ = signup()
    refused = client.post(
        "/chat/create",
        json={"name": "bad", "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
        headers=bearer(token),
    )
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "invalid_response_format"
    assert not Chat.objects.filter(name="bad").exists()

    chat = client.post("/chat/create", json={"name": "people", "response_format": PERSON}, headers=bearer(token)).json()
    assert chat["response_format"] == PERSON
    message = client.post(
        "/chat/prompt", json={"id": chat["id"], "prompt": "echo: " + json.dumps(ADA)}, headers=bearer(token)
    ).json()["message"]
    assert message["data"] == ADA
    as_text = client.post(
        "/chat/prompt",
        json={"id": chat["id"], "prompt": "echo: just words", "response_format": {"type": "text"}},
        headers=bearer(token),
    ).json()["message"]
    assert as_text["status"] == "complete" and as_text["reply"] == "just words" and as_text["data"] is None

    updated = client.post("/chat/update", json={"id": chat["id"], "response_format": None}, headers=bearer(token))
    assert updated.status_code == 200 and updated.json()["response_format"] is None
    plain = client.post(
        "/chat/prompt", json={"id": chat["id"], "prompt": "echo: words again"}, headers=bearer(token)
    ).json()["message"]
    assert plain["data"] is None and plain["status"] == "complete"
    assert "response_format" not in completions(upstream)[-1]


@pytest.fixture
def plain_model(settings, tmp_path):
    """A public model `plain` whose deployment lacks native json_schema support (TURBO_CONFIG)."""
    from conftest import FAKE_HEADERS
    from proxy.gateway import health
    from testing.fake_upstream import FakeUpstream

    fake = FakeUpstream().start()
    health.forget()
    path = tmp_path / "turbo.yaml"
    path.write_text(
        "upstreams:\n"
        f"  - {{name: up, base_url: {fake.url}/v1, api_key: sk-up}}\n"
        "models:\n"
        "  - name: plain\n"
        "    deployments: [{upstream: up, model: llama}]\n"
        "    capabilities: [tools]\n"
    )
    settings.TURBO_CONFIG = str(path)
    settings.GATEWAY_HEALTH_SYNC_SECONDS = 0
    settings.PROXY_FORWARD_HEADERS = FAKE_HEADERS
    yield fake
    health.forget()
    fake.stop()


def test_a_chat_on_a_model_without_json_schema_gets_the_schema_as_instructions(client, signup, plain_model):
    token, _, _ = signup()
    chat = client.post(
        "/chat/create",
        json={"name": "mapped", "model": "plain", "system_prompt": "Be terse.", "response_format": PERSON},
        headers=bearer(token),
    ).json()
    prompt = "sequence: {} ||| " + json.dumps(ADA)
    response = client.post("/chat/prompt", json={"id": chat["id"], "prompt": prompt}, headers=bearer(token))
    assert response.status_code == 200, response.text
    assert response.json()["message"]["data"] == ADA
    first, second = completions(plain_model)
    for sent in (first, second):
        assert "response_format" not in sent and sent["model"] == "llama"
        system = sent["messages"][0]
        assert system["role"] == "system" and system["content"].startswith("Be terse.\n\nReply with only a JSON value")
        assert json.dumps(PERSON["json_schema"]["schema"], sort_keys=True) in system["content"]
    assert "'name' is a required property" in second["messages"][-1]["content"]
