"""Two server processes sharing Postgres + Redis: a prompt sent to one streams to a subscriber on the other."""

import json
import os
import socket
import subprocess
import sys
import time

import httpx
import pytest
from django.conf import settings
from django.db import connection
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from conftest import PROJECT_ROOT, SERVER_KEY

pytestmark = [
    pytest.mark.django_db(transaction=True),
    # Only a shared database and channel layer can join two processes; the in-memory leg has neither.
    pytest.mark.skipif(
        not settings.REDIS_ADDRESS or connection.vendor != "postgresql",
        reason="needs DB_ADDRESS=postgresql://... and REDIS_ADDRESS",
    ),
]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def two_servers(upstream):
    db = connection.settings_dict
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "turbo_site.test_settings",
        "DB_ADDRESS": f"postgresql://{db['USER']}@{db['HOST']}:{db['PORT']}/{db['NAME']}",
        "REDIS_ADDRESS": settings.REDIS_ADDRESS,
        "OPENAI_API_URL": upstream.url + "/v1",
        "OPENAI_API_KEY": SERVER_KEY,
    }
    servers = []
    for _ in range(2):
        port = free_port()
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "turbo_site.asgi:application",
                "--port",
                str(port),
                "--log-level",
                "warning",
            ],
            cwd=PROJECT_ROOT,
            env=env,
        )
        servers.append((process, f"127.0.0.1:{port}"))
    try:
        for process, address in servers:
            for _ in range(200):
                try:
                    httpx.get(f"http://{address}/api/schema/", timeout=1)
                    break
                except httpx.HTTPError:
                    assert process.poll() is None, "a server process died"
                    time.sleep(0.1)
        yield [address for _, address in servers]
    finally:
        for process, _ in servers:
            process.terminate()
            process.wait(timeout=20)


def test_prompt_on_one_process_streams_to_a_subscriber_on_the_other(two_servers):
    first, second = two_servers
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
    first, second = two_servers
    with httpx.Client(base_url=f"http://{first}", timeout=20) as one:
        signed = one.post("/user/signup", data={"username": "two-procs-out", "password": "correct-horse"}).json()
        token = signed["token"]
        chat = one.post("/chat/create", data={"name": "s"}, headers={"Authorization": f"Bearer {token}"}).json()
        with (
            connect(f"ws://{second}/chat/stream?id={chat['id']}&token={token}", open_timeout=10) as chat_ws,
            connect(f"ws://{second}/ws?token={token}", open_timeout=10) as rpc,
        ):
            assert one.post("/user/logout", headers={"Authorization": f"Bearer {token}"}).status_code == 200
            frames = []
            with pytest.raises(ConnectionClosed):
                while True:
                    frames.append(json.loads(chat_ws.recv(timeout=15)))
            assert chat_ws.close_code == 4401 and frames[-1]["type"] == "stream.closed"
            with pytest.raises(ConnectionClosed):
                while True:
                    rpc.recv(timeout=15)
            assert rpc.close_code == 4401
