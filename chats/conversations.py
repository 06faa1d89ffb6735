"""The conversation API over the same chats and messages: /api/conversations/*, /api/chat/<id>.

It speaks its own wire format: a conversation is known by its owner's integer number (Chat.number, not
our UUID), times are Unix seconds, history turns are numbered 1, 2, 3... (a user turn, then its reply),
and the chat stream's `data:` lines carry raw text.
"""

import asyncio
import contextlib
import json
import re

from channels.db import database_sync_to_async
from django.http import StreamingHttpResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema, extend_schema_field, inline_serializer
from rest_framework import serializers
from rest_framework.response import Response
from rest_framework.views import APIView

from chats import generation, selectors, services
from chats.api import async_endpoint
from chats.stream import FINAL_TYPES, MESSAGE_DELTA, ChatSubscriber
from proxy.requests import context_size
from turbo_site.core.crypto import secret_decrypt, secret_mask
from turbo_site.core.errors import Outcome, refusal
from turbo_site.core.schema import errors
from turbo_site.core.serializers import StrictCharField, plain_request_input, request_input


class ConversationCreateInput(serializers.Serializer):
    title = StrictCharField(max_length=200)
    model = StrictCharField(max_length=100, required=False, allow_blank=True)
    api_key = StrictCharField(max_length=500, required=False, allow_blank=True)


class ConversationMessageInput(serializers.Serializer):
    # StrictCharField refuses NUL and lone surrogates, which Postgres and UTF-8 cannot store.
    message = StrictCharField(trim_whitespace=False)

    def validate_message(self, value: str) -> str:
        if not value.strip():
            raise serializers.ValidationError("may not be empty")
        return value


STREAM_FINISHED = "Stream finished"


@extend_schema_field(OpenApiTypes.INT)
class UnixTimeField(serializers.Field):
    """A datetime as whole seconds since the epoch, as the API sends `created_time`."""

    def to_representation(self, value) -> int:
        return int(value.timestamp())


class ConversationOutput(serializers.Serializer):
    conversation_id = serializers.IntegerField(source="number")
    title = serializers.CharField(source="name")
    model = serializers.CharField()
    api_key = serializers.SerializerMethodField(help_text="masked; never returned in full; empty if none")
    created_time = UnixTimeField(source="created_at")

    def get_api_key(self, chat) -> str:
        plain = secret_decrypt(chat.api_key_encrypted)
        return secret_mask(plain) if plain else ""


class ConversationBriefOutput(serializers.Serializer):
    conversation_id = serializers.IntegerField(source="number")
    title = serializers.CharField(source="name")
    created_time = UnixTimeField(source="created_at")


class HistoryMessage(serializers.Serializer):
    role = serializers.CharField()
    content = serializers.CharField()
    message_id = serializers.IntegerField(help_text="the turn's number in the conversation: 1, 2, 3...")


class ConversationCreateView(APIView):
    @extend_schema(
        request=ConversationCreateInput,
        responses={200: ConversationOutput, **errors(400, 401)},
        summary="Create a conversation; an api_key is stored encrypted",
    )
    def post(self, request):
        data = ConversationCreateInput(data=request_input(request))
        data.is_valid(raise_exception=True)
        chat = services.conversation_create(
            owner=request.user, allowed_models=request.auth.allowed_models, **data.validated_data
        )
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
                    "conversation_id": serializers.IntegerField(),
                    "title": serializers.CharField(),
                    "model": serializers.CharField(),
                    "messages": HistoryMessage(many=True),
                    "created_time": serializers.IntegerField(help_text="Unix seconds"),
                },
            ),
            **errors(401, 404),
        },
        summary="A conversation's messages as user/assistant turns",
    )
    def get(self, request, number):
        chat = selectors.conversation_get(user=request.user, number=number)
        turns = []
        for message in selectors.conversation_history(chat=chat):
            turns.append({"role": "user", "content": message.prompt, "message_id": len(turns) + 1})
            if message.reply:
                turns.append({"role": "assistant", "content": message.reply, "message_id": len(turns) + 1})
        return Response(
            {
                "conversation_id": chat.number,
                "title": chat.name,
                "model": chat.model,
                "messages": HistoryMessage(turns, many=True).data,
                "created_time": UnixTimeField().to_representation(chat.created_at),
            }
        )


class ConversationDeleteView(APIView):
    @extend_schema(
        request=None,
        responses={200: inline_serializer("Deleted", {"message": serializers.CharField()}), **errors(401, 404)},
        summary="Delete a conversation",
    )
    def post(self, request, number):
        chat = selectors.conversation_get(user=request.user, number=number)
        services.chat_delete(chat=chat, user=request.user)
        return Response({"message": "Conversation deleted successfully"})


def _frame(event: str, text: str) -> bytes:
    """An SSE frame whose data is `text` as is; a line break in it starts another `data:` line, as SSE says."""
    data = "".join(f"data: {line}\n" for line in re.split(r"\r\n|\r|\n", text))
    return f"event: {event}\n{data}\n".encode()


def _error_frame(outcome: Outcome) -> bytes:
    """The SSE `error` event: the same error object as every other front's."""
    return _frame("error", json.dumps({"error": outcome.error()}, ensure_ascii=False))


@async_endpoint(("POST",))
async def conversation_chat(request, number):
    """POST {message}: the reply as SSE `message` events (raw deltas), then `done` and `full_response`."""
    parsed = ConversationMessageInput(data=plain_request_input(request))
    parsed.is_valid(raise_exception=True)
    text = parsed.validated_data["message"]
    chat = await database_sync_to_async(selectors.conversation_get)(user=request.user, number=number)
    subscriber = await ChatSubscriber(chat_id=chat.pk, session=request.turbo_session).start()
    try:
        message = await generation.message_prompt(
            chat=chat,
            user=request.user,
            prompt=text,
            context_size=context_size(None),
            stream=True,
            otr=False,
            allowed_models=request.turbo_session.allowed_models,
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
                        yield _error_frame(refusal(entry.data.get("code", "unavailable"), entry.data["message"]))
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
                    yield _error_frame(refusal(event.get("code") or "upstream_error", final["error"]))
                yield _frame("done", STREAM_FINISHED)
                yield _frame("full_response", final["reply"])
                return
        finally:
            with contextlib.suppress(asyncio.CancelledError):
                await subscriber.close()

    response = StreamingHttpResponse(frames(), content_type="text/event-stream")
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"
    return response
