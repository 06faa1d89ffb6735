"""Turbo's whole ASGI app served in process to a synchronous httpx client, inside the test's transaction.

`InProcessTransport` hands each request to `turbo_site.asgi.application` (the same stack a server runs:
metrics, tracing, the /v1 fast path, Django's middleware) through `httpx.ASGITransport`, on an event
loop of its own made by asgiref's `async_to_sync`, as Django's own test client does. The thread that
sends the request (the test's) serves the app's thread-sensitive `sync_to_async` calls meanwhile, so
the ORM answers on the test's own database connection: a test marked `django_db` without
`transaction=True` sees everything the request wrote, and the database is rolled back after it rather
than flushed (a TRUNCATE of every table on Postgres).

`run_in_process` runs any scenario the same way, such as a WebSocket through channels' communicator.

What a committed transaction would set off (`transaction.on_commit`: cache invalidation, stream
sends) runs when the request ends, as it would have after the view's commit.

Its limits, which keep such tests on the live server (`live_client`): the body is read whole before
the response is returned, so a stream that waits for the client to go away never ends; the request's
loop is closed once the response is complete, so work it leaves running (a chat's reply) is cancelled;
and the app's calls that use a thread of their own (`thread_sensitive=False`: the cache, /health's
checks) see only what is committed.
"""

import asyncio
import threading
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import Executor
from contextlib import contextmanager
from typing import TypeVar
from unittest import mock

import httpx
from asgiref.current_thread_executor import CurrentThreadExecutor
from asgiref.sync import AsyncToSync, async_to_sync
from django.core.signals import request_finished, request_started
from django.db import close_old_connections
from django.test import TestCase

ORIGIN = "http://127.0.0.1"

T = TypeVar("T")


@contextmanager
def connection_kept() -> Iterator[None]:
    """While app code runs for the test, nothing closes the test's own database connection (closing it
    inside the test's transaction ends the transaction): not the request signals (as Django's test client
    does), nor channels' database_sync_to_async and its consumers' aclose_old_connections, which close
    old connections around each call (as channels' own test communicator does, but for as long as this
    lasts: its communicator's wait() for a consumer to finish is not covered). Other threads' connections
    are closed as usual."""
    ours = threading.get_ident()

    def close_old_connections_but_ours(**kwargs):
        if threading.get_ident() != ours:
            close_old_connections(**kwargs)

    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    try:
        with mock.patch("channels.db.close_old_connections", close_old_connections_but_ours):
            yield
    finally:
        request_started.connect(close_old_connections)
        request_finished.connect(close_old_connections)


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


def run_in_process(scenario: Callable[[], Awaitable[T]]) -> T:
    """`await scenario()` on an event loop of asgiref's, as the in-process client's requests run: the app's
    thread-sensitive calls on this thread's connection, inside the test's transaction, and what would
    run on commit run at the end. For a scenario that drives the ASGI app itself, such as a WebSocket
    through channels' WebsocketCommunicator(turbo_site.asgi.application, path)."""
    running: list[CurrentThreadExecutor] = []

    async def on_this_thread() -> T:
        loop = asyncio.get_running_loop()
        AsyncToSync.loop_thread_executors[loop] = _InnermostExecutor(AsyncToSync.loop_thread_executors[loop], running)
        return await scenario()

    with connection_kept(), _innermost_executor_tracked(running), TestCase.captureOnCommitCallbacks(execute=True):
        return async_to_sync(on_this_thread)()


class InProcessTransport(httpx.BaseTransport):
    def __init__(self, app=None, client_address: tuple[str, int] = ("127.0.0.1", 40000)):
        if app is None:
            from turbo_site.asgi import application as app
        self._asgi = httpx.ASGITransport(app=app, client=client_address)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        body = request.read()

        async def exchange() -> tuple[int, httpx.Headers, bytes]:
            # The request's own headers, as they would cross a socket: `content=` would add a Content-Length
            # to a chunked body (and so skip the app's reading of a body that declares no length).
            inner = httpx.Request(request.method, request.url, headers=request.headers, stream=httpx.ByteStream(body))
            response = await self._asgi.handle_async_request(inner)
            content = await response.aread()
            return response.status_code, response.headers, content

        status, headers, content = run_in_process(exchange)
        # The body as the app sent it: httpx decodes a compressed one for the client as it would off a socket.
        return httpx.Response(status, headers=headers, stream=httpx.ByteStream(content), request=request)


def in_process_client(**options) -> httpx.Client:
    """An httpx client whose requests `InProcessTransport` serves (httpx.Client's options otherwise)."""
    options.setdefault("timeout", 30)
    return httpx.Client(transport=InProcessTransport(), base_url=ORIGIN, **options)
