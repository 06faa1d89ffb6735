"""Database connections are bounded: each process takes its Postgres connections from a pool of
DB_POOL_SIZE, however many requests come at once, and a burst is served (or refused with a 503), never
answered 500."""

import asyncio
import threading

import httpx
import pytest
from django.conf import settings
from django.db import connection

from chats.tests.processes import Api, needs_postgres

pytestmark = [pytest.mark.django_db(transaction=True), needs_postgres]

POOL = 4


def _server_connections(pids: list[int]) -> int:
    """Connections to the test database from these Turbo processes (their application_name: turbo:<pid>)."""
    names = [f"turbo:{pid}" for pid in pids]
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_stat_clear_snapshot()")
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND application_name = ANY(%s)",
            [names],
        )
        return cursor.fetchone()[0]


def test_a_burst_over_two_processes_stays_within_their_pools(start_server):
    env = {"REDIS_ADDRESS": settings.REDIS_ADDRESS or None, "DB_POOL_SIZE": POOL}
    servers = [start_server(**env), start_server(**env)]
    api = Api(servers[0].url, "pool-burst")
    for _ in range(3):
        api.chat()
    most, sampling, pids = 0, True, [server.process.pid for server in servers]

    def sample():
        nonlocal most
        while sampling:
            most = max(most, _server_connections(pids))
        connection.close()

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()

    async def burst() -> list[int]:
        limits = httpx.Limits(max_connections=600)
        async with httpx.AsyncClient(timeout=60, limits=limits) as http:
            calls = [http.get(servers[index % 2].url + "/chat/index", headers=api.headers) for index in range(500)]
            return [response.status_code for response in await asyncio.gather(*calls)]

    try:
        statuses = asyncio.run(burst())
    finally:
        sampling = False
        sampler.join(timeout=10)
    assert set(statuses) <= {200, 503}, sorted(set(statuses))
    assert statuses.count(200) >= 1
    assert 0 < most <= 2 * POOL, most
    for server in servers:
        assert "Traceback" not in server.stderr()
    api.close()
