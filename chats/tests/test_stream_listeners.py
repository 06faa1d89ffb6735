"""Listeners are cheap: a few hundred SSE subscribers connecting at once to one server process.

Every subscribe must be accepted (no 503 "Too many connections"), every subscriber must get the
event sent once they are all in, and the process must hold a small, fixed number of Redis
connections while they listen (counted in Redis's CLIENT LIST by the process's own sockets).
Needs Postgres + Redis: the embedded leg has no Redis connections to count.
"""

import asyncio
import json
from pathlib import Path

import httpx
import pytest
from django.conf import settings
from django.db import connection

from bench.redis_clients import redis_connections_of
from chats.tests.processes import Api, bearer

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(
        not settings.REDIS_ADDRESS or connection.vendor != "postgresql" or not Path("/proc/self/fd").exists(),
        reason="needs DB_ADDRESS=postgresql://..., REDIS_ADDRESS and Linux's /proc",
    ),
]

SUBSCRIBERS = 300
CHATS = 3  # fresh chats: their first subscribers all arrive before the process follows them
REDIS_CONNECTIONS_BOUND = 20  # per process, as bench/README.md's target


async def subscribe(http: httpx.AsyncClient, url: str, token: str, chat_id: str, after: int | None, opened: list):
    """Open one SSE subscription; returns (status, the event types read until chat.updated)."""
    headers = bearer(token)
    if after is not None:
        headers["Last-Event-ID"] = str(after)
    async with http.stream("GET", f"{url}/chat/stream", params={"id": chat_id}, headers=headers) as response:
        if response.status_code != 200:
            await response.aread()
            opened.append(response.status_code)
            return response.status_code, response.text[:200]
        opened.append(200)
        types = []
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                types.append(json.loads(line[6:])["type"])
                if types[-1] == "chat.updated":
                    break
        return 200, types


def test_hundreds_of_subscribers_at_once_are_all_accepted_over_few_redis_connections(start_server):
    server = start_server(REDIS_ADDRESS=settings.REDIS_ADDRESS)
    api = Api(server.url, "listeners")
    chat_ids = [api.chat(f"listeners {number}") for number in range(CHATS)]
    # One event in each chat, so that half the subscribers resume (a replay read each) from before it.
    for chat_id in chat_ids:
        renamed = api.http.post("/chat/update", data={"id": chat_id, "name": "first"}, headers=api.headers)
        assert renamed.status_code == 200, renamed.text

    async def run():
        opened: list = []
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        async with httpx.AsyncClient(limits=limits, timeout=180) as http:
            tasks = [
                asyncio.create_task(
                    subscribe(http, server.url, api.token, chat_ids[i % CHATS], 1 if i % 2 else None, opened)
                )
                for i in range(SUBSCRIBERS)
            ]
            while len(opened) < SUBSCRIBERS and not any(task.done() for task in tasks):
                await asyncio.sleep(0.05)
            connections = redis_connections_of(server.process.pid, settings.REDIS_ADDRESS)
            for chat_id in chat_ids:
                renamed = await http.post(
                    f"{server.url}/chat/update", data={"id": chat_id, "name": "everyone in"}, headers=api.headers
                )
                assert renamed.status_code == 200, renamed.text
            results = await asyncio.wait_for(asyncio.gather(*tasks), 180)  # 8 s here when quiet; a loaded CI is slower
        return connections, results

    connections, results = asyncio.run(run())
    api.close()

    refused = [result for result in results if result[0] != 200]
    assert refused == [], f"{len(refused)} of {SUBSCRIBERS} refused, e.g. {refused[:3]}"
    assert all(types[-1] == "chat.updated" for _, types in results)
    assert 1 <= connections <= REDIS_CONNECTIONS_BOUND, connections
