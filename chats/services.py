"""Writes to chats, their members and messages; each change goes out on the chat's stream after commit.

The prompt-to-reply loop is in chats.generation, the event contract in chats.stream, the context cache
in chats.context.
"""

import uuid
from typing import Any

from django.conf import settings
from django.db import transaction

from accounts.models import User
from chats import running, selectors, stream
from chats.context import chat_context_forget
from chats.models import Chat, ChatMember, Message
from chats.options import settings_validate
from chats.programs.runner import program_bind
from chats.serializers import chat_data
from groups.models import Group
from groups.selectors import group_get_for_member, models_allowed_in
from proxy.structured import response_format_check
from turbo_site.core.crypto import secret_encrypt
from turbo_site.core.errors import Forbidden, Invalid, NotFound


def model_resolve(model: str | None) -> str:
    """A chat's model: an alias (`gpt-3`, `gpt-4`, see MODEL_ALIASES) or a model name; default DEFAULT_MODEL."""
    if not model:
        return settings.DEFAULT_MODEL
    return settings.MODEL_ALIASES.get(model, model)


def chat_model_check(
    *, model: str, allowed_models: frozenset[str] | None, group: Group | None
) -> frozenset[str] | None:
    """Refuse (403 `model_not_allowed`) a model the user's groups (`allowed_models`, from their session;
    None: any) or the chat's group do not allow; returns the models allowed in the chat."""
    allowed = models_allowed_in(allowed_models=allowed_models, group=group)
    if allowed is not None and model not in allowed:
        raise Forbidden(f"your groups may not use the model {model!r}", code="model_not_allowed")
    return allowed


UNCHANGED: Any = object()  # chat_update's "not given"


def _response_format_default(value: Any) -> dict | None:
    """A chat's default response_format, checked (proxy.structured); plain text is stored as None."""
    checked = response_format_check(value)
    return None if checked == {"type": "text"} else checked


def _require_owner(chat: Chat, user: User, action: str) -> None:
    if chat.owner_id != user.pk:
        raise Forbidden(f"only the chat's owner may {action}")


@transaction.atomic
def chat_create(
    *,
    owner: User,
    name: str,
    model: str | None = None,
    group_id: uuid.UUID | None = None,
    system_prompt: str = "",
    tools: list[str] | None = None,
    settings: dict | None = None,
    program: str = "",
    program_context: dict | None = None,
    allowed_models: frozenset[str] | None = None,
    response_format: Any = None,
) -> Chat:
    """A new chat owned by `owner` (a member of `group_id`, if given), who is its first member.

    `allowed_models` is the owner's model limit (their session's; None: any); the group's list applies too.
    `settings` are model settings (chats.options); `program` binds the chat to a chat program, started
    with `program_context` (its opening turn is the caller's to run: chats.generation.message_prompt
    with prompt=None). `response_format` is the default of its prompts (400 `invalid_response_format`).
    """
    response_format = _response_format_default(response_format)
    if response_format and program:
        raise Invalid("response_format: a chat that runs a program takes none")
    group = group_get_for_member(user=owner, group_id=group_id) if group_id is not None else None
    model = model_resolve(model)
    chat_model_check(model=model, allowed_models=allowed_models, group=group)
    chat = Chat.objects.create(
        owner=owner,
        name=name,
        model=model,
        group=group,
        system_prompt=system_prompt,
        tools=tools or [],
        settings=settings_validate(settings or {}),
        response_format=response_format,
    )
    ChatMember.objects.create(chat=chat, user=owner)
    if program:
        program_bind(chat=chat, name=program, context=program_context or {})
    return chat


@transaction.atomic
def conversation_create(
    *,
    owner: User,
    title: str,
    model: str | None = None,
    api_key: str = "",
    allowed_models: frozenset[str] | None = None,
) -> Chat:
    """A chat as the conversation API creates one; its own upstream key, if given, is stored encrypted."""
    chat = chat_create(owner=owner, name=title, model=model, allowed_models=allowed_models)
    if api_key:
        chat.api_key_encrypted = secret_encrypt(api_key)
        chat.save(update_fields=["api_key_encrypted"])
    return chat


@transaction.atomic
def chat_update(
    *,
    chat: Chat,
    user: User,
    name: str | None = None,
    model: str | None = None,
    system_prompt: str | None = None,
    tools: list[str] | None = None,
    settings: dict | None = None,
    allowed_models: frozenset[str] | None = None,
    response_format: Any = UNCHANGED,
) -> Chat:
    """Change a chat's settings (owner only); only the fields given change (`settings` as a whole;
    `response_format` null, "" or `{"type": "text"}` goes back to text replies).

    A new model must be one the user (`allowed_models`, their session's; None: any) and the chat's group
    may use; an unchanged one is not checked, so that a chat can still be renamed.
    """
    _require_owner(chat, user, "change it")
    if model is not None and model_resolve(model) != chat.model:
        chat_model_check(model=model_resolve(model), allowed_models=allowed_models, group=chat.group)
    if name is not None:
        chat.name = name
    if model is not None:
        chat.model = model_resolve(model)
    if system_prompt is not None:
        chat.system_prompt = system_prompt
    if tools is not None:
        chat.tools = tools
    if settings is not None:
        chat.settings = settings_validate(settings)
    if response_format is not UNCHANGED:
        chat.response_format = _response_format_default(response_format)
        if chat.response_format and chat.program:
            raise Invalid("response_format: a chat that runs a program takes none")
    chat.save()
    stream.event_send(chat.pk, stream.CHAT_UPDATED, chat=chat_data(chat))
    return chat


@transaction.atomic
def chat_delete(*, chat: Chat, user: User) -> None:
    """Delete a chat with its members and messages (owner only); open streams end."""
    _require_owner(chat, user, "delete it")
    chat_id = chat.pk
    _generations_drop(Message.objects.filter(chat=chat, status=Message.Status.STREAMING).values_list("pk", flat=True))
    chat.delete()
    chat_context_forget(chat_id)
    stream.event_send(chat_id, stream.CHAT_DELETED)


@transaction.atomic
def chat_user_add(*, chat: Chat, user: User, user_id: uuid.UUID) -> None:
    """Add a user to a chat (owner only); the user must exist; adding a member again is a no-op."""
    _require_owner(chat, user, "add users")
    if not User.objects.filter(pk=user_id, is_active=True).exists():
        raise NotFound(f"no such user: {user_id}", code="user_not_found")
    _, created = ChatMember.objects.get_or_create(chat=chat, user_id=user_id)
    if created:
        stream.event_send(chat.pk, stream.MEMBER_ADDED, user_id=str(user_id))


@transaction.atomic
def chat_user_remove(*, chat: Chat, user: User, user_id: uuid.UUID) -> None:
    """Remove a user from a chat (owner only); they lose access at once, open streams included."""
    _require_owner(chat, user, "remove users")
    if user_id == chat.owner_id:
        raise Forbidden("the chat's owner cannot be removed")
    removed, _ = ChatMember.objects.filter(chat=chat, user_id=user_id).delete()
    if removed:
        stream.event_send(chat.pk, stream.MEMBER_REMOVED, user_id=str(user_id))


def group_access_changed(*, group_id: uuid.UUID, user_ids: list[uuid.UUID]) -> None:
    """Users left a group: streams of the group's chats re-check their access."""
    users = [str(user_id) for user_id in user_ids]
    for chat_id in Chat.objects.filter(group_id=group_id).values_list("pk", flat=True):
        stream.event_send(chat_id, stream.ACCESS_CHANGED, user_ids=users)


# --- messages -------------------------------------------------------------------------------------


def _generations_drop(message_ids) -> None:
    """Once the delete commits, the replies of these messages stop wherever they are being generated,
    with no further event: a deleted message does not come back."""
    message_ids = list(message_ids)
    if message_ids:
        transaction.on_commit(lambda: running.stops_announce_sync(message_ids, delete=True))


@transaction.atomic
def message_delete(*, message_id: uuid.UUID | str, user: User | None = None) -> None:
    """Delete one message for good; members see `message.deleted`.

    A member may delete their own messages, the chat's owner any; without `user` (an operator) any.
    Raises NotFound if there is no such message the user can see (including an id that is not a UUID).
    """
    try:
        message_id = uuid.UUID(str(message_id))
    except ValueError:
        raise NotFound(f"no message with id {message_id!r}") from None
    message = Message.objects.select_for_update().select_related("chat").filter(pk=message_id).first()
    if message is None or (user is not None and not selectors.chat_can_see(user_id=user.pk, chat_id=message.chat_id)):
        raise NotFound(f"no message with id {message_id}")
    if user is not None and user.pk not in (message.author_id, message.chat.owner_id):
        raise Forbidden("only the message's author or the chat's owner may delete it")
    chat_id = message.chat_id
    if message.status == Message.Status.STREAMING:
        _generations_drop([message.pk])
    message.delete()
    chat_context_forget(chat_id)
    stream.event_send(chat_id, stream.MESSAGE_DELETED, message_id=str(message_id))
