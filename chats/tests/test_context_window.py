"""A long chat on a model with a small window keeps answering: each prompt's context is cut by tokens to the
window the upstream's model listing gave, in chats and the conversations API alike."""

import json

import pytest

from chats.tests.test_conversations import sse_events
from proxy.gateway import health
from proxy.usage.tokens import count_messages

pytestmark = pytest.mark.django_db(transaction=True)

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
