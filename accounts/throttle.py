"""Failed-login limits per username and per client address, counted in the shared cache."""

import time

from django.conf import settings
from django.core.cache import cache

from turbo_site.core.errors import RateLimited


def _keys(username: str, client_ip: str | None) -> list[tuple[str, int]]:
    window = settings.LOGIN_FAILURE_WINDOW_SECONDS
    slot = int(time.time() // window)
    keys = [(f"login-fail:user:{username.lower()}:{slot}", settings.LOGIN_FAILURES_PER_USERNAME)]
    if client_ip:
        keys.append((f"login-fail:ip:{client_ip}:{slot}", settings.LOGIN_FAILURES_PER_IP))
    return keys


def _retry_after() -> int:
    window = settings.LOGIN_FAILURE_WINDOW_SECONDS
    return int(window - time.time() % window) + 1


def login_throttle_check(*, username: str, client_ip: str | None) -> None:
    """Raise RateLimited when this username or address has failed too often in this window."""
    keys = _keys(username, client_ip)
    counts = cache.get_many([key for key, _ in keys])
    for key, limit in keys:
        if counts.get(key, 0) >= limit:
            raise RateLimited("too many failed logins; try again later", retry_after=_retry_after())


def login_throttle_fail(*, username: str, client_ip: str | None) -> None:
    """Count one failure against this username and address."""
    ttl = settings.LOGIN_FAILURE_WINDOW_SECONDS + 5
    for key, _ in _keys(username, client_ip):
        if not cache.add(key, 1, ttl):
            try:
                cache.incr(key)
            except ValueError:  # expired between add and incr
                cache.add(key, 1, ttl)


def login_throttle_reset(*, username: str) -> None:
    """A successful login clears the username's count (the address count stays)."""
    cache.delete(_keys(username, None)[0][0])
