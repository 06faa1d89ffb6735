"""Which Redis transport for chat events: Streams (what Turbo uses), Pub/Sub + a replay copy, or the
Channels layer's group_send (what Turbo used before).

One process publishes `--chats` x `--publishers` concurrent streams of `--events` events each (a
~600-byte event, like a delta with its message snapshot) while `--readers` subscribers per chat, in
the same process, read them. Prints, per transport: events delivered / expected (lost and
duplicated), publish throughput, delivery delay p50/p99 (publish call started -> subscriber got it),
and CPU microseconds per delivered event (this process: publishers, Redis client, subscribers). Writes
bench/results/stream_transport-<timestamp>.json and stream_transport-latest.json, each with its chart.

    .venv/bin/python -m bench.stream_transport [--chats 10 --publishers 5 --events 200 --readers 4]

Needs REDIS_ADDRESS (default redis://127.0.0.1:6379/3; the keys it writes are deleted at the end).
"""

import argparse
import asyncio
import json
import os
import platform
import resource
import sys
import time
import uuid
from datetime import UTC, datetime

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "turbo_site.settings")
os.environ.setdefault("SECRET_KEY", "bench-not-secret")
os.environ.setdefault("REDIS_ADDRESS", "redis://127.0.0.1:6379/3")

import django  # noqa: E402

django.setup()

import redis.asyncio  # noqa: E402
from channels.layers import get_channel_layer  # noqa: E402
from django.conf import settings  # noqa: E402

from bench.charts import RESULTS, charts_write  # noqa: E402
from turbo_site.core import streams  # noqa: E402

PADDING = "x" * 500


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))] if ordered else float("nan")


class Tally:
    def __init__(self, expected: int):
        self.expected = expected
        self.delays: list[float] = []
        self.seen: set[tuple] = set()
        self.duplicates = 0
        self.done = asyncio.Event()

    def got(self, reader: int, data: dict) -> None:
        key = (reader, data["chat"], data["publisher"], data["n"])
        if key in self.seen:
            self.duplicates += 1
            return
        self.seen.add(key)
        self.delays.append(time.perf_counter() - data["sent"])
        if len(self.seen) == self.expected:
            self.done.set()


def event(chat: int, publisher: int, n: int) -> dict:
    return {"chat": chat, "publisher": publisher, "n": n, "sent": time.perf_counter(), "padding": PADDING}


async def publish_all(args, publish, tally: Tally, readers: list[asyncio.Future], *, wait: float) -> None:
    """Every publisher at once; then wait (at most `wait` s) until all is delivered, and stop the readers."""
    await asyncio.gather(*(publish(c, p) for c in range(args.chats) for p in range(args.publishers)))
    try:
        await asyncio.wait_for(tally.done.wait(), wait)
    except TimeoutError:
        pass
    for task in readers:
        task.cancel()


async def run_streams(args, tally: Tally, prefix: str) -> None:
    keys = [f"{prefix}.{chat}" for chat in range(args.chats)]
    subscriptions = [[streams.Subscription(key) for _ in range(args.readers)] for key in keys]
    for chat_subscriptions in subscriptions:
        for subscription in chat_subscriptions:
            await subscription.start()

    async def read(reader: int, subscription) -> None:
        async for entry in subscription:
            tally.got(reader, entry.data)

    readers = [
        asyncio.ensure_future(read(reader, subscription))
        for chat_subscriptions in subscriptions
        for reader, subscription in enumerate(chat_subscriptions)
    ]

    async def publish(chat: int, publisher: int) -> None:
        for n in range(args.events):
            await streams.append(keys[chat], "bench", event(chat, publisher, n))

    await publish_all(args, publish, tally, readers, wait=60)
    for chat_subscriptions in subscriptions:
        for subscription in chat_subscriptions:
            await subscription.close()


async def run_pubsub(args, tally: Tally, prefix: str) -> None:
    client = redis.asyncio.Redis.from_url(settings.REDIS_ADDRESS)
    listeners = []
    for reader in range(args.readers):
        pubsub = client.pubsub()
        await pubsub.subscribe(*[f"{prefix}.{chat}" for chat in range(args.chats)])
        listeners.append((reader, pubsub))

    async def read(reader: int, pubsub) -> None:
        async for message in pubsub.listen():
            if message["type"] == "message":
                tally.got(reader, json.loads(message["data"]))

    readers = [asyncio.ensure_future(read(reader, pubsub)) for reader, pubsub in listeners]

    async def publish(chat: int, publisher: int) -> None:
        channel = f"{prefix}.{chat}"
        for n in range(args.events):
            # the seq and the replay copy a resume needs, then the publication: one pipeline
            async with client.pipeline(transaction=False) as pipe:
                text = json.dumps(event(chat, publisher, n))
                pipe.incr(f"{channel}:seq")
                pipe.set(f"{channel}:event:{publisher}:{n}", text, ex=60)
                pipe.publish(channel, text)
                await pipe.execute()

    await publish_all(args, publish, tally, readers, wait=10)
    for _, pubsub in listeners:
        await pubsub.aclose()
    async for key in client.scan_iter(f"{prefix}.*"):
        await client.delete(key)
    await client.aclose()


async def run_group_send(args, tally: Tally, prefix: str) -> None:
    layer = get_channel_layer()
    channels = []
    for chat in range(args.chats):
        for reader in range(args.readers):
            channel = await layer.new_channel()
            await layer.group_add(f"{prefix}-{chat}", channel)
            channels.append((reader, channel))

    async def read(reader: int, channel: str) -> None:
        while True:
            message = await layer.receive(channel)
            tally.got(reader, message["data"])

    readers = [asyncio.ensure_future(read(reader, channel)) for reader, channel in channels]

    async def publish(chat: int, publisher: int) -> None:
        for n in range(args.events):
            await layer.group_send(f"{prefix}-{chat}", {"type": "bench", "data": event(chat, publisher, n)})

    await publish_all(args, publish, tally, readers, wait=10)
    await layer.flush()


TRANSPORTS = {"streams": run_streams, "pubsub": run_pubsub, "group_send": run_group_send}


async def measure(name: str, args) -> dict:
    expected = args.chats * args.publishers * args.events * args.readers
    tally = Tally(expected)
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    cpu, wall = cpu_seconds(), time.perf_counter()
    await TRANSPORTS[name](args, tally, prefix)
    cpu, wall = cpu_seconds() - cpu, time.perf_counter() - wall
    delivered = len(tally.seen)
    return {
        "transport": name,
        "delivered": delivered,
        "expected": expected,
        "lost": expected - delivered,
        "duplicates": tally.duplicates,
        "published_per_second": round(args.chats * args.publishers * args.events / wall),
        "delay_p50_ms": round(percentile(tally.delays, 0.5) * 1000, 2),
        "delay_p99_ms": round(percentile(tally.delays, 0.99) * 1000, 2),
        "cpu_us_per_delivery": round(cpu / max(delivered, 1) * 1e6, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chats", type=int, default=10)
    parser.add_argument("--publishers", type=int, default=5, help="concurrent publishers per chat")
    parser.add_argument("--events", type=int, default=200, help="events per publisher")
    parser.add_argument("--readers", type=int, default=4, help="subscribers per chat")
    parser.add_argument("--transports", default=",".join(TRANSPORTS))
    args = parser.parse_args()
    started_at = datetime.now(UTC)
    results = []
    for name in args.transports.split(","):
        results.append(asyncio.run(measure(name, args)))
        print(json.dumps(results[-1]))
    # Like the other benchmarks: the JSON in bench/results/, its chart beside it (bench/charts.py).
    report = {
        "started_at": started_at.isoformat(),
        "finished_at": datetime.now(UTC).isoformat(),
        "settings": {name: getattr(args, name) for name in ("chats", "publishers", "events", "readers")},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "results": results,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = started_at.strftime("%Y%m%d-%H%M%S")
    paths = [RESULTS / f"stream_transport-{stamp}.json", RESULTS / "stream_transport-latest.json"]
    for path in paths:
        path.write_text(json.dumps(report, indent=2))
    charts = charts_write(report, paths)
    print("wrote " + ", ".join(str(path) for path in [*paths, *charts]), file=sys.stderr)


if __name__ == "__main__":
    main()
