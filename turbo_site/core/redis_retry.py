"""Redis clients that survive a Redis restart: a pooled connection found dead is replaced once.

Without this, redis-py's asyncio client fails the first command on each connection it pooled before
a restart ("Connection closed by server"), so a request right after Redis returned could still get 503.
"""

import redis
import redis.asyncio.retry
import redis.retry
from redis.backoff import NoBackoff


def async_retry_options() -> dict:
    return {"retry": redis.asyncio.retry.Retry(NoBackoff(), 1), "retry_on_error": [redis.exceptions.ConnectionError]}


def sync_retry_options() -> dict:
    return {"retry": redis.retry.Retry(NoBackoff(), 1), "retry_on_error": [redis.exceptions.ConnectionError]}
