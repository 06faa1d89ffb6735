"""Every Redis client Turbo makes is made here: of bounded size, surviving a Redis restart.

- `redis_client(url, purpose=...)`: the running loop's asyncio client for a purpose (cache, gateway,
  streams), over a pool of at most REDIS_POOL_SIZE connections;
- `bounded_sync_client`: the same for sync code (the live streams' appends from threads);
- `fast_redis`: the loop's one pipelined connection of the hot path (turbo_site.core.fastredis), for
  `redis://` addresses;
- `redis_own_connection`: a connection of its own, for a blocking read (the live-stream reader's XREAD);
- `bounded_cache_options`: Django's Redis cache (settings.py), one bounded pool per process;
- `channel_layer_hosts`: the Channels layer's (channels_redis builds its connections from it).

Bounded: a client's pool holds at most REDIS_POOL_SIZE connections; a caller beyond that waits for
one to come free (up to POOL_WAIT_SECONDS) instead of failing with "Too many connections", so a
process's Redis connections stay few however many requests or listeners it serves.

Restart: without the retry options, redis-py's asyncio client fails the first command on each
connection it pooled before a restart ("Connection closed by server"), so a request right after Redis
returned could still get 503; a pooled connection found dead is replaced once.
"""

import os
import threading

import redis
import redis.asyncio
import redis.asyncio.retry
import redis.retry
from django.conf import settings
from redis.backoff import NoBackoff

from turbo_site.core.fastredis import FastRedis, fast_address
from turbo_site.core.loops import loop_client

# How long a caller waits for a pooled connection. Generous: under a burst a busy process holds its
# connections longer (each waits for the loop to read its reply), and a wait is better than a 503; an
# unreachable Redis still fails at once (connecting fails, the slot is given back).
POOL_WAIT_SECONDS = 30


def async_retry_options() -> dict:
    return {"retry": redis.asyncio.retry.Retry(NoBackoff(), 1), "retry_on_error": [redis.exceptions.ConnectionError]}


def sync_retry_options() -> dict:
    return {"retry": redis.retry.Retry(NoBackoff(), 1), "retry_on_error": [redis.exceptions.ConnectionError]}


def bounded_async_client(url: str, *, socket_timeout: float, socket_connect_timeout: float) -> redis.asyncio.Redis:
    """An asyncio client over at most REDIS_POOL_SIZE connections; a caller waits for one."""
    pool = redis.asyncio.BlockingConnectionPool.from_url(
        url,
        max_connections=settings.REDIS_POOL_SIZE,
        timeout=POOL_WAIT_SECONDS,
        socket_timeout=socket_timeout,
        socket_connect_timeout=socket_connect_timeout,
        **async_retry_options(),
    )
    return redis.asyncio.Redis.from_pool(pool)


def redis_client(
    url: str, *, purpose: str, socket_timeout: float, socket_connect_timeout: float
) -> redis.asyncio.Redis:
    """The running loop's client of the Redis at `url` for `purpose` ("cache", "gateway", ...): bounded
    (REDIS_POOL_SIZE at most), surviving a restart, made once per loop and purpose (each purpose keeps its
    own timeouts, so a slow one does not hold up another's pool)."""
    return loop_client(
        f"{purpose}-redis",
        (url, socket_timeout, socket_connect_timeout),
        lambda: bounded_async_client(url, socket_timeout=socket_timeout, socket_connect_timeout=socket_connect_timeout),
        lambda client: False,
    )


def bounded_sync_client(url: str, *, socket_timeout: float, socket_connect_timeout: float) -> redis.Redis:
    """A client for sync code (any thread) over at most REDIS_POOL_SIZE connections."""
    pool = redis.BlockingConnectionPool.from_url(
        url,
        max_connections=settings.REDIS_POOL_SIZE,
        timeout=POOL_WAIT_SECONDS,
        socket_timeout=socket_timeout,
        socket_connect_timeout=socket_connect_timeout,
        **sync_retry_options(),
    )
    return redis.Redis(connection_pool=pool)


class SharedBlockingConnectionPool(redis.BlockingConnectionPool):
    """One pool per address and process, whoever asks: Django makes a cache (and so a pool) per thread."""

    _shared: dict = {}
    _lock = threading.Lock()

    @classmethod
    def from_url(cls, url: str, **options):
        key = (os.getpid(), url, options.get("max_connections"))
        with cls._lock:
            pool = cls._shared.get(key)
            if pool is None:
                pool = cls._shared[key] = super().from_url(url, **options)
            return pool


def bounded_cache_options(pool_size: int) -> dict:
    """OPTIONS of Django's Redis cache (read by settings.py): the same bound for every thread's cache."""
    return {
        "pool_class": "turbo_site.core.redis_retry.SharedBlockingConnectionPool",
        "max_connections": pool_size,
        "timeout": POOL_WAIT_SECONDS,
        **sync_retry_options(),
    }


def channel_layer_hosts(address: str) -> list[dict]:
    """`hosts` of the Channels layer (read by settings.py). No socket timeout: redis-py 8 would time idle
    sockets out after a few seconds, and a subscriber waits on its socket indefinitely."""
    return [{"address": address, "socket_timeout": None}]


def fast_redis(location: str) -> FastRedis | None:
    """The running loop's FastRedis for `location`; None for an address it does not speak (use redis-py)."""
    address = fast_address(location)
    if address is None:
        return None
    return loop_client("fast-redis", location, lambda: FastRedis(*address), lambda client: client.closed)


def redis_own_connection(
    url: str, *, socket_timeout: float, socket_connect_timeout: float
) -> FastRedis | redis.asyncio.Redis:
    """A client with a connection of its own, shared with nobody (a blocking read must not hold up the
    commands behind it): FastRedis for a `redis://` address (its reads are bounded by the caller), else
    redis-py's single-connection client. No retry: its one reader reconnects on a failure itself."""
    address = fast_address(url)
    if address is not None:
        return FastRedis(*address)
    return redis.asyncio.Redis.from_url(
        url,
        single_connection_client=True,
        socket_timeout=socket_timeout,
        socket_connect_timeout=socket_connect_timeout,
    )
