"""Token hashes, what a token resolves to (AuthSession) and forgetting cached lookups.

The floor under sessions (accounts.services) and API keys (accounts.keys): both look tokens up the
same way and both forget cached lookups, so what they share lives here and neither imports the other
for it; groups.services forgets its members' lookups through here too.
"""

import hashlib
import uuid
from dataclasses import dataclass
from datetime import datetime

from django.core.cache import cache
from django.db import transaction
from django.utils import timezone

from accounts.live import sessions_revoked_announce
from accounts.models import ApiKey, Session, User

CACHE_PREFIX = "session:"


@dataclass(frozen=True)
class AuthSession:
    """What a valid token resolves to: the session's id and its user. For an API key (kind "key"),
    `session_id` is the key's id and `expires_at` may be None (never)."""

    session_id: uuid.UUID
    user: User
    expires_at: datetime | None
    kind: str
    token_hash: str
    # The public model names the user's groups allow (the intersection of the limited ones; for a key,
    # also its group's and its own list); None: any.
    allowed_models: frozenset[str] | None = None
    group_id: uuid.UUID | None = None  # a group key's group: its usage and budget are the group's

    @property
    def key_id(self) -> uuid.UUID | None:
        return self.session_id if self.kind == "key" else None


def token_hash(token: str) -> str:
    """A token as the database and the cache know it (never the token itself)."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def cache_key(hashed: str) -> str:
    return CACHE_PREFIX + hashed


def token_lookups_forget(hashes) -> None:
    """Drop cached lookups (by token hash) now and again after commit, so no request re-caches the old row."""
    keys = [cache_key(h) for h in hashes]
    if keys:
        cache.delete_many(keys)
        transaction.on_commit(lambda: cache.delete_many(keys))


def session_cache_forget_user(*, user_id: uuid.UUID, is_active: bool = True) -> None:
    """Drop cached lookups of a user's sessions and API keys, so the next request sees the user as saved now.

    A user who is no longer active (or is being deleted) also loses their open streams and sockets.
    """
    live = list(Session.objects.filter(user_id=user_id, revoked_at__isnull=True).values_list("pk", "token_hash"))
    live += ApiKey.objects.filter(user_id=user_id, revoked_at__isnull=True).values_list("pk", "key_hash")
    token_lookups_forget([hashed for _, hashed in live])
    if not is_active:
        sessions_revoked_announce([pk for pk, _ in live])


def session_cache_forget_users(*, user_ids) -> None:
    """Drop cached lookups of many users' sessions and API keys (two queries; `user_ids` may be a queryset
    of ids), so that their next request sees what is saved now: e.g. the model limit of a group they
    joined or left."""
    hashes = Session.objects.filter(user_id__in=user_ids, revoked_at__isnull=True, expires_at__gt=timezone.now())
    keys = ApiKey.objects.filter(user_id__in=user_ids, revoked_at__isnull=True)
    token_lookups_forget([*hashes.values_list("token_hash", flat=True), *keys.values_list("key_hash", flat=True)])
