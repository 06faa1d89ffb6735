"""GraphQL: chats and their messages, the chat operations of the REST API, `prompt`, and `chatEvents`.

Input is checked by the REST API's serializers (chats.api), access by chats.selectors, changes by
chats.services, chats.generation and chats.running (stop); `chatEvents` reads through
chats.stream.ChatSubscriber, the subscriber behind the SSE and WebSocket streams, and ends as they do
(chat deleted, access lost, session ended). Lists are batched per operation
(turbo_site.core.graphql.loader): no query per item.
"""

import enum
import json
import uuid
from collections.abc import AsyncGenerator
from datetime import datetime
from typing import TYPE_CHECKING, Annotated

import strawberry
from channels.db import database_sync_to_async
from django.utils.dateparse import parse_datetime
from strawberry.scalars import JSON
from strawberry.types import Info

from accounts.graphql import UserType, user_load, viewer
from accounts.models import User
from chats import api, generation, running, selectors, services, stream
from chats.models import Chat, Message
from chats.stream import ChatSubscriber
from groups.graphql import group_chats_register, group_load_for, parsed
from proxy.requests import context_size
from turbo_site.core.errors import Invalid, NotFound
from turbo_site.core.graphql import MODEL_CALL, BigInt, loader
from turbo_site.core.streams import Entry

if TYPE_CHECKING:
    from groups.graphql import GroupType

MAX_PAGE = 500  # the most messages one page may hold (as /chat/read's limit)


def _uuid(value, field: str) -> uuid.UUID:
    try:
        return uuid.UUID(str(value))
    except ValueError:
        raise Invalid(f"{field}: must be a valid UUID") from None


# --- batched reads --------------------------------------------------------------------------------


def _visible_chats_loader(user: User):
    def load(chat_ids: list) -> list[Chat | None]:
        found = selectors.chats_visible_to(user=user).in_bulk(chat_ids)
        return [found.get(chat_id) for chat_id in chat_ids]

    return loader(f"chats:{user.pk}", database_sync_to_async(load))


async def chats_of_group(info: Info, group_id: uuid.UUID) -> list[Chat]:
    """The chats of a group the caller may see, newest activity first (one query for every group asked)."""
    session = await viewer(info)
    user = session.user

    def load(group_ids: list) -> list[list[Chat]]:
        found: dict = {group_id: [] for group_id in group_ids}
        for chat in selectors.chats_visible_to(user=user).filter(group_id__in=group_ids):
            found[chat.group_id].append(chat)
        return [found[group_id] for group_id in group_ids]

    return await loader(f"group_chats:{user.pk}", database_sync_to_async(load)).load(group_id)


group_chats_register(chats_of_group)  # a group's `chats` field (groups.graphql) is this list


def _latest_loader(limit: int):
    def load(chat_ids: list) -> list[list[Message]]:
        found = selectors.chats_latest_messages(chat_ids=chat_ids, limit=limit)
        return [found[chat_id] for chat_id in chat_ids]

    return loader(f"latest_messages:{limit}", database_sync_to_async(load))


def _messages_before(chat: Chat, before: str, limit: int) -> list[Message]:
    anchor = Message.objects.filter(chat=chat, pk=_uuid(before, "before")).values_list("created_at", flat=True).first()
    if anchor is None:
        raise Invalid("before: no such message in this chat")
    return selectors.chat_messages(chat=chat, limit=limit, before=anchor)


# --- types ----------------------------------------------------------------------------------------


@strawberry.type(name="Message", description="One prompt/reply exchange in a chat.")
class MessageType:
    id: strawberry.ID
    chat_id: strawberry.ID
    prompt: str
    reply: str
    model: str
    status: str = strawberry.field(description="streaming, complete or error")
    error: str
    tool_calls: JSON
    prompt_tokens: int | None
    completion_tokens: int | None
    total_tokens: int | None
    created_at: datetime

    @strawberry.field(description="The author's id (null: the author's account is gone).")
    def user_id(self) -> strawberry.ID | None:
        return self.author_id

    @strawberry.field(description="Off the record: shown to members, never sent to the model.")
    def otr(self) -> bool:
        return self.is_otr

    @strawberry.field(description="The reply parsed as JSON, valid against the prompt's json_schema responseFormat.")
    def data(self) -> JSON | None:
        return getattr(self, "data", None)

    @strawberry.field
    async def author(self, info: Info) -> UserType | None:
        return None if self.author_id is None else await user_load(self.author_id)

    @strawberry.field
    async def chat(self, info: Info) -> Annotated["ChatType", strawberry.lazy("chats.graphql")] | None:
        session = await viewer(info)
        return await _visible_chats_loader(session.user).load(self.chat_id)


@strawberry.type(description="A page of a chat's messages, oldest first.")
class MessagePage:
    nodes: list[MessageType]
    has_previous: bool = strawberry.field(description="older messages exist: ask again with before: startCursor")
    start_cursor: str | None = strawberry.field(description="the oldest message's cursor (for `before`)")


@strawberry.type(name="Chat", description="A 1:1 or group conversation with a model.")
class ChatType:
    id: strawberry.ID
    name: str
    model: str
    owner_id: strawberry.ID
    group_id: strawberry.ID | None
    system_prompt: str
    tools: list[str]
    settings: JSON = strawberry.field(description="model settings sent with every prompt")
    program: str = strawberry.field(description="the chat program this chat runs; empty for an ordinary chat")
    created_at: datetime
    updated_at: datetime

    @strawberry.field(description="The responseFormat of prompts that give none; null: text.")
    def response_format(self) -> JSON | None:
        return getattr(self, "response_format", None)

    @strawberry.field
    async def owner(self, info: Info) -> UserType:
        return await user_load(self.owner_id)

    @strawberry.field(description="The chat's group, if you are a member of it.")
    async def group(self, info: Info) -> Annotated["GroupType", strawberry.lazy("groups.graphql")] | None:
        return None if self.group_id is None else await group_load_for(info, self.group_id)

    @strawberry.field(description="The newest `last` messages (before the message `before`), oldest first.")
    async def messages(self, info: Info, last: int = 50, before: str | None = None) -> MessagePage:
        if not 1 <= last <= MAX_PAGE:
            raise Invalid(f"last: must be between 1 and {MAX_PAGE}")
        if before is None:
            rows = await _latest_loader(last + 1).load(self.id)
        else:
            rows = await database_sync_to_async(_messages_before)(self, before, last + 1)
        has_previous = len(rows) > last
        rows = rows[1:] if has_previous else rows
        return MessagePage(nodes=rows, has_previous=has_previous, start_cursor=str(rows[0].id) if rows else None)


@strawberry.enum(description="What happened on a chat's stream (the last four are notices: no seq).")
class ChatEventKind(enum.Enum):
    MESSAGE_CREATED = stream.MESSAGE_CREATED
    MESSAGE_DELTA = stream.MESSAGE_DELTA
    MESSAGE_COMPLETED = stream.MESSAGE_COMPLETED
    MESSAGE_FAILED = stream.MESSAGE_FAILED
    MESSAGE_DELETED = stream.MESSAGE_DELETED
    CHAT_UPDATED = stream.CHAT_UPDATED
    CHAT_DELETED = stream.CHAT_DELETED
    MEMBER_ADDED = stream.MEMBER_ADDED
    MEMBER_REMOVED = stream.MEMBER_REMOVED
    ACCESS_CHANGED = stream.ACCESS_CHANGED
    STREAM_GAP = "stream.gap"
    STREAM_ERROR = "stream.error"
    SERVER_SHUTDOWN = "server.shutdown"
    STREAM_CLOSED = "stream.closed"


@strawberry.type(
    name="ChatEvent",
    description="One event of a chat's stream (chats/stream.py lists the fields of each type); "
    "notices have no seq and say why in `notice`.",
)
class ChatEventType:
    type: ChatEventKind
    seq: BigInt | None = None
    chat_id: strawberry.ID | None = None
    message: MessageType | None = None
    delta: str | None = None
    partial: bool | None = None
    message_id: strawberry.ID | None = None
    chat: ChatType | None = None
    user_id: strawberry.ID | None = None
    user_ids: list[strawberry.ID] | None = None
    notice: str | None = None
    reason: str | None = None


def _message_of(data: dict) -> Message:
    """A message as an event carries it (MessageOutput), for the Message type; never saved."""
    message = Message(
        id=data["id"],
        chat_id=data["chat_id"],
        author_id=data.get("user_id"),
        prompt=data.get("prompt", ""),
        reply=data.get("reply", ""),
        model=data.get("model", ""),
        is_otr=data.get("otr", False),
        status=data.get("status", ""),
        error=data.get("error", ""),
        tool_calls=data.get("tool_calls") or [],
        prompt_tokens=data.get("prompt_tokens"),
        completion_tokens=data.get("completion_tokens"),
        total_tokens=data.get("total_tokens"),
        created_at=parse_datetime(data["created_at"]) if data.get("created_at") else None,
    )
    message.data = data.get("data")
    return message


def _chat_of(data: dict) -> Chat:
    chat = Chat(
        id=data["id"],
        name=data.get("name", ""),
        model=data.get("model", ""),
        owner_id=data.get("owner_id"),
        group_id=data.get("group_id"),
        system_prompt=data.get("system_prompt", ""),
        tools=data.get("tools") or [],
        settings=data.get("settings") or {},
        program=data.get("program", ""),
        created_at=parse_datetime(data["created_at"]) if data.get("created_at") else None,
        updated_at=parse_datetime(data["updated_at"]) if data.get("updated_at") else None,
    )
    chat.response_format = data.get("response_format")
    return chat


def event_of(entry: Entry) -> ChatEventType:
    data = json.loads(entry.text)
    if entry.is_notice:
        return ChatEventType(type=ChatEventKind(entry.type), notice=data.get("message"), reason=data.get("reason"))
    return ChatEventType(
        type=ChatEventKind(entry.type),
        seq=entry.seq,
        chat_id=data.get("chat_id"),
        message=_message_of(data["message"]) if isinstance(data.get("message"), dict) else None,
        delta=data.get("delta"),
        partial=data.get("partial"),
        message_id=data.get("message_id"),
        chat=_chat_of(data["chat"]) if isinstance(data.get("chat"), dict) else None,
        user_id=data.get("user_id"),
        user_ids=data.get("user_ids"),
    )


# --- operations -----------------------------------------------------------------------------------


async def _chat_of_member(user: User, chat_id) -> Chat:
    return await database_sync_to_async(selectors.chat_get_for_member)(user=user, chat_id=_uuid(chat_id, "id"))


@strawberry.type
class Query:
    @strawberry.field(description="The chats you may see (only those of `groupId`, if given), newest activity first.")
    async def chats(self, info: Info, group_id: strawberry.ID | None = None) -> list[ChatType]:
        session = await viewer(info)
        group = None if group_id is None else _uuid(group_id, "groupId")
        return await database_sync_to_async(
            lambda: list(selectors.chats_visible_to(user=session.user, group_id=group))
        )()

    @strawberry.field(description="A chat you may see (not found otherwise).")
    async def chat(self, info: Info, id: strawberry.ID) -> ChatType:
        session = await viewer(info)
        return await _chat_of_member(session.user, id)


@strawberry.type
class Mutation:
    @strawberry.mutation(description="Create a chat (in `groupId`, a group of yours, if given); you are its owner.")
    async def chat_create(
        self,
        info: Info,
        name: str,
        model: str | None = None,
        group_id: strawberry.ID | None = None,
        system_prompt: str | None = None,
        tools: list[str] | None = None,
        settings: JSON | None = None,
        program: str | None = None,
        program_context: JSON | None = None,
    ) -> ChatType:
        session = await viewer(info)
        given = {
            "name": name,
            "model": model,
            "group_id": group_id,
            "system_prompt": system_prompt,
            "tools": tools,
            "settings": settings,
            "program": program,
            "program_context": program_context,
        }
        fields = parsed(api.ChatCreateInput, given)

        def create() -> Chat:
            chat = services.chat_create(owner=session.user, allowed_models=session.allowed_models, **fields)
            if chat.program:
                generation.program_open(chat=chat, user=session.user, allowed_models=session.allowed_models)
            return chat

        return await database_sync_to_async(create)()

    @strawberry.mutation(description="Rename a chat or change its model, system prompt, tools or settings (owner).")
    async def chat_update(
        self,
        info: Info,
        id: strawberry.ID,
        name: str | None = None,
        model: str | None = None,
        system_prompt: str | None = None,
        tools: list[str] | None = None,
        settings: JSON | None = None,
    ) -> ChatType:
        session = await viewer(info)
        given = {"id": id, "name": name, "model": model, "system_prompt": system_prompt, "tools": tools}
        fields = parsed(api.ChatUpdateInput, {**given, "settings": settings})

        def update() -> Chat:
            chat = selectors.chat_get_for_member(user=session.user, chat_id=fields.pop("id"))
            fields.pop("chat_id", None)
            if fields.get("model") == "":
                fields.pop("model")
            return services.chat_update(chat=chat, user=session.user, allowed_models=session.allowed_models, **fields)

        return await database_sync_to_async(update)()

    @strawberry.mutation(description="Delete a chat with its messages (owner); open streams end.")
    async def chat_delete(self, info: Info, id: strawberry.ID) -> bool:
        session = await viewer(info)
        chat_id = _uuid(id, "id")

        def delete() -> None:
            chat = selectors.chat_get_for_member(user=session.user, chat_id=chat_id)
            services.chat_delete(chat=chat, user=session.user)

        await database_sync_to_async(delete)()
        return True

    @strawberry.mutation(description="Add a user to a chat (owner).")
    async def chat_user_add(self, info: Info, chat_id: strawberry.ID, user_id: strawberry.ID) -> bool:
        session = await viewer(info)
        fields = parsed(api.ChatUserInput, {"chat_id": chat_id, "user_id": user_id})

        def add() -> None:
            chat = selectors.chat_get_for_member(user=session.user, chat_id=fields["chat_id"])
            services.chat_user_add(chat=chat, user=session.user, user_id=fields["user_id"])

        await database_sync_to_async(add)()
        return True

    @strawberry.mutation(description="Remove a user from a chat (owner); they lose access at once.")
    async def chat_user_remove(self, info: Info, chat_id: strawberry.ID, user_id: strawberry.ID) -> bool:
        session = await viewer(info)
        fields = parsed(api.ChatUserInput, {"chat_id": chat_id, "user_id": user_id})

        def remove() -> None:
            chat = selectors.chat_get_for_member(user=session.user, chat_id=fields["chat_id"])
            services.chat_user_remove(chat=chat, user=session.user, user_id=fields["user_id"])

        await database_sync_to_async(remove)()
        return True

    @strawberry.mutation(description="Delete a message (its author, or the chat's owner).")
    async def message_delete(self, info: Info, id: strawberry.ID) -> bool:
        session = await viewer(info)
        await database_sync_to_async(services.message_delete)(message_id=id, user=session.user)
        return True

    @strawberry.mutation(description="Stop the chat's replies being generated; how many were stopped.")
    async def chat_stop(self, info: Info, id: strawberry.ID) -> int:
        session = await viewer(info)
        chat = await _chat_of_member(session.user, id)
        return await running.generations_stop_chat(chat=chat, user=session.user)

    @strawberry.mutation(
        description="Send a prompt; the reply streams to the chat's members (chatEvents). With stream: false "
        "(the default) this answers once the reply is complete; with stream: true at once (status streaming). "
        "responseFormat (OpenAI's shape) asks for structured output: the reply's JSON is in `data`.",
        metadata=MODEL_CALL,
    )
    async def prompt(
        self,
        info: Info,
        chat_id: strawberry.ID,
        prompt: str,
        context: int | None = None,
        response_format: JSON | None = None,
        stream: bool = False,
        otr: bool = False,
    ) -> MessageType:
        session = await viewer(info)
        fields = parsed(api.PromptInput, {"id": chat_id, "prompt": prompt, "context": context})
        extra = {}
        if response_format is not None:
            from proxy.structured import response_format_check

            extra["response_format"] = response_format_check(response_format)
        chat = await _chat_of_member(session.user, fields["id"])
        size = context_size(fields.get("context"))
        return await generation.message_prompt(
            chat=chat,
            user=session.user,
            prompt=fields["prompt"],
            context_size=size,
            stream=stream,
            otr=otr,
            allowed_models=session.allowed_models,
            **extra,
        )


@strawberry.type
class Subscription:
    @strawberry.subscription(
        description="The chat's events: those after seq `after` (if given; a stream.gap notice if they are gone), "
        "then live. Ends when the chat is deleted, you lose access or your session ends."
    )
    async def chat_events(
        self, info: Info, chat_id: strawberry.ID, after: BigInt | None = None
    ) -> AsyncGenerator[ChatEventType, None]:
        session = await viewer(info)
        chat_id = _uuid(chat_id, "chatId")
        if after is not None and after < 0:
            raise Invalid("after: may not be negative")
        if not await database_sync_to_async(selectors.chat_can_see)(user_id=session.user.pk, chat_id=chat_id):
            raise NotFound("chat not found")
        subscriber = await ChatSubscriber(chat_id=chat_id, session=session, after=after).start()
        try:
            async for entry in subscriber:
                yield event_of(entry)
        finally:
            await subscriber.close()
