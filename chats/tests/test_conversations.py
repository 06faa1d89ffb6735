"""Seed 002's conversation API over real HTTP, against the fake upstream."""

import json

import pytest

from chats.models import Chat

pytestmark = pytest.mark.django_db(transaction=True)


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def sse_events(text: str) -> list[tuple[str, object]]:
    events = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if "event" in fields:
            events.append((fields["event"], json.loads(fields["data"])))
    return events


def test_conversation_lifecycle_with_streamed_chat(client, signup, upstream):
    token, _, _ = signup()
    created = client.post(
        "/api/conversations/create",
        json={"title": "Trip", "model": "gpt-4o", "api_key": "sk-conversation-own-key-1234"},
        headers=bearer(token),
    )
    assert created.status_code == 200, created.text
    conversation = created.json()
    assert conversation["title"] == "Trip" and conversation["model"] == "gpt-4o"
    assert conversation["api_key"] == "sk-…1234"
    assert "sk-conversation-own-key-1234" not in created.text
    stored = Chat.objects.get(pk=conversation["conversation_id"])
    assert "own-key" not in stored.api_key_encrypted

    reply = client.post(
        f"/api/chat/{conversation['conversation_id']}/", json={"message": "echo: hola que tal"}, headers=bearer(token)
    )
    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith("text/event-stream")
    events = sse_events(reply.text)
    names = [name for name, _ in events]
    assert names[-2:] == ["done", "full_response"]
    assert "".join(data for name, data in events if name == "message") == "hola que tal"
    assert events[-1][1] == "hola que tal"
    # the conversation's own key was used upstream, not the server's
    assert upstream.requests[-1].headers["authorization"] == "Bearer sk-conversation-own-key-1234"

    listed = client.get("/api/conversations/list", headers=bearer(token)).json()
    assert [c["conversation_id"] for c in listed] == [conversation["conversation_id"]]
    history = client.get(f"/api/conversations/history/{conversation['conversation_id']}", headers=bearer(token)).json()
    assert [(m["role"], m["content"]) for m in history["messages"]] == [
        ("user", "echo: hola que tal"),
        ("assistant", "hola que tal"),
    ]
    deleted = client.post(f"/api/conversations/del/{conversation['conversation_id']}", headers=bearer(token))
    assert deleted.json() == {"message": "Conversation deleted successfully"}
    assert client.get("/api/conversations/list", headers=bearer(token)).json() == []


def test_others_conversations_are_404(client, signup, upstream):
    owner, _, _ = signup()
    other, _, _ = signup()
    conversation = client.post("/api/conversations/create", json={"title": "Mine"}, headers=bearer(owner)).json()
    cid = conversation["conversation_id"]
    assert conversation["api_key"] is None
    assert client.get(f"/api/conversations/history/{cid}", headers=bearer(other)).status_code == 404
    assert client.post(f"/api/conversations/del/{cid}", headers=bearer(other)).status_code == 404
    assert client.post(f"/api/chat/{cid}", json={"message": "hi"}, headers=bearer(other)).status_code == 404
    assert Chat.objects.filter(pk=cid).exists()
    assert upstream.requests == []


def test_chat_failure_ends_with_an_error_event(client, signup, upstream, settings):
    token, _, _ = signup()
    cid = client.post("/api/conversations/create", json={"title": "x"}, headers=bearer(token)).json()["conversation_id"]
    settings.OPENAI_API_URL = "http://127.0.0.1:9/v1"
    events = sse_events(client.post(f"/api/chat/{cid}", json={"message": "hello"}, headers=bearer(token)).text)
    assert [name for name, _ in events] == ["error", "done", "full_response"]
    assert events[1][1]["status"] == "error"


def test_bad_input(client, signup):
    token, _, _ = signup()
    assert client.post("/api/conversations/create", json={}, headers=bearer(token)).status_code == 400
    cid = client.post("/api/conversations/create", json={"title": "x"}, headers=bearer(token)).json()["conversation_id"]
    assert client.post(f"/api/chat/{cid}", json={"message": ""}, headers=bearer(token)).status_code == 400
    assert client.post(f"/api/chat/{cid}", json={}, headers=bearer(token)).status_code == 400
    assert client.get("/api/conversations/list").status_code == 401
