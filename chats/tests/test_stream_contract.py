"""The live stream's contract over real connections: every event type on SSE, WebSocket and the
conversations API, WebSocket resume, message deletion, and streams ending when access or the session does."""

import gc
import json
import threading
import time

import httpx
import pytest
from django.conf import settings
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from chats.models import Message
from chats.stream import EVENT_TYPES
from chats.tests.test_stream import bearer, receive_until_final, ws_url

pytestmark = pytest.mark.django_db(transaction=True)


class SseListener:
    """An SSE subscriber in a thread: collects (id, data) until the stream ends."""

    def __init__(self, server, chat_id: str, token: str, last_event_id: int | None = None):
        self.frames: list[tuple[int | None, dict]] = []
        self.ready = threading.Event()
        self.ended = threading.Event()
        headers = bearer(token)
        if last_event_id is not None:
            headers["Last-Event-ID"] = str(last_event_id)
        self.thread = threading.Thread(target=self._run, args=(server.url, chat_id, headers), daemon=True)
        self.thread.start()
        assert self.ready.wait(10)

    def _run(self, url, chat_id, headers):
        try:
            with httpx.Client(base_url=url, timeout=30) as http:
                with http.stream("GET", "/chat/stream", params={"id": chat_id}, headers=headers) as response:
                    seq = None
                    for line in response.iter_lines():
                        self.ready.set()
                        if line.startswith("id:"):
                            seq = int(line[3:])
                        elif line.startswith("data:"):
                            self.frames.append((seq, json.loads(line[5:])))
                            seq = None
        finally:
            self.ready.set()
            self.ended.set()

    def types(self) -> list[str]:
        return [data["type"] for _, data in self.frames]


def ws_events_until_closed(ws, timeout: float = 15) -> list[dict]:
    events = []
    try:
        while True:
            events.append(json.loads(ws.recv(timeout=timeout)))
    except ConnectionClosed:
        return events


def wait_for(predicate, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_every_event_type_reaches_sse_and_websocket_subscribers(client, turbo_server, signup, upstream):
    owner, _, _ = signup()
    member, member_user, _ = signup()
    guest, guest_user, _ = signup()
    group = client.post("/group/create", data={"name": "team"}, headers=bearer(owner)).json()
    client.post("/group/members/add", data={"id": group["id"], "user_ids": member_user["id"]}, headers=bearer(owner))
    chat = client.post("/chat/create", data={"name": "all", "group_id": group["id"]}, headers=bearer(owner)).json()

    sse = SseListener(turbo_server, chat["id"], owner)
    with connect(ws_url(turbo_server, chat["id"], owner)) as ws:
        ok = client.post("/chat/prompt", data={"id": chat["id"], "prompt": "echo: one two"}, headers=bearer(owner))
        assert ok.status_code == 200
        failed = client.post(
            "/chat/prompt", data={"id": chat["id"], "prompt": "[scenario:error_500] boom"}, headers=bearer(owner)
        )
        assert failed.status_code == 502
        message_id = ok.json()["message"]["id"]
        steps = [
            ("/chat/message/delete", {"id": message_id}),
            ("/chat/update", {"id": chat["id"], "name": "renamed"}),
            ("/chat/user/add", {"chat_id": chat["id"], "user_id": guest_user["id"]}),
            ("/chat/user/remove", {"chat_id": chat["id"], "user_id": guest_user["id"]}),
            ("/group/members/remove", {"id": group["id"], "user_ids": member_user["id"]}),
            ("/chat/delete", {"id": chat["id"]}),
        ]
        for path, data in steps:
            assert client.post(path, data=data, headers=bearer(owner)).status_code == 200, path
        ws_events = ws_events_until_closed(ws)
        assert ws.close_code == 4404
    assert sse.ended.wait(15)

    for events in (ws_events, [data for _, data in sse.frames]):
        stored = [e for e in events if "seq" in e]
        assert {e["type"] for e in stored} == set(EVENT_TYPES)
        assert [e["seq"] for e in stored] == list(range(stored[0]["seq"], stored[0]["seq"] + len(stored)))
        assert all(e["chat_id"] == chat["id"] for e in stored)
        assert events[-1]["type"] == "stream.closed" and events[-1]["reason"] == "chat_deleted"
        by_type = {e["type"]: e for e in stored}
        assert by_type["message.completed"]["message"]["reply"] == "one two"
        assert by_type["message.failed"]["message"]["status"] == "error"
        assert by_type["message.deleted"]["message_id"] == message_id
        assert by_type["chat.updated"]["chat"]["name"] == "renamed"
        assert by_type["member.added"]["user_id"] == by_type["member.removed"]["user_id"] == guest_user["id"]
        assert by_type["access.changed"]["user_ids"] == [member_user["id"]]
    # SSE: the stored events carry their seq as the id line; the notice has none
    assert all(seq == data.get("seq") for seq, data in sse.frames)
    assert ws_events == [data for _, data in sse.frames]


def test_conversations_subscriber_gets_the_reply_and_its_failure(client, signup, upstream):
    token, _, _ = signup()
    conversation = client.post("/api/conversations/create", data={"title": "t"}, headers=bearer(token)).json()
    url = f"/api/chat/{conversation['conversation_id']}"
    with client.stream("POST", url, data={"message": "echo: via conversations"}, headers=bearer(token)) as response:
        body = "".join(response.iter_text())
    assert body.count("event: message") == 2 and "event: done" in body
    assert "event: full_response\ndata: via conversations\n\n" in body
    with client.stream("POST", url, data={"message": "[scenario:error_500] x"}, headers=bearer(token)) as response:
        body = "".join(response.iter_text())
    assert "event: error" in body and "event: done\ndata: Stream finished\n\n" in body


def test_websocket_resumes_with_after_or_a_first_resume_frame(client, turbo_server, signup, upstream):
    owner, _, _ = signup()
    chat = client.post("/chat/create", data={"name": "r"}, headers=bearer(owner)).json()
    with connect(ws_url(turbo_server, chat["id"], owner)) as ws:
        client.post("/chat/prompt", data={"id": chat["id"], "prompt": "echo: first"}, headers=bearer(owner))
        seen = receive_until_final(ws)[-1]["seq"]
    started = client.post(
        "/chat/prompt", data={"id": chat["id"], "prompt": "echo: missed words", "stream": "true"}, headers=bearer(owner)
    ).json()["message"]
    wait_for(lambda: Message.objects.filter(pk=started["id"], status="complete").exists())

    def check(events):
        assert [e["seq"] for e in events] == list(range(seen + 1, seen + 1 + len(events)))
        assert events[0]["type"] == "message.created" and events[-1]["type"] == "message.completed"
        assert "".join(e["delta"] for e in events) == "missed words"

    with connect(ws_url(turbo_server, chat["id"], owner) + f"&after={seen}") as ws:
        check(receive_until_final(ws))
        ws.send(json.dumps({"type": "ping"}))
        assert json.loads(ws.recv(timeout=10)) == {"type": "pong"}  # nothing was sent twice
    with connect(ws_url(turbo_server, chat["id"], owner)) as ws:
        ws.send(json.dumps({"type": "resume", "after": seen}))
        check(receive_until_final(ws))
        ws.send(json.dumps({"type": "resume", "after": seen}))
        assert json.loads(ws.recv(timeout=10))["type"] == "error"  # only as the first frame
    # a resume from before the replay window: told so, then given what is kept
    with connect(ws_url(turbo_server, chat["id"], owner) + f"&after={seen - 10_000}") as ws:
        first = json.loads(ws.recv(timeout=10))
        assert first["type"] == "stream.gap" and first["after"] == seen - 10_000
        assert "seq" not in first


def test_message_delete_author_or_owner(client, signup, upstream):
    owner, _, _ = signup()
    member, member_user, _ = signup()
    stranger, _, _ = signup()
    chat = client.post("/chat/create", data={"name": "d"}, headers=bearer(owner)).json()
    client.post("/chat/user/add", data={"chat_id": chat["id"], "user_id": member_user["id"]}, headers=bearer(owner))

    def prompt(token, text):
        reply = client.post(
            "/chat/prompt", data={"id": chat["id"], "prompt": text, "otr": "true"}, headers=bearer(token)
        )
        return reply.json()["message"]["id"]

    owners, members = prompt(owner, "mine"), prompt(member, "theirs")
    refused = client.post("/chat/message/delete", data={"id": owners}, headers=bearer(member))
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "forbidden"
    hidden = client.post("/chat/message/delete", data={"id": owners}, headers=bearer(stranger))
    assert hidden.status_code == 404
    bad = client.post("/chat/message/delete", data={"id": "nope"}, headers=bearer(owner))
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid"
    assert Message.objects.filter(pk__in=[owners, members]).count() == 2  # nothing changed

    assert client.post("/chat/message/delete", data={"id": members}, headers=bearer(member)).status_code == 200
    assert client.post("/chat/message/delete", json={"id": owners}, headers=bearer(owner)).status_code == 200
    assert not Message.objects.filter(pk__in=[owners, members]).exists()
    again = client.post("/chat/message/delete", data={"id": owners}, headers=bearer(owner))
    assert again.status_code == 404


def test_logout_closes_open_streams_and_sockets(client, turbo_server, signup, upstream):
    token, _, _ = signup()
    chat = client.post("/chat/create", data={"name": "l"}, headers=bearer(token)).json()
    sse = SseListener(turbo_server, chat["id"], token)
    with (
        connect(ws_url(turbo_server, chat["id"], token)) as chat_ws,
        connect(f"ws://127.0.0.1:{turbo_server.port}/ws?token={token}") as rpc,
    ):
        rpc.send(json.dumps({"type": "ping", "request_id": "1"}))
        assert json.loads(rpc.recv(timeout=10))["type"] == "pong"
        assert client.post("/user/logout", headers=bearer(token)).status_code == 200
        events = ws_events_until_closed(chat_ws)
        assert chat_ws.close_code == 4401
        assert events[-1]["type"] == "stream.closed" and events[-1]["reason"] == "session"
        frames = ws_events_until_closed(rpc)
        assert rpc.close_code == 4401
        assert frames[-1]["error"]["code"] == "session_ended"
    assert sse.ended.wait(10)
    assert sse.types()[-1] == "stream.closed"
    # and the token no longer opens anything
    assert client.get("/chat/stream", params={"id": chat["id"]}, headers=bearer(token)).status_code == 401


def test_password_change_closes_the_other_sessions_streams(client, turbo_server, signup, upstream):
    token, user, password = signup()
    other = client.post("/user/login", data={"username": user["username"], "password": password}).json()["token"]
    chat = client.post("/chat/create", data={"name": "p"}, headers=bearer(token)).json()
    with connect(ws_url(turbo_server, chat["id"], other)) as stale, connect(ws_url(turbo_server, chat["id"], token)):
        changed = client.post(
            "/user/password/update",
            data={"old_password": password, "new_password": "another-horse"},
            headers=bearer(token),
        )
        assert changed.status_code == 200
        ws_events_until_closed(stale)
        assert stale.close_code == 4401


@pytest.mark.parametrize("how", ["removed", "left", "group_deleted"])
def test_leaving_a_group_closes_group_chat_streams_with_debug_off(client, turbo_server, signup, upstream, how):
    assert settings.DEBUG is False
    gc.collect()  # a receiver held only by a weak reference would be gone now
    owner, _, _ = signup()
    member, member_user, _ = signup()
    group = client.post("/group/create", data={"name": "g"}, headers=bearer(owner)).json()
    client.post("/group/members/add", data={"id": group["id"], "user_ids": member_user["id"]}, headers=bearer(owner))
    chat = client.post("/chat/create", data={"name": "gc", "group_id": group["id"]}, headers=bearer(owner)).json()
    sse = SseListener(turbo_server, chat["id"], member)
    with connect(ws_url(turbo_server, chat["id"], member)) as ws, connect(ws_url(turbo_server, chat["id"], owner)):
        if how == "removed":
            data, token, path = {"id": group["id"], "user_ids": member_user["id"]}, owner, "/group/members/remove"
        elif how == "left":
            data, token, path = {"id": group["id"], "user_ids": member_user["id"]}, member, "/group/members/remove"
        else:
            data, token, path = {"id": group["id"]}, owner, "/group/delete"
        assert client.post(path, data=data, headers=bearer(token)).status_code == 200
        events = ws_events_until_closed(ws)
        assert ws.close_code == 4403
        assert [e["type"] for e in events] == ["access.changed", "stream.closed"]
        # a new message is not delivered to them
        client.post("/chat/prompt", data={"id": chat["id"], "prompt": "echo: secret"}, headers=bearer(owner))
    assert sse.ended.wait(10)
    assert sse.types() == ["access.changed", "stream.closed"]
