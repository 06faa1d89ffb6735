"""The conversation API over real HTTP, against the fake upstream, in its own wire format."""

import json
import time

import pytest

from chats.models import Chat

pytestmark = pytest.mark.django_db


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def sse_events(text: str) -> list[tuple[str, str]]:
    """(event, data) pairs as an EventSource sees them: several `data:` lines join with a line break."""
    events = []
    for block in text.strip().split("\n\n"):
        name, data = None, []
        for line in block.splitlines():
            field, _, value = line.partition(": ")
            if field == "event":
                name = value
            elif field == "data":
                data.append(value)
        if name:
            events.append((name, "\n".join(data)))
    return events


def test_create_list_history_and_delete_speak_the_seeds_format(client, signup, upstream):
    token, _, _ = signup()
    before = int(time.time())
    created = client.post(
        "/api/conversations/create",
        json={"title": "My New Conversation", "model": "gpt-4o", "api_key": "sk-conversation-own-key-1234"},
        headers=bearer(token),
    )
    after = int(time.time())
    assert created.status_code == 200, created.text
    conversation = created.json()
    # the API's documented example with our values: same keys in the same order, an integer id and Unix seconds
    assert list(conversation) == ["conversation_id", "title", "model", "api_key", "created_time"]
    assert conversation["conversation_id"] == 1
    assert before <= conversation["created_time"] <= after and isinstance(conversation["created_time"], int)
    assert (
        created.content
        == json.dumps(
            {
                "conversation_id": 1,
                "title": "My New Conversation",
                "model": "gpt-4o",
                "api_key": "sk-…1234",  # masked, never echoed in full
                "created_time": conversation["created_time"],
            },
            ensure_ascii=False,
            separators=(",", ":"),
        ).encode()
    )
    stored = Chat.objects.get(number=1, name="My New Conversation")
    assert "own-key" not in stored.api_key_encrypted
    second = client.post("/api/conversations/create", json={"title": "Another Conversation"}, headers=bearer(token))
    assert second.json()["conversation_id"] == 2 and second.json()["api_key"] == ""

    listed = client.get("/api/conversations/list", headers=bearer(token))
    assert listed.json() == [
        {"conversation_id": 2, "title": "Another Conversation", "created_time": second.json()["created_time"]},
        {"conversation_id": 1, "title": "My New Conversation", "created_time": conversation["created_time"]},
    ]
    assert [list(item) for item in listed.json()] == [["conversation_id", "title", "created_time"]] * 2

    client.post("/api/chat/1", json={"message": "echo: Rust es un lenguaje"}, headers=bearer(token))
    history = client.get("/api/conversations/history/1", headers=bearer(token))
    assert history.status_code == 200
    assert list(history.json()) == ["conversation_id", "title", "model", "messages", "created_time"]
    assert history.json() == {
        "conversation_id": 1,
        "title": "My New Conversation",
        "model": "gpt-4o",
        "messages": [
            {"role": "user", "content": "echo: Rust es un lenguaje", "message_id": 1},
            {"role": "assistant", "content": "Rust es un lenguaje", "message_id": 2},
        ],
        "created_time": conversation["created_time"],
    }

    deleted = client.post("/api/conversations/del/1", headers=bearer(token))
    assert deleted.content == b'{"message":"Conversation deleted successfully"}'
    assert [c["conversation_id"] for c in client.get("/api/conversations/list", headers=bearer(token)).json()] == [2]
    assert client.get("/api/conversations/history/1", headers=bearer(token)).status_code == 404


def test_chat_streams_raw_text_byte_for_byte(client, signup, upstream):
    token, _, _ = signup()
    number = client.post(
        "/api/conversations/create",
        json={"title": "Trip", "model": "gpt-4o", "api_key": "sk-conversation-own-key-1234"},
        headers=bearer(token),
    ).json()["conversation_id"]

    # the API's documented curl example: POST /api/chat/329629 (no trailing slash), and the Go router's /api/chat/:id/
    for path in (f"/api/chat/{number}", f"/api/chat/{number}/"):
        reply = client.post(path, json={"message": 'echo: Rust "is" fast'}, headers=bearer(token))
        assert reply.status_code == 200, reply.text
        assert reply.headers["content-type"].startswith("text/event-stream")
        assert reply.content == (
            b"event: message\ndata: Rust \n\n"
            b'event: message\ndata: "is" \n\n'
            b"event: message\ndata: fast\n\n"
            b"event: done\ndata: Stream finished\n\n"
            b'event: full_response\ndata: Rust "is" fast\n\n'
        )
    # the conversation's own key was used upstream, not the server's
    assert upstream.requests[-1].headers["authorization"] == "Bearer sk-conversation-own-key-1234"


def test_a_line_break_in_the_reply_continues_on_another_data_line(client, signup, upstream):
    token, _, _ = signup()
    number = client.post("/api/conversations/create", json={"title": "x"}, headers=bearer(token)).json()
    reply = client.post(
        f"/api/chat/{number['conversation_id']}", json={"message": "echo: one\ntwo"}, headers=bearer(token)
    )
    assert reply.content.endswith(b"event: full_response\ndata: one\ndata: two\n\n")
    assert sse_events(reply.text)[-1] == ("full_response", "one\ntwo")
    assert "".join(data for name, data in sse_events(reply.text) if name == "message") == "one\ntwo"


def test_numbers_are_per_owner_and_others_conversations_are_404(client, signup, upstream):
    owner, _, _ = signup()
    other, _, _ = signup()
    mine = client.post("/api/conversations/create", json={"title": "Mine"}, headers=bearer(owner)).json()
    theirs = client.post("/api/conversations/create", json={"title": "Theirs"}, headers=bearer(other)).json()
    assert mine["conversation_id"] == theirs["conversation_id"] == 1
    client.post("/api/conversations/del/1", headers=bearer(other))  # deletes only the other's own
    assert client.get("/api/conversations/history/1", headers=bearer(owner)).json()["title"] == "Mine"
    assert client.get("/api/conversations/history/1", headers=bearer(other)).status_code == 404
    assert client.post("/api/conversations/del/1", headers=bearer(other)).status_code == 404
    assert client.post("/api/chat/1", json={"message": "hi"}, headers=bearer(other)).status_code == 404
    assert Chat.objects.filter(name="Mine", number=1).exists()
    assert upstream.requests == []
    # each owner counts on from their own highest number
    another = client.post("/api/conversations/create", json={"title": "More"}, headers=bearer(owner)).json()
    assert another["conversation_id"] == 2


def test_chat_failure_ends_with_an_error_event(client, signup, upstream, settings):
    token, _, _ = signup()
    cid = client.post("/api/conversations/create", json={"title": "x"}, headers=bearer(token)).json()["conversation_id"]
    settings.OPENAI_API_URL = "http://127.0.0.1:9/v1"
    events = sse_events(client.post(f"/api/chat/{cid}", json={"message": "hello"}, headers=bearer(token)).text)
    assert [name for name, _ in events] == ["error", "done", "full_response"]
    assert json.loads(events[0][1])["error"]["code"] == "upstream_unreachable"  # the outcome code, as on every front
    assert events[1] == ("done", "Stream finished")


def test_bad_input(client, signup):
    token, _, _ = signup()
    assert client.post("/api/conversations/create", json={}, headers=bearer(token)).status_code == 400
    cid = client.post("/api/conversations/create", json={"title": "x"}, headers=bearer(token)).json()["conversation_id"]
    assert client.post(f"/api/chat/{cid}", json={"message": ""}, headers=bearer(token)).status_code == 400
    assert client.post(f"/api/chat/{cid}", json={}, headers=bearer(token)).status_code == 400
    assert client.get("/api/conversations/list").status_code == 401
    assert client.post("/api/chat/999999", json={"message": "hi"}, headers=bearer(token)).status_code == 404
