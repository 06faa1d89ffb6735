"""Users and their login sessions.

Tokens are random strings shown to the client once; the database keeps only their SHA-256. A token
lookup is cached for SESSION_CACHE_SECONDS, and every revocation deletes the cached entry, so a
revoked token stops working at once (in every process when the cache is Redis). The cached lookup
also carries the user and their groups' model limit; changes to either delete it too. API keys
(`tk-...`, accounts.keys) are looked up the same way, as sessions of kind "key".
"""

import copy
import hashlib
import secrets
import uuid

import jwt
from asgiref.sync import sync_to_async
from channels.db import database_sync_to_async
from django.conf import settings
from django.contrib.auth import password_validation
from django.contrib.auth.hashers import check_password, make_password
from django.core.cache import cache, caches
from django.core.cache.backends.locmem import LocMemCache
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import IntegrityError, transaction
from django.utils import timezone

from accounts.keys import api_key_session
from accounts.live import sessions_revoked_announce
from accounts.models import API_KEY_PREFIX, Session, User
from accounts.throttle import login_throttle_check, login_throttle_fail, login_throttle_reset
from accounts.tokens import AuthSession, cache_key, token_hash, token_lookups_forget
from turbo_site.core.acache import CachedCheck, acache_get, acache_get_unconfirmed
from turbo_site.core.errors import Conflict, Invalid, NotFound, Unauthorized
from turbo_site.core.singleflight import load_once

# A hash to compare against when the username is unknown, so both failures take the same time.
_DUMMY_PASSWORD_HASH = None


def _jwt_key() -> bytes:
    """JWTs are signed with a key derived from SECRET_KEY, never with SECRET_KEY itself."""
    return hashlib.sha256(f"turbo-jwt:{settings.SECRET_KEY}".encode()).digest()


# --- sessions -------------------------------------------------------------------------------------


def session_create(
    *, user: User, kind: str = "token", client_ip: str | None = None, user_agent: str = ""
) -> tuple[Session, str]:
    """Start a login for `user`; returns the session and its token (the only time it is seen)."""
    now = timezone.now()
    session_id = uuid.uuid4()
    if kind == "jwt":
        expires_at = now + settings.JWT_TTL
        claims = {"sub": str(user.pk), "sid": str(session_id), "iat": now, "exp": expires_at}
        token = jwt.encode(claims, _jwt_key(), algorithm="HS256")
    else:
        expires_at = now + settings.SESSION_TTL
        token = secrets.token_urlsafe(32)
    session = Session.objects.create(
        id=session_id,
        user=user,
        kind=kind,
        token_hash=token_hash(token),
        expires_at=expires_at,
        last_used_at=now,
        client_ip=client_ip,
        user_agent=(user_agent or "")[:256],
    )
    return session, token


def _looks_like_jwt(token: str) -> bool:
    return token.count(".") == 2


def _token_acceptable(token: str) -> bool:
    if not token or len(token) > 4096:
        return False
    if _looks_like_jwt(token):
        try:
            jwt.decode(token, _jwt_key(), algorithms=["HS256"], options={"require": ["exp", "sid"]})
        except jwt.PyJWTError:
            return False
    return True


def _session_from_db(hashed: str, *, maybe_key: bool = False) -> AuthSession | None:
    if maybe_key:  # a `tk-` token; a session token may start so too, rarely: then it is one of those
        found = api_key_session(hashed)
        if found is not None:
            return found
    now = timezone.now()
    session = (
        Session.objects.select_related("user")
        .filter(token_hash=hashed, revoked_at__isnull=True, expires_at__gt=now, user__is_active=True)
        .first()
    )
    if session is None:
        return None
    # The second named call from accounts up into groups (after signup's group_create): a session
    # carries its user's model limit, so that every front checks it without a query.
    from groups.selectors import models_allowed

    # Written at most once per cache period, not on every request.
    Session.objects.filter(pk=session.pk).update(last_used_at=now)
    allowed_models = models_allowed(user_id=session.user_id)
    return AuthSession(session.id, session.user, session.expires_at, session.kind, hashed, allowed_models)


def _still_valid(found: AuthSession | None, keys: bool) -> AuthSession | None:
    if found is None or (found.kind == "key" and not keys):
        return None
    if found.expires_at is not None and found.expires_at <= timezone.now():
        return None
    return found


def session_lookup(token: str, *, keys: bool = False) -> AuthSession | None:
    """The live session for `token`, or None if it is unknown, expired or revoked.

    An API key counts only with `keys` (accounts.auth passes it, and refuses a key where keys may not go).
    """
    if not _token_acceptable(token):
        return None
    hashed = token_hash(token)
    key = cache_key(hashed)
    found = cache.get(key)
    if found is None:
        found = _session_from_db(hashed, maybe_key=token.startswith(API_KEY_PREFIX))
        if found is not None:
            cache.set(key, found, settings.SESSION_CACHE_SECONDS)
    return _still_valid(found, keys)


async def asession_lookup(token: str, *, keys: bool = False, shared: bool = False) -> AuthSession | None:
    """session_lookup for async code: a cache hit costs no thread hop and no query. `shared`: the
    caller only reads the session (and its user), so an unchanged cache entry is not unpickled again
    (turbo_site.core.acache); the proxy's hot path reads it so."""
    if not _token_acceptable(token):
        return None
    hashed = token_hash(token)
    return await _asession_of(hashed, maybe_key=token.startswith(API_KEY_PREFIX), keys=keys, shared=shared)


async def asession_lookup_unconfirmed(
    token: str, *, keys: bool = False
) -> tuple[AuthSession | None, CachedCheck | None]:
    """asession_lookup(shared=True) with no Redis round trip when this process has read the token's
    cached lookup before and it is still valid: that lookup, and the check (turbo_site.core.acache) the
    caller must confirm before it answers or acts. Otherwise the lookup as asession_lookup makes it, and
    None (nothing to confirm)."""
    if _token_acceptable(token):
        known = acache_get_unconfirmed(cache_key(token_hash(token)))
        if known is not None and _still_valid(known[0], keys) is not None:
            return known
    return await asession_lookup(token, keys=keys, shared=True), None


async def asession_refresh(session: AuthSession) -> AuthSession | None:
    """`session` as it stands now (None: ended), for connections that outlive a request: a socket
    picks up its user's changed model limit as a new request would. Costs what a lookup costs."""
    is_key = session.kind == "key"
    return await _asession_of(session.token_hash, maybe_key=is_key, keys=is_key)


async def _asession_of(hashed: str, *, maybe_key: bool, keys: bool, shared: bool = False) -> AuthSession | None:
    key = cache_key(hashed)
    found = await acache_get(key, shared=shared)
    if found is None:
        # Requests that miss the token's cached lookup together (it expired, or the process is new)
        # share one query and one cache write (turbo_site.core.singleflight), not one each.
        found = await load_once(("session", hashed, maybe_key), lambda: _asession_load(key, hashed, maybe_key))
        if found is not None and not shared:
            found = copy.deepcopy(found)  # its own, as a cache read gives it: the others hold the loaded one
    return _still_valid(found, keys)


async def _asession_load(key: str, hashed: str, maybe_key: bool) -> AuthSession | None:
    found = await database_sync_to_async(_session_from_db)(hashed, maybe_key=maybe_key)
    if found is not None:
        await _cache_set(key, found, settings.SESSION_CACHE_SECONDS)
    return found


async def _cache_set(key: str, value, timeout: int) -> None:
    """A cache write from async code (after a miss: rare), off Django's one sync thread."""
    if isinstance(caches["default"], LocMemCache):
        cache.set(key, value, timeout)
    else:
        await sync_to_async(cache.set, thread_sensitive=False)(key, value, timeout)


def session_revoke(*, session_id: uuid.UUID) -> None:
    """End one session now."""
    hashes = list(Session.objects.filter(pk=session_id).values_list("token_hash", flat=True))
    Session.objects.filter(pk=session_id, revoked_at__isnull=True).update(revoked_at=timezone.now())
    token_lookups_forget(hashes)
    sessions_revoked_announce([session_id])


def sessions_revoke_all(*, user_id: uuid.UUID, except_session_id: uuid.UUID | None = None) -> int:
    """End every session of a user (but one, if given). Returns how many were ended."""
    active = Session.objects.filter(user_id=user_id, revoked_at__isnull=True)
    if except_session_id is not None:
        active = active.exclude(pk=except_session_id)
    ended = list(active.values_list("pk", "token_hash"))
    count = active.filter(pk__in=[pk for pk, _ in ended]).update(revoked_at=timezone.now())
    token_lookups_forget([hashed for _, hashed in ended])
    sessions_revoked_announce([pk for pk, _ in ended])
    return count


# --- users ----------------------------------------------------------------------------------------


def _check_password_strength(password: str, user: User | None = None) -> None:
    if not password:
        raise Invalid("password: may not be empty", code="invalid")
    try:
        password_validation.validate_password(password, user)
    except DjangoValidationError as exc:
        raise Invalid("password: " + " ".join(exc.messages)) from exc


def _username_taken(username: str, *, exclude_id: uuid.UUID | None = None) -> bool:
    users = User.objects.filter(username__iexact=username)
    if exclude_id is not None:
        users = users.exclude(pk=exclude_id)
    return users.exists()


@transaction.atomic
def user_create(
    *,
    username: str,
    password: str,
    first_name: str = "",
    last_name: str = "",
    group_name: str = "",
) -> User:
    """Create a user and their first group ("Personal" unless named), all or nothing."""
    from groups.services import group_create  # signup is the one flow that reaches into groups

    _check_password_strength(password)
    if _username_taken(username):
        raise Conflict(f"username {username!r} is already taken", code="username_taken")
    if not first_name and "@" in username:
        first_name = username.split("@", 1)[0][:150]
    user = User(username=username, first_name=first_name, last_name=last_name)
    user.set_password(password)
    try:
        with transaction.atomic():
            user.save()
    except IntegrityError as exc:  # lost a race for the same username
        raise Conflict(f"username {username!r} is already taken", code="username_taken") from exc
    group_create(owner=user, name=group_name or "Personal")
    return user


def user_authenticate(*, username: str, password: str, client_ip: str | None) -> User:
    """The user with these credentials, or Unauthorized (the same for unknown user and wrong password)."""
    global _DUMMY_PASSWORD_HASH
    login_throttle_check(username=username, client_ip=client_ip)
    user = User.objects.filter(username__iexact=username).first()
    if user is None:
        if _DUMMY_PASSWORD_HASH is None:
            _DUMMY_PASSWORD_HASH = make_password(secrets.token_urlsafe(16))
        check_password(password, _DUMMY_PASSWORD_HASH)
        valid = False
    else:
        valid = user.check_password(password) and user.is_active
    if not valid:
        login_throttle_fail(username=username, client_ip=client_ip)
        raise Unauthorized("invalid username or password", code="invalid_credentials")
    login_throttle_reset(username=username, client_ip=client_ip)
    return user


def user_get(*, user_id) -> User:
    user = User.objects.filter(pk=user_id).first()
    if user is None:
        raise NotFound("user not found")
    return user


@transaction.atomic
def user_update(
    *, user: User, first_name: str | None = None, last_name: str | None = None, username: str | None = None
) -> User:
    """Change a user's own profile; only the fields given change."""
    if username is not None and username != user.username:
        if _username_taken(username, exclude_id=user.pk):
            raise Conflict(f"username {username!r} is already taken", code="username_taken")
        user.username = username
    if first_name is not None:
        user.first_name = first_name
    if last_name is not None:
        user.last_name = last_name
    try:
        with transaction.atomic():
            user.save()
    except IntegrityError as exc:
        raise Conflict(f"username {username!r} is already taken", code="username_taken") from exc
    return user


@transaction.atomic
def user_password_change(
    *, user: User, session_id: uuid.UUID, old_password: str, new_password: str, client_ip: str | None
) -> None:
    """Set a new password after checking the old one; every other session of the user ends."""
    login_throttle_check(username=user.username, client_ip=client_ip)
    if not user.check_password(old_password):
        login_throttle_fail(username=user.username, client_ip=client_ip)
        raise Unauthorized("old password is wrong", code="invalid_credentials")
    _check_password_strength(new_password, user)
    user.set_password(new_password)
    user.save(update_fields=["password"])
    sessions_revoke_all(user_id=user.pk, except_session_id=session_id)


@transaction.atomic
def user_password_reset(*, username: str, password: str) -> User:
    """An operator sets a user's password; all of that user's sessions end."""
    user = User.objects.filter(username__iexact=username).first()
    if user is None:
        raise NotFound(f"no user named {username!r}")
    _check_password_strength(password, user)
    user.set_password(password)
    user.save(update_fields=["password"])
    sessions_revoke_all(user_id=user.pk)
    return user
