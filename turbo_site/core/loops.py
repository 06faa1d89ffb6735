"""Network clients kept per event loop: a connection pool cannot be shared between loops.

Production runs one loop per process, so each client is one pool per process there; tests and sync
wrappers may run other loops, which get their own. `loop_clients_close()` closes the running loop's
clients (the ASGI lifespan does it at shutdown).
"""

import asyncio
import atexit
import weakref
from collections.abc import Callable, Hashable
from typing import Any

_clients: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, tuple[Hashable, Any]]]" = (
    weakref.WeakKeyDictionary()
)


def loop_client(name: str, options: Hashable, make: Callable[[], Any], is_closed: Callable[[Any], bool]) -> Any:
    """The running loop's client called `name`, made anew if it is missing, closed or its options changed."""
    per_loop = _clients.setdefault(asyncio.get_running_loop(), {})
    cached = per_loop.get(name)
    if cached is not None and cached[0] == options and not is_closed(cached[1]):
        return cached[1]
    client = make()
    per_loop[name] = (options, client)
    _drop_dead_loops()
    return client


def _drop_dead_loops() -> None:
    """Forget the clients of loops that have closed (a sync wrapper's short-lived loop): nothing can
    await their close any more, so their connections are shut here and now, quietly."""
    for loop in list(_clients):
        if loop.is_closed():
            for _, client in _clients.pop(loop, {}).values():
                connector = getattr(client, "connector", None)  # aiohttp's session
                try:
                    if connector is not None:
                        connector._close()
                except Exception:
                    pass


atexit.register(_drop_dead_loops)


async def loop_clients_close() -> None:
    """Close every client of the running loop."""
    for _, client in _clients.pop(asyncio.get_running_loop(), {}).values():
        close = getattr(client, "aclose", None) or client.close  # aiohttp names it close()
        await close()
