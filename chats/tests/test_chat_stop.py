"""/chat/stop: a member stops a reply being generated, in this process or another."""

import threading

import httpx
import pytest
from django.conf import settings
from django.db import connection
from websockets.sync.client import connect

from chats.models import ChatProgram, Message
from chats.tests.test_programs import CHAT_PROGRAMS, wait_until
from chats.tests.test_stream import bearer, receive_until_final, ws_url

pytestmark = pytest.mark.django_db(transaction=True)


def gated_prompt(http, token, chat, text="[scenario:gated] echo: one two three four", stream=True):
    body = {"id": chat["id"], "prompt": text, "stream": "true" if stream else "false"}
    return http.post("/chat/prompt", data=body, headers=bearer(token))


def test_stop_ends_the_reply_keeping_what_was_said_and_the_chat_goes_on(client, turbo_server, signup, upstream):
    token, _, _ = signup()
    chat = client.post("/chat/create", data={"name": "s"}, headers=bearer(token)).json()
    with connect(ws_url(turbo_server, chat["id"], token)) as ws:
        assert gated_prompt(client, token, chat).status_code == 200
        first = receive_until_first_delta(ws)
        assert first["message"]["reply"] == "one "
        stopped = client.post("/chat/stop", json={"id": chat["id"]}, headers=bearer(token))
        assert stopped.status_code == 200 and stopped.json() == {"stopped": 1}
        final = receive_until_final(ws)[-1]
    assert final["type"] == "message.failed"
    assert (final["message"]["status"], final["message"]["error"], final["message"]["reply"]) == (
        "error",
        "stopped",
        "one ",
    )
    assert client.post("/chat/stop", json={"id": chat["id"]}, headers=bearer(token)).json() == {"stopped": 0}
    upstream.release()
    again = client.post("/chat/prompt", data={"id": chat["id"], "prompt": "echo: fine"}, headers=bearer(token))
    assert again.status_code == 200 and again.json()["message"]["reply"] == "fine"


def receive_until_first_delta(ws) -> dict:
    import json

    while True:
        event = json.loads(ws.recv(timeout=15))
        if event["type"] == "message.delta" and event["message"]["reply"]:
            return event


def test_only_the_author_or_the_owner_may_stop_and_a_waiting_prompt_hears_409(client, signup, upstream):
    owner, _, _ = signup()
    member, member_user, _ = signup()
    outsider, _, _ = signup()
    group = client.post("/group/create", data={"name": "g"}, headers=bearer(owner)).json()
    client.post("/group/members/add", data={"id": group["id"], "user_ids": member_user["id"]}, headers=bearer(owner))
    chat = client.post("/chat/create", data={"name": "g", "group_id": group["id"]}, headers=bearer(owner)).json()

    answers = {}

    def wait_for_reply():
        with httpx.Client(base_url=str(client.base_url), timeout=30) as http:
            answers["owner"] = gated_prompt(http, owner, chat, stream=False)

    waiting = threading.Thread(target=wait_for_reply)
    waiting.start()
    wait_until(lambda: Message.objects.filter(chat_id=chat["id"], status="streaming").exists())
    refused = client.post("/chat/stop", json={"id": chat["id"]}, headers=bearer(member))
    assert refused.status_code == 403
    hidden = client.post("/chat/stop", json={"id": chat["id"]}, headers=bearer(outsider))
    assert hidden.status_code == 404
    assert Message.objects.get(chat_id=chat["id"]).status == "streaming"  # nothing stopped

    assert client.post("/chat/stop", data={"id": chat["id"]}, headers=bearer(owner)).json() == {"stopped": 1}
    waiting.join(30)
    assert answers["owner"].status_code == 409 and answers["owner"].json()["error"]["code"] == "stopped"
    assert Message.objects.get(chat_id=chat["id"]).error == "stopped"
    upstream.release()


def test_a_stopped_program_turn_leaves_the_program_waiting(client, signup, upstream, settings):
    settings.CHAT_PROGRAMS = CHAT_PROGRAMS
    token, _, _ = signup()
    chat = client.post("/chat/create", json={"name": "p", "program": "looper"}, headers=bearer(token)).json()
    assert gated_prompt(client, token, chat).status_code == 200
    wait_until(lambda: any(request.path == "/v1/chat/completions" for request in upstream.requests))
    assert client.post("/chat/stop", json={"id": chat["id"]}, headers=bearer(token)).json() == {"stopped": 1}
    wait_until(lambda: ChatProgram.objects.get(chat_id=chat["id"]).status == "waiting")
    upstream.release()
    assert ChatProgram.objects.get(chat_id=chat["id"]).steps == []
    again = client.post("/chat/prompt", data={"id": chat["id"], "prompt": "echo: go on"}, headers=bearer(token))
    assert again.json()["message"]["reply"] == "go on\n\nSay something"


@pytest.mark.skipif(
    not settings.REDIS_ADDRESS or connection.vendor != "postgresql",
    reason="two processes share only Postgres + Redis",
)
def test_a_stop_sent_to_another_process_stops_the_reply_there(start_server, upstream):  # noqa: F811
    first = start_server(REDIS_ADDRESS=settings.REDIS_ADDRESS)
    second = start_server(REDIS_ADDRESS=settings.REDIS_ADDRESS)
    with httpx.Client(base_url=first.url, timeout=30) as one, httpx.Client(base_url=second.url, timeout=30) as two:
        token = one.post("/user/signup", data={"username": "stopper", "password": "correct-horse"}).json()["token"]
        chat = one.post("/chat/create", data={"name": "x"}, headers=bearer(token)).json()
        assert gated_prompt(one, token, chat).status_code == 200
        wait_until(lambda: Message.objects.filter(chat_id=chat["id"], status="streaming").exists())
        assert two.post("/chat/stop", json={"id": chat["id"]}, headers=bearer(token)).json() == {"stopped": 1}
        wait_until(lambda: Message.objects.get(chat_id=chat["id"]).status == "error")
    message = Message.objects.get(chat_id=chat["id"])
    assert message.error == "stopped"
    upstream.release()
