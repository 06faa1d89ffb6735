"""The WebSocket side of /chat/stream: authenticate, check access, join the chat's topic, relay."""

import json
import uuid
from urllib.parse import parse_qs

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer

from accounts.auth import AuthRefused, aauthenticate_websocket
from chats import selectors
from chats.services import chat_topic
from turbo_site.core.pubsub import topic_group

MAX_CLIENT_FRAME = 4096


class ChatStreamConsumer(AsyncWebsocketConsumer):
    """Sends every event of one chat, as JSON text frames, to one member."""

    group: str | None = None

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
        self.group = topic_group(chat_topic(chat_id))
        await self.channel_layer.group_add(self.group, self.channel_name)
        await self.accept()

    async def disconnect(self, code):
        if self.group:
            await self.channel_layer.group_discard(self.group, self.channel_name)

    async def receive(self, text_data=None, bytes_data=None):
        """Clients only listen; a ping is answered so that they can check the line."""
        if text_data and len(text_data) <= MAX_CLIENT_FRAME:
            try:
                frame = json.loads(text_data)
            except ValueError:
                return
            if isinstance(frame, dict) and frame.get("type") == "ping":
                await self.send(text_data=json.dumps({"type": "pong"}))

    async def pubsub_message(self, message):
        data = message["data"]
        control = data.get("control")
        if control == "chat_deleted":
            await self.close(code=4404)
        elif control == "access_changed":
            if str(self.user_id) in data.get("user_ids", []) and not await database_sync_to_async(
                selectors.chat_can_see
            )(user_id=self.user_id, chat_id=self.chat_id):
                await self.close(code=4403)
        elif not control:
            await self.send(text_data=json.dumps(data, separators=(",", ":")))
