"""Cache reads from async code without a thread hop.

Django's Redis cache is synchronous: from async code every `cache.get` would go through a thread
pool. The hot paths (token lookups on every proxied request) read through `acache_get` instead: the
in-process cache answers from memory, Redis through one connection per event loop
(`turbo_site.core.fastredis`, redis-py for addresses it does not speak) that reads the very keys and
values Django's cache writes.
"""

import asyncio
from typing import Any

import redis.asyncio
import redis.exceptions
from asgiref.sync import sync_to_async
from django.core.cache import caches
from django.core.cache.backends.locmem import LocMemCache
from django.core.cache.backends.redis import RedisCache

from turbo_site.core import redis_retry
from turbo_site.core.fastredis import fast_redis

REDIS_SECONDS = 10  # as the clients' socket timeouts


def redis_client(location: str) -> redis.asyncio.Redis:
    """This loop's asyncio client of the Redis at `location` (shared by everything reading it directly)."""
    return redis_retry.redis_client(
        location, purpose="cache", socket_timeout=REDIS_SECONDS, socket_connect_timeout=REDIS_SECONDS
    )


async def acache_get(key: str, default: Any = None) -> Any:
    """`cache.get(key, default)` for async code, on the default cache."""
    cache = caches["default"]
    if isinstance(cache, LocMemCache):
        return cache.get(key, default)
    if isinstance(cache, RedisCache) and len(cache._servers) == 1:
        location = cache._servers[0]
        fast = fast_redis(location)
        if fast is not None:
            try:
                async with asyncio.timeout(REDIS_SECONDS):
                    raw = await fast.execute("GET", cache.make_and_validate_key(key))
            except TimeoutError as exc:  # as redis-py says it
                raise redis.exceptions.TimeoutError("Timeout reading from Redis") from exc
        else:
            raw = await redis_client(location).get(cache.make_and_validate_key(key))
        return default if raw is None else cache._cache._serializer.loads(raw)
    return await sync_to_async(cache.get, thread_sensitive=False)(key, default)
