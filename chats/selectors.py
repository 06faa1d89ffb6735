"""Reads about chats, with the access rule inside.

Who may see a chat: its owner, its current members, and, for a chat in a group, the group's current
members. Anyone else gets a 404, so that a chat's existence does not leak.
"""

import uuid
from datetime import datetime

from django.db.models import Case, Exists, F, OuterRef, Q, QuerySet, Subquery, Value, When, Window
from django.db.models.functions import Coalesce, RowNumber

from accounts.models import User
from chats.models import Chat, ChatMember, Message
from groups.models import GroupMember
from turbo_site.core.errors import NotFound


def _access(user_id) -> Q:
    is_member = ChatMember.objects.filter(chat=OuterRef("pk"), user_id=user_id)
    in_group = GroupMember.objects.filter(group=OuterRef("group_id"), user_id=user_id)
    return Q(owner_id=user_id) | Q(Exists(is_member)) | Q(Exists(in_group))


def chats_visible_to(*, user: User, group_id: uuid.UUID | None = None) -> QuerySet[Chat]:
    """Every chat `user` may see (only those of `group_id`, if given), newest activity first."""
    chats = Chat.objects.filter(_access(user.pk))
    if group_id is not None:
        chats = chats.filter(group_id=group_id)
    return chats.order_by("-updated_at")


def chat_get_for_member(*, user: User, chat_id: uuid.UUID) -> Chat:
    # With its group: a prompt checks the group's model list without another query.
    chat = Chat.objects.filter(_access(user.pk), pk=chat_id).select_related("group").first()
    if chat is None:
        raise NotFound("chat not found")
    return chat


def chat_can_see(*, user_id: uuid.UUID, chat_id: uuid.UUID) -> bool:
    return Chat.objects.filter(_access(user_id), pk=chat_id).exists()


# How a user reaches a chat, strongest first: chat_users() marks each user with one of these.
ACCESS_OWNER, ACCESS_MEMBER, ACCESS_GROUP = "owner", "member", "group"
ACCESS_KINDS = (ACCESS_OWNER, ACCESS_MEMBER, ACCESS_GROUP)


def chat_users(*, chat: Chat) -> list[User]:
    """Everyone who can see `chat` (one query), each with `access` (owner, member or group) and `joined_at`.

    The owner first, then the chat's members, then the members of its group only, each in the order
    they joined.
    """
    membership = ChatMember.objects.filter(chat_id=chat.pk, user_id=OuterRef("pk"))
    group_membership = GroupMember.objects.filter(group_id=chat.group_id, user_id=OuterRef("pk"))
    sees = Q(pk=chat.owner_id) | Q(Exists(membership))
    if chat.group_id is not None:
        sees |= Q(Exists(group_membership))
    rank = Case(
        When(pk=chat.owner_id, then=Value(0)),
        When(Exists(membership), then=Value(1)),
        default=Value(2),
    )
    return list(
        User.objects.filter(sees)
        .annotate(
            access_rank=rank,
            joined_at=Coalesce(
                Subquery(membership.values("created_at")[:1]),
                Subquery(group_membership.values("created_at")[:1]),
                Value(chat.created_at),
            ),
        )
        .annotate(
            access=Case(
                When(access_rank=0, then=Value(ACCESS_OWNER)),
                When(access_rank=1, then=Value(ACCESS_MEMBER)),
                default=Value(ACCESS_GROUP),
            )
        )
        .order_by("access_rank", "joined_at", "username")
    )


def chat_messages(*, chat: Chat, limit: int, before: datetime | None = None) -> list[Message]:
    """Up to `limit` messages before `before` (default: the newest), oldest first."""
    messages = Message.objects.filter(chat=chat)
    if before is not None:
        messages = messages.filter(created_at__lt=before)
    newest_first = list(messages.order_by("-created_at", "-id")[:limit])
    newest_first.reverse()
    return newest_first


def chat_context(*, chat_id: uuid.UUID, size: int) -> list[tuple[str, str]]:
    """The last `size` exchanges that count as context (not off the record, not failed), oldest first."""
    if size <= 0:
        return []
    rows = list(
        Message.objects.filter(chat_id=chat_id, is_otr=False, status=Message.Status.COMPLETE)
        .order_by("-created_at", "-id")
        .values_list("prompt", "reply")[:size]
    )
    rows.reverse()
    return rows


def conversations_of(*, user: User) -> QuerySet[Chat]:
    """The conversation API's conversations: the chats a user owns, newest first."""
    return Chat.objects.filter(owner=user).order_by("-created_at")


def conversation_get(*, user: User, number: int) -> Chat:
    """A conversation of its owner's by its per-owner number; anyone else gets a 404."""
    chat = Chat.objects.filter(owner=user, number=number).select_related("group").first()
    if chat is None:
        raise NotFound("conversation not found")
    return chat


def conversation_history(*, chat: Chat) -> list[Message]:
    return list(Message.objects.filter(chat=chat).order_by("created_at", "id"))


def chats_latest_messages(*, chat_ids: list[uuid.UUID], limit: int) -> dict[uuid.UUID, list[Message]]:
    """chat_messages(limit=...) for many chats in one query: each chat's newest `limit`, oldest first.

    The chats' access is the caller's to have checked (they come from chats_visible_to)."""
    newest = Window(RowNumber(), partition_by=[F("chat_id")], order_by=[F("created_at").desc(), F("id").desc()])
    rows = (
        Message.objects.filter(chat_id__in=chat_ids)
        .annotate(newness=newest)
        .filter(newness__lte=limit)
        .order_by("chat_id", "created_at", "id")
    )
    found: dict[uuid.UUID, list[Message]] = {chat_id: [] for chat_id in chat_ids}
    for message in rows:
        found[message.chat_id].append(message)
    return found
