"""Settings come from the environment, and a production start without a key is refused."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def manage(*args: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in {"SECRET_KEY", "DEBUG", "DB_ADDRESS", "REDIS_ADDRESS"}}
    clean.pop("DJANGO_SETTINGS_MODULE", None)
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_refuses_to_start_without_secret_key_when_not_debugging():
    result = manage("check", DEBUG="0")
    assert result.returncode != 0
    assert "SECRET_KEY is not set" in result.stderr
    assert "Traceback" not in result.stderr


def test_debug_allows_the_development_key():
    assert manage("check", DEBUG="1").returncode == 0


def test_db_address_picks_a_sqlite_file(tmp_path):
    db = tmp_path / "other.db"
    result = manage("migrate", "--noinput", DEBUG="1", DB_ADDRESS=f"sqlite:///{db}")
    assert result.returncode == 0, result.stderr
    assert db.exists() and db.stat().st_size > 0


def test_bad_addresses_are_refused_with_a_clear_line():
    bad_db = manage("check", DEBUG="1", DB_ADDRESS="mysql://x")
    assert bad_db.returncode != 0 and "DB_ADDRESS" in bad_db.stderr
    bad_redis = manage("check", DEBUG="1", REDIS_ADDRESS="localhost:6379")
    assert bad_redis.returncode != 0 and "REDIS_ADDRESS" in bad_redis.stderr
