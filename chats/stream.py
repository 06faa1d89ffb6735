"""A chat's live stream: the event contract, the one way to send, and the one subscriber.

Every event is a JSON object with `seq` (its number: one more than the chat's previous event, so a
client can see a gap; the SSE `id:`) and `type`, and stays available for replay for
STREAM_REPLAY_SECONDS (at most STREAM_REPLAY_MAX events per chat). The types and their fields:

| type                | fields (besides seq, type, chat_id)                                           |
|---------------------|-------------------------------------------------------------------------------|
| `message.created`   | `message` (MessageOutput, status `streaming`; `complete` off the record),      |
|                     | `delta` "", `partial` (false off the record: nothing follows)                 |
| `message.delta`     | `message` (reply and tool calls so far), `delta` (text added), `partial` true |
|                     | (+ `retry` {attempt, errors}: a structured reply failed its schema and is     |
|                     | asked again; `message.reply` has dropped the failed attempt)                  |
| `message.completed` | `message` (the stored reply, status `complete`, or `tool_calls`: it waits for  |
|                     | the client's function results), `delta` "", `partial` false                   |
| `message.failed`    | `message` (status `error`, `error` says why, partial reply kept), `delta` "", |
|                     | `partial` false (+ `code` `storage_unavailable`: the reply could not be       |
|                     | stored yet; `message.completed` follows once it is)                           |
| `message.deleted`   | `message_id`; no event of that message follows (its reply stops)              |
| `chat.updated`      | `chat` (ChatOutput)                                                           |
| `chat.deleted`      | (none); the stream ends after it                                              |
| `member.added`      | `user_id` (added to the chat)                                                 |
| `member.removed`    | `user_id` (removed from the chat); their streams end                          |
| `access.changed`    | `user_ids` (left the chat's group or it was deleted); their streams end if   |
|                     | they lost access                                                              |

Subscribers may also get notices, which have no `seq` and are not stored: `stream.gap` (events after
`after` are gone: reload the chat), `stream.error` (the stream broke: reconnect with the last seq),
`server.shutdown` (this server is stopping: reconnect), `stream.closed` (access or the session ended).
Those that end a stream carry the error `code` its failure has on every front (turbo_site.core.errors).

Services send with `event_send` (inside their transaction: it goes out after the commit) and the
reply loop with `aevent_send`; every front (SSE, the chat WebSocket, the conversations API) reads
through `ChatSubscriber`.
"""

import logging
import uuid
from typing import Any

from channels.db import database_sync_to_async
from django.db import transaction

from accounts.live import session_watch
from chats import selectors
from turbo_site.core import streams
from turbo_site.core.streams import Entry, StreamUnavailable, notice

logger = logging.getLogger("turbo.chats")

MESSAGE_CREATED = "message.created"
MESSAGE_DELTA = "message.delta"
MESSAGE_COMPLETED = "message.completed"
MESSAGE_FAILED = "message.failed"
MESSAGE_DELETED = "message.deleted"
CHAT_UPDATED = "chat.updated"
CHAT_DELETED = "chat.deleted"
MEMBER_ADDED = "member.added"
MEMBER_REMOVED = "member.removed"
ACCESS_CHANGED = "access.changed"
EVENT_TYPES = (
    MESSAGE_CREATED,
    MESSAGE_DELTA,
    MESSAGE_COMPLETED,
    MESSAGE_FAILED,
    MESSAGE_DELETED,
    CHAT_UPDATED,
    CHAT_DELETED,
    MEMBER_ADDED,
    MEMBER_REMOVED,
    ACCESS_CHANGED,
)
FINAL_TYPES = (MESSAGE_COMPLETED, MESSAGE_FAILED)
MESSAGE_TYPES = (MESSAGE_CREATED, MESSAGE_DELTA, MESSAGE_COMPLETED, MESSAGE_FAILED)
NOTICE_TYPES = ("stream.gap", "stream.error", "server.shutdown", "stream.closed")


def chat_stream_key(chat_id: uuid.UUID | str) -> str:
    return f"chat.{chat_id}"


def message_event(type: str, message: dict, delta: str = "", *, partial: bool | None = None) -> dict:
    """The fields of a message.* event (`message` is MessageOutput data)."""
    if partial is None:
        partial = type not in FINAL_TYPES
    return {"message": message, "delta": delta, "partial": partial}


def _payload(chat_id, type: str, fields: dict) -> dict:
    if type not in EVENT_TYPES:
        raise ValueError(f"unknown chat event type {type!r}")
    return {"chat_id": str(chat_id), **fields}


def event_send(chat_id, type: str, **fields: Any) -> None:
    """Send an event to the chat's stream once the surrounding transaction commits (from sync code)."""
    payload = _payload(chat_id, type, fields)

    def send():
        try:
            streams.append_sync(chat_stream_key(chat_id), type, payload)
        except StreamUnavailable:
            logger.warning("chat %s: %s not sent, the stream is unavailable", chat_id, type)

    transaction.on_commit(send)


async def aevent_send(chat_id, type: str, **fields: Any) -> int:
    """Send an event to the chat's stream now (from async code, outside any transaction); its seq.

    Raises StreamUnavailable when the stream cannot be reached.
    """
    return await streams.append(chat_stream_key(chat_id), type, _payload(chat_id, type, fields))


class ReplyEvents:
    """A reply's events to its chat, each sent without waiting for the one before to be stored
    (turbo_site.core.streams.Appends): the next delta is read from the model meanwhile."""

    def __init__(self, chat_id):
        self.chat_id = chat_id
        self.appends = streams.Appends(chat_stream_key(chat_id))

    async def send(self, type: str, text: str, **fields: Any) -> str:
        """Send an event carrying `text` (a delta's); returns the text to send again with the next one
        (earlier events' found not stored, then this one's if it was not sent), "" when all is on its way."""
        return await self.appends.send(type, _payload(self.chat_id, type, fields), text=text)

    def forget(self) -> None:
        """Whether the events on their way are stored no longer matters (the reply was cut back)."""
        self.appends.forget()


class ChatSubscriber(streams.ReadsByGet):
    """One member's view of a chat's stream, for every front.

        async with ChatSubscriber(chat_id=..., session=auth_session, after=last_seq) as events:
            while (entry := await events.get(timeout=15)) is not None: ...   # None: heartbeat time

    Replays what came after `after` (if given), then follows live, each event once and in order. It
    ends (raising StopAsyncIteration after a last entry that says why) when the chat is deleted, when
    the member loses access (`member.removed` / `access.changed` naming them are re-checked against
    the database), when their session is revoked or expires, when the transport fails and at shutdown.
    `start` raises StreamUnavailable when the stream cannot be reached (answer 503).
    """

    def __init__(self, *, chat_id: uuid.UUID, session, after: int | None = None):
        self.chat_id = chat_id
        self.user_id = session.user.pk
        self.session = session
        self.subscription = streams.Subscription(chat_stream_key(chat_id), after=after)
        self._watch = None
        self._deleted: set[str] = set()  # ids of messages deleted while this subscriber followed

    @property
    def last(self) -> int | None:
        return self.subscription.last

    async def start(self) -> "ChatSubscriber":
        await self.subscription.start()
        self._watch = session_watch(self.session.session_id, self.session.expires_at, self._session_ended)
        try:
            await self._watch.__aenter__()
        except BaseException:
            self._watch = None
            await self.subscription.close()
            raise
        return self

    async def close(self) -> None:
        watch, self._watch = self._watch, None
        if watch is not None:
            await watch.__aexit__(None, None, None)
        await self.subscription.close()

    async def __aenter__(self) -> "ChatSubscriber":
        return await self.start()

    async def __aexit__(self, *exc_info) -> None:
        await self.close()

    def _of_deleted(self, entry: Entry) -> bool:
        """Is this an event of a message deleted earlier in the stream (a delta already on its way when the
        delete stopped its reply)? Members never hear of a deleted message again."""
        if not self._deleted or entry.type not in MESSAGE_TYPES:
            return False
        return str((entry.data.get("message") or {}).get("id")) in self._deleted

    def _session_ended(self, reason: str) -> None:
        self.subscription.end(notice("stream.closed", reason, reason="session", code="session_ended"))

    async def get(self, timeout: float | None = None) -> Entry | None:
        while True:
            entry = await self.subscription.get(timeout)
            if entry is None or entry.is_notice or not self._of_deleted(entry):
                break
        if entry is None or entry.is_notice:
            return entry
        if entry.type == MESSAGE_DELETED:
            self._deleted.add(entry.data.get("message_id"))
        elif entry.type == CHAT_DELETED:
            self.subscription.end(
                notice("stream.closed", "the chat was deleted", reason="chat_deleted", code="not_found")
            )
        elif entry.type in (MEMBER_REMOVED, ACCESS_CHANGED):
            data = entry.data
            named = data.get("user_ids") or [data.get("user_id")]
            if str(self.user_id) in [str(user_id) for user_id in named] and not await database_sync_to_async(
                selectors.chat_can_see
            )(user_id=self.user_id, chat_id=self.chat_id):
                self.subscription.end(
                    notice("stream.closed", "you no longer have access to this chat", reason="access", code="forbidden")
                )
        return entry


def shutdown_notice() -> Entry:
    return notice(
        "server.shutdown",
        "this server is shutting down; reconnect (with the last seq) to resume",
        code="unavailable",
    )
