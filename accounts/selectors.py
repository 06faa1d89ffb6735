"""Reads about users and sessions, with the access rule inside."""

import uuid

from accounts.models import Session, User
from turbo_site.core.errors import NotFound


def user_visible(*, viewer: User, user_id: uuid.UUID) -> User:
    """A user may read only themself; any other id is a 404 so that existence does not leak."""
    if viewer.pk != user_id:
        raise NotFound("user not found")
    return viewer


def user_groups(*, user: User) -> list:
    """The groups a user is a member of, oldest membership first, in one query."""
    memberships = user.group_memberships.select_related("group").order_by("created_at")
    return [membership.group for membership in memberships]


def session_get(*, session_id: uuid.UUID) -> Session:
    session = Session.objects.filter(pk=session_id).first()
    if session is None:
        raise NotFound("session not found")
    return session


def user_find(*, username: str) -> User:
    """The active user with this username (any case), for adding a member by name; 404 if there is none."""
    user = User.objects.filter(username__iexact=username.strip(), is_active=True).first()
    if user is None:
        raise NotFound(f"no user named {username.strip()!r}", code="user_not_found")
    return user
