"""ASGI lifespan: what Turbo does when the server (uvicorn) starts and stops.

On shutdown, generations still running get SHUTDOWN_GRACE_SECONDS to finish (then they are cancelled
and saved as interrupted), and queued events are written. Servers without lifespan (daphne) exit
through the atexit hook in proxy.events, which writes queued events too.
"""

import asyncio
import logging

from asgiref.sync import sync_to_async
from django.conf import settings

logger = logging.getLogger("turbo")


async def on_shutdown() -> None:
    from chats.services import generations_stop
    from proxy.events import events_shutdown
    from turbo_site.core.loops import loop_clients_close

    await generations_stop(grace_seconds=settings.SHUTDOWN_GRACE_SECONDS)
    await loop_clients_close()
    await sync_to_async(events_shutdown, thread_sensitive=False)()


async def lifespan(scope, receive, send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            try:
                await asyncio.wait_for(on_shutdown(), settings.SHUTDOWN_GRACE_SECONDS + 10)
            except Exception:
                logger.exception("shutdown did not finish cleanly")
            await send({"type": "lifespan.shutdown.complete"})
            return
