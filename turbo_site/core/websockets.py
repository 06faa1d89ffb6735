"""The WebSocket side of the URL map: what a handshake gets when nothing (or nothing healthy) can serve it.

Channels' URLRouter raises on a path it does not know, and a consumer whose backing service is away
(Redis, the database) raises out of its handshake: either way the server logs a traceback and answers
500. Here an unknown path closes with 4404 and a service that is away with 1013 ("try again later",
RFC 6455), the close codes a client can act on.
"""

import logging

from channels.routing import URLRouter
from django.db import InterfaceError, OperationalError
from django.urls.exceptions import Resolver404

from turbo_site.core.errors import UNAVAILABLE_ERRORS

logger = logging.getLogger("turbo")

CLOSE_NOT_FOUND = 4404
CLOSE_TRY_AGAIN_LATER = 1013
# The database away (refused, reset, too many clients) is an OperationalError or InterfaceError.
AWAY_ERRORS = (*UNAVAILABLE_ERRORS, OperationalError, InterfaceError)


class WebSocketRouter(URLRouter):
    """URLRouter whose unknown paths close with 4404 and whose unavailable services close with 1013."""

    def _knows(self, path: str) -> bool:
        for route in self.routes:
            try:
                if route.pattern.match(path):
                    return True
            except Resolver404:
                continue
        return False

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        root_path = scope.get("root_path", "")
        if path.startswith(root_path):
            path = path[len(root_path) :]
        accepted = False

        async def tracked_send(message):
            nonlocal accepted
            if message["type"] == "websocket.accept":
                accepted = True
            elif message["type"] == "websocket.close":
                accepted = False  # closed: nothing more to send
            await send(message)

        if not self._knows(path.lstrip("/")):
            if (await receive())["type"] == "websocket.connect":  # else the client is gone already
                await _close(send, CLOSE_NOT_FOUND, accepted=False)
            return
        try:
            return await super().__call__(scope, receive, tracked_send)
        except AWAY_ERRORS as exc:
            logger.warning("a WebSocket was closed 1013: a backing service is unavailable: %s", exc)
            await _close(send, CLOSE_TRY_AGAIN_LATER, accepted=accepted)


async def _close(send, code: int, *, accepted: bool) -> None:
    """Close with `code`; a handshake not yet answered is accepted first, or the client would only see a 403."""
    if not accepted:
        await send({"type": "websocket.accept"})
    await send({"type": "websocket.close", "code": code})
