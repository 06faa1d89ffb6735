"""The replies being generated right now, in this process and across processes: what stops them (a
member's stop, a delete, this process's shutdown), and what tells a sweeper that one still runs somewhere.

A stop or delete is done where the generation runs: here at once, and announced on the
`generation-stops` stream for the other processes (each loop running generations follows it). A
running generation also keeps a short-lived mark in the cache (`alive`), renewed while it runs, so
that the sweeper (chats.sweeper) can tell a message left `streaming` by a process that died from one
still being written. At shutdown, running generations get SHUTDOWN_GRACE_SECONDS to finish; the rest
are cancelled (and saved as interrupted by the reply loop).
"""

import asyncio
import contextvars
import logging
import uuid

from channels.db import database_sync_to_async
from django.conf import settings
from django.core.cache import cache

from accounts.models import User
from chats.models import Chat, Message
from turbo_site.core import streams
from turbo_site.core.errors import Forbidden, ServiceUnavailable
from turbo_site.core.streams import StreamUnavailable

logger = logging.getLogger("turbo.chats")

STOPS_STREAM = "generation-stops"

# This process's running generations by message id.
by_message: dict[uuid.UUID, asyncio.Task] = {}
stop_requested: set[uuid.UUID] = set()  # a member pressed stop: the reply ends "stopped"
deleted: set[uuid.UUID] = set()  # the message (or its chat) was deleted: the reply ends silently
_followers: dict[asyncio.AbstractEventLoop, asyncio.Task] = {}
# This process's generations and late saves, so that they are not garbage-collected and shutdown finds them.
_tasks: set[asyncio.Task] = set()
_draining = False


def alive_key(message_id: uuid.UUID | str) -> str:
    return f"generation.alive.{message_id}"


def task_keep(task: asyncio.Task) -> None:
    """Hold a task of a reply (its generation, or its late save) until it ends: shutdown waits for it."""
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)


def is_draining() -> bool:
    """Is this process shutting down (new prompts refused)?"""
    return _draining


def running_add(message_id: uuid.UUID, task: asyncio.Task) -> None:
    """Register a generation task of this loop: stoppable from any process, marked alive while it runs."""
    task_keep(task)
    by_message[message_id] = task

    def forget(_task):
        by_message.pop(message_id, None)
        stop_requested.discard(message_id)
        deleted.discard(message_id)

    task.add_done_callback(forget)
    loop = asyncio.get_running_loop()
    follower = _followers.get(loop)
    if follower is None or follower.done():
        _followers[loop] = loop.create_task(_follow(), context=contextvars.Context())
    for closed in [other for other in _followers if other.is_closed()]:
        del _followers[closed]


def stop_here(message_ids, *, delete: bool = False) -> None:
    """Cancel the generations of these messages that run in this process."""
    for message_id in message_ids:
        task = by_message.get(message_id)
        if task is not None and not task.done():
            (deleted if delete else stop_requested).add(message_id)
            task.get_loop().call_soon_threadsafe(task.cancel)


def stops_announce_sync(message_ids: list[uuid.UUID], *, delete: bool) -> None:
    """Stop (or, with `delete`, drop) these generations wherever they run (from sync code)."""
    stop_here(message_ids, delete=delete)
    if all(message_id in by_message for message_id in message_ids):
        return
    payload = {"message_ids": [str(m) for m in message_ids], "deleted": delete}
    try:
        streams.append_sync(STOPS_STREAM, "generation.stop", payload)
    except StreamUnavailable:
        logger.warning("generations %s: the stop could not reach the other processes", payload["message_ids"])


async def stops_announce(message_ids: list[uuid.UUID], *, delete: bool = False) -> None:
    """Stop these generations wherever they run; StreamUnavailable if other processes cannot be told."""
    stop_here(message_ids, delete=delete)
    if any(message_id not in by_message for message_id in message_ids):
        payload = {"message_ids": [str(m) for m in message_ids], "deleted": delete}
        await streams.append(STOPS_STREAM, "generation.stop", payload)


def _mine() -> list[uuid.UUID]:
    loop = asyncio.get_running_loop()
    return [message_id for message_id, task in by_message.items() if task.get_loop() is loop]


async def _follow() -> None:
    """While this loop runs generations: act on stops announced by any process (the stream's replay is
    read from the start, so a stop sent while a generation was starting is seen too), and keep their
    alive marks fresh."""
    after = 0
    renewed = 0.0
    loop = asyncio.get_running_loop()
    renew_every = settings.GENERATION_ALIVE_SECONDS / 3
    while _mine():
        try:
            async with streams.Subscription(STOPS_STREAM, after=after) as stops:
                while by_message:
                    if loop.time() - renewed >= renew_every:
                        await _alive_renew(_mine())
                        renewed = loop.time()
                    entry = await stops.get(timeout=min(5, renew_every))
                    if entry is not None and entry.type == "generation.stop":
                        ids = [uuid.UUID(value) for value in entry.data.get("message_ids", [])]
                        stop_here(ids, delete=bool(entry.data.get("deleted")))
                    after = stops.last or after
        except (StreamUnavailable, StopAsyncIteration):
            await asyncio.sleep(0.5)


async def _alive_renew(message_ids: list[uuid.UUID]) -> None:
    if not message_ids:
        return
    try:
        await cache.aset_many({alive_key(m): 1 for m in message_ids}, timeout=settings.GENERATION_ALIVE_SECONDS)
    except Exception as exc:  # the cache away: the sweeper waits longer before it judges
        logger.warning("generation alive marks not renewed: %s", exc)


async def alive_mark(message_id: uuid.UUID) -> None:
    """Mark a generation alive as it starts (renewed by the follower while it runs)."""
    await _alive_renew([message_id])


def alive_anywhere(message_ids: list[uuid.UUID]) -> set[uuid.UUID]:
    """Which of these messages some process is generating now (by their alive marks)."""
    found = cache.get_many([alive_key(m) for m in message_ids])
    return {m for m in message_ids if alive_key(m) in found}


def _streaming_messages_to_stop(*, chat: Chat, user: User) -> list[uuid.UUID]:
    streaming = list(Message.objects.filter(chat=chat, status=Message.Status.STREAMING).values_list("pk", "author_id"))
    mine = [pk for pk, author_id in streaming if user.pk in (author_id, chat.owner_id)]
    if streaming and not mine:
        raise Forbidden("only the prompt's author or the chat's owner may stop this reply")
    return mine


async def generations_stop_chat(*, chat: Chat, user: User) -> int:
    """Stop the chat's replies being generated, in whatever process runs them (the prompt's author or
    the chat's owner only). Each ends `status: "error"`, `error: "stopped"`, keeping its partial reply.
    Returns how many were asked to stop."""
    message_ids = await database_sync_to_async(_streaming_messages_to_stop)(chat=chat, user=user)
    if not message_ids:
        return 0
    try:
        await stops_announce(message_ids)
    except StreamUnavailable:
        raise ServiceUnavailable("stop requests cannot reach the other server processes; try again") from None
    return len(message_ids)


async def generations_stop(*, grace_seconds: float) -> None:
    """Graceful shutdown: refuse new prompts, let running generations finish for a while, then stop
    and save the rest as interrupted."""
    global _draining
    _draining = True
    if _tasks:
        logger.info("waiting up to %ss for %d generations", grace_seconds, len(_tasks))
        _, pending = await asyncio.wait(list(_tasks), timeout=grace_seconds)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=settings.FINAL_SAVE_RETRY_SECONDS + 5)
