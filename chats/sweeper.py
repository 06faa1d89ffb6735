"""The sweeper: no message stays `streaming` for good.

A reply is `streaming` while some process generates it, and that process keeps an alive mark for it
(chats.running). A process that died (SIGKILL, a crash, a machine gone) leaves its messages
`streaming` with no mark: the sweeper, run by every server process at start and every SWEEP_SECONDS
(and by `manage.py chats sweep`), ends them as `error` with the reply as far as the chat stream's
record has it, and tells the members with `message.failed`.
"""

import asyncio
import logging
import uuid
from datetime import timedelta

from channels.db import database_sync_to_async
from django.conf import settings
from django.utils import timezone

from chats import running
from chats.models import Message
from chats.serializers import message_data
from chats.stream import MESSAGE_FAILED, MESSAGE_TYPES, aevent_send, chat_stream_key, message_event
from turbo_site.core import streams
from turbo_site.core.streams import StreamUnavailable
from turbo_site.core.text import storable, storable_json

logger = logging.getLogger("turbo.chats")

ABANDONED = "interrupted: the server generating this reply stopped before it ended"
BATCH = 200


def _candidates(older_than: timedelta) -> list[tuple[uuid.UUID, uuid.UUID]]:
    cutoff = timezone.now() - older_than
    found = Message.objects.filter(status=Message.Status.STREAMING, updated_at__lt=cutoff)
    return list(found.order_by("updated_at").values_list("pk", "chat_id")[:BATCH])


async def _reply_recorded(chat_id: uuid.UUID, message_id: uuid.UUID) -> dict:
    """The latest `message` of this message's events still in the chat stream's record ({} if none)."""
    try:
        entries, _ = await streams.replay(chat_stream_key(chat_id), 0)
    except StreamUnavailable:
        return {}
    wanted = str(message_id)
    for entry in reversed(entries):
        if entry.type in MESSAGE_TYPES:
            message = entry.data.get("message") or {}
            if str(message.get("id")) == wanted:
                return message
    return {}


def _abandoned_end(message_id: uuid.UUID, recorded: dict) -> Message | None:
    """End one message as abandoned, only if it is still `streaming` (its generation may have ended since)."""
    fields = {
        "status": Message.Status.ERROR,
        "error": ABANDONED,
        "reply": storable(str(recorded.get("reply") or "")),
        "tool_calls": storable_json(recorded.get("tool_calls") or []),
        "updated_at": timezone.now(),
    }
    if not Message.objects.filter(pk=message_id, status=Message.Status.STREAMING).update(**fields):
        return None
    return Message.objects.filter(pk=message_id).first()


async def messages_sweep(*, older_than: timedelta | None = None) -> int:
    """End the messages left `streaming` whose generation runs nowhere; how many were ended."""
    if older_than is None:
        older_than = timedelta(seconds=settings.GENERATION_ALIVE_SECONDS * 2)
    candidates = await database_sync_to_async(_candidates)(older_than)
    if not candidates:
        return 0
    alive = await database_sync_to_async(running.alive_anywhere)([pk for pk, _ in candidates])
    ended = 0
    for message_id, chat_id in candidates:
        if message_id in alive or message_id in running.by_message:
            continue
        recorded = await _reply_recorded(chat_id, message_id)
        message = await database_sync_to_async(_abandoned_end)(message_id, recorded)
        if message is None:
            continue
        ended += 1
        logger.warning("message %s: its generation stopped with its process; ended as interrupted", message_id)
        try:
            await aevent_send(chat_id, MESSAGE_FAILED, **message_event(MESSAGE_FAILED, message_data(message)))
        except StreamUnavailable:
            pass  # the stored message says it; a member who reloads sees it
    return ended


async def sweeper_run() -> None:
    """Sweep at start and every SWEEP_SECONDS, for the life of the process (a task of the server's loop)."""
    while True:
        try:
            await messages_sweep()
        except Exception as exc:  # the database or the cache away: the next round tries again
            logger.warning("the message sweeper could not run: %s", exc)
        await asyncio.sleep(settings.SWEEP_SECONDS)
