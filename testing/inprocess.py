"""Turbo's whole ASGI app served in process to a synchronous httpx client, inside the test's transaction.

`InProcessTransport` hands each request to `turbo_site.asgi.application` (the same stack a server runs:
metrics, tracing, the /v1 fast path, Django's middleware) through `httpx.ASGITransport`, on an event
loop of its own made by asgiref's `async_to_sync`, as Django's own test client does. The thread that
sends the request (the test's) serves the app's thread-sensitive `sync_to_async` calls meanwhile, so
the ORM answers on the test's own database connection: a test marked `django_db` without
`transaction=True` sees everything the request wrote, and the database is rolled back after it rather
than flushed (a TRUNCATE of every table on Postgres). `run_in_process` runs any scenario the same way,
such as a WebSocket through Channels' communicator.

What a committed transaction would set off (`transaction.on_commit`: cache invalidation, stream
sends) runs when the request ends, as it would have after the view's commit.

Its limits, which keep such tests on the live server (`live_client`): the body is read whole before
the response is returned, so a stream that waits for the client to go away never ends; the request's
loop is closed once the response is complete, so work it leaves running (a chat's reply) is cancelled;
and the app's calls that use a thread of their own (`thread_sensitive=False`: the cache, /health's
checks) see only what is committed.

Channels' `database_sync_to_async` (the /v1 fast path's and the consumers' ORM calls, the gateway's)
calls `close_old_connections` before and after each call; on the test's thread, inside its transaction
(autocommit off), that would close the test's connection. `connection_kept()` makes it leave the
test thread's connection alone: while a request is served here, and (conftest) for the whole of a test
that runs in one transaction, which may call the app's async code itself through `async_to_sync`.
"""

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import Executor
from contextlib import contextmanager
from typing import TypeVar
from unittest import mock

import channels.db
import httpx
from asgiref.current_thread_executor import CurrentThreadExecutor
from asgiref.sync import AsyncToSync, async_to_sync
from django.core.signals import request_finished, request_started
from django.db import close_old_connections, connection

logger = logging.getLogger(__name__)

ORIGIN = "http://127.0.0.1"

T = TypeVar("T")


def run_in_process(scenario: Callable[[], Awaitable[T]]) -> T:
    """`await scenario()` on an event loop of asgiref's, as the in-process client's requests run: the app's
    thread-sensitive calls on this thread's connection, inside the test's transaction, and what would
    run on commit run at the end. For a scenario that drives the ASGI app itself, such as a WebSocket
    through Channels' WebsocketCommunicator(turbo_site.asgi.application, path)."""
    running: list[CurrentThreadExecutor] = []

    async def on_this_thread() -> T:
        loop = asyncio.get_running_loop()
        AsyncToSync.loop_thread_executors[loop] = _InnermostExecutor(AsyncToSync.loop_thread_executors[loop], running)
        return await scenario()

    # As Django's test client does: the handler's signals would otherwise close the test's connection.
    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    try:
        with connection_kept(), _innermost_executor_tracked(running), _committed_at_the_end():
            return async_to_sync(on_this_thread)()
    finally:
        request_started.connect(close_old_connections)
        request_finished.connect(close_old_connections)


@contextmanager
def _committed_at_the_end() -> Iterator[None]:
    """Run what was registered with `transaction.on_commit` meanwhile (and what that registers) at the end,
    as a commit would, once: what ran leaves the list, so a scenario around a request does not run the
    request's again (Django's captureOnCommitCallbacks leaves them there)."""
    start = len(connection.run_on_commit)
    try:
        yield
    finally:
        while len(connection.run_on_commit) > start:
            pending = connection.run_on_commit[start:]
            del connection.run_on_commit[start:]
            for _, callback, robust in pending:
                if not robust:
                    callback()
                    continue
                try:
                    callback()
                except Exception:
                    logger.exception("an on-commit callback failed")


class _InnermostExecutor(Executor):
    """This thread's innermost running CurrentThreadExecutor, for the loop's tasks of no request.

    asgiref sends the thread-sensitive calls of a task made in a fresh context (a chat's generation, which
    outlives its request) to the executor of the async_to_sync that started the loop: the test's thread,
    outermost. When a sync view on that thread calls async_to_sync itself (a program chat's opening turn,
    generation.program_open), the thread serves only that inner call's executor until it returns, and the
    task's calls, queued on the outer one, never run. Sent to the innermost one running, they run."""

    def __init__(self, outermost: CurrentThreadExecutor, running: list[CurrentThreadExecutor]):
        self.outermost = outermost
        self.running = running

    def submit(self, fn, /, *args, **kwargs):
        return (self.running[-1] if self.running else self.outermost).submit(fn, *args, **kwargs)


@contextmanager
def _innermost_executor_tracked(running: list[CurrentThreadExecutor]) -> Iterator[None]:
    ours = threading.get_ident()
    run_until_future = CurrentThreadExecutor.run_until_future

    def tracked(executor, future):
        if threading.get_ident() != ours:
            return run_until_future(executor, future)
        running.append(executor)
        try:
            return run_until_future(executor, future)
        finally:
            running.remove(executor)

    with mock.patch.object(CurrentThreadExecutor, "run_until_future", tracked):
        yield


class InProcessTransport(httpx.BaseTransport):
    def __init__(self, app=None, client_address: tuple[str, int] = ("127.0.0.1", 40000)):
        if app is None:
            from turbo_site.asgi import application as app
        self._asgi = httpx.ASGITransport(app=app, client=client_address)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        # The headers as they are and the body in the client's pieces, as the app would read them off a
        # socket: a body sent from a generator comes in chunks under Transfer-Encoding with no
        # Content-Length (giving it `content=` would add one, and the app would judge it by that instead).
        chunks = [bytes(chunk) for chunk in request.stream if chunk]

        async def exchange() -> tuple[int, httpx.Headers, bytes]:
            inner = httpx.Request(request.method, request.url, headers=request.headers, stream=_Chunks(chunks))
            response = await self._asgi.handle_async_request(inner)
            content = await response.aread()
            return response.status_code, response.headers, content

        status, headers, content = run_in_process(exchange)
        # The body as the app sent it: httpx decodes a compressed one for the client as it would off a socket.
        return httpx.Response(status, headers=headers, stream=httpx.ByteStream(content), request=request)


class _Chunks(httpx.AsyncByteStream):
    def __init__(self, chunks: list[bytes]):
        self._chunks = chunks

    async def __aiter__(self):
        for chunk in self._chunks:
            yield chunk


@contextmanager
def connection_kept() -> Iterator[None]:
    """Channels' close_old_connections calls skip the calling thread's connection (the test's)."""
    test_thread = threading.get_ident()
    before = channels.db.close_old_connections

    def close_old_connections_but_the_tests(**kwargs) -> None:
        if threading.get_ident() != test_thread:
            close_old_connections(**kwargs)

    channels.db.close_old_connections = close_old_connections_but_the_tests
    try:
        yield
    finally:
        channels.db.close_old_connections = before


def in_process_client(**options) -> httpx.Client:
    """An httpx client whose requests `InProcessTransport` serves (httpx.Client's options otherwise)."""
    options.setdefault("timeout", 30)
    return httpx.Client(transport=InProcessTransport(), base_url=ORIGIN, **options)
