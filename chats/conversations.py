"""Seed 002's conversation API over the same chats and messages: /api/conversations/*, /api/chat/<id>."""

import asyncio
import contextlib
import json

from channels.db import database_sync_to_async
from django.http import StreamingHttpResponse
from drf_spectacular.utils import extend_schema, inline_serializer
from rest_framework import serializers
from rest_framework.response import Response
from rest_framework.views import APIView

from chats import generation, selectors, services
from chats.api import async_endpoint
from chats.stream import FINAL_TYPES, MESSAGE_DELTA, ChatSubscriber
from turbo_site.core.crypto import secret_decrypt, secret_mask
from turbo_site.core.errors import Invalid
from turbo_site.core.schema import errors
from turbo_site.core.serializers import StrictCharField, plain_request_input, request_input


class ConversationCreateInput(serializers.Serializer):
    title = StrictCharField(max_length=200)
    model = StrictCharField(max_length=100, required=False, allow_blank=True)
    api_key = StrictCharField(max_length=500, required=False, allow_blank=True)


class ConversationOutput(serializers.Serializer):
    conversation_id = serializers.UUIDField(source="id")
    title = serializers.CharField(source="name")
    model = serializers.CharField()
    api_key = serializers.SerializerMethodField(help_text="masked; never returned in full")
    created_time = serializers.DateTimeField(source="created_at")

    def get_api_key(self, chat) -> str | None:
        plain = secret_decrypt(chat.api_key_encrypted)
        return secret_mask(plain) if plain else None


class ConversationBriefOutput(serializers.Serializer):
    conversation_id = serializers.UUIDField(source="id")
    title = serializers.CharField(source="name")
    created_time = serializers.DateTimeField(source="created_at")


class HistoryMessage(serializers.Serializer):
    role = serializers.CharField()
    content = serializers.CharField()
    message_id = serializers.UUIDField()


class ConversationCreateView(APIView):
    @extend_schema(
        request=ConversationCreateInput,
        responses={200: ConversationOutput, **errors(400, 401)},
        summary="Create a conversation (seed 002); an api_key is stored encrypted",
    )
    def post(self, request):
        data = ConversationCreateInput(data=request_input(request))
        data.is_valid(raise_exception=True)
        chat = services.conversation_create(owner=request.user, **data.validated_data)
        return Response(ConversationOutput(chat).data)


class ConversationListView(APIView):
    @extend_schema(
        responses={200: ConversationBriefOutput(many=True), **errors(401)}, summary="Your conversations, newest first"
    )
    def get(self, request):
        return Response(ConversationBriefOutput(selectors.conversations_of(user=request.user), many=True).data)


class ConversationHistoryView(APIView):
    @extend_schema(
        responses={
            200: inline_serializer(
                "ConversationHistory",
                {
                    "conversation_id": serializers.UUIDField(),
                    "title": serializers.CharField(),
                    "model": serializers.CharField(),
                    "messages": HistoryMessage(many=True),
                },
            ),
            **errors(401, 404),
        },
        summary="A conversation's messages as user/assistant turns",
    )
    def get(self, request, chat_id):
        chat = selectors.conversation_get(user=request.user, chat_id=chat_id)
        turns = []
        for message in selectors.conversation_history(chat=chat):
            turns.append({"role": "user", "content": message.prompt, "message_id": message.id})
            if message.reply:
                turns.append({"role": "assistant", "content": message.reply, "message_id": message.id})
        return Response(
            {
                "conversation_id": chat.id,
                "title": chat.name,
                "model": chat.model,
                "messages": HistoryMessage(turns, many=True).data,
            }
        )


class ConversationDeleteView(APIView):
    @extend_schema(
        request=None,
        responses={200: inline_serializer("Deleted", {"message": serializers.CharField()}), **errors(401, 404)},
        summary="Delete a conversation",
    )
    def post(self, request, chat_id):
        chat = selectors.conversation_get(user=request.user, chat_id=chat_id)
        services.chat_delete(chat=chat, user=request.user)
        return Response({"message": "Conversation deleted successfully"})


def _frame(event: str, data) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


@async_endpoint(("POST",))
async def conversation_chat(request, chat_id):
    """POST {message}: the reply as SSE `message` events (deltas), then `done` and `full_response`."""
    fields = plain_request_input(request)
    text = fields.get("message")
    if not isinstance(text, str) or not text.strip():
        raise Invalid("message: this field is required and may not be empty")
    chat = await database_sync_to_async(selectors.conversation_get)(user=request.user, chat_id=chat_id)
    subscriber = await ChatSubscriber(chat_id=chat.pk, session=request.turbo_session).start()
    try:
        message = await generation.message_prompt(
            chat=chat, user=request.user, prompt=text, context_size=10, stream=True, otr=False
        )
    except BaseException:
        await subscriber.close()
        raise
    message_id = str(message.pk)

    async def frames():
        try:
            async for entry in subscriber:
                if entry.is_notice:
                    if entry.type != "stream.gap":  # the stream ended: say why
                        yield _frame("error", {"error": {"code": entry.type, "message": entry.data["message"]}})
                        return
                    continue
                if entry.type != MESSAGE_DELTA and entry.type not in FINAL_TYPES:
                    continue
                event = entry.data
                if event["message"]["id"] != message_id:
                    continue
                if entry.type == MESSAGE_DELTA:
                    if event["delta"]:
                        yield _frame("message", event["delta"])
                    continue
                final = event["message"]
                if final["status"] == "error":
                    yield _frame("error", {"error": {"code": "upstream_error", "message": final["error"]}})
                yield _frame("done", {"message_id": message_id, "status": final["status"]})
                yield _frame("full_response", final["reply"])
                return
        finally:
            with contextlib.suppress(asyncio.CancelledError):
                await subscriber.close()

    response = StreamingHttpResponse(frames(), content_type="text/event-stream")
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"
    return response
