"""A long chat on a model with a small window keeps answering: each prompt's context is cut by tokens to the
window the upstream's model listing gave, in chats and the conversations API alike."""

import json

import pytest

from chats.tests.test_conversations import sse_events
from proxy.gateway import health
from proxy.usage.tokens import count_messages

pytestmark = pytest.mark.django_db

WINDOW = 800


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def small_model(upstream):
    """The fake upstream's /v1/models says its models take WINDOW tokens (as vLLM says it)."""
    health.forget()
    upstream.max_model_len = WINDOW
    yield upstream
    health.forget()  # no later test inherits the learned window


def chat_bodies(upstream) -> list[dict]:
    return [json.loads(r.body) for r in upstream.requests if r.path == "/v1/chat/completions"]


def test_a_conversation_of_long_exchanges_keeps_answering_within_the_window(client, signup, small_model):
    token, _, _ = signup()
    conversation = client.post("/api/conversations/create", data={"title": "long"}, headers=bearer(token)).json()
    url = f"/api/chat/{conversation['conversation_id']}"
    for number in range(6):
        text = f"echo: exchange {number} " + "word " * 60
        reply = client.post(url, json={"message": text}, headers=bearer(token))
        assert sse_events(reply.text)[-1] == ("full_response", text.removeprefix("echo: ").strip())
    sent = chat_bodies(small_model)
    assert len(sent) == 6
    last = sent[-1]
    assert last["messages"][-1]["content"].startswith("echo: exchange 5")
    assert 1 < len(last["messages"]) < 11  # some earlier exchanges, not all five
    assert last["messages"][-3]["content"].startswith("echo: exchange 4")  # the newest ones stay
    assert count_messages(last["messages"]) + last["max_tokens"] <= WINDOW
    assert [r.path for r in small_model.requests].count("/v1/models") == 1


def test_a_prompt_that_cannot_fit_is_refused_before_any_model_call(client, signup, small_model):
    token, _, _ = signup()
    chat = client.post("/chat/create", data={"name": "small", "model": "gpt-4o-mini"}, headers=bearer(token)).json()
    refused = client.post("/chat/prompt", data={"id": chat["id"], "prompt": "word " * 2000}, headers=bearer(token))
    assert refused.status_code == 400
    assert refused.json()["error"]["code"] == "context_length_exceeded"
    assert chat_bodies(small_model) == []


@pytest.fixture
def llama_like(upstream):
    """The fake upstream as llama-cpp-python's server with a 200-token window its listing does not say."""
    health.forget()
    upstream.n_ctx = 200
    yield upstream
    health.forget()


def test_a_long_chat_on_a_server_whose_listing_says_no_window_keeps_answering(client, signup, llama_like):
    """An empty stream for a prompt that does not fit is asked again unstreamed, whose refusal teaches the
    window; the prompt is cut and sent again, and every later one fits from the start."""
    upstream = llama_like
    token, _, _ = signup()
    chat = client.post("/chat/create", data={"name": "llama", "model": "gpt-4o-mini"}, headers=bearer(token)).json()
    for number in range(4):
        text = f"echo: exchange {number} " + "word " * 80
        answered = client.post("/chat/prompt", data={"id": chat["id"], "prompt": text}, headers=bearer(token))
        assert answered.status_code == 200, answered.text
        message = answered.json()["message"]
        assert message["status"] == "complete" and message["reply"] == text.removeprefix("echo: ").strip()
    sent = chat_bodies(upstream)
    assert [body.get("stream") for body in sent] == [True, True, None, True, True, True]
    assert sent[2]["max_tokens"] == 1  # the unstreamed question after the empty stream
    assert len(sent[1]["messages"]) == 3 and len(sent[3]["messages"]) == 1  # exchange 0 no longer fits
    for body in sent[3:]:
        assert body["messages"][-1]["content"].startswith("echo: exchange")
        assert count_messages(body["messages"]) + body["max_tokens"] <= 200
    assert not health.is_cooling("default")


def test_a_program_of_long_exchanges_keeps_answering_within_the_window(client, signup, small_model, settings):
    settings.CHAT_PROGRAMS = ["looper=chats.tests.programs_for_tests:looper"]
    token, _, _ = signup()
    created = client.post("/chat/create", json={"name": "loop", "program": "looper"}, headers=bearer(token))
    assert created.status_code == 200, created.text
    chat = created.json()
    for number in range(6):
        text = f"echo: exchange {number} " + "word " * 60
        answered = client.post("/chat/prompt", data={"id": chat["id"], "prompt": text}, headers=bearer(token))
        assert answered.status_code == 200, answered.text
        reply = answered.json()["message"]["reply"]  # the model's answer, then the program's next question
        assert reply.startswith(text.removeprefix("echo: ").strip()) and reply.endswith("Say something")
    last = chat_bodies(small_model)[-1]
    assert last["messages"][0] == {"role": "system", "content": "You repeat after the user."}  # kept
    assert last["messages"][-1]["content"].startswith("echo: exchange 5")
    assert 2 < len(last["messages"]) < 12  # the program remembers all five earlier exchanges; some are cut
    assert count_messages(last["messages"]) + last["max_tokens"] <= WINDOW
