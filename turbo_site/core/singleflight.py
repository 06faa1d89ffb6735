"""One load at a time per key: callers that miss the same cached entry together share one load.

The proxy's admission reads a caller's budgets and rate limits from the database when this process's
copy of them has expired. At 16 requests in flight, all 16 found it expired at once and each sent its
own query through Django's one database thread, so every one of them waited for all sixteen. With
`load_once` the first starts the load and the others wait for its result.
"""

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Any

_running: dict[Hashable, asyncio.Task] = {}


async def load_once(key: Hashable, load: Callable[[], Awaitable[Any]]) -> Any:
    """`await load()`, unless a load of `key` is running on this loop: then its result (or its error).
    A caller that is cancelled leaves the load running for the others."""
    loop = asyncio.get_running_loop()
    task = _running.get(key)
    if task is None or task.get_loop() is not loop or task.done():
        task = loop.create_task(load())
        _running[key] = task
        task.add_done_callback(lambda done: _running.pop(key, None) if _running.get(key) is done else None)
    return await asyncio.shield(task)
