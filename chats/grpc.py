"""The gRPC Chats service (protos/turbo/v1/turbo.proto): a prompt, and a chat's live stream.

A thin adapter like the SSE view and the WebSocket consumer: authenticate (session tokens only, as
every chat endpoint), check access with the selector, call `generation.message_prompt`, and relay the
chat's events from `ChatSubscriber` (resumable with `after`; it ends after a notice saying why, with
the status the WebSocket's close codes stand for). Errors become gRPC statuses in one place
(turbo_site.core.grpc, through the server's interceptor).
"""

import json
import uuid

import grpc
from channels.db import database_sync_to_async

from accounts.auth import aauthenticate, metadata_credentials
from chats import generation, selectors
from chats.api import PromptInput
from chats.serializers import message_data
from chats.stream import ChatSubscriber
from protos.turbo.v1 import turbo_pb2, turbo_pb2_grpc
from proxy.grpc import response_format_of
from proxy.requests import context_size
from turbo_site.core.errors import Invalid, refusal
from turbo_site.core.streams import Entry


def _chat_id(value: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise Invalid("chat_id: must be a chat's id (a UUID)") from None


def message_proto(data: dict) -> turbo_pb2.ChatMessage:
    """A ChatMessage from MessageOutput data (the REST and stream shape)."""
    tokens = {
        name: data[name]
        for name in ("prompt_tokens", "completion_tokens", "total_tokens")
        if isinstance(data.get(name), int)
    }
    parsed = data.get("data")
    return turbo_pb2.ChatMessage(
        id=str(data.get("id") or ""),
        chat_id=str(data.get("chat_id") or ""),
        user_id=str(data.get("user_id") or ""),
        prompt=data.get("prompt") or "",
        reply=data.get("reply") or "",
        model=data.get("model") or "",
        otr=bool(data.get("otr")),
        status=data.get("status") or "",
        error=data.get("error") or "",
        tool_calls_json=json.dumps(data.get("tool_calls") or [], ensure_ascii=False),
        created_at=str(data.get("created_at") or ""),
        data_json="" if parsed is None else json.dumps(parsed, ensure_ascii=False),
        **tokens,
    )


def event_proto(entry: Entry) -> turbo_pb2.ChatEvent:
    """A ChatEvent for one entry of the chat's stream; `json` is the entry as SSE sends it."""
    data = entry.data
    message = data.get("message")
    return turbo_pb2.ChatEvent(
        seq=entry.seq,
        type=entry.type,
        chat_id=str(data.get("chat_id") or ""),
        message=message_proto(message) if isinstance(message, dict) else None,
        delta=data["delta"] if isinstance(data.get("delta"), str) else "",
        partial=data.get("partial") is True,
        json=entry.text,
    )


class ChatsServicer(turbo_pb2_grpc.ChatsServicer):
    """turbo.v1.Chats: a member's prompts and their chat's events."""

    async def Prompt(self, request, context):
        session = await aauthenticate("grpc.chats", metadata_credentials(context.invocation_metadata()))
        fields = {"id": request.chat_id, "prompt": request.prompt, "stream": request.stream, "otr": request.otr}
        parsed = PromptInput(data=fields)
        parsed.is_valid(raise_exception=True)  # the same rules as POST /chat/prompt
        response_format = response_format_of(request.response_format_json_schema)
        chat = await database_sync_to_async(selectors.chat_get_for_member)(
            user=session.user, chat_id=parsed.validated_data["id"]
        )
        options = {"response_format": response_format} if response_format is not None else {}
        message = await generation.message_prompt(
            chat=chat,
            user=session.user,
            prompt=parsed.validated_data["prompt"],
            context_size=context_size(request.context if request.HasField("context") else None),
            stream=request.stream,
            otr=request.otr,
            allowed_models=session.allowed_models,
            **options,
        )
        return turbo_pb2.PromptResponse(message=message_proto(message_data(message)))

    async def Events(self, request, context):
        session = await aauthenticate("grpc.chats", metadata_credentials(context.invocation_metadata()))
        chat_id = _chat_id(request.chat_id)
        after = request.after if request.HasField("after") else None
        if after is not None and after < 0:
            raise Invalid("after: may not be negative")
        chat = await database_sync_to_async(selectors.chat_get_for_member)(user=session.user, chat_id=chat_id)
        subscriber = await ChatSubscriber(chat_id=chat.pk, session=session, after=after).start()
        ending: Entry | None = None
        try:
            # Headers go out once subscribed: a client that awaits them misses no later event.
            await context.send_initial_metadata(())
            async for entry in subscriber:
                yield event_proto(entry)
                if entry.is_notice and entry.type != "stream.gap":
                    ending = entry
        finally:
            await subscriber.close()
        if ending is not None:
            # The notice's code ends the call with its status (NOT_FOUND: the chat was deleted, ...).
            outcome = refusal(ending.data.get("code", "unavailable"), str(ending.data.get("message") or ending.type))
            await context.abort(grpc.StatusCode[outcome.grpc_name], outcome.message)
