"""Open streams and sockets end when their session does, in every process, within a second.

A front that keeps a connection open (SSE, the chat WebSocket, `/ws`) watches its session:

    async with session_watch(session, on_end):   # on_end(reason) is called once, on this loop
        ...

Revocations (logout, password change, an operator ending sessions, a user deactivated, an API key
revoked: its id stands for the session id) are announced on the `sessions` stream after their
transaction commits; one listener per process hands them to the watchers. A session also ends at its
expiry time. If the announcements could not be followed for a while (Redis away), every watched
session is checked against the database again.
"""

import asyncio
import contextlib
import logging
import uuid
import weakref
from collections.abc import Callable
from datetime import datetime

from channels.db import database_sync_to_async
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from accounts.models import ApiKey, Session
from turbo_site.core import streams

logger = logging.getLogger("turbo.accounts")

SESSIONS_STREAM = "sessions"
REVOKED = "session.revoked"


def sessions_revoked_announce(session_ids: list) -> None:
    """Tell every process that these sessions ended (sent after the surrounding transaction commits)."""
    ids = [str(session_id) for session_id in session_ids]
    if not ids:
        return

    def send():
        try:
            streams.append_sync(SESSIONS_STREAM, REVOKED, {"session_ids": ids})
        except streams.StreamUnavailable:
            # Watchers re-check every session against the database once the stream is back.
            logger.warning("could not announce %d ended sessions: stream unavailable", len(ids))

    transaction.on_commit(send)


class _Watch:
    __slots__ = ("session_id", "on_end", "expiry", "__weakref__")

    def __init__(self, session_id: str, on_end: Callable[[str], object], expires_at: datetime | None):
        self.session_id = session_id
        self.on_end = on_end
        self.expiry: asyncio.TimerHandle | None = None
        if expires_at is not None:  # None: an API key that never expires
            delay = (expires_at - timezone.now()).total_seconds()
            self.expiry = asyncio.get_running_loop().call_later(max(delay, 0), self.fire, "the session expired")

    def fire(self, reason: str) -> None:
        if self.expiry is not None:
            self.expiry.cancel()
            self.expiry = None
        on_end, self.on_end = self.on_end, None
        if on_end is not None:
            try:
                on_end(reason)
            except Exception:
                logger.exception("ending a stream of session %s failed", self.session_id)


class _Watcher:
    """This loop's listener on the `sessions` stream."""

    def __init__(self):
        self.watches: dict[str, set[_Watch]] = {}
        self.task: asyncio.Task | None = None
        self.ready: asyncio.Future | None = None

    async def add(self, watch: _Watch) -> None:
        self.watches.setdefault(watch.session_id, set()).add(watch)
        if self.task is None or self.task.done():
            self.ready = asyncio.get_running_loop().create_future()
            self.task = asyncio.get_running_loop().create_task(self._run())
        await asyncio.shield(self.ready)

    def remove(self, watch: _Watch) -> None:
        watches = self.watches.get(watch.session_id)
        if watches is not None:
            watches.discard(watch)
            if not watches:
                del self.watches[watch.session_id]
        if watch.expiry is not None:
            watch.expiry.cancel()

    def _end(self, session_ids, reason: str) -> None:
        for session_id in session_ids:
            for watch in list(self.watches.pop(str(session_id), ())):
                watch.fire(reason)

    async def _recheck(self) -> None:
        """After missing announcements: end the watched sessions the database no longer accepts."""
        watched = list(self.watches)
        if not watched:
            return
        live = await database_sync_to_async(_sessions_still_valid)(watched)
        self._end([session_id for session_id in watched if session_id not in live], "the session ended")

    async def _run(self) -> None:
        after = None
        failures = 0
        while self.watches:
            subscription = streams.Subscription(SESSIONS_STREAM, after=after)
            try:
                await subscription.start()
            except streams.StreamUnavailable:
                if self.ready is not None and not self.ready.done():
                    self.ready.set_exception(streams.StreamUnavailable("session announcements unavailable"))
                    self.ready.exception()
                    return
                failures += 1
                await asyncio.sleep(min(0.5 * failures, 5))
                continue
            if self.ready is not None and not self.ready.done():
                self.ready.set_result(None)
            if failures or after is not None:
                with contextlib.suppress(Exception):
                    await self._recheck()
            failures = 0
            try:
                while self.watches:
                    entry = await subscription.get(timeout=30)
                    if entry is None:
                        continue
                    if entry.type == REVOKED:
                        self._end(entry.data.get("session_ids", []), "the session ended (logged out or revoked)")
                    elif entry.type == "stream.gap":
                        await self._recheck()
                    elif entry.type == "stream.error":
                        failures = 1
                    after = subscription.last or after
            except StopAsyncIteration:
                after = subscription.last or after or 0
            finally:
                await subscription.close()
            if failures:
                await asyncio.sleep(0.5)


def _sessions_still_valid(session_ids: list[str]) -> set[str]:
    now = timezone.now()
    valid = Session.objects.filter(
        pk__in=session_ids, revoked_at__isnull=True, expires_at__gt=now, user__is_active=True
    ).values_list("pk", flat=True)
    keys = ApiKey.objects.filter(pk__in=session_ids, revoked_at__isnull=True, user__is_active=True).filter(
        Q(expires_at__isnull=True) | Q(expires_at__gt=now)
    )
    return {str(session_id) for session_id in [*valid, *keys.values_list("pk", flat=True)]}


_watchers: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Watcher]" = weakref.WeakKeyDictionary()


@contextlib.asynccontextmanager
async def session_watch(session_id: uuid.UUID, expires_at: datetime | None, on_end: Callable[[str], object]):
    """Call `on_end(reason)` (once, on this loop) when the session is revoked or expires, while inside.

    Raises streams.StreamUnavailable when revocations cannot be followed (the caller answers 503).
    """
    watcher = _watchers.get(asyncio.get_running_loop())
    if watcher is None:
        watcher = _watchers[asyncio.get_running_loop()] = _Watcher()
    watch = _Watch(str(session_id), on_end, expires_at)
    try:
        await watcher.add(watch)
    except BaseException:
        watcher.remove(watch)
        raise
    try:
        yield watch
    finally:
        watcher.remove(watch)
