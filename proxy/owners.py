"""Whose is an object the upstream stores: the user whose call through Turbo created it.

The upstream keeps chat completions (with `store`), responses, files and batches under the server's
key, so it would hand any of them to any user. The proxy records the id in each answer that created
one (proxy.paths: a `creates` route), and lets only that user reach it (an `owner` route).

`object_record()` costs no database write and no wait: the owner goes into this process's memory at
once, onto Redis (when REDIS_ADDRESS is set) in a command sent without waiting for its reply, so that
the other processes know it at once too, and into a queue the event writer (proxy.events) saves in its
batches (`StoredObject`). `object_owner()` reads memory, then Redis, then the database. Without Redis,
another process learns of a new object when the writer has saved it (within EVENT_FLUSH_MS).
"""

import asyncio
import logging
import threading
from collections import OrderedDict, deque

from django.conf import settings
from django.db import transaction

from proxy.models import StoredObject
from turbo_site.core import metrics

logger = logging.getLogger("turbo.proxy")

MAX_REMEMBERED = 50_000  # owners kept in memory per process (the most recent)
MAX_PENDING = 100_000  # records waiting for the writer; beyond it the oldest go (and are logged)
MAX_ID_LENGTH = 200
REDIS_SECONDS = 7 * 24 * 3600  # Redis is the fast path only: the database keeps every owner
REDIS_KEY = "turbo:owner:"
SET_SCRIPT = "redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2]) return 1"
GET_SCRIPT = "return redis.call('GET', KEYS[1])"

_remembered: OrderedDict[tuple[str, str], str] = OrderedDict()
_pending: deque[tuple[str, str, str]] = deque()
_lock = threading.Lock()
_sending: set[asyncio.Task] = set()


def storable_id(value: object) -> str | None:
    """An object id as an upstream writes one (`chatcmpl-...`, `resp_...`), or None for anything else."""
    if isinstance(value, str) and 0 < len(value) <= MAX_ID_LENGTH and value.isprintable() and "/" not in value:
        return value
    return None


def _remember(collection: str, object_id: str, user_id: str) -> None:
    with _lock:
        _remembered[(collection, object_id)] = user_id
        _remembered.move_to_end((collection, object_id))
        while len(_remembered) > MAX_REMEMBERED:
            _remembered.popitem(last=False)


def _redis_key(collection: str, object_id: str) -> str:
    return f"{REDIS_KEY}{collection}:{object_id}"


def object_record(collection: str, object_id: object, user_id: object) -> None:
    """Record `user_id` as the owner of `object_id` in `collection` (e.g. "responses"). Never touches the
    database, never waits and never raises (it runs as the exchange ends); a second claim on an id already
    recorded changes nothing."""
    try:
        _record(collection, object_id, user_id)
    except Exception:
        logger.exception("could not record the owner of a new object in %s", collection)


def _record(collection: str, object_id: object, user_id: object) -> None:
    from proxy.usage.ratelimits import redis_script, redis_script_soon
    from proxy.writer_bell import writer_wake

    object_id = storable_id(object_id)
    if object_id is None or user_id is None:
        return
    user_id = str(user_id)
    with _lock:
        if (collection, object_id) in _remembered:
            return
        if len(_pending) >= MAX_PENDING:
            _pending.popleft()
            metrics.object_owners_lost("queue_full")
            logger.warning("object owner queue full (%d); dropped the oldest record", MAX_PENDING)
        _pending.append((collection, object_id, user_id))
    _remember(collection, object_id, user_id)
    writer_wake(soon=len(_pending) >= settings.EVENT_BATCH_SIZE)
    if not settings.REDIS_ADDRESS:
        return
    # SET NX would keep a first claim too, but nothing else can claim an id the upstream just made.
    keys, args = [_redis_key(collection, object_id)], [user_id, REDIS_SECONDS]
    if not redis_script_soon(SET_SCRIPT, keys, args, "an object's owner could not be sent to Redis"):
        task = asyncio.ensure_future(redis_script(SET_SCRIPT, keys, args))
        _sending.add(task)
        task.add_done_callback(_sending.discard)


async def object_owner(collection: str, object_id: str) -> str | None:
    """The id of the user who created `object_id` in `collection` through Turbo, or None."""
    from proxy.usage.ratelimits import redis_script

    owner = _remembered.get((collection, object_id))
    if owner is not None:
        return owner
    if settings.REDIS_ADDRESS:
        found = await redis_script(GET_SCRIPT, [_redis_key(collection, object_id)], [])
        if isinstance(found, bytes):
            owner = found.decode()
    if owner is None:
        found = await (
            StoredObject.objects.filter(collection=collection, object_id=object_id)
            .values_list("user_id", flat=True)
            .afirst()
        )
        owner = str(found) if found is not None else None
    if owner is not None:
        _remember(collection, object_id, owner)
    return owner


async def object_is_users(collection: str, object_id: str, user_id: object) -> bool:
    """Did `user_id` create `object_id`? (False for ids nobody recorded.)"""
    owner = await object_owner(collection, object_id)
    return owner is not None and owner == str(user_id)


def objects_pending() -> int:
    return len(_pending)


def objects_flush() -> int:
    """Save every queued owner (the event writer calls it in its flush); returns how many were given to
    the database. If the database is away, the records stay queued for the next try."""
    with _lock:
        batch = list(_pending)
        _pending.clear()
    if not batch:
        return 0
    rows = [StoredObject(collection=collection, object_id=oid, user_id=user) for collection, oid, user in batch]
    try:
        _insert(rows)
    except Exception as exc:
        from turbo_site.core.batches import database_reachable

        if database_reachable():  # not the database's absence: a row it refuses, dropped alone
            for row in rows:
                try:
                    _insert([row])
                except Exception:
                    metrics.object_owners_lost("refused")
                    logger.error("dropped the owner of %s %r: the database refused it", row.collection, row.object_id)
            return len(batch)
        with _lock:
            _pending.extendleft(reversed(batch))
        logger.warning("could not write %d object owners (%s); will retry", len(batch), type(exc).__name__)
        raise
    return len(batch)


def objects_discard(reason: str) -> int:
    """Drop the owners still queued, counted under `reason` (at shutdown, once the last flush has failed:
    they would go with the process anyway; their objects are then nobody's, a 404 to everyone); returns
    how many."""
    with _lock:
        count = len(_pending)
        _pending.clear()
    if count:
        metrics.object_owners_lost(reason, count)
        logger.error("lost the owners of %d stored objects (%s): the database could not be reached", count, reason)
    return count


def _insert(rows: list[StoredObject]) -> None:
    with transaction.atomic():
        StoredObject.objects.bulk_create(rows, ignore_conflicts=True)  # the first claim stands


def objects_forget() -> None:
    """Empty this process's memory of owners (tests: as another process would see them)."""
    with _lock:
        _remembered.clear()
