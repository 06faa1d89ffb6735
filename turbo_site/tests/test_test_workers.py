"""The suite's parallel workers (`make test`, pytest-xdist) each get a Redis database of their own
(turbo_site/test_settings.py): every test empties its database, so two workers must never share one."""

import os

import pytest
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

from turbo_site.test_settings import REDIS_ADDRESS_GIVEN, redis_address_of_worker


def test_worker_k_gets_the_database_k_above_the_address_own():
    assert redis_address_of_worker("redis://127.0.0.1:6379/6", "gw0") == "redis://127.0.0.1:6379/6"
    assert redis_address_of_worker("redis://127.0.0.1:6379/6", "gw3") == "redis://127.0.0.1:6379/9"
    assert redis_address_of_worker("redis://:p%40ss@cache:6380", "gw2") == "redis://:p%40ss@cache:6380/2"
    assert redis_address_of_worker("rediss://cache:6380/1?ssl_cert_reqs=none", "gw1") == (
        "rediss://cache:6380/2?ssl_cert_reqs=none"
    )
    assert redis_address_of_worker("unix:///run/redis.sock?db=4", "gw1") == "unix:///run/redis.sock?db=5"


def test_a_worker_past_the_last_database_is_refused_in_one_line():
    with pytest.raises(ImproperlyConfigured, match="Redis database 17 .*TEST_WORKERS"):
        redis_address_of_worker("redis://127.0.0.1:6379/14", "gw3")


def test_this_worker_uses_its_own_database_and_the_servers_it_starts_inherit_it():
    if not REDIS_ADDRESS_GIVEN:  # the embedded leg: no Redis, and none is made up for a worker
        assert settings.REDIS_ADDRESS == "" and not os.environ.get("REDIS_ADDRESS")
        assert "redis" not in settings.CACHES["default"]["BACKEND"].lower()
        return
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    expected = redis_address_of_worker(REDIS_ADDRESS_GIVEN, worker) if worker else REDIS_ADDRESS_GIVEN
    assert settings.REDIS_ADDRESS == expected
    assert os.environ["REDIS_ADDRESS"] == expected  # what a server or command started by a test reads
    assert settings.CACHES["default"]["LOCATION"] == expected
