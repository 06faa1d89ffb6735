"""Failed-login limits per (username, client address) and per client address, in the shared cache.

A username's failures count per address, so that wrong passwords sent from elsewhere cannot lock the
real user out; each address also has a limit over all the usernames it tries.
"""

import hashlib
import time

from django.conf import settings
from django.core.cache import cache

from turbo_site.core.errors import RateLimited


def _keys(username: str, client_ip: str | None) -> list[tuple[str, int]]:
    window = settings.LOGIN_FAILURE_WINDOW_SECONDS
    slot = int(time.time() // window)
    address = client_ip or "unknown"
    # Hashed: a username may hold any character, and any length a cache key may not.
    user = hashlib.sha256(f"{username.lower()}\n{address}".encode("utf-8", "surrogatepass")).hexdigest()
    return [
        (f"login-fail:user-at:{user}:{slot}", settings.LOGIN_FAILURES_PER_USERNAME),
        (f"login-fail:ip:{address}:{slot}", settings.LOGIN_FAILURES_PER_IP),
    ]


def _retry_after() -> int:
    window = settings.LOGIN_FAILURE_WINDOW_SECONDS
    return int(window - time.time() % window) + 1


def login_throttle_check(*, username: str, client_ip: str | None) -> None:
    """Raise RateLimited when this username from this address, or this address, failed too often."""
    keys = _keys(username, client_ip)
    counts = cache.get_many([key for key, _ in keys])
    for key, limit in keys:
        if counts.get(key, 0) >= limit:
            raise RateLimited("too many failed logins; try again later", retry_after=_retry_after())


def login_throttle_fail(*, username: str, client_ip: str | None) -> None:
    """Count one failure against this username at this address, and against the address."""
    ttl = settings.LOGIN_FAILURE_WINDOW_SECONDS + 5
    for key, _ in _keys(username, client_ip):
        if not cache.add(key, 1, ttl):
            try:
                cache.incr(key)
            except ValueError:  # expired between add and incr
                cache.add(key, 1, ttl)


def login_throttle_reset(*, username: str, client_ip: str | None) -> None:
    """A successful login clears the username's count at this address (the address count stays)."""
    cache.delete(_keys(username, client_ip)[0][0])
