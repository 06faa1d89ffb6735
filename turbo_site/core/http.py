"""Small HTTP helpers shared by every app."""

import ipaddress
import re
from urllib.parse import unquote_plus

from django.conf import settings

# Words in a name (a query parameter, a form field, a JSON key) that say its value is a secret.
_SECRET_WORDS = r"token|key|secret|pass|auth|session|sess|credential|cookie"
SECRET_NAME = re.compile(_SECRET_WORDS, re.IGNORECASE)
# A query parameter (`name=value`) in a query string or a log line holding URLs; its name is judged
# once percent-decoded (`%74oken=` is `token=` to the server that reads it).
_PARAMETER = re.compile(r"(?P<name>(?:^|(?<=[?&;\s]))[^=&;\s?]+=)[^&;\s\"']*")
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


def parameter_name(raw: str) -> str:
    """A query parameter's name as a server reads it: percent-decoded (`+` a space), repeatedly, so
    that no spelling (`%74oken`, `%2574oken`) hides what it is."""
    for _ in range(3):
        decoded = unquote_plus(raw)
        if decoded == raw:
            break
        raw = decoded
    return raw


def is_secret_name(name: str) -> bool:
    """Does a parameter or field name (decoded, any case: `TOKEN`, `Api_Key`) say its value is a secret?"""
    return SECRET_NAME.search(parameter_name(name)) is not None


def _parameter_redacted(found: re.Match) -> str:
    name = found.group("name")
    return f"{name}{REDACTED}" if is_secret_name(name[:-1]) else found.group(0)


def holds_key(text: str, *known: str) -> bool:
    """Does `text` hold one of the `known` secrets, or anything that looks like an OpenAI key?"""
    return any(secret and secret in text for secret in known) or _KEY_LIKE.search(text) is not None


def redact_query(text: str) -> str:
    """`text` (a query string, or a log line holding URLs) with the values of secret parameters redacted.

    A name is judged after percent-decoding and in any case: `?%74oken=`, `?TOKEN=`, `?Api%5FKey=`.
    """
    if not text or "=" not in text:
        return text
    return _PARAMETER.sub(_parameter_redacted, text)


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
