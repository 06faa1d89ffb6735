"""Writes to groups. Signup calls group_create for a user's first group."""

import uuid

from django.db import transaction

from accounts.models import User
from groups.models import Group, GroupMember
from groups.signals import group_members_removed
from turbo_site.core.errors import Forbidden, Invalid, NotFound


def _require_owner(group: Group, user: User, action: str) -> None:
    if group.owner_id != user.pk:
        raise Forbidden(f"only the group's owner may {action}")


@transaction.atomic
def group_create(*, owner: User, name: str, description: str = "") -> Group:
    """Create a group owned by `owner`, who becomes its first member."""
    group = Group.objects.create(owner=owner, name=name, description=description)
    GroupMember.objects.create(group=group, user=owner)
    return group


@transaction.atomic
def group_update(*, group: Group, user: User, name: str | None = None, description: str | None = None) -> Group:
    """Rename or re-describe a group (owner only); only the fields given change."""
    _require_owner(group, user, "update it")
    if name is not None:
        group.name = name
    if description is not None:
        group.description = description
    group.save()
    return group


@transaction.atomic
def group_delete(*, group: Group, user: User) -> None:
    """Delete a group and its memberships (owner only). Its chats stay, without the group."""
    _require_owner(group, user, "delete it")
    member_ids = list(group.memberships.values_list("user_id", flat=True))
    group_id = group.pk
    group_members_removed.send(sender=Group, group_id=group_id, user_ids=member_ids)
    group.delete()


@transaction.atomic
def group_members_add(*, group: Group, user: User, user_ids: list[uuid.UUID]) -> None:
    """Add users to a group (owner only). All must exist; existing members are left as they are."""
    _require_owner(group, user, "add members")
    found = set(User.objects.filter(pk__in=user_ids, is_active=True).values_list("pk", flat=True))
    unknown = [str(user_id) for user_id in user_ids if user_id not in found]
    if unknown:
        raise NotFound(f"no such user: {', '.join(unknown)}", code="user_not_found")
    present = set(GroupMember.objects.filter(group=group, user_id__in=user_ids).values_list("user_id", flat=True))
    GroupMember.objects.bulk_create(
        [GroupMember(group=group, user_id=user_id) for user_id in user_ids if user_id not in present],
        ignore_conflicts=True,
    )


@transaction.atomic
def group_members_remove(*, group: Group, user: User, user_ids: list[uuid.UUID]) -> None:
    """Remove members: the owner may remove anyone but themself; a member may remove only themself."""
    if group.owner_id in user_ids:
        raise Invalid("user_ids: the group's owner cannot be removed", code="owner_not_removable")
    if group.owner_id != user.pk and user_ids != [user.pk]:
        raise Forbidden("only the group's owner may remove other members")
    GroupMember.objects.filter(group=group, user_id__in=user_ids).delete()
    group_members_removed.send(sender=Group, group_id=group.pk, user_ids=user_ids)
