"""The WebSocket side of /chat/stream: authenticate, check access, relay the chat's events.

Each event is a JSON text frame (the same objects as the SSE `data:` lines). A client resumes with
`?after=<seq>` or, as its first frame, `{"type": "resume", "after": <seq>}`; `{"type": "ping"}` is
answered with `{"type": "pong"}`. The socket closes after a notice saying why: 4404 the chat was
deleted, 4403 access was lost, 4401 the session ended, 1012 the server is stopping, 1013 the stream
broke (reconnect and resume).
"""

import asyncio
import json
import uuid
from urllib.parse import parse_qs

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer

from accounts.auth import AuthRefused, aauthenticate, scope_credentials
from chats import selectors
from chats.stream import ChatSubscriber
from turbo_site.core.errors import outcome_of, refusal
from turbo_site.core.parsers import client_json_loads
from turbo_site.core.streams import StreamUnavailable

MAX_CLIENT_FRAME = 4096
CLOSE_CODES = {"chat_deleted": 4404, "access": 4403, "session": 4401}


def _after_of(value) -> int | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        after = int(value)
    except (TypeError, ValueError):
        return None
    return after if after >= 0 else None


class ChatStreamConsumer(AsyncWebsocketConsumer):
    """Sends every event of one chat, as JSON text frames, to one member."""

    # No channel layer: events come through chats.stream, so a Redis outage cannot kill the consumer.
    channel_layer_alias = "turbo-no-channel-layer"

    subscriber: ChatSubscriber | None = None
    pump: asyncio.Task | None = None
    sent_any = False

    async def connect(self):
        try:
            session = await aauthenticate("chat.socket", scope_credentials(self.scope))
        except AuthRefused as refused:
            await self.close(code=refused.close_code)  # before accept: the handshake is refused (HTTP 403)
            return
        query = parse_qs(self.scope.get("query_string", b"").decode("latin1"))
        try:
            chat_id = uuid.UUID((query.get("id") or query.get("chat_id") or [""])[0])
        except ValueError:
            await self.close()
            return
        if not await database_sync_to_async(selectors.chat_can_see)(user_id=session.user.pk, chat_id=chat_id):
            await self.close()
            return
        self.session = session
        self.chat_id = chat_id
        after = _after_of((query.get("after") or [None])[0])
        try:
            # Subscribed before accepting: no event after the handshake is missed.
            self.subscriber = await ChatSubscriber(chat_id=chat_id, session=session, after=after).start()
        except StreamUnavailable as exc:
            await self.accept()
            await self._send_failure(exc)
            await self.close(code=1013)
            return
        await self.accept()
        self.pump = asyncio.get_running_loop().create_task(self._relay(self.subscriber))

    async def disconnect(self, code):
        await self._stop()

    async def _stop(self) -> None:
        pump, self.pump = self.pump, None
        if pump is not None and pump is not asyncio.current_task():
            pump.cancel()
        subscriber, self.subscriber = self.subscriber, None
        if subscriber is not None:
            await subscriber.close()

    async def _relay(self, subscriber: ChatSubscriber) -> None:
        ending = None
        try:
            async for entry in subscriber:
                self.sent_any = self.sent_any or not entry.is_notice
                await self.send(text_data=entry.text)
                if entry.is_notice and entry.type != "stream.gap":
                    ending = entry
        except StopAsyncIteration:
            pass
        if ending is not None and self.subscriber is subscriber:
            reason = ending.data.get("reason")
            code = CLOSE_CODES.get(reason) or (1012 if ending.type == "server.shutdown" else 1013)
            await self.close(code=code)

    async def _send_notice(self, type: str, message: str, **fields) -> None:
        await self.send(text_data=json.dumps({"type": type, "message": message, **fields}))

    async def _send_failure(self, exc: Exception) -> None:
        """The stream cannot go on: `stream.error` with the failure's outcome (reconnect and resume)."""
        outcome = outcome_of(exc)
        await self._send_notice("stream.error", outcome.message, code=outcome.code, retry_after=outcome.retry_after)

    async def _send_error(self, code: str, message: str) -> None:
        """A refused client frame: `{"type": "error", "code", "message"}` (the code from the one table)."""
        outcome = refusal(code, message)
        await self._send_notice("error", outcome.message, code=outcome.code)

    async def receive(self, text_data=None, bytes_data=None):
        """Clients listen; they may resume (first frame only) and ping to check the line."""
        if not text_data or len(text_data) > MAX_CLIENT_FRAME:
            await self._send_error("frame_too_large", f"frames must be JSON text of at most {MAX_CLIENT_FRAME} bytes")
            return
        try:
            frame = client_json_loads(text_data)
        except ValueError:
            await self._send_error("invalid_frame", "frames must be JSON objects")
            return
        kind = frame.get("type") if isinstance(frame, dict) else None
        if kind == "ping":
            await self.send(text_data=json.dumps({"type": "pong"}))
        elif kind == "resume":
            await self._resume(_after_of(frame.get("after")))
        else:
            await self._send_error(
                "unknown_type", 'unknown frame: send {"type": "ping"} or {"type": "resume", "after": N}'
            )

    async def _resume(self, after: int | None) -> None:
        if after is None:
            await self._send_error("invalid_frame", "resume: after must be a whole number (the last seq received)")
            return
        if self.sent_any or self.subscriber is None:
            await self._send_error("invalid_frame", "resume must be the first frame (or connect with ?after=N)")
            return
        try:
            replacement = await ChatSubscriber(chat_id=self.chat_id, session=self.session, after=after).start()
        except StreamUnavailable as exc:
            await self._send_failure(exc)
            await self.close(code=1013)
            return
        await self._stop()  # the live-only subscription started at connect: the replacement covers it
        self.subscriber = replacement
        self.pump = asyncio.get_running_loop().create_task(self._relay(replacement))
