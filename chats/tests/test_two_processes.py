"""Two server processes sharing Postgres + Redis: a prompt sent to one streams to a subscriber on the other."""

import json

import httpx
import pytest
from django.conf import settings
from django.db import connection
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

pytestmark = [
    pytest.mark.django_db(transaction=True),
    # Only a shared database and channel layer can join two processes; the in-memory leg has neither.
    pytest.mark.skipif(
        not settings.REDIS_ADDRESS or connection.vendor != "postgresql",
        reason="needs DB_ADDRESS=postgresql://... and REDIS_ADDRESS",
    ),
]


def test_prompt_on_one_process_streams_to_a_subscriber_on_the_other(two_servers):
    first, second = (server.address for server in two_servers)
    with httpx.Client(base_url=f"http://{first}", timeout=20) as one:
        signed = one.post("/user/signup", data={"username": "two-procs", "password": "correct-horse"}).json()
        token = signed["token"]
        chat = one.post("/chat/create", data={"name": "shared"}, headers={"Authorization": f"Bearer {token}"}).json()
        with connect(f"ws://{second}/chat/stream?id={chat['id']}&token={token}", open_timeout=10) as ws:
            one.post(
                "/chat/prompt",
                data={"id": chat["id"], "prompt": "echo: across two processes", "stream": "true"},
                headers={"Authorization": f"Bearer {token}"},
            )
            events = []
            while not events or events[-1]["partial"]:
                events.append(json.loads(ws.recv(timeout=15)))
    assert "".join(e["delta"] for e in events) == "across two processes"
    assert events[-1]["message"]["status"] == "complete"


def test_logout_on_one_process_closes_streams_on_the_other(two_servers):
    first, second = (server.address for server in two_servers)
    with httpx.Client(base_url=f"http://{first}", timeout=20) as one:
        signed = one.post("/user/signup", data={"username": "two-procs-out", "password": "correct-horse"}).json()
        token = signed["token"]
        chat = one.post("/chat/create", data={"name": "s"}, headers={"Authorization": f"Bearer {token}"}).json()
        with (
            connect(f"ws://{second}/chat/stream?id={chat['id']}&token={token}", open_timeout=10) as chat_ws,
            connect(f"ws://{second}/ws?token={token}", open_timeout=10) as rpc,
        ):
            assert one.post("/user/logout", headers={"Authorization": f"Bearer {token}"}).status_code == 200
            frames = frames_until_closed(chat_ws)
            assert chat_ws.close_code == 4401 and frames[-1]["type"] == "stream.closed"
            assert frames_until_closed(rpc)[-1]["error"]["code"] == "session_ended"
            assert rpc.close_code == 4401


def frames_until_closed(ws) -> list[dict]:
    frames = []
    with pytest.raises(ConnectionClosed):
        while True:
            frames.append(json.loads(ws.recv(timeout=15)))
    return frames
