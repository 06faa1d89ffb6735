"""GraphQL: groups, their members and chats; the group operations of the REST API (groups.api).

Input is checked by the REST API's serializers, access by groups.selectors, changes by
groups.services: this module only adapts. A group's `chats` are those its caller may see: chats lists
them (chats.graphql registers the list with `group_chats_register`), so groups imports no app above it.
"""

import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Annotated

import strawberry
from channels.db import database_sync_to_async
from strawberry.types import Info

from accounts.graphql import UserType, user_load, viewer
from accounts.models import User
from groups import api, selectors, services
from groups.models import Group, GroupMember
from turbo_site.core.graphql import loader

# The chats of a group its caller may see: chats.graphql's, registered when that module is imported
# (turbo_site.graphql imports every app's schema before building it).
_group_chats: Callable[[Info, uuid.UUID], Awaitable[list]] | None = None


def group_chats_register(group_chats: Callable[[Info, uuid.UUID], Awaitable[list]]) -> None:
    """Let `Group.chats` list a group's chats with `group_chats(info, group_id)` (chats owns the list)."""
    global _group_chats
    _group_chats = group_chats


def parsed(serializer_class, data: dict) -> dict:
    """`data` checked by a REST input serializer (DRF's ValidationError: the error says which field)."""
    checked = serializer_class(data={name: value for name, value in data.items() if value is not None})
    checked.is_valid(raise_exception=True)
    return dict(checked.validated_data)


def _members_of(group_ids: list) -> list[list[User]]:
    rows = GroupMember.objects.filter(group_id__in=group_ids).select_related("user").order_by("created_at", "id")
    members: dict = {group_id: [] for group_id in group_ids}
    for row in rows:
        members[row.group_id].append(row.user)
    return [members[group_id] for group_id in group_ids]


def _visible_groups_loader(user: User):
    def load(group_ids: list) -> list[Group | None]:
        found = selectors.groups_visible_to(user=user).in_bulk(group_ids)
        return [found.get(group_id) for group_id in group_ids]

    return loader(f"groups:{user.pk}", database_sync_to_async(load))


async def group_load_for(info: Info, group_id: uuid.UUID) -> Group | None:
    """The group, if the caller is a member (else None), batched with the others this operation asks for."""
    session = await viewer(info)
    return await _visible_groups_loader(session.user).load(group_id)


@strawberry.type(name="Group", description="A group: its owner and members, and the chats in it you may see.")
class GroupType:
    id: strawberry.ID
    name: str
    description: str
    owner_id: strawberry.ID
    created_at: datetime
    updated_at: datetime

    @strawberry.field
    async def owner(self, info: Info) -> UserType:
        return await user_load(self.owner_id)

    @strawberry.field(description="Members in the order they joined.")
    async def members(self, info: Info) -> list[UserType]:
        return await loader("group_members", database_sync_to_async(_members_of)).load(self.id)

    # The field's type is chats' (strawberry.lazy names its module; the schema resolves it when built).
    @strawberry.field(description="The group's chats you may see, newest activity first.")
    async def chats(self, info: Info) -> list[Annotated["ChatType", strawberry.lazy("chats.graphql")]]:  # noqa: F821
        return await _group_chats(info, self.id)


def _id(value) -> uuid.UUID:
    return parsed(api.GroupIdInput, {"id": value})["id"]


@strawberry.type
class Query:
    @strawberry.field(description="The groups you are a member of, oldest first.")
    async def groups(self, info: Info) -> list[GroupType]:
        session = await viewer(info)
        return await database_sync_to_async(lambda: list(selectors.groups_visible_to(user=session.user)))()

    @strawberry.field(description="A group you are a member of (not found otherwise).")
    async def group(self, info: Info, id: strawberry.ID) -> GroupType:
        session = await viewer(info)
        return await database_sync_to_async(selectors.group_get_for_member)(user=session.user, group_id=_id(id))


@strawberry.type
class Mutation:
    @strawberry.mutation(description="Create a group; you are its owner and first member.")
    async def group_create(self, info: Info, name: str, description: str | None = None) -> GroupType:
        session = await viewer(info)
        fields = parsed(api.GroupCreateInput, {"name": name, "description": description})
        return await database_sync_to_async(services.group_create)(owner=session.user, **fields)

    @strawberry.mutation(description="Rename or re-describe a group (owner); only the fields given change.")
    async def group_update(
        self, info: Info, id: strawberry.ID, name: str | None = None, description: str | None = None
    ) -> GroupType:
        session = await viewer(info)
        fields = parsed(api.GroupUpdateInput, {"id": id, "name": name, "description": description})

        def update() -> Group:
            group = selectors.group_get_for_member(user=session.user, group_id=fields.pop("id"))
            return services.group_update(group=group, user=session.user, **fields)

        return await database_sync_to_async(update)()

    @strawberry.mutation(description="Delete a group (owner); its chats stay, without the group.")
    async def group_delete(self, info: Info, id: strawberry.ID) -> bool:
        session = await viewer(info)
        group_id = _id(id)

        def delete() -> None:
            group = selectors.group_get_for_member(user=session.user, group_id=group_id)
            services.group_delete(group=group, user=session.user)

        await database_sync_to_async(delete)()
        return True

    @strawberry.mutation(description="Add members (owner); adding a member twice is a no-op.")
    async def group_members_add(self, info: Info, group_id: strawberry.ID, user_ids: list[strawberry.ID]) -> GroupType:
        session = await viewer(info)
        fields = parsed(api.GroupMembersInput, {"group_id": group_id, "user_ids": list(user_ids)})

        def add() -> Group:
            group = selectors.group_get_for_member(user=session.user, group_id=fields["group_id"])
            services.group_members_add(group=group, user=session.user, user_ids=fields["user_ids"])
            return group

        return await database_sync_to_async(add)()

    @strawberry.mutation(description="Remove members (owner), or leave (yourself); the owner cannot be removed.")
    async def group_members_remove(self, info: Info, group_id: strawberry.ID, user_ids: list[strawberry.ID]) -> bool:
        session = await viewer(info)
        fields = parsed(api.GroupMembersInput, {"group_id": group_id, "user_ids": list(user_ids)})

        def remove() -> None:
            group = selectors.group_get_for_member(user=session.user, group_id=fields["group_id"])
            services.group_members_remove(group=group, user=session.user, user_ids=fields["user_ids"])

        await database_sync_to_async(remove)()
        return True
