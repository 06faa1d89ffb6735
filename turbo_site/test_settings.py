"""Settings for the test suite: the real settings, with a test key and a fast password hasher."""

import os
import sys
import tempfile
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from django.core.exceptions import ImproperlyConfigured

os.environ.setdefault("SECRET_KEY", "turbo-test-suite-key-not-secret")


def redis_address_of_worker(address: str, worker: str) -> str:
    """REDIS_ADDRESS for pytest-xdist worker `gwK`: database base + K, base being the address's own.

    Every test empties its Redis database (conftest.py's `_clean_cache` is a FLUSHDB) and some count its
    keys, so workers running at once must not share one; Redis has 16 (0-15) by default.
    """
    parts = urlsplit(address)
    index = int(worker.removeprefix("gw"))
    if parts.scheme == "unix":
        query = dict(parse_qsl(parts.query))
        base = int(query.get("db") or 0)
        query["db"] = str(base + index)
        rewritten = f"unix://{parts.path}?{urlencode(query)}"  # urlunsplit would drop the empty host's //
    else:
        base = int(parts.path.strip("/") or 0)
        rewritten = urlunsplit(parts._replace(path=f"/{base + index}"))
    if base + index > 15:
        raise ImproperlyConfigured(
            f"test worker {worker} would use Redis database {base + index} ({address} + {index}): "
            "pick a lower database in REDIS_ADDRESS, or fewer workers (TEST_WORKERS)"
        )
    return rewritten


# Under pytest-xdist (-n N) each worker gets a Redis database of its own, written into the environment
# before the settings read it, so the servers and commands a test starts (which inherit the environment)
# use the worker's database too. Only in the pytest process: a child has the rewritten address already.
_worker = os.environ.get("PYTEST_XDIST_WORKER")
REDIS_ADDRESS_GIVEN = os.environ.get("REDIS_ADDRESS", "")  # before the rewrite (turbo_site/tests/test_test_workers.py)
if "pytest" in sys.modules and _worker and REDIS_ADDRESS_GIVEN:
    os.environ["REDIS_ADDRESS"] = redis_address_of_worker(os.environ["REDIS_ADDRESS"], _worker)

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
