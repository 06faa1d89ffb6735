"""Reads about groups, with the access rule inside: only members see a group; and the models a
group's members may use."""

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


def models_allowed(*, user_id: uuid.UUID) -> frozenset[str] | None:
    """The public model names `user_id` may use (one query): those every one of their limited groups
    lists. None: no group of theirs is limited (a group with an empty list does not limit)."""
    allowed: frozenset[str] | None = None
    for names in Group.objects.filter(memberships__user_id=user_id).values_list("allowed_models", flat=True):
        if names:
            allowed = frozenset(names) if allowed is None else allowed & frozenset(names)
    return allowed


def models_allowed_in(*, allowed_models: frozenset[str] | None, group: Group | None) -> frozenset[str] | None:
    """A user's models (`allowed_models`, None: any) as narrowed by `group`'s list, for a group's chat."""
    if group is None or not group.allowed_models:
        return allowed_models
    listed = frozenset(group.allowed_models)
    return listed if allowed_models is None else allowed_models & listed
