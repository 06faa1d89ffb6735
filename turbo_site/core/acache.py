"""Cache reads from async code without a thread hop.

Django's Redis cache is synchronous: from async code every `cache.get` would go through a thread
pool. The hot paths (token lookups on every proxied request) read through `acache_get` instead: the
in-process cache answers from memory, Redis through one connection per event loop
(`turbo_site.core.fastredis`, redis-py for addresses it does not speak) that reads the very keys and
values Django's cache writes.

`shared=True` also skips the unpickling when the bytes read are the ones read last time for that key
(a token's cached lookup, a User inside, costs more to unpickle than the Redis GET itself): the value
then is the very object returned before, so such callers read it and never change it.
"""

import asyncio
import pickle
from typing import Any

import redis.asyncio
import redis.exceptions
from asgiref.sync import sync_to_async
from django.core.cache import caches
from django.core.cache.backends.locmem import LocMemCache
from django.core.cache.backends.redis import RedisCache

from turbo_site.core import redis_retry

REDIS_SECONDS = 10  # as the clients' socket timeouts
SHARED_MAX = 4096  # keys whose last (bytes, value) are kept for `shared` reads; beyond it, start again

_shared: dict[str, tuple[bytes, Any]] = {}


def redis_client(location: str) -> redis.asyncio.Redis:
    """This loop's asyncio client of the Redis at `location` (shared by everything reading it directly)."""
    return redis_retry.redis_client(
        location, purpose="cache", socket_timeout=REDIS_SECONDS, socket_connect_timeout=REDIS_SECONDS
    )


def _loads(cache, key: str, raw: bytes, shared: bool) -> Any:
    if not shared:
        return cache._cache._serializer.loads(raw) if isinstance(cache, RedisCache) else pickle.loads(raw)
    known = _shared.get(key)
    if known is not None and known[0] == raw:
        return known[1]
    value = cache._cache._serializer.loads(raw) if isinstance(cache, RedisCache) else pickle.loads(raw)
    if len(_shared) >= SHARED_MAX:
        _shared.clear()
    _shared[key] = (raw, value)
    return value


def _locmem_raw(cache: LocMemCache, key: str) -> bytes | None:
    """The pickled bytes LocMemCache.get would unpickle (the same expiry and LRU rules), or None."""
    with cache._lock:
        if cache._has_expired(key):
            cache._delete(key)
            return None
        raw = cache._cache[key]
        cache._cache.move_to_end(key, last=False)
    return raw


async def acache_get(key: str, default: Any = None, *, shared: bool = False) -> Any:
    """`cache.get(key, default)` for async code, on the default cache. `shared`: see the module's
    docstring (the value may be the same object as before: read it, never change it)."""
    cache = caches["default"]
    if isinstance(cache, LocMemCache):
        if not shared:
            return cache.get(key, default)
        made = cache.make_and_validate_key(key)
        raw = _locmem_raw(cache, made)
        return default if raw is None else _loads(cache, made, raw, shared)
    if isinstance(cache, RedisCache) and len(cache._servers) == 1:
        location = cache._servers[0]
        fast = redis_retry.fast_redis(location)
        if fast is not None:
            try:
                async with asyncio.timeout(REDIS_SECONDS):
                    raw = await fast.execute("GET", cache.make_and_validate_key(key))
            except TimeoutError as exc:  # as redis-py says it
                raise redis.exceptions.TimeoutError("Timeout reading from Redis") from exc
        else:
            raw = await redis_client(location).get(cache.make_and_validate_key(key))
        return default if raw is None else _loads(cache, key, raw, shared)
    return await sync_to_async(cache.get, thread_sensitive=False)(key, default)
