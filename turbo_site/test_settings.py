"""Settings for the test suite: the real settings, with a test key and a fast password hasher."""

import os
import sys
import tempfile

os.environ.setdefault("SECRET_KEY", "turbo-test-suite-key-not-secret")

from turbo_site.settings import *  # noqa: E402,F403
from turbo_site.settings import DATABASES  # noqa: E402

# Password hashing is deliberately slow; the suite signs up hundreds of users.
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]

# A file, not an in-memory database: the live server's threads then use real, separate connections.
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    DATABASES["default"]["TEST"] = {"NAME": os.path.join(tempfile.gettempdir(), f"turbo-test-{os.getpid()}.sqlite3")}

# The suite's own process (pytest, with its live server and many short-lived threads) opens connections
# as before, one per thread; the server processes the tests start (uvicorn, the same settings) keep
# Postgres's pool, as production does, and chats/tests/test_db_pool.py holds them to it.
if "pytest" in sys.modules:
    DATABASES["default"].get("OPTIONS", {}).pop("pool", None)
