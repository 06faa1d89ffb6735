"""Turbo's settings for the fan-out benchmark: production's, with a cheap password hasher.

Signing up hashes the password with PBKDF2 on purpose slowly (over a second of CPU per user on a small
machine), so setting up 100 users through `/user/signup` would take minutes. Nothing the benchmark measures
checks a password: WebSocket handshakes and API calls look the token up by its SHA-256 hash. The users are
thrown away with their database. `python -m bench.fanout --production-hasher` runs without this module.
"""

from turbo_site.settings import *  # noqa: F403

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
