"""Cache reads from async code without a thread hop.

Django's Redis cache is synchronous: from async code every `cache.get` would go through a thread
pool. The hot paths (token lookups on every proxied request) read through `acache_get` instead: the
in-process cache answers from memory, Redis through one asyncio client per event loop
(`turbo_site.core.loops`) that reads the
very keys and values Django's cache writes.
"""

from typing import Any

import redis.asyncio
from asgiref.sync import sync_to_async
from django.core.cache import caches
from django.core.cache.backends.locmem import LocMemCache
from django.core.cache.backends.redis import RedisCache

from turbo_site.core.loops import loop_client
from turbo_site.core.redis_retry import async_retry_options


def redis_client(location: str) -> redis.asyncio.Redis:
    """This loop's asyncio client of the Redis at `location` (shared by everything reading it directly)."""
    return loop_client(
        "cache-redis",
        location,
        lambda: redis.asyncio.Redis.from_url(
            location, socket_timeout=10, socket_connect_timeout=10, **async_retry_options()
        ),
        lambda client: False,
    )


async def acache_get(key: str, default: Any = None) -> Any:
    """`cache.get(key, default)` for async code, on the default cache."""
    cache = caches["default"]
    if isinstance(cache, LocMemCache):
        return cache.get(key, default)
    if isinstance(cache, RedisCache) and len(cache._servers) == 1:
        raw = await redis_client(cache._servers[0]).get(cache.make_and_validate_key(key))
        return default if raw is None else cache._cache._serializer.loads(raw)
    return await sync_to_async(cache.get, thread_sensitive=False)(key, default)
