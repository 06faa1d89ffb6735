"""Small HTTP helpers shared by every app."""

import ipaddress
import re

from django.conf import settings

# Words in a name (a query parameter, a form field, a JSON key) that say its value is a secret.
_SECRET_WORDS = r"token|key|secret|pass|auth|session|sess|credential|cookie"
SECRET_NAME = re.compile(_SECRET_WORDS, re.IGNORECASE)
# A query parameter whose name says it holds a secret (?token=, ?api_key=, ?password=, ...).
_SECRET_PARAMETER = re.compile(
    rf"(?P<name>(?:^|(?<=[?&;\s]))[^=&;\s?]*(?:{_SECRET_WORDS})[^=&;\s]*=)[^&;\s\"']*", re.IGNORECASE
)
# An OpenAI-style key (sk-..., sk-proj-..., or the masked sk-abc***xyz an upstream quotes back).
_KEY_LIKE = re.compile(r"\bsk-[A-Za-z0-9_*.\-]{3,}")
REDACTED = "[redacted]"


def _valid_ip(value: str) -> str | None:
    value = value.strip()
    if value.startswith("[") and "]" in value:
        value = value[1 : value.index("]")]
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        return None


def redact_keys(text: str, *known: str) -> str:
    """`text` with the `known` secrets and anything that looks like an OpenAI key replaced by REDACTED."""
    for secret in known:
        if secret:
            text = text.replace(secret, REDACTED)
    return _KEY_LIKE.sub(REDACTED, text)


def redact_query(text: str) -> str:
    """`text` (a query string, or a log line holding URLs) with the values of secret parameters redacted."""
    if not text or "=" not in text:
        return text
    return _SECRET_PARAMETER.sub(rf"\g<name>{REDACTED}", text)


def client_ip_from(remote_addr: str | None, forwarded_for: str | None) -> str | None:
    """The caller's address: X-Forwarded-For is believed only when the peer is a trusted proxy.

    Walks the forwarded chain from the right and stops at the first address that is not one of
    our own proxies, so a client cannot spoof its address by sending the header itself.
    """
    peer = _valid_ip(remote_addr or "")
    trusted = set(settings.TRUSTED_PROXIES)
    if not peer or peer not in trusted or not forwarded_for:
        return peer
    for hop in reversed(forwarded_for.split(",")):
        address = _valid_ip(hop)
        if address is None:
            break
        if address not in trusted:
            return address
    return peer


def is_trusted_proxy(remote_addr: str | None) -> bool:
    """Whether the peer is one of TRUSTED_PROXIES, whose X-Forwarded-* headers are believed."""
    peer = _valid_ip(remote_addr or "")
    return peer is not None and peer in settings.TRUSTED_PROXIES


def client_ip(request) -> str | None:
    return client_ip_from(request.META.get("REMOTE_ADDR"), request.META.get("HTTP_X_FORWARDED_FOR"))


def mark_event(request, *, event_type: str | None = None, user_id=None) -> None:
    """Tell the event log what this request was (login, signup, ...) and who made it.

    Takes a DRF Request or a Django HttpRequest; the mark lands on the HttpRequest the middleware sees.
    """
    target = getattr(request, "_request", request)
    if event_type is not None:
        target.turbo_event_type = event_type
    if user_id is not None:
        target.turbo_user_id = user_id


def scope_headers(scope) -> dict[str, str]:
    """An ASGI scope's headers by lower-case name; repeated headers joined with commas, as Django does."""
    headers: dict[str, str] = {}
    for raw_name, raw_value in scope.get("headers", []):
        name = raw_name.decode("latin1").lower()
        value = raw_value.decode("latin1")
        headers[name] = f"{headers[name]},{value}" if name in headers else value
    return headers
