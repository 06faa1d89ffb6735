"""Secrets at rest (per-conversation API keys): encrypted with a key derived from SECRET_KEY."""

import base64
import hashlib

from cryptography.fernet import Fernet, InvalidToken
from django.conf import settings


def _fernet() -> Fernet:
    digest = hashlib.sha256(f"turbo-secrets:{settings.SECRET_KEY}".encode()).digest()
    return Fernet(base64.urlsafe_b64encode(digest))


def secret_encrypt(plain: str) -> str:
    return _fernet().encrypt(plain.encode()).decode()


def secret_decrypt(token: str) -> str | None:
    """The plain secret, or None if it cannot be read (e.g. SECRET_KEY changed since)."""
    if not token:
        return None
    try:
        return _fernet().decrypt(token.encode()).decode()
    except (InvalidToken, ValueError):
        return None


def secret_mask(plain: str) -> str:
    """Enough of a secret to recognise it, never enough to use it."""
    if len(plain) <= 8:
        return "…"
    return f"{plain[:3]}…{plain[-4:]}"
