"""A lean Redis client for the proxy's hot path: one pipelined connection per event loop.

Every proxied call reads its token's cached lookup and, with limits on, runs one script before the
upstream call and one after. Through redis-py's asyncio client each of those costs about 120 µs of CPU
(connection pool, retry and observability layers, a task per timeout); here a command is a few bytes
written to one connection and a future resolved by the reply, about a fifth of that (bench/README.md).

Only what the hot path needs: `execute(*args)` for commands whose replies are integers, strings (as
bytes), nil and arrays of those, over `redis://` addresses (user, password and database number
honoured). Anything else (`rediss://`, `unix://`) gets None from `fast_redis()` and callers use
redis-py. Commands are pipelined: replies come back in the order sent, each to its own waiter, so a
waiter that gave up (timed out, cancelled) leaves the connection in step. Errors are redis-py's
exception classes, so callers handle both clients alike: a lost connection fails its waiters with
ConnectionError, and a command whose connection was lost is sent once more on a new one (as the
redis-py clients here do).

The clients are made where every Redis client is made: turbo_site.core.redis_retry (`fast_redis`, the
loop's shared one; `redis_own_connection`, one of a blocking reader's own).
"""

import asyncio
import functools
import hashlib
from collections import deque
from urllib.parse import unquote, urlsplit

import redis.exceptions

CONNECT_SECONDS = 10.0
CLOSE_WAIT_SECONDS = 1.0  # at shutdown, for replies still on their way


@functools.cache
def script_sha(script: str) -> str:
    """The SHA1 Redis names a script by (EVALSHA)."""
    return hashlib.sha1(script.encode()).hexdigest()


def bulk(data: bytes) -> bytes:
    """One argument of a command as Redis reads it (for callers that keep parts of a command packed)."""
    return b"$%d\r\n%s\r\n" % (len(data), data)


def _pack(args: tuple) -> bytes:
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, bytes):
            data = arg
        elif isinstance(arg, str):
            data = arg.encode()
        elif isinstance(arg, float):
            data = repr(arg).encode()
        elif isinstance(arg, int) and not isinstance(arg, bool):
            data = b"%d" % arg
        else:
            raise redis.exceptions.DataError(f"cannot send a {type(arg).__name__} to Redis")
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


class _Incomplete(Exception):
    """The buffer ends inside a reply: wait for more bytes."""


def _error(message: bytes) -> redis.exceptions.ResponseError:
    text = message.decode("utf-8", "replace")
    if text.startswith("NOSCRIPT"):
        return redis.exceptions.NoScriptError(text)
    return redis.exceptions.ResponseError(text)


def _parse(buffer: bytearray, at: int):
    """One reply starting at `at`: (reply, where the next one starts). Raises _Incomplete."""
    end = buffer.find(b"\r\n", at)
    if end < 0:
        raise _Incomplete
    kind, line = buffer[at], bytes(buffer[at + 1 : end])
    after = end + 2
    if kind == 0x3A:  # ':' integer
        return int(line), after
    if kind == 0x24:  # '$' bulk string
        size = int(line)
        if size < 0:
            return None, after
        if len(buffer) < after + size + 2:
            raise _Incomplete
        return bytes(buffer[after : after + size]), after + size + 2
    if kind == 0x2A:  # '*' array
        count = int(line)
        if count < 0:
            return None, after
        items = []
        for _ in range(count):
            item, after = _parse(buffer, after)
            items.append(item)
        return items, after
    if kind == 0x2B:  # '+' simple string
        return line, after
    if kind == 0x2D:  # '-' error
        return _error(line), after
    raise redis.exceptions.InvalidResponse(f"unexpected reply from Redis: {bytes(buffer[at:end])[:40]!r}")


class _Connection(asyncio.Protocol):
    def __init__(self):
        self.transport: asyncio.Transport | None = None
        self.outgoing: list[bytes] | None = None  # commands sent in this turn of the loop, not yet written
        self.buffer = bytearray()
        self.waiting: deque[asyncio.Future] = deque()
        self.scripts: set[str] = set()  # the SHA1s of the scripts this connection has sent whole (EVAL)
        self.lost = False

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        at = 0
        try:
            while at < len(self.buffer):
                reply, at = _parse(self.buffer, at)
                waiter = self.waiting.popleft() if self.waiting else None
                if waiter is not None and not waiter.done():
                    if isinstance(reply, redis.exceptions.ResponseError):
                        waiter.set_exception(reply)
                    else:
                        waiter.set_result(reply)
        except _Incomplete:
            pass
        except Exception as exc:  # out of step with the server: start again on a new connection
            self._fail(redis.exceptions.ConnectionError(f"Redis connection out of step: {exc}"))
            self.transport.close()
            return
        del self.buffer[:at]

    def connection_lost(self, exc) -> None:
        self._fail(redis.exceptions.ConnectionError(f"Connection closed by server ({exc or 'end of stream'})"))

    def _fail(self, error: Exception) -> None:
        self.lost = True
        while self.waiting:
            waiter = self.waiting.popleft()
            if not waiter.done():
                waiter.set_exception(error)

    def send(self, payload: bytes) -> asyncio.Future:
        """Queue one command; every command sent in the same turn of the event loop goes out in one
        write at its end (a socket write is a system call holding the GIL: at 16 calls in flight the
        admissions, settlements and token reads of several requests share one)."""
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        self.waiting.append(waiter)
        if self.outgoing is None:
            self.outgoing = [payload]
            loop.call_soon(self._write)
        else:
            self.outgoing.append(payload)
        return waiter

    def _write(self) -> None:
        outgoing, self.outgoing = self.outgoing, None
        if outgoing and not self.lost and not self.transport.is_closing():
            self.transport.write(outgoing[0] if len(outgoing) == 1 else b"".join(outgoing))


class FastRedis:
    """One loop's pipelined connection to one Redis database (see the module's docstring)."""

    def __init__(self, host: str, port: int, db: int, username: str | None, password: str | None):
        self.host, self.port, self.db = host, port, db
        self.username, self.password = username, password
        self._connection: _Connection | None = None
        self._connecting: asyncio.Future | None = None
        self.closed = False

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(CONNECT_SECONDS):
            try:
                _, connection = await loop.create_connection(_Connection, self.host, self.port)
            except OSError as exc:
                raise redis.exceptions.ConnectionError(f"cannot reach Redis at {self.host}:{self.port}: {exc}") from exc
            hello = []
            if self.password is not None:
                auth = ("AUTH", self.username, self.password) if self.username else ("AUTH", self.password)
                hello.append(connection.send(_pack(auth)))
            if self.db:
                hello.append(connection.send(_pack(("SELECT", self.db))))
            try:
                for waiter in hello:
                    await waiter
            except BaseException:
                connection.transport.close()
                raise
        return connection

    async def _ready(self) -> _Connection:
        connection = self._connection
        if connection is not None and not connection.lost:
            return connection
        if self._connecting is None:  # one connect for every command waiting on it
            self._connecting = asyncio.ensure_future(self._connect())
        connecting = self._connecting
        try:
            self._connection = await asyncio.shield(connecting)
        finally:
            if self._connecting is connecting and connecting.done():
                self._connecting = None
        return self._connection

    async def execute(self, *args):
        """Send one command, return its reply (raises redis-py's exceptions)."""
        payload = _pack(args)
        connection = await self._ready()
        try:
            return await connection.send(payload)
        except redis.exceptions.ConnectionError:
            connection = await self._ready()  # once more, on a new connection (as redis_retry does)
            return await connection.send(payload)

    async def send_once(self, payload: bytes):
        """Send a command already packed (`*N` and its arguments) and return its reply, with no second try
        on a new connection: for a caller that must know which connection it talked to (the stream
        reader's blocking XREAD, which another connection unblocks by this one's CLIENT ID)."""
        connection = await self._ready()
        return await connection.send(payload)

    async def script(self, script: str, keys: list, args: list):
        """Run a Lua script: EVAL the first time on a connection, EVALSHA after (EVAL again on NOSCRIPT)."""
        sha = script_sha(script)
        connection = await self._ready()
        try:
            return await self._script_send(connection, script, sha, keys, args)
        except redis.exceptions.NoScriptError:  # the server's scripts were flushed
            connection.scripts.discard(sha)
        except redis.exceptions.ConnectionError:
            connection = await self._ready()
        return await self._script_send(connection, script, sha, keys, args)

    def script_nowait(self, script: str, keys: list, args: list) -> asyncio.Future | None:
        """Send a script now without waiting for its reply (None: not connected; await `script` instead).

        Commands on the connection run in the order written, so whatever this process sends next
        (the next call's admission) finds the script's effect in place."""
        connection = self._connection
        if connection is None or connection.lost:
            return None
        sha = script_sha(script)
        sent = self._script_send(connection, script, sha, keys, args)
        sent.add_done_callback(lambda done: _forget_flushed(connection, sha, done))
        return sent

    @staticmethod
    def _script_send(connection: _Connection, script: str, sha: str, keys: list, args: list) -> asyncio.Future:
        if sha in connection.scripts:
            return connection.send(_pack(("EVALSHA", sha, len(keys), *keys, *args)))
        connection.scripts.add(sha)
        return connection.send(_pack(("EVAL", script, len(keys), *keys, *args)))

    async def aclose(self) -> None:
        self.closed = True
        connection = self._connection
        if connection is not None and connection.transport is not None:
            if connection.waiting and not connection.lost:  # settlements sent without waiting: let them land
                await asyncio.wait(list(connection.waiting), timeout=CLOSE_WAIT_SECONDS)
            connection.transport.close()
        self._connection = None


def _forget_flushed(connection: _Connection, sha: str, done: asyncio.Future) -> None:
    """A script sent without waiting found the server's scripts flushed: the next send is EVAL again."""
    if not done.cancelled() and isinstance(done.exception(), redis.exceptions.NoScriptError):
        connection.scripts.discard(sha)


@functools.lru_cache(maxsize=16)
def fast_address(location: str) -> tuple | None:
    """(host, port, db, username, password) of a `redis://` address, FastRedis's arguments; None for an
    address it does not speak (`rediss://`, `unix://`: redis-py serves those)."""
    parts = urlsplit(location)
    if parts.scheme != "redis" or not parts.hostname:
        return None
    path = parts.path.strip("/")
    try:
        db = int(path) if path else 0
        port = parts.port or 6379
    except ValueError:
        return None
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else None
    return parts.hostname, port, db, username, password
