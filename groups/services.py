"""Writes to groups. Signup calls group_create for a user's first group.

A member's model limit (the intersection of their groups' lists) rides in their cached session lookup;
every change to a limited group's list or members drops the cached lookups of the users it affects,
so the change applies to their next request.
"""

import uuid

from django.core.exceptions import ValidationError
from django.db import transaction

from accounts.models import User
from accounts.tokens import session_cache_forget_users
from groups.models import Group, GroupMember, model_names_clean
from groups.signals import group_members_removed
from turbo_site.core.errors import Forbidden, Invalid, NotFound


def _require_owner(group: Group, user: User, action: str) -> None:
    if group.owner_id != user.pk:
        raise Forbidden(f"only the group's owner may {action}")


def _limits_changed(group: Group, user_ids: list[uuid.UUID]) -> None:
    """These users joined or left `group`: if it is limited, their next request looks their limit up again.

    The list is read from the database, not from `group`, which may have been loaded before it changed.
    """
    if user_ids and Group.objects.filter(pk=group.pk).values_list("allowed_models", flat=True).first():
        session_cache_forget_users(user_ids=user_ids)


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
    # Never the model limit: a group read before an operator changed it must not write it back.
    group.save(update_fields=["name", "description", "updated_at"])
    return group


@transaction.atomic
def group_allowed_models_set(*, group: Group, allowed_models: list[str]) -> Group:
    """Limit a group's members to these public model names (an operator's setting; empty: any model).

    Names are stripped and repeats dropped. Takes effect at once: the members' cached sessions go.
    """
    try:
        names = model_names_clean(allowed_models)
    except ValidationError as exc:
        raise Invalid("allowed_models: " + " ".join(exc.messages)) from None
    before = Group.objects.filter(pk=group.pk).values_list("allowed_models", flat=True).first()
    group.allowed_models = names
    group.save(update_fields=["allowed_models", "updated_at"])
    if before != names and (before or names):
        session_cache_forget_users(user_ids=GroupMember.objects.filter(group=group).values("user_id"))
    return group


@transaction.atomic
def group_delete(*, group: Group, user: User) -> None:
    """Delete a group and its memberships (owner only). Its chats stay, without the group."""
    _require_owner(group, user, "delete it")
    member_ids = list(group.memberships.values_list("user_id", flat=True))
    group_id = group.pk
    group_members_removed.send(sender=Group, group_id=group_id, user_ids=member_ids)
    _limits_changed(group, member_ids)
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
    added = list(dict.fromkeys(user_id for user_id in user_ids if user_id not in present))
    GroupMember.objects.bulk_create(
        [GroupMember(group=group, user_id=user_id) for user_id in added], ignore_conflicts=True
    )
    _limits_changed(group, added)


@transaction.atomic
def group_members_remove(*, group: Group, user: User, user_ids: list[uuid.UUID]) -> None:
    """Remove members: the owner may remove anyone but themself; a member may remove only themself."""
    if group.owner_id in user_ids:
        raise Invalid("user_ids: the group's owner cannot be removed", code="owner_not_removable")
    if group.owner_id != user.pk and user_ids != [user.pk]:
        raise Forbidden("only the group's owner may remove other members")
    GroupMember.objects.filter(group=group, user_id__in=user_ids).delete()
    group_members_removed.send(sender=Group, group_id=group.pk, user_ids=user_ids)
    _limits_changed(group, user_ids)
