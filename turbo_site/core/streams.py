"""Numbered, replayable event streams: the transport under every live front.

A stream has a key (`chat.<id>`, `sessions`). `append` gives an event the next sequence number of its
stream and keeps it for replay (STREAM_REPLAY_MAX events, and STREAM_REPLAY_SECONDS after the last
one); a `Subscription` replays what came after a number it is given, then follows the stream live.
Nothing is dropped silently: a subscriber that falls behind reads what it missed back from the
replay store, and when that is not possible (the window has passed, the store restarted empty) it
gets a `stream.gap` entry; when the transport fails it gets `stream.error` and ends.

Backends: in-process memory (the embedded default: one process) or Redis Streams when REDIS_ADDRESS
is set. Redis Streams were chosen over Pub/Sub because the stream *is* the replay store (one XADD
numbers, stores and publishes an event in one round trip; XREAD from the last id resumes with
nothing lost), while Pub/Sub drops whatever a subscriber misses and needs a second store beside
it (bench/README.md has the measurements). Each process reads every stream it has subscribers for
with one blocking XREAD on one connection, and hands each event to its local subscribers.

Sequence numbers: a stream's counter starts at the clock's time in microseconds, then counts up by
one per event. Redis here keeps nothing on disk, so a restart loses every counter; the new counter
starts from the clock again, above every number handed out before (unless a stream averaged more
than a million events a second), so numbers never go backwards and subscribers see the jump as a gap.
"""

import abc
import asyncio
import contextlib
import json
import logging
import os
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import redis
import redis.asyncio
from django.conf import settings

from turbo_site.core import metrics
from turbo_site.core.fastredis import FastRedis, bulk
from turbo_site.core.redis_retry import bounded_sync_client, fast_redis, redis_client, redis_own_connection

logger = logging.getLogger("turbo.streams")

# Redis failures that mean "the transport is unavailable", not a bug.
TRANSPORT_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)


class StreamUnavailable(Exception):
    """The stream transport (Redis) cannot be reached; the caller should answer 503 or retry."""


@dataclass(slots=True)
class Entry:
    """One event of a stream: `text` is its JSON, `seq` its number (0 for a notice that is not stored)."""

    seq: int
    type: str
    text: str
    at: float = 0.0  # time.time() of its append, when it came live (the fan-out delay metric); 0: unknown
    sse: bytes | None = field(default=None, repr=False, compare=False)  # its SSE frame, once made

    @property
    def data(self) -> dict:
        return json.loads(self.text)

    def sse_frame(self) -> bytes:
        """Its Server-Sent Events frame: stored events carry their number as `id:`, notices do not.

        Made once and kept: a live entry is one object shared by every subscriber of the process, so a
        chat with many SSE listeners encodes each event once, not once per listener."""
        if self.sse is None:
            head = b"event: message\ndata: " if self.is_notice else b"id: %d\nevent: message\ndata: " % self.seq
            self.sse = head + self.text.encode() + b"\n\n"
        return self.sse

    @property
    def is_notice(self) -> bool:
        return self.seq == 0


def notice(type: str, message: str, **fields: Any) -> Entry:
    """An entry for one subscriber only (gap, error, shutdown, closed): not numbered, not stored."""
    return Entry(0, type, json.dumps({"type": type, "message": message, **fields}, separators=(",", ":")))


def _clock_seq() -> int:
    return time.time_ns() // 1000


def _event_text(seq: int, type: str, payload: dict) -> str:
    body = json.dumps({"type": type, **payload}, separators=(",", ":"), default=str)
    return f'{{"seq":{seq},{body[1:]}'


# --- backends -------------------------------------------------------------------------------------


class _MemoryStream:
    __slots__ = ("counter", "entries", "touched", "listeners")

    def __init__(self):
        self.counter = 0
        self.entries: deque[Entry] = deque(maxlen=settings.STREAM_REPLAY_MAX)
        self.touched = 0.0
        self.listeners: set[Subscription] = set()


class MemoryBackend:
    """Streams in this process's memory, safe to append to from any thread."""

    def __init__(self):
        self._lock = threading.Lock()
        self._streams: dict[str, _MemoryStream] = {}

    def _stream(self, key: str) -> _MemoryStream:
        stream = self._streams.get(key)
        if stream is None:
            stream = self._streams[key] = _MemoryStream()
        return stream

    def append_sync(self, key: str, type: str, payload: dict) -> int:
        with self._lock:
            stream = self._stream(key)
            now = time.monotonic()
            if now - stream.touched > settings.STREAM_REPLAY_SECONDS:
                stream.entries.clear()
            stream.touched = now
            stream.counter = stream.counter + 1 if stream.counter else _clock_seq()
            entry = Entry(stream.counter, type, _event_text(stream.counter, type, payload), time.time())
            stream.entries.append(entry)
            # Handed over inside the lock, so every subscriber sees the stream's order.
            for subscription in stream.listeners:
                subscription.push_threadsafe(entry)
            return entry.seq

    async def append(self, key: str, type: str, payload: dict) -> int:
        return self.append_sync(key, type, payload)

    def append_soon(self, key: str, type: str, payload: dict) -> None:
        return None  # `append` never waits here

    async def range(self, key: str, after: int) -> tuple[list[Entry], int]:
        with self._lock:
            stream = self._streams.get(key)
            if stream is None:
                return [], 0
            if time.monotonic() - stream.touched > settings.STREAM_REPLAY_SECONDS:
                stream.entries.clear()
            return [entry for entry in stream.entries if entry.seq > after], stream.counter

    async def listen(self, key: str, subscription: "Subscription") -> None:
        with self._lock:
            self._stream(key).listeners.add(subscription)

    async def unlisten(self, key: str, subscription: "Subscription") -> None:
        with self._lock:
            stream = self._streams.get(key)
            if stream is not None:
                stream.listeners.discard(subscription)

    async def caught_up(self, keys: set[str]) -> None:
        """Nothing to wait for: an append hands its event to the stream's subscriptions itself (to one on
        another loop through that loop's queue, where it lands before any later `end_threadsafe`)."""


# Numbers the event, keeps it (bounded in length and time) and publishes it: one round trip.
_APPEND_SCRIPT = """
local seq = redis.call('INCR', KEYS[1])
if seq == 1 then
  local now = redis.call('TIME')
  seq = tonumber(now[1]) * 1000000 + tonumber(now[2])
end
local id = string.format('%.0f', seq)
redis.call('SET', KEYS[1], id, 'EX', ARGV[5])
local text = '{"seq":' .. id .. ',' .. string.sub(ARGV[2], 2)
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], id .. '-0', 't', ARGV[1], 'd', text, 'a', ARGV[6])
redis.call('EXPIRE', KEYS[2], ARGV[4])
return id
"""


def _raise_swallowed_cancellation() -> None:
    """Raise the cancellation of the running task if a Redis command swallowed it.

    redis-py (8.1, on Python 3.11) can complete a command whose task was cancelled mid-way and return
    normally, the CancelledError lost: a reply cancelled at shutdown then streamed on to its end (once
    in a few SIGTERMs). A task that runs on while a cancellation of it is pending (`cancelling()`) was
    told to stop and nobody has taken that back: it stops here.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def _redis_keys(key: str) -> tuple[str, str]:
    # One hash tag for both, so that they live on the same node of a Redis Cluster.
    return f"turbo:seq:{{{key}}}", f"turbo:stream:{{{key}}}"


def _seq_of(stream_id: bytes) -> int:
    return int(stream_id.split(b"-", 1)[0])


def _id_order(stream_id: bytes) -> tuple[int, int]:
    first, _, second = stream_id.partition(b"-")
    return int(first), int(second or 0)


class RedisBackend:
    """Streams in Redis, shared by every process; one reader task per process follows them."""

    def __init__(self, url: str):
        self.url = url
        self._sync_client: redis.Redis | None = None
        self._sync_pid: int | None = None

    # writes and reads
    def _client(self) -> redis.asyncio.Redis:
        return redis_client(self.url, purpose="streams", socket_timeout=5, socket_connect_timeout=3)

    def _sync(self) -> redis.Redis:
        if self._sync_client is None or self._sync_pid != os.getpid():
            self._sync_client = bounded_sync_client(self.url, socket_timeout=5, socket_connect_timeout=3)
            self._sync_pid = os.getpid()
        return self._sync_client

    def _append_args(self, key: str, type: str, payload: dict) -> tuple[list, list]:
        body = json.dumps({"type": type, **payload}, separators=(",", ":"), default=str)
        keep_seconds = max(settings.STREAM_REPLAY_SECONDS, 1)
        counter_seconds = max(7 * 86400, 2 * keep_seconds)
        appended_at = f"{time.time():.6f}"  # the fan-out delay metric's start
        args = [type, body, settings.STREAM_REPLAY_MAX, keep_seconds, counter_seconds, appended_at]
        return list(_redis_keys(key)), args

    def append_sync(self, key: str, type: str, payload: dict) -> int:
        keys, args = self._append_args(key, type, payload)
        try:
            return int(self._sync().eval(_APPEND_SCRIPT, len(keys), *keys, *args))
        except TRANSPORT_ERRORS as exc:
            raise StreamUnavailable(str(exc)) from exc

    async def append(self, key: str, type: str, payload: dict) -> int:
        keys, args = self._append_args(key, type, payload)
        try:
            fast = fast_redis(self.url)
            if fast is not None:
                # One pipelined connection for every append of the process: no pool to wait for, however
                # many replies stream at once, and a process's appends reach Redis in the order made.
                async with asyncio.timeout(5):
                    seq = int(await fast.script(_APPEND_SCRIPT, keys, args))
            else:
                client = self._client()
                script = getattr(client, "_turbo_append", None)
                if script is None:
                    script = client._turbo_append = client.register_script(_APPEND_SCRIPT)
                seq = int(await script(keys=keys, args=args))
        except TRANSPORT_ERRORS as exc:
            raise StreamUnavailable(str(exc)) from exc
        _raise_swallowed_cancellation()
        return seq

    def append_soon(self, key: str, type: str, payload: dict) -> asyncio.Future | None:
        """Send one append on the process's pipelined connection without waiting for it (None: not
        connected yet, `append` instead). Its future resolves to the id, or fails with a Redis error."""
        fast = fast_redis(self.url)
        if fast is None:
            return None
        keys, args = self._append_args(key, type, payload)
        return fast.script_nowait(_APPEND_SCRIPT, keys, args)

    async def range(self, key: str, after: int) -> tuple[list[Entry], int]:
        seq_key, stream_key = _redis_keys(key)
        start = f"({after}-0" if after else "-"
        try:
            async with self._client().pipeline(transaction=False) as pipe:
                pipe.xrange(stream_key, start, "+", count=settings.STREAM_REPLAY_MAX)
                pipe.get(seq_key)
                found, counter = await pipe.execute()
        except TRANSPORT_ERRORS as exc:
            raise StreamUnavailable(str(exc)) from exc
        _raise_swallowed_cancellation()
        entries = [Entry(_seq_of(i), f[b"t"].decode(), f[b"d"].decode()) for i, f in found]
        return entries, int(counter or 0)

    async def listen(self, key: str, subscription: "Subscription") -> None:
        await _reader_for(self).add(key, subscription)

    async def unlisten(self, key: str, subscription: "Subscription") -> None:
        reader = _readers.get(asyncio.get_running_loop())
        if reader is not None:
            reader.remove(key, subscription)

    async def caught_up(self, keys: set[str]) -> None:
        """Wait until this loop's reader has handed out everything stored in these streams so far."""
        reader = _readers.get(asyncio.get_running_loop())
        if reader is not None:
            await reader.caught_up(keys)


class _RedisReader:
    """One process's follower of every stream its subscribers want: one blocking XREAD, one connection."""

    BLOCK_MS = 5000

    def __init__(self, backend: RedisBackend):
        self.backend = backend
        self.listeners: dict[str, set[Subscription]] = {}
        self.positions: dict[bytes, bytes] = {}  # redis stream key -> last id read
        self.keys: dict[bytes, str] = {}
        self.starting: dict[str, asyncio.Task] = {}  # stream key -> the look-up of where it stands
        self.connection: FastRedis | redis.asyncio.Redis | None = None
        self.connection_id: int | None = None
        # The XREAD command in parts, kept packed: it names every stream followed (a thousand, in a
        # process whose clients watch a thousand chats), and packing those anew for every read cost
        # more than delivering what it read. Keys change when a stream is followed or dropped, ids as
        # entries are read.
        self.keys_packed: bytes | None = None
        self.ids_packed: dict[bytes, bytes] = {}
        self.reading = False
        self.version = 0  # bumped when the set of streams changes
        self.read_version = 0  # the version the running XREAD was sent with
        self.changed = asyncio.Event()
        self.delivered = asyncio.Event()  # set once a read's entries are handed out (or reading failed)
        self.task: asyncio.Task | None = None

    async def add(self, key: str, subscription: "Subscription") -> None:
        subscribers = self.listeners.get(key)
        if subscribers is None:
            # Subscribers of a stream not followed yet that arrive together share one look-up of where it
            # stands (a burst would otherwise take a Redis command, and a pooled connection, each).
            starting = self.starting.get(key)
            if starting is None:
                starting = self.starting[key] = asyncio.get_running_loop().create_task(self._last_id(key))
                starting.add_done_callback(lambda task: self._started(key, task))
            last = await asyncio.shield(starting)
            subscribers = self.listeners.get(key)
        if subscribers is not None:
            subscribers.add(subscription)
            return
        self.listeners[key] = {subscription}
        stream_key = _redis_keys(key)[1].encode()
        self.positions[stream_key] = last
        self.ids_packed[stream_key] = bulk(last)
        self.keys_packed = None
        self.keys[stream_key] = key
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self._run())
        await self._wake()

    async def _last_id(self, key: str) -> bytes:
        """The id of the stream's newest entry: following it starts after that one."""
        try:
            last = await self.backend._client().xrevrange(_redis_keys(key)[1], "+", "-", count=1)
        except TRANSPORT_ERRORS as exc:
            raise StreamUnavailable(str(exc)) from exc
        return last[0][0] if last else b"0-0"

    async def caught_up(self, keys: set[str]) -> None:
        """Wait until every one of these streams that is followed has been read (and its entries handed
        to the subscriptions) up to its newest entry as of now. Raises StreamUnavailable."""
        stream_keys = [stream_key for stream_key, key in self.keys.items() if key in keys]
        if not stream_keys:
            return
        try:
            async with self.backend._client().pipeline(transaction=False) as pipe:
                for stream_key in stream_keys:
                    pipe.xrevrange(stream_key, "+", "-", count=1)
                newest = await pipe.execute()
        except TRANSPORT_ERRORS as exc:
            raise StreamUnavailable(str(exc)) from exc
        _raise_swallowed_cancellation()  # a timeout swallowed by redis-py: not waited for without end below
        targets = [(k, _id_order(last[0][0])) for k, last in zip(stream_keys, newest, strict=True) if last]
        # A stream no longer followed (its subscribers left, or reading failed) is not waited for.
        while any(
            (position := self.positions.get(stream_key)) is not None and _id_order(position) < target
            for stream_key, target in targets
        ):
            self.delivered.clear()
            await self.delivered.wait()

    def _started(self, key: str, task: asyncio.Task) -> None:
        if self.starting.get(key) is task:
            del self.starting[key]
        if not task.cancelled():
            task.exception()  # read here, so that it is never reported as unretrieved

    def remove(self, key: str, subscription: "Subscription") -> None:
        subscribers = self.listeners.get(key)
        if subscribers is None:
            return
        subscribers.discard(subscription)
        if not subscribers:
            del self.listeners[key]
            stream_key = _redis_keys(key)[1].encode()
            self.positions.pop(stream_key, None)
            self.ids_packed.pop(stream_key, None)
            self.keys_packed = None
            self.keys.pop(stream_key, None)

    async def _wake(self) -> None:
        """Make the blocked XREAD return, so that the next one includes a new stream."""
        self.version += 1
        self.changed.set()
        # The XREAD may not have reached Redis yet (it travels on another connection): try a few times.
        for _ in range(50):
            if not self.reading or self.read_version == self.version or self.connection_id is None:
                return
            try:
                if await self.backend._client().client_unblock(self.connection_id):
                    return
            except TRANSPORT_ERRORS:
                return  # the reader fails on its own connection and tells the subscribers
            await asyncio.sleep(0.002)

    async def _connect(self) -> None:
        self.connection = redis_own_connection(
            self.backend.url, socket_timeout=self.BLOCK_MS / 1000 + 5, socket_connect_timeout=3
        )
        if not isinstance(self.connection, FastRedis):
            self.connection_id = await self.connection.client_id()
            return
        async with asyncio.timeout(self.BLOCK_MS / 1000 + 5):
            self.connection_id = await self.connection.send_once(b"*2\r\n$6\r\nCLIENT\r\n$2\r\nID\r\n")

    async def _run(self) -> None:
        failed_once = False  # the last read failed, and has not succeeded since
        while self.listeners:
            try:
                # redis-py can swallow a cancellation that lands mid-command: look for it each round.
                _raise_swallowed_cancellation()
                if self.connection is None:
                    await self._connect()
                    continue  # look for a cancellation again
                if not self.positions:
                    self.changed.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.changed.wait(), self.BLOCK_MS / 1000)
                    continue
                self.changed.clear()
                self.reading = True
                self.read_version = self.version
                try:
                    found = await self._read()
                finally:
                    self.reading = False
                failed_once = False
                for stream_key, entries in found or ():
                    key = self.keys.get(stream_key)
                    if key is None:
                        continue
                    for stream_id, fields in entries:
                        self.positions[stream_key] = stream_id
                        self.ids_packed[stream_key] = bulk(stream_id)
                        entry = Entry(
                            _seq_of(stream_id), fields[b"t"].decode(), fields[b"d"].decode(), float(fields.get(b"a", 0))
                        )
                        for subscription in tuple(self.listeners.get(key, ())):
                            subscription.push(entry)
                self.delivered.set()
            except asyncio.CancelledError:
                await self._disconnect()
                raise
            except TRANSPORT_ERRORS as exc:
                await self._disconnect()
                if not failed_once and self.positions:
                    # One failed read (a busy process can miss the read timeout) costs a new connection,
                    # not every subscriber's stream: the next read goes on from the same positions.
                    failed_once = True
                    logger.warning("live streams: a read failed (%s); reading again on a new connection", exc)
                    continue
                logger.warning("live streams interrupted: Redis unavailable (%s)", exc)
                self._fail_all()
            except Exception:
                logger.exception("live stream reader failed")
                self._fail_all()
                await self._disconnect()
        await self._disconnect()

    async def _read(self) -> list:
        """One blocking XREAD of every stream followed: [(stream key, [(id, {field: value})])], or None."""
        if not isinstance(self.connection, FastRedis):
            return await self.connection.xread(dict(self.positions), count=1000, block=self.BLOCK_MS)
        if self.keys_packed is None:
            self.keys_packed = b"".join(bulk(stream_key) for stream_key in self.positions)
        ids = self.ids_packed
        command = b"".join(
            (
                b"*%d\r\n$5\r\nXREAD\r\n$5\r\nCOUNT\r\n$4\r\n1000\r\n$5\r\nBLOCK\r\n%s$7\r\nSTREAMS\r\n"
                % (6 + 2 * len(self.positions), bulk(b"%d" % self.BLOCK_MS)),
                self.keys_packed,
                *(ids[stream_key] for stream_key in self.positions),
            )
        )
        async with asyncio.timeout(self.BLOCK_MS / 1000 + 5):
            found = await self.connection.send_once(command)
        return [
            (
                stream_key,
                [(stream_id, dict(zip(fields[::2], fields[1::2], strict=True))) for stream_id, fields in entries],
            )
            for stream_key, entries in found or ()
        ]

    def _fail_all(self) -> None:
        listeners, self.listeners = self.listeners, {}
        self.positions.clear()
        self.ids_packed.clear()
        self.keys_packed = None
        self.keys.clear()
        self.delivered.set()
        for subscribers in listeners.values():
            for subscription in subscribers:
                subscription.end(
                    notice(
                        "stream.error",
                        "the live stream was interrupted; reconnect (with Last-Event-ID) to resume",
                        code="unavailable",
                    )
                )

    async def _disconnect(self) -> None:
        client, self.connection, self.connection_id = self.connection, None, None
        if client is None:
            return
        if isinstance(client, FastRedis):
            await client.aclose()
            return
        try:
            # Close the socket without waiting for it to drain: a read cut short (cancelled at
            # shutdown, or Redis gone) can leave the graceful close waiting forever.
            if client.connection is not None:
                await asyncio.wait_for(client.connection.disconnect(nowait=True), 1)
            await asyncio.wait_for(client.aclose(), 1)
        except (Exception, TimeoutError):
            pass


_readers: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _RedisReader]" = weakref.WeakKeyDictionary()


def _reader_for(backend: RedisBackend) -> _RedisReader:
    loop = asyncio.get_running_loop()
    reader = _readers.get(loop)
    if reader is None or reader.backend is not backend:
        reader = _readers[loop] = _RedisReader(backend)
    return reader


_backend: MemoryBackend | RedisBackend | None = None
_backend_config: str | None = None
_backend_lock = threading.Lock()


def backend() -> MemoryBackend | RedisBackend:
    """The process's stream backend, by REDIS_ADDRESS (made again if the setting changes, as in tests)."""
    global _backend, _backend_config
    config = settings.REDIS_ADDRESS or ""
    if _backend is None or _backend_config != config:
        with _backend_lock:
            if _backend is None or _backend_config != config:
                _backend = RedisBackend(config) if config else MemoryBackend()
                _backend_config = config
    return _backend


# --- the API --------------------------------------------------------------------------------------


def append_sync(key: str, type: str, payload: dict) -> int:
    """Number, keep and publish one event from sync code; returns its number. Raises StreamUnavailable."""
    return backend().append_sync(key, type, payload)


async def append(key: str, type: str, payload: dict) -> int:
    """Number, keep and publish one event; returns its number. Raises StreamUnavailable."""
    return await backend().append(key, type, payload)


def _retrieve(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()  # looked at by Appends when it matters; never "exception was never retrieved"


class Appends:
    """One writer's events to one stream, sent in order without waiting for each to be numbered.

    A reply's deltas used to wait for each append's answer before the next could be read from the
    model: in a busy process every such wait is a turn or two of a crowded event loop, and the deltas
    queued up behind it (seconds, with a hundred replies streaming to thousands of subscribers). Here an
    append goes out at once on the process's one pipelined Redis connection, whose commands run in the
    order written, so the stream keeps the order sent. One that cannot go that way (not connected yet,
    the in-memory backend, a `rediss://` address) is awaited, after those in flight.

    `send` returns the text to send again with the writer's next event: that of events found not stored
    (their connection was lost), oldest first, then this event's own if it was not sent. An event sent
    after others were found lost is held back (its text returned with theirs) so that text never goes
    out of order; a failed awaited append's text comes back the same way.
    """

    MAX_IN_FLIGHT = 64  # beyond this many unanswered appends, a send first waits for them
    WAIT_SECONDS = 5.0  # as long as an awaited append may take

    def __init__(self, key: str):
        self.key = key
        self._in_flight: deque[tuple[asyncio.Future, str]] = deque()

    async def send(self, type: str, payload: dict, *, text: str = "") -> str:
        """Send one event carrying `text` (a delta's); the text to send again (see the class). Never
        raises StreamUnavailable."""
        lost = self._lost()
        if not lost and len(self._in_flight) >= self.MAX_IN_FLIGHT:
            lost = await self._settle()
        if lost:
            return lost + text
        sent = backend().append_soon(self.key, type, payload)
        if sent is not None:
            sent.add_done_callback(_retrieve)
            self._in_flight.append((sent, text))
            return ""
        lost = await self._settle()
        if lost:
            return lost + text
        try:
            await append(self.key, type, payload)
        except StreamUnavailable:
            return text
        return ""

    def forget(self) -> None:
        """Stop following the appends in flight: whether they are stored no longer matters (a reply's
        text was cut back, and a failed one's text must not come back)."""
        self._in_flight.clear()

    def _lost(self) -> str:
        lost = []
        while self._in_flight and self._in_flight[0][0].done():
            sent, text = self._in_flight.popleft()
            if sent.cancelled() or sent.exception() is not None:
                lost.append(text)
        return "".join(lost)

    async def _settle(self) -> str:
        """Wait for every append in flight (WAIT_SECONDS at most); the text of those not stored (one that
        did not answer in time counts as not stored)."""
        waiting, self._in_flight = self._in_flight, deque()
        if waiting:
            await asyncio.wait([sent for sent, _ in waiting], timeout=self.WAIT_SECONDS)
        return "".join(
            text for sent, text in waiting if not sent.done() or sent.cancelled() or sent.exception() is not None
        )


async def replay(key: str, after: int) -> tuple[list[Entry], bool]:
    """The kept events after `after`, and whether some between `after` and them are gone.

    `after=0` asks for everything kept and never reports a gap.
    """
    entries, counter = await backend().range(key, after)
    return entries, _is_gap(after, entries, counter)


def _is_gap(after: int, entries: list[Entry], counter: int) -> bool:
    if not after:
        return False
    if entries:
        return entries[0].seq != after + 1
    return counter != after


class ReadsByGet(abc.ABC):
    """`async for entry in x` over `x.get()`, for subscriptions (ended: StopAsyncIteration)."""

    @abc.abstractmethod
    async def get(self, timeout: float | None = None) -> Entry | None:
        """The next entry; None if nothing came within `timeout` seconds."""

    def __aiter__(self):
        return self

    async def __anext__(self) -> Entry:
        while True:
            entry = await self.get(timeout=None)
            if entry is not None:
                return entry


_TIMED_OUT = object()


def _time_up(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_result(_TIMED_OUT)


# Subscriptions open in this process, ended together at shutdown (after which no new one starts).
_open: "weakref.WeakSet[Subscription]" = weakref.WeakSet()
_closing = False


class Subscription(ReadsByGet):
    """Events of one stream: those after `after` (if given) from the replay store, then live, each once.

        async with Subscription("chat.1", after=41) as events:
            while (entry := await events.get(timeout=15)) is not None: ...   # None: nothing for 15 s

    `get` raises StopAsyncIteration once the subscription has ended (after handing out the notice that
    says why: `stream.error`, `server.shutdown`, `stream.closed`).
    """

    def __init__(self, key: str, after: int | None = None):
        self.key = key
        # The newest number handed out: None before the first of a live-only subscription, 0 before
        # the first of one that replays everything kept.
        self.last = after
        self._first_live: int | None = None
        self._after = after
        self._replayed: deque[Entry] = deque()
        self._live: deque[Entry] = deque()
        self._ending: Entry | None = None
        self._ended = False
        self._lagging = False
        self._settled = 0  # a live number whose hole was already filled (or reported)
        self._waiter: asyncio.Future | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started = False

    async def start(self) -> "Subscription":
        """Follow live first, then read the replay: together they miss nothing. Raises StreamUnavailable."""
        if _closing:
            raise StreamUnavailable("this server is shutting down")
        self._loop = asyncio.get_running_loop()
        await backend().listen(self.key, self)
        self._started = True
        _open.add(self)
        if self._after is not None:
            try:
                entries, counter = await backend().range(self.key, self._after)
            except BaseException:
                await self.close()
                raise
            gap = _is_gap(self._after, entries, counter)
            if self._after > counter:
                # A number this stream has not given out (a client's mistake, or a stream that expired and
                # started again): say so, then follow it from where it is, or every live event would look
                # already handed out.
                self.last = counter or None
            if gap:
                self._replayed.append(self._gap_notice())
            self._replayed.extend(entries)
        return self

    async def close(self) -> None:
        if self._started:
            self._started = False
            _open.discard(self)
            await backend().unlisten(self.key, self)

    async def __aenter__(self) -> "Subscription":
        return await self.start()

    async def __aexit__(self, *exc_info) -> None:
        await self.close()

    # called by the backend, on this subscription's loop
    def push(self, entry: Entry) -> None:
        if self._ending is not None:
            return
        if entry.at:
            metrics.stream_delivered(entry.at)
        if self._first_live is None:
            self._first_live = entry.seq
        if len(self._live) >= settings.STREAM_SUBSCRIBER_BUFFER:
            # Too slow a reader: drop what is buffered here and read it back from the replay store.
            self._live.clear()
            self._lagging = True
        else:
            self._live.append(entry)
        self._wake()

    def push_threadsafe(self, entry: Entry) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self.push(entry)
        else:
            loop.call_soon_threadsafe(self.push, entry)

    def end(self, why: Entry, *, at_once: bool = True) -> None:
        """End the subscription with a notice; `at_once=False` hands out what is already buffered first."""
        if self._ending is None:
            self._ending = why
            if at_once:
                self._replayed.clear()
                self._live.clear()
            self._wake()

    def end_threadsafe(self, why: Entry, *, at_once: bool = True) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(lambda: self.end(why, at_once=at_once))

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _gap_notice(self) -> Entry:
        return notice(
            "stream.gap",
            "some events are no longer available (the replay window has passed); reload the chat",
            after=self.last if self.last is not None else (self._after or 0),
        )

    async def get(self, timeout: float | None = None) -> Entry | None:
        """The next entry; None if nothing came within `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self._ended:
                raise StopAsyncIteration
            entry = await self._next_ready()
            if entry is not None:
                return entry
            if self._ending is not None and not self._replayed and not self._live:
                self._ended = True
                return self._ending
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return None
            # A future and a timer, not asyncio.wait_for: on Python 3.11 that costs a second future and a
            # callback per wait, and every subscriber waits once per event it is handed.
            waiter = self._waiter = self._loop.create_future()
            timer = None if remaining is None else self._loop.call_later(remaining, _time_up, waiter)
            try:
                await waiter
            finally:
                self._waiter = None
                if timer is not None:
                    timer.cancel()
            if waiter.result() is _TIMED_OUT:
                return None

    async def _next_ready(self) -> Entry | None:
        while True:
            if self._replayed:
                entry = self._replayed.popleft()
            elif self._lagging and self._ending is None:
                self._lagging = False
                await self._refill(upto=None)
                continue
            elif self._live:
                entry = self._live[0]
                if self.last and entry.seq > self.last + 1 and entry.seq != self._settled:
                    # A hole between what was handed out and what came live: fill it from the store.
                    self._settled = entry.seq
                    await self._refill(upto=entry.seq)
                    continue
                self._live.popleft()
            else:
                return None
            if entry.is_notice:
                return entry
            if self.last is not None and entry.seq <= self.last:
                continue  # already handed out (replay and live overlap)
            self.last = entry.seq
            return entry

    async def _refill(self, upto: int | None) -> None:
        """Queue the stored events after `last` (and before `upto`), with a gap notice if some are gone."""
        after = self.last
        if after is None:  # live only, nothing handed out yet: from the first event that came live
            if self._first_live is None:
                return
            after = self._first_live - 1
        try:
            entries, gap = await replay(self.key, after)
        except StreamUnavailable:
            self.end(notice("stream.error", "the live stream was interrupted; reconnect to resume", code="unavailable"))
            return
        if self.last is None:
            gap = bool(entries) and entries[0].seq != after + 1  # did the live start leave the window?
        if upto is not None:
            entries = [entry for entry in entries if entry.seq < upto]
            if after:
                gap = gap or (entries[-1].seq if entries else after) != upto - 1
        if gap:
            self._replayed.append(self._gap_notice())
        self._replayed.extend(entries)


async def subscriptions_caught_up(timeout: float = 1.0) -> bool:
    """Wait (`timeout` seconds at most) until each open subscription of this loop not ended yet has been
    handed everything stored in its stream so far; False if that did not happen in time.

    At shutdown, before `subscriptions_end_all`: on Redis a reply's final event is stored as soon as its
    append returns, but this process's reader may not have read it back and handed it to the
    subscriptions yet, and one ended before then would miss it (it got `server.shutdown` first).
    """
    loop = asyncio.get_running_loop()
    keys = {s.key for s in list(_open) if s._loop is loop and s._ending is None}
    if not keys:
        return True
    try:
        async with asyncio.timeout(timeout):
            await backend().caught_up(keys)
    except (TimeoutError, StreamUnavailable) as exc:
        logger.warning("shutdown: open streams not caught up with what was stored (%s)", exc or "timed out")
        return False
    return True


def subscriptions_end_all(why: Entry) -> int:
    """End every open subscription of this process (at shutdown), after what each has buffered."""
    global _closing
    _closing = True
    count = 0
    for subscription in list(_open):
        subscription.end_threadsafe(why, at_once=False)
        count += 1
    return count
