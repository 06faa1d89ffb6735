"""Reads about groups, with the access rule inside: only members see a group."""

import uuid

from django.db.models import QuerySet

from accounts.models import User
from groups.models import Group
from turbo_site.core.errors import NotFound


def groups_visible_to(*, user: User) -> QuerySet[Group]:
    """The groups `user` is a member of, oldest first."""
    return Group.objects.filter(memberships__user=user).order_by("created_at")


def group_get_for_member(*, user: User, group_id: uuid.UUID) -> Group:
    """The group, if `user` is a member; otherwise 404, so that its existence does not leak."""
    group = groups_visible_to(user=user).filter(pk=group_id).first()
    if group is None:
        raise NotFound("group not found")
    return group


def group_members(*, group: Group) -> QuerySet[User]:
    """The members of a group, in the order they joined."""
    return User.objects.filter(group_memberships__group=group).order_by("group_memberships__created_at")


def is_group_member(*, user: User, group_id: uuid.UUID) -> bool:
    return groups_visible_to(user=user).filter(pk=group_id).exists()
