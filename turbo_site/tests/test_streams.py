"""The stream transport on its real backend (memory on the first leg, Redis Streams on the second):
numbering, replay, gaps, slow subscribers and restarts."""

import asyncio
import uuid

import pytest
import redis
from django.core.cache import cache

from turbo_site.core import streams
from turbo_site.core.loops import loop_clients_close
from turbo_site.core.redis_retry import fast_redis


def run(coroutine_function):
    async def main():
        try:
            return await coroutine_function()
        finally:
            await loop_clients_close()

    return asyncio.run(main())


def new_key() -> str:
    return f"test.{uuid.uuid4().hex}"


def test_numbers_are_consecutive_and_replay_gives_what_came_after():
    key = new_key()

    async def scenario():
        seqs = [await streams.append(key, "t", {"n": n}) for n in range(5)]
        entries, gap = await streams.replay(key, seqs[1])
        return seqs, entries, gap

    seqs, entries, gap = run(scenario)
    assert seqs == list(range(seqs[0], seqs[0] + 5))
    assert seqs[0] > 1_600_000_000_000_000  # started from the clock, in microseconds
    assert not gap
    assert [(e.seq, e.type, e.data["n"]) for e in entries] == [(seqs[n], "t", n) for n in (2, 3, 4)]
    assert entries[0].data == {"seq": seqs[2], "type": "t", "n": 2}


def test_a_resume_from_before_the_window_is_told_so():
    key = new_key()

    async def scenario():
        first = await streams.append(key, "t", {})
        await streams.append(key, "t", {})
        subscription = await streams.Subscription(key, after=first - 1000).start()
        try:
            return first, [await subscription.get(timeout=5) for _ in range(3)]
        finally:
            await subscription.close()

    first, got = run(scenario)
    assert got[0].type == "stream.gap" and got[0].is_notice and got[0].data["after"] == first - 1000
    assert [entry.seq for entry in got[1:]] == [first, first + 1]


def test_live_and_replay_together_deliver_each_event_once_in_order(settings):
    key = new_key()

    async def scenario():
        start = await streams.append(key, "t", {"n": -1})
        subscription = await streams.Subscription(key, after=start).start()
        publisher = asyncio.ensure_future(asyncio.gather(*(streams.append(key, "t", {"n": n}) for n in range(50))))
        got = []
        while len(got) < 50:
            got.append(await subscription.get(timeout=10))
        await publisher
        extra = await subscription.get(timeout=0.2)
        await subscription.close()
        return start, got, extra

    start, got, extra = run(scenario)
    assert [entry.seq for entry in got] == list(range(start + 1, start + 51))
    assert extra is None


def test_a_slow_subscriber_reads_what_it_could_not_hold_back_from_the_store(settings):
    settings.STREAM_SUBSCRIBER_BUFFER = 5
    key = new_key()

    async def scenario():
        subscription = await streams.Subscription(key, after=0).start()
        seqs = [await streams.append(key, "t", {"n": n}) for n in range(40)]
        await asyncio.sleep(0.2)  # the reader hands them over while nobody reads
        got = [await subscription.get(timeout=10) for _ in range(40)]
        await subscription.close()
        return seqs, got

    seqs, got = run(scenario)
    assert [entry.seq for entry in got] == seqs


def test_counters_lost_with_a_restarted_store_never_go_backwards():
    key = new_key()

    async def scenario():
        return await streams.append(key, "t", {})

    before = run(scenario)
    cache.clear()  # on the Redis leg: FLUSHDB, as a Redis restart without persistence would leave it
    streams._backend = None  # and on the memory leg: a new process
    after = run(scenario)
    assert after > before


def test_ending_hands_out_what_is_buffered_then_the_notice():
    key = new_key()

    async def scenario():
        subscription = await streams.Subscription(key).start()
        await streams.append(key, "t", {"n": 1})
        await asyncio.sleep(0.2)
        assert streams.subscriptions_end_all(streams.notice("server.shutdown", "bye")) >= 1
        streams._closing = False  # this test process goes on
        got = [await subscription.get(timeout=5), await subscription.get(timeout=5)]
        try:
            await subscription.get(timeout=1)
        except StopAsyncIteration:
            ended = True
        else:
            ended = False
        await subscription.close()
        return got, ended

    got, ended = run(scenario)
    assert [entry.type for entry in got] == ["t", "server.shutdown"]
    assert ended


def test_the_shutdown_drain_hands_out_what_was_stored_before_it_ends_the_streams():
    """The drain ends a follower's stream after every event stored before it, not before the last ones:
    on Redis the process's reader may not have read them back yet when the drain starts (it did not
    wait: a follower got `server.shutdown` without the reply's final event)."""
    from chats import running
    from turbo_site.lifespan import drain

    key = new_key()

    async def scenario():
        subscription = await streams.Subscription(key).start()
        # Stored without this loop turning meanwhile: the reader cannot have read them back yet when the
        # drain starts (the reply's final event, stored just before it, often has not either).
        seqs = [streams.append_sync(key, "t", {"n": n}) for n in range(3)]
        draining = asyncio.create_task(drain())
        got = []
        async with asyncio.timeout(10):
            async for entry in subscription:
                got.append(entry)
            await subscription.close()
            await draining
        return seqs, got

    try:
        seqs, got = run(scenario)
    finally:
        running._draining = False  # this test process goes on
        streams._closing = False
    assert [(entry.seq, entry.type) for entry in got] == [*((seq, "t") for seq in seqs), (0, "server.shutdown")]


def test_a_resume_from_beyond_the_last_event_is_told_so_and_then_gets_the_live_events():
    key = new_key()

    async def scenario():
        last = await streams.append(key, "t", {})
        subscription = await streams.Subscription(key, after=last + 1000).start()
        try:
            got = [await subscription.get(timeout=5)]
            await streams.append(key, "t", {"n": 1})
            await streams.append(key, "t", {"n": 2})
            got += [await subscription.get(timeout=5) for _ in range(2)]
            return last, got
        finally:
            await subscription.close()

    last, got = run(scenario)
    assert got[0].type == "stream.gap" and got[0].data["after"] == last
    assert [(entry.seq, entry.data["n"]) for entry in got[1:]] == [(last + 1, 1), (last + 2, 2)]


def test_streams_followed_and_dropped_in_turn_each_get_their_own_events_once():
    """The process's one reader keeps its read of every followed stream packed (the streams, and where
    each stands): following one, dropping one and following one again must each change what it reads."""
    first, second, third = new_key(), new_key(), new_key()

    async def scenario():
        a = await streams.Subscription(first).start()
        b = await streams.Subscription(second).start()
        await streams.append(first, "t", {"n": 1})
        await streams.append(second, "t", {"n": 2})
        got = {"a": [await a.get(timeout=5)], "b": [await b.get(timeout=5)]}
        await a.close()
        await streams.append(first, "t", {"n": 3})  # nobody here follows it now
        await streams.append(second, "t", {"n": 4})
        got["b"].append(await b.get(timeout=5))
        c = await streams.Subscription(third).start()
        again = await streams.Subscription(first).start()  # live from here: not 3
        await streams.append(third, "t", {"n": 5})
        await streams.append(first, "t", {"n": 6})
        got["c"] = [await c.get(timeout=5)]
        got["again"] = [await again.get(timeout=5)]
        for subscription in (b, c, again):
            got.setdefault("after", []).append(await subscription.get(timeout=0.3))
            await subscription.close()
        return got

    got = run(scenario)
    numbers = {name: [entry and entry.data["n"] for entry in entries] for name, entries in got.items()}
    assert numbers == {"a": [1], "b": [2, 4], "c": [5], "again": [6], "after": [None, None, None]}


def test_appends_sent_without_waiting_arrive_once_in_the_order_sent():
    """A reply's deltas go out without waiting for each to be stored (Appends): the stream still holds
    each once, in the order sent, and nothing comes back to send again."""
    key = new_key()

    async def scenario():
        subscription = await streams.Subscription(key).start()
        appends = streams.Appends(key)
        again = [await appends.send("t", {"n": n}, text=str(n)) for n in range(40)]
        got = [await subscription.get(timeout=10) for _ in range(40)]
        extra = await subscription.get(timeout=0.2)
        await subscription.close()
        stored, _ = await streams.replay(key, 0)
        return again, got, extra, stored

    again, got, extra, stored = run(scenario)
    assert again == [""] * 40
    assert [entry.data["n"] for entry in got] == list(range(40))
    assert [entry.seq for entry in got] == list(range(got[0].seq, got[0].seq + 40))
    assert extra is None
    assert [entry.data["n"] for entry in stored] == list(range(40))


@pytest.fixture
def redis_streams(settings):
    """Redis Streams as the stream backend on either leg: the suite's Redis on leg 2, a redis-server of this
    test's own on leg 1 (the backend follows REDIS_ADDRESS)."""
    if settings.REDIS_ADDRESS:
        yield settings.REDIS_ADDRESS
        return
    from chats.tests.processes import free_port, redis_start

    port = free_port()
    server = redis_start(port)
    settings.REDIS_ADDRESS = f"redis://127.0.0.1:{port}/0"
    try:
        yield settings.REDIS_ADDRESS
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_appends_lost_with_their_connection_come_back_in_order_and_the_next_is_held_back(redis_streams):
    """Appends on their way when the process's Redis connection is cut are not stored: their text comes
    back, oldest first, with the event sent next (held back so that no text goes out of order); the one
    after that goes out on a new connection. (Redis only: the in-memory stream takes each append at once.)"""
    key = new_key()

    async def scenario():
        appends = streams.Appends(key)
        assert await appends.send("t", {"n": 0}, text="x") == ""
        fast = fast_redis(redis_streams)
        connection_id = await fast.execute("CLIENT", "ID")
        with redis.Redis.from_url(redis_streams) as sync:
            sync.client_kill_filter(_id=connection_id)
        # Sent before this loop has seen the connection go: written to a socket the server closed.
        sent = [await appends.send("t", {"n": n}, text=text) for n, text in ((1, "a"), (2, "b"), (3, "c"))]
        await asyncio.sleep(0.3)
        held = await appends.send("t", {"n": 4}, text="d")
        after = await appends.send("t", {"n": 5}, text="e")
        stored, _ = await streams.replay(key, 0)
        return sent, held, after, stored

    sent, held, after, stored = run(scenario)
    assert sent == ["", "", ""]
    assert held == "abcd"
    assert after == ""
    assert [entry.data["n"] for entry in stored] == [0, 5]
