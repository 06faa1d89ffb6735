"""An upstream's error text reaches users with keys taken out: the response, the stored message, streams."""

import json

import pytest

from conftest import SERVER_KEY

pytestmark = pytest.mark.django_db

ECHO = "[scenario:error_401_echo] hi"


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def test_a_key_the_upstream_quotes_is_redacted_from_the_prompt_reply_and_the_stored_message(client, signup, upstream):
    token, _, _ = signup()
    chat = client.post("/chat/create", data={"name": "keys"}, headers=bearer(token)).json()
    failed = client.post("/chat/prompt", data={"id": chat["id"], "prompt": ECHO}, headers=bearer(token))
    assert failed.status_code in (401, 502)
    assert upstream.requests[-1].headers["authorization"] == f"Bearer {SERVER_KEY}"  # the upstream saw it...
    assert "Incorrect API key provided" in failed.json()["error"]["message"]
    stored = client.post("/chat/read", data={"id": chat["id"]}, headers=bearer(token))
    assert stored.status_code == 200
    for body in (failed.text, stored.text):
        assert SERVER_KEY not in body and "sk-" not in body  # ...and no one reads it back
    assert "[redacted]" in json.dumps(stored.json())


def test_a_key_the_upstream_quotes_is_redacted_from_the_conversations_error_event(client, signup, upstream):
    token, _, _ = signup()
    conversation = client.post("/api/conversations/create", data={"title": "t"}, headers=bearer(token)).json()
    url = f"/api/chat/{conversation['conversation_id']}"
    with client.stream("POST", url, data={"message": ECHO}, headers=bearer(token)) as response:
        body = "".join(response.iter_text())
    assert upstream.requests[-1].headers["authorization"] == f"Bearer {SERVER_KEY}"
    assert "event: error" in body and "Incorrect API key provided: [redacted]" in body
    assert SERVER_KEY not in body and "sk-" not in body
