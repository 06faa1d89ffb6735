"""turbo_site.core.fastredis against a real redis-server of its own (a password, database 3), on both legs."""

import asyncio
import shutil
import socket
import subprocess
import time

import pytest
import redis
import redis.exceptions

from turbo_site.core.fastredis import FastRedis, fast_address, script_sha
from turbo_site.core.redis_retry import fast_redis

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs the redis-server binary")

PASSWORD = "fast-redis-test-password"
SCRIPT = "redis.call('INCRBY', KEYS[1], ARGV[1]); return {redis.call('GET', KEYS[1]), tonumber(ARGV[1]), {1, 'x'}}"
SHA = script_sha(SCRIPT)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _start(port: int) -> subprocess.Popen:
    process = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        + ["--requirepass", PASSWORD],
        stdout=subprocess.DEVNULL,
    )
    for _ in range(200):
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return process
        assert process.poll() is None, "redis-server exited at start"
        time.sleep(0.05)
    raise AssertionError("redis-server did not listen")


@pytest.fixture
def server():
    port = free_port()
    process = _start(port)
    try:
        yield port, process
    finally:
        process.kill()
        process.wait(timeout=10)


def _sync(port: int) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=port, db=3, password=PASSWORD)


def _client(port: int) -> FastRedis:
    return FastRedis("127.0.0.1", port, 3, None, PASSWORD)


def with_client(port: int, body) -> None:
    """Run `await body(client)` on a new loop with a client of the test's server, closed after."""

    async def run():
        client = _client(port)
        try:
            await body(client)
        finally:
            await client.aclose()

    asyncio.run(run())


def test_replies_of_every_kind_in_the_selected_database(server):
    port, _ = server

    async def run(client):
        assert await client.execute("SET", "k", "v") == b"OK"
        assert await client.execute("GET", "k") == b"v"
        assert await client.execute("GET", "missing") is None
        assert await client.execute("INCRBY", "n", 5) == 5
        assert await client.execute("EVAL", "return {1, 'two', {3}, -4}", 0) == [1, b"two", [3], -4]
        with pytest.raises(redis.exceptions.ResponseError, match="WRONGTYPE"):
            await client.execute("LPUSH", "k", "x")
        assert await client.execute("GET", "k") == b"v"  # an error leaves the connection in step
        big = "x" * 200_000  # a reply that arrives in several reads
        await client.execute("SET", "big", big)
        assert await client.execute("GET", "big") == big.encode()

    with_client(port, run)
    assert _sync(port).get("k") == b"v"  # database 3, as the address says
    assert redis.Redis(host="127.0.0.1", port=port, db=0, password=PASSWORD).get("k") is None


def test_a_wrong_password_is_refused():
    async def run(port):
        with pytest.raises(redis.exceptions.ResponseError, match="WRONGPASS|invalid"):
            await FastRedis("127.0.0.1", port, 0, None, "not-the-password").execute("PING")

    port = free_port()
    process = _start(port)
    try:
        asyncio.run(run(port))
    finally:
        process.kill()
        process.wait(timeout=10)


def test_many_commands_at_once_each_get_their_own_reply_in_order(server):
    port, _ = server

    async def run(client):
        replies = await asyncio.gather(*(client.execute("INCR", "counter") for _ in range(500)))
        assert replies == list(range(1, 501))
        echoes = await asyncio.gather(*(client.execute("ECHO", f"m{i}") for i in range(200)))
        assert echoes == [f"m{i}".encode() for i in range(200)]

    with_client(port, run)


def test_a_waiter_that_gave_up_leaves_the_connection_in_step(server):
    port, _ = server

    async def run(client):
        await client.execute("SET", "k", "v")
        slow = asyncio.ensure_future(client.execute("EVAL", "local t = redis.call('TIME'); return 1", 0))
        slow.cancel()
        late = asyncio.ensure_future(client.execute("BLPOP", "never", "0.2"))
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                await late
        assert await client.execute("GET", "k") == b"v"  # not the cancelled EVAL's 1, nor BLPOP's nil
        assert await client.execute("ECHO", "after") == b"after"

    with_client(port, run)


def test_scripts_are_sent_whole_once_then_by_sha_and_again_after_a_flush(server):
    port, _ = server
    sync = _sync(port)

    async def run(client):
        assert await client.script(SCRIPT, ["total"], [2]) == [b"2", 2, [1, b"x"]]
        assert sync.script_exists(SHA) == [True]
        assert await client.script(SCRIPT, ["total"], [3]) == [b"5", 3, [1, b"x"]]
        sync.script_flush()
        assert sync.script_exists(SHA) == [False]
        assert await client.script(SCRIPT, ["total"], [4]) == [b"9", 4, [1, b"x"]]  # NOSCRIPT, then EVAL
        # Sent without waiting: what this connection runs next sees it done.
        assert client.script_nowait(SCRIPT, ["total"], [10]) is not None
        assert await client.execute("GET", "total") == b"19"

    with_client(port, run)


def test_a_killed_connection_is_replaced_and_its_waiting_command_sent_again(server):
    port, _ = server
    sync = _sync(port)

    async def run(client):
        await client.execute("CLIENT", "SETNAME", "fast")
        blocked = asyncio.ensure_future(client.execute("BLPOP", "queue", 1))
        await asyncio.sleep(0.1)
        first = [c["id"] for c in sync.client_list() if c["name"] == "fast"]
        assert len(first) == 1
        sync.client_kill_filter(_id=first[0])
        await asyncio.sleep(0.1)
        sync.rpush("queue", "item")  # the BLPOP, sent again on a new connection, takes it
        assert await blocked == [b"queue", b"item"]
        assert await client.execute("ECHO", "back") == b"back"
        assert [c["id"] for c in sync.client_list() if c["name"] == "fast"] == []  # a new, unnamed connection

    with_client(port, run)


def test_redis_gone_is_a_connection_error_and_its_return_is_picked_up(server):
    port, process = server

    async def run(client):
        assert await client.execute("PING") == b"PONG"
        process.kill()
        process.wait(timeout=10)
        with pytest.raises(redis.exceptions.ConnectionError):
            await client.execute("PING")
        restarted = _start(port)
        try:
            assert await client.execute("PING") == b"PONG"
        finally:
            restarted.kill()
            restarted.wait(timeout=10)

    with_client(port, run)


def test_addresses_it_speaks_and_those_left_to_redis_py():
    assert fast_address("redis://127.0.0.1:6380/4") == ("127.0.0.1", 6380, 4, None, None)
    assert fast_address("redis://user:p%40ss@cache.internal/0") == ("cache.internal", 6379, 0, "user", "p@ss")
    assert fast_address("redis://:secret@127.0.0.1") == ("127.0.0.1", 6379, 0, None, "secret")
    assert fast_address("rediss://127.0.0.1:6379/0") is None
    assert fast_address("unix:///run/redis.sock") is None

    async def run():
        one = fast_redis("redis://127.0.0.1:1/0")
        assert fast_redis("redis://127.0.0.1:1/0") is one  # one per loop and address
        assert fast_redis("rediss://127.0.0.1:1/0") is None
        with pytest.raises(redis.exceptions.ConnectionError):
            await one.execute("PING")  # nothing listens on port 1

    asyncio.run(run())


def test_commands_sent_in_one_turn_of_the_loop_go_out_in_one_write(server):
    port, _ = server

    async def run(client):
        await client.execute("PING")  # connected (AUTH and SELECT went first)
        connection = client._connection
        writes = []
        write = connection.transport.write

        def counted(data):
            writes.append(data)
            write(data)

        connection.transport.write = counted
        replies = await asyncio.gather(
            client.execute("INCR", "n"),
            client.script(SCRIPT, ["s"], [2]),
            client.execute("ECHO", "x"),
        )
        assert replies == [1, [b"2", 2, [1, b"x"]], b"x"]
        assert len(writes) == 1  # three commands, one system call
        assert await client.execute("GET", "n") == b"1"
        assert len(writes) == 2

    with_client(port, run)
