"""The end of a reply: stored, then told. The final save is retried while the database is away
(FINAL_SAVE_RETRY_SECONDS), then goes on in the background (FINAL_SAVE_LATE_SECONDS); the final event
is always sent, retried the same way while the stream's transport is away. A program's turn is recorded
in the transaction that stores its message (chats.programs.runner).
"""

import asyncio
import logging
import time
import uuid

from asgiref.sync import sync_to_async
from channels.db import database_sync_to_async
from django.conf import settings
from django.db import DatabaseError, InterfaceError, transaction
from django.utils import timezone

from chats import running
from chats.context import chat_context_extend, chat_context_forget_now
from chats.models import Message
from chats.programs.runner import turn_after_save, turn_save
from chats.reply import PromptPlan, Reply
from chats.serializers import message_data
from chats.stream import MESSAGE_COMPLETED, MESSAGE_FAILED, aevent_send, message_event
from turbo_site.core import tracing
from turbo_site.core.streams import StreamUnavailable
from turbo_site.core.text import storable, storable_json

logger = logging.getLogger("turbo.chats")

STORAGE_UNAVAILABLE = (
    "the reply could not be stored (the database is unavailable); it is kept and stored when it is back"
)


class MessageGone(Exception):
    """The message is no longer `streaming` in the database: deleted during its generation, or already
    ended by the sweeper (chats.sweeper). Nothing to save, and nobody to tell."""


@transaction.atomic
def _message_finish(*, message: Message, reply: Reply, status: str, error: str, program=None, turn=None) -> None:
    """Store the reply, only while the message is still `streaming` (MessageGone otherwise): a deleted
    message never comes back, whatever the reply loop still holds."""
    fields = {
        "reply": storable(reply.text),
        "tool_calls": storable_json(reply.records),
        "data": storable_json(reply.data),
        "status": status,
        "error": storable(error),
        "prompt_tokens": reply.usage.get("prompt_tokens"),
        "completion_tokens": reply.usage.get("completion_tokens"),
        "total_tokens": reply.usage.get("total_tokens"),
        "updated_at": timezone.now(),
    }
    if not Message.objects.filter(pk=message.pk, status=Message.Status.STREAMING).update(**fields):
        raise MessageGone(message.pk)
    for name, value in fields.items():
        setattr(message, name, value)
    if program is not None:
        turn_save(chat_id=message.chat_id, result=turn if status == Message.Status.COMPLETE else None)


def _context_after(message: Message, reply: Reply) -> None:
    """The cached context learns the new exchange; if the cache is away, it is dropped (rebuilt later)."""
    if message.status != Message.Status.COMPLETE or message.is_otr or not message.prompt:
        return
    try:
        chat_context_extend(message.chat_id, message.prompt, reply.text)
    except Exception as exc:
        logger.warning("message %s: the cached context could not be extended: %s", message.pk, exc)
        try:
            chat_context_forget_now(message.chat_id)
        except Exception:
            pass  # a cache that is away lost the key or will expire it (CONTEXT_CACHE_SECONDS)


async def _retrying(what: str, message_id: uuid.UUID, attempt, errors: tuple) -> bool:
    """Call `attempt` until it succeeds or FINAL_SAVE_RETRY_SECONDS have passed; did it succeed?"""
    deadline = time.monotonic() + settings.FINAL_SAVE_RETRY_SECONDS
    pause = 0.1
    while True:
        try:
            await attempt()
            return True
        except errors as exc:
            if time.monotonic() + pause > deadline:
                logger.error("message %s: could not %s, giving up: %s", message_id, what, exc)
                return False
            logger.warning("message %s: could not %s, retrying: %s", message_id, what, exc)
            await asyncio.sleep(pause)
            pause = min(pause * 2, 2.0)


async def reply_finish(plan: PromptPlan, reply: Reply, status: str, error: str, turn=None) -> bool | None:
    """Save the reply (retried while the database is away), then send the final event. A program's turn
    is recorded in the same transaction. Returns True once stored; None if the message is gone (deleted:
    no event); False if it could not be stored in time: members get `message.failed` (code
    `storage_unavailable`) with the reply as it stands, and the save goes on in the background until
    the database is back (then `message.completed` or `message.failed` tells the stored outcome)."""
    message = plan.message

    async def save():
        await database_sync_to_async(_message_finish)(
            message=message, reply=reply, status=status, error=error, program=plan.program, turn=turn
        )

    try:
        stored = await _retrying("save the reply", message.pk, save, (DatabaseError, InterfaceError))
    except MessageGone:
        return None
    except Exception:
        logger.exception("message %s: the reply could not be saved", message.pk)
        stored = False
    if not stored:
        await final_event_send(message, MESSAGE_FAILED, unstored=reply)
        running.task_keep(asyncio.get_running_loop().create_task(_save_late(plan, reply, save, status, turn)))
        return False
    await _after_save(plan, reply, status, turn)
    return True


async def _after_save(plan: PromptPlan, reply: Reply, status: str, turn) -> None:
    """What follows a stored reply: the cached context learns it, a program's turn goes on, members are told."""
    message = plan.message
    try:
        await sync_to_async(_context_after, thread_sensitive=False)(message, reply)
        if plan.program is not None and status == Message.Status.COMPLETE:
            await turn_after_save(turn)
    except Exception:
        logger.exception("message %s: after its save", message.pk)
    ended = status in (Message.Status.COMPLETE, Message.Status.TOOL_CALLS)  # tool_calls: the turn ended well
    await final_event_send(message, MESSAGE_COMPLETED if ended else MESSAGE_FAILED, code="" if ended else reply.code)


async def _save_late(plan: PromptPlan, reply: Reply, save, status: str, turn) -> None:
    """Keep trying to store a reply whose save outlived FINAL_SAVE_RETRY_SECONDS, for as long as
    FINAL_SAVE_LATE_SECONDS; its alive mark is kept meanwhile, so the sweeper leaves it alone."""
    message = plan.message
    deadline = time.monotonic() + settings.FINAL_SAVE_LATE_SECONDS
    pause = 1.0
    while time.monotonic() < deadline:
        await running.alive_mark(message.pk)
        await asyncio.sleep(pause)
        pause = min(pause * 2, 15.0)
        try:
            await save()
        except MessageGone:
            return
        except (DatabaseError, InterfaceError) as exc:
            logger.warning("message %s: the reply is still not stored: %s", message.pk, exc)
            continue
        except Exception:
            logger.exception("message %s: the reply could not be stored", message.pk)
            return
        logger.info("message %s: the reply is stored now that the database is back", message.pk)
        await _after_save(plan, reply, status, turn)
        return
    logger.error("message %s: the reply could not be stored in %ss; the sweeper will end it", message.pk, deadline)


@tracing.traced("chat fan-out", lambda message, type, **_: {"turbo.chat.event": type})
async def final_event_send(message: Message, type: str, *, unstored: Reply | None = None, code: str = "") -> None:
    """The message's final event; `code` says why a failed one failed (the same outcome code every front
    gives); with `unstored`, the reply that could not be stored (status error, code
    `storage_unavailable`), so that members still see it."""
    data = message_data(message)
    extra = {"code": code} if code else {}
    if unstored is not None:
        data = {**data, "status": Message.Status.ERROR, "error": STORAGE_UNAVAILABLE}
        data.update(reply=unstored.text, tool_calls=unstored.records)
        extra = {"code": "storage_unavailable"}

    async def send():
        await aevent_send(message.chat_id, type, **message_event(type, data, partial=False), **extra)

    try:
        await _retrying(f"send {type}", message.pk, send, (StreamUnavailable,))
    except Exception:
        logger.exception("message %s: %s could not be sent", message.pk, type)
