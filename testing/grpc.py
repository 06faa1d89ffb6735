"""Turbo's gRPC server (turbo_site/grpc.py) for tests: on a free loopback port, on its own thread and event
loop, sharing the test database (like conftest.py's LiveServer for HTTP), and clients for it.

    server = GrpcServer().start()
    async with server.channel() as channel:
        stub = turbo_pb2_grpc.CompletionsStub(channel)
        reply = await stub.Complete(request, metadata=bearer(token))
    server.stop()

In a test that runs in one transaction, `serving()` starts it on the running loop instead (a scenario of
testing.inprocess.run_in_process), so its servicers' database calls run on the test's connection.
"""

import asyncio
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import grpc


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    """The call metadata that authenticates as `token` (a session token or an API key)."""
    return (("authorization", f"Bearer {token}"),)


class GrpcServer:
    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="grpc-test-server", daemon=True)
        self.running = None
        self.address = ""

    def _call(self, coroutine, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def start(self) -> "GrpcServer":
        from turbo_site.grpc import server_start

        self.thread.start()
        self.running = self._call(server_start("127.0.0.1:0"))
        self.address = f"127.0.0.1:{self.running.port}"
        return self

    def stop(self) -> None:
        from turbo_site.core.loops import loop_clients_close

        if self.running is not None:
            self._call(self.running.server.stop(None))
            self._call(loop_clients_close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)

    def channel(self) -> grpc.aio.Channel:
        """A new grpc.aio channel to the server (use `async with`, in the test's own event loop)."""
        return grpc.aio.insecure_channel(self.address)


@asynccontextmanager
async def serving() -> AsyncIterator[grpc.aio.Channel]:
    """Turbo's gRPC server on a free loopback port, on the running loop, and a channel to it; the server stops
    at the end (calls still open are cancelled)."""
    from turbo_site.grpc import server_start

    running = await server_start("127.0.0.1:0")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            yield channel
    finally:
        await running.server.stop(None)
