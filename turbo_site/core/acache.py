"""Cache reads from async code without a thread hop.

Django's Redis cache is synchronous: from async code every `cache.get` would go through a thread
pool. The hot paths (token lookups on every proxied request) read through `acache_get` instead: the
in-process cache answers from memory, Redis through one connection per event loop
(`turbo_site.core.fastredis`, redis-py for addresses it does not speak) that reads the very keys and
values Django's cache writes.

`shared=True` also skips the unpickling when the bytes read are the ones read last time for that key
(a token's cached lookup, a User inside, costs more to unpickle than the Redis GET itself): the value
then is the very object returned before, so such callers read it and never change it.

`acache_get_unconfirmed` goes one step further for a caller that can check later: it answers from what
this process read last, with no Redis round trip, and hands back a `CachedCheck` that says which bytes
that was. The caller must confirm them before it answers or acts: alone (`check.confirm()`, one GET), or
inside a script it sends Redis anyway (the proxy's admission, proxy.usage.limits), so that a revoked token
(its entry deleted) is refused at once in every process, at the cost of no extra round trip.
"""

import asyncio
import hashlib
import pickle
from dataclasses import dataclass
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

_shared: dict[str, tuple[bytes, Any, str]] = {}  # key -> (the bytes read, their value, their SHA1 in hex)


class CacheChanged(Exception):
    """A value read with `acache_get_unconfirmed` is no longer the one in Redis: read it again."""


@dataclass(slots=True)
class CachedCheck:
    """Which bytes an unconfirmed read returned the value of: Redis must still hold them under `key`."""

    location: str  # the Redis address
    key: str  # the key as stored in Redis (prefixed and versioned, as Django's cache makes it)
    digest: str  # the SHA1 (hex) of the bytes, as Lua's redis.sha1hex writes it
    confirmed: bool = False

    async def confirm(self) -> None:
        """Check on Redis that the value still holds (once; later calls return at once). Raises
        CacheChanged if not, and forgets it, so that the next read reads it anew."""
        if self.confirmed:
            return
        raw = await _redis_get(self.location, self.key)
        if raw is None or hashlib.sha1(raw).hexdigest() != self.digest:
            _shared.pop(self.key, None)
            raise CacheChanged(self.key)
        self.confirmed = True

    def changed(self) -> CacheChanged:
        """What a script that found other bytes under `key` raises (the value is forgotten here)."""
        _shared.pop(self.key, None)
        return CacheChanged(self.key)


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
    _shared[key] = (raw, value, hashlib.sha1(raw).hexdigest())
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
        made = cache.make_and_validate_key(key)
        raw = await _redis_get(cache._servers[0], made)
        return default if raw is None else _loads(cache, made, raw, shared)
    return await sync_to_async(cache.get, thread_sensitive=False)(key, default)


async def _redis_get(location: str, made: str) -> bytes | None:
    fast = redis_retry.fast_redis(location)
    if fast is None:
        return await redis_client(location).get(made)
    try:
        async with asyncio.timeout(REDIS_SECONDS):
            return await fast.execute("GET", made)
    except TimeoutError as exc:  # as redis-py says it
        raise redis.exceptions.TimeoutError("Timeout reading from Redis") from exc


def acache_get_unconfirmed(key: str) -> tuple[Any, CachedCheck] | None:
    """The value of `key` as this process read it last from the Redis cache, and what to confirm it by
    (see the module's docstring), with no round trip; None if there is no such read (or the cache is not
    one Redis): then read with `acache_get(key, shared=True)`. Read the value, never change it."""
    cache = caches["default"]
    if not isinstance(cache, RedisCache) or len(cache._servers) != 1:
        return None
    made = cache.make_and_validate_key(key)
    known = _shared.get(made)
    if known is None:
        return None
    return known[1], CachedCheck(cache._servers[0], made, known[2])
