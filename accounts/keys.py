"""API keys: named, long-lived tokens for programs, good on /v1/* and /ws only.

A key is `tk-` + secrets.token_urlsafe(32), shown once when it is made; the database keeps its SHA-256
and its first characters (`prefix`, so people can tell keys apart). A key signs in like a session
token, through the same cached lookup (accounts.services.session_lookup), as an AuthSession of kind
"key" whose model limit is its user's groups', its group's (for a group key) and its own list; the
fronts of accounts.auth refuse it everywhere but /v1 and /ws. Revoking drops the cached lookup after
commit and announces the key's id on the `sessions` stream, so its open /ws sockets close in every
process.

Like sessions (the model limit), keys reach up into groups: a group key, and the models a user may use.
"""

import secrets
import uuid
from datetime import datetime

from django.db import transaction
from django.db.models import Q, QuerySet
from django.utils import timezone

from accounts.live import sessions_revoked_announce
from accounts.models import API_KEY_PREFIX, ApiKey, User
from accounts.tokens import AuthSession, token_hash, token_lookups_forget
from turbo_site.core.errors import Conflict, Forbidden, Invalid, NotFound

PREFIX_CHARS = 12  # `tk-` and 9 random characters: 54 bits, enough to tell a person's keys apart
KEYS_PER_USER_MAX = 50  # live keys (neither revoked nor expired)
NAME_MAX_CHARS = 100
MODELS_MAX = 100
LIMIT_PER_MINUTE_MAX = 2**31 - 1  # a key's rpm / tpm: what the column holds on every database
MODEL_NAME_MAX_CHARS = 100


# --- selectors ------------------------------------------------------------------------------------


def api_keys_of(user: User) -> QuerySet[ApiKey]:
    """A user's keys that are not revoked (expired ones too, until revoked), newest first."""
    return ApiKey.objects.filter(user=user, revoked_at__isnull=True).select_related("budget").order_by("-created_at")


def _live(keys: QuerySet[ApiKey]) -> QuerySet[ApiKey]:
    now = timezone.now()
    return keys.filter(revoked_at__isnull=True).filter(Q(expires_at__isnull=True) | Q(expires_at__gt=now))


def api_key_find(*, prefix_or_id: str) -> ApiKey:
    """The key with this id, or else the one key whose prefix this is (an operator's look-up)."""
    try:
        key = ApiKey.objects.select_related("user").filter(pk=uuid.UUID(prefix_or_id)).first()
    except ValueError:
        key = None
    if key is not None:
        return key
    found = list(ApiKey.objects.select_related("user").filter(prefix=prefix_or_id)[:2])
    if not found:
        raise NotFound(f"no API key with id or prefix {prefix_or_id!r}")
    if len(found) > 1:
        raise Conflict(f"more than one API key has the prefix {prefix_or_id!r}: give its id", code="ambiguous")
    return found[0]


def api_key_session(hashed: str) -> AuthSession | None:
    """The live key with this hash as an AuthSession of kind "key", or None (for accounts.services'
    lookup, which caches it). Writes `last_used_at`, so at most once per cache period."""
    from groups.selectors import models_allowed, models_allowed_in

    key = _live(ApiKey.objects.select_related("user", "group").filter(key_hash=hashed, user__is_active=True)).first()
    if key is None or (key.group is not None and key.group.owner_id != key.user_id):
        return None
    ApiKey.objects.filter(pk=key.pk).update(last_used_at=timezone.now())
    allowed = models_allowed_in(allowed_models=models_allowed(user_id=key.user_id), group=key.group)
    if key.models:
        allowed = frozenset(key.models) if allowed is None else allowed & frozenset(key.models)
    return AuthSession(key.pk, key.user, key.expires_at, "key", hashed, allowed, key.group_id)


# --- services -------------------------------------------------------------------------------------


def _name_clean(name) -> str:
    name = name.strip() if isinstance(name, str) else ""
    if not name:
        raise Invalid("name: may not be empty")
    if len(name) > NAME_MAX_CHARS:
        raise Invalid(f"name: may be at most {NAME_MAX_CHARS} characters")
    return name


def _models_clean(models) -> list[str]:
    """A key's model list: names stripped, repeats dropped; at most MODELS_MAX of 1-100 characters."""
    if models is None:
        return []
    if not isinstance(models, list) or not all(isinstance(name, str) for name in models):
        raise Invalid("models: must be a list of model names")
    names = list(dict.fromkeys(name.strip() for name in models))
    if len(names) > MODELS_MAX:
        raise Invalid(f"models: at most {MODELS_MAX} model names, not {len(names)}")
    for name in names:
        if not name or len(name) > MODEL_NAME_MAX_CHARS:
            raise Invalid(f"models: each model name must be 1 to {MODEL_NAME_MAX_CHARS} characters")
    return names


@transaction.atomic
def api_key_create(
    *,
    user: User,
    name: str,
    expires_at: datetime | None = None,
    models: list[str] | None = None,
    group_id: uuid.UUID | None = None,
    rpm: int | None = None,
    tpm: int | None = None,
) -> tuple[ApiKey, str]:
    """Make a key for `user`; returns it and the key itself (the only time it is seen).

    `models` (public model names, each one `user` may use) limits the key further; with `group_id`
    (a group `user` owns) it is a group key, limited to what the group allows. At most
    KEYS_PER_USER_MAX live keys per user. `rpm` / `tpm`: the key's own requests and tokens per minute
    (at least 1; None: RATE_LIMIT_KEY_RPM / _TPM), within its user's and group's limits.
    """
    from groups.selectors import group_get_for_member, models_allowed, models_allowed_in

    name = _name_clean(name)
    names = _models_clean(models)
    if expires_at is not None and expires_at <= timezone.now():
        raise Invalid("expires_at: must be in the future")
    for field_name, limit in (("rpm", rpm), ("tpm", tpm)):
        if limit is not None and (
            not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= LIMIT_PER_MINUTE_MAX
        ):
            raise Invalid(f"{field_name}: must be a whole number from 1 to {LIMIT_PER_MINUTE_MAX}")
    group = None
    if group_id is not None:
        group = group_get_for_member(user=user, group_id=group_id)
        if group.owner_id != user.pk:
            raise Forbidden("only the group's owner may create a key for it")
    allowed = models_allowed_in(allowed_models=models_allowed(user_id=user.pk), group=group)
    refused = [model for model in names if allowed is not None and model not in allowed]
    if refused:
        raise Forbidden(f"you may not use the model {refused[0]!r}", code="model_not_allowed")
    # One creation per user at a time, so that two at once cannot both take the last place.
    User.objects.select_for_update().filter(pk=user.pk).values_list("pk", flat=True).first()
    if _live(ApiKey.objects.filter(user=user)).count() >= KEYS_PER_USER_MAX:
        raise Conflict(
            f"you have {KEYS_PER_USER_MAX} live API keys, the most there may be: revoke one first",
            code="too_many_keys",
        )
    key = API_KEY_PREFIX + secrets.token_urlsafe(32)
    api_key = ApiKey.objects.create(
        user=user,
        group=group,
        name=name,
        prefix=key[:PREFIX_CHARS],
        key_hash=token_hash(key),
        models=names,
        expires_at=expires_at,
        rpm=rpm,
        tpm=tpm,
    )
    return api_key, key


@transaction.atomic
def api_key_revoke(*, user: User | None = None, key_id: uuid.UUID) -> ApiKey:
    """Revoke a key of `user` (None: any key, for an operator), at once in every process.

    Someone else's key is a 404, so that its existence does not leak. Revoking twice is no error.
    """
    keys = ApiKey.objects.select_for_update().filter(pk=key_id)
    if user is not None:
        keys = keys.filter(user=user)
    key = keys.first()
    if key is None:
        raise NotFound("API key not found")
    if key.revoked_at is None:
        key.revoked_at = timezone.now()
        key.save(update_fields=["revoked_at"])
    token_lookups_forget([key.key_hash])
    sessions_revoked_announce([key.pk])  # its open /ws sockets close, in every process
    return key
