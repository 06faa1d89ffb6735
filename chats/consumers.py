"""The WebSocket side of /chat/stream: authenticate, check access, join the chat's topic, relay."""

import json
import uuid
from urllib.parse import parse_qs

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer

from accounts.auth import AuthRefused, aauthenticate_websocket
from chats import hub, selectors

MAX_CLIENT_FRAME = 4096


class ChatStreamConsumer(AsyncWebsocketConsumer):
    """Sends every event of one chat, as JSON text frames, to one member."""

    joined = False

    async def connect(self):
        try:
            session = await aauthenticate_websocket(self.scope)
        except AuthRefused:
            await self.close()  # before accept: the handshake is refused (HTTP 403)
            return
        query = parse_qs(self.scope.get("query_string", b"").decode("latin1"))
        try:
            chat_id = uuid.UUID((query.get("id") or query.get("chat_id") or [""])[0])
        except ValueError:
            await self.close()
            return
        self.user_id = session.user.pk
        self.chat_id = chat_id
        if not await database_sync_to_async(selectors.chat_can_see)(user_id=self.user_id, chat_id=chat_id):
            await self.close()
            return
        await hub.join(chat_id, self)  # before accepting: no event after the handshake is missed
        self.joined = True
        await self.accept()

    async def disconnect(self, code):
        if self.joined:
            self.joined = False
            await hub.leave(self.chat_id, self)

    async def receive(self, text_data=None, bytes_data=None):
        """Clients only listen; a ping is answered so that they can check the line."""
        if text_data and len(text_data) <= MAX_CLIENT_FRAME:
            try:
                frame = json.loads(text_data)
            except ValueError:
                return
            if isinstance(frame, dict) and frame.get("type") == "ping":
                await self.send(text_data=json.dumps({"type": "pong"}))

    async def deliver(self, text: str) -> None:
        """One event of the chat, already JSON (chats.hub serialises it once for all members)."""
        await self.send(text_data=text)

    async def on_control(self, data: dict) -> None:
        control = data["control"]
        if control == "chat_deleted":
            await self.close(code=4404)
        elif control == "access_changed":
            if str(self.user_id) in data.get("user_ids", []) and not await database_sync_to_async(
                selectors.chat_can_see
            )(user_id=self.user_id, chat_id=self.chat_id):
                await self.close(code=4403)
