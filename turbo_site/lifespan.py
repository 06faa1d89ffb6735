"""ASGI lifespan: what Turbo does when the server (uvicorn) starts and stops.

SIGTERM first drains this process, before the server stops: new prompts are refused (503), running
generations get SHUTDOWN_GRACE_SECONDS to finish (then they are cancelled and saved as interrupted),
their final events reach the subscribers here, and every open stream gets a `server.shutdown` notice
and ends. Only then is the signal handed to the server, which closes what is left, and on lifespan
shutdown queued events are written. A second SIGTERM (or SIGINT) goes straight to the server.
Servers without lifespan (daphne) exit through the atexit hook in proxy.events.
"""

import asyncio
import logging
import signal
import threading

from asgiref.sync import sync_to_async
from django.conf import settings

from turbo_site.core.startup import heap_freeze

logger = logging.getLogger("turbo")


async def drain() -> None:
    """Finish (or save) running generations, then end every open stream with a shutdown notice."""
    from chats.running import generations_stop
    from chats.stream import shutdown_notice
    from turbo_site.core import streams

    await generations_stop(grace_seconds=settings.SHUTDOWN_GRACE_SECONDS)
    # The replies' final events are stored, but on Redis this process's reader may not have read them
    # back yet: a stream ended before then would get `server.shutdown` without the final event.
    await streams.subscriptions_caught_up(timeout=1.0)
    ended = streams.subscriptions_end_all(shutdown_notice())
    logger.info("shutdown: %d open streams told to reconnect", ended)
    for _ in range(50):  # the streams' last frames go out before the server closes their connections
        if not len(streams._open):
            break
        await asyncio.sleep(0.05)


def _drain_before_server_stops(loop: asyncio.AbstractEventLoop) -> None:
    """Put drain() in front of the server's own SIGTERM handler (uvicorn's, in the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return  # a server in a thread (tests) installs no signal handlers
    server_handler = signal.getsignal(signal.SIGTERM)
    if not callable(server_handler):
        return
    started = False

    def on_sigterm(signum, frame):
        nonlocal started
        if started:
            server_handler(signum, frame)
            return
        started = True
        logger.info("SIGTERM: draining before shutdown")
        loop.call_soon_threadsafe(lambda: loop.create_task(_drain_then(server_handler, signum)))

    signal.signal(signal.SIGTERM, on_sigterm)


async def _drain_then(server_handler, signum) -> None:
    try:
        await asyncio.wait_for(drain(), settings.SHUTDOWN_GRACE_SECONDS + settings.FINAL_SAVE_RETRY_SECONDS + 10)
    except Exception:
        logger.exception("draining did not finish cleanly")
    server_handler(signum, None)


async def on_shutdown() -> None:
    from proxy.events import events_shutdown, events_writer_stop
    from turbo_site.core.loops import loop_clients_close
    from turbo_site.core.tracing import tracing_shutdown

    for task in _background:
        task.cancel()
    await drain()  # a no-op when SIGTERM already drained
    await loop_clients_close()
    await events_writer_stop()  # its flush in flight ends; what is left is written just below
    await sync_to_async(events_shutdown, thread_sensitive=False)()
    await sync_to_async(tracing_shutdown, thread_sensitive=False)()  # the last spans, when tracing is on


# Tasks that live as long as the server (kept here so that they are not garbage-collected).
_background: set[asyncio.Task] = set()


async def _sweeper() -> None:
    from chats.sweeper import sweeper_run

    await sweeper_run()


async def lifespan(scope, receive, send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            _drain_before_server_stops(asyncio.get_running_loop())
            from proxy.usage.tokens import encodings_warm

            encodings_warm()  # started by turbo_site.asgi; again in a worker forked since (gunicorn --preload)
            _background.add(asyncio.get_running_loop().create_task(_sweeper()))
            from proxy.events import events_writer_start

            events_writer_start()  # the event and usage writer on this loop, not in a thread of its own
            heap_freeze()
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            try:
                await asyncio.wait_for(on_shutdown(), settings.SHUTDOWN_GRACE_SECONDS + 10)
            except Exception:
                logger.exception("shutdown did not finish cleanly")
            await send({"type": "lifespan.shutdown.complete"})
            return
