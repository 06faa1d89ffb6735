"""acache_get reads what Django's cache wrote (in-process on the first test leg, Redis on the second)."""

import asyncio
import uuid

from django.core.cache import cache

from turbo_site.core.acache import acache_get
from turbo_site.core.loops import loop_clients_close


def test_async_reads_see_the_values_django_wrote():
    key = f"acache-{uuid.uuid4().hex}"
    values = {"number": 7, "text": "hé", "object": {"a": [1, 2]}, "uuid": uuid.uuid4()}

    async def read_all():
        try:
            return {name: await acache_get(f"{key}-{name}") for name in [*values, "missing"]}
        finally:
            await loop_clients_close()

    for name, value in values.items():
        cache.set(f"{key}-{name}", value, 60)
    assert asyncio.run(read_all()) == {**values, "missing": None}
    cache.delete(f"{key}-number")
    assert asyncio.run(read_all())["number"] is None


def test_shared_reads_unpickle_an_unchanged_entry_once():
    key = f"acache-shared-{uuid.uuid4().hex}"

    async def read_twice():
        try:
            return await acache_get(key, shared=True), await acache_get(key, shared=True), await acache_get(key)
        finally:
            await loop_clients_close()

    cache.set(key, {"user": "a", "models": ["m"]}, 60)
    first, again, unshared = asyncio.run(read_twice())
    assert first == again == unshared == {"user": "a", "models": ["m"]}
    assert again is first  # the same bytes: not unpickled again
    assert unshared is not first  # a plain read gets its own copy, as cache.get does
    cache.set(key, {"user": "a", "models": []}, 60)  # changed: read anew
    changed, _, _ = asyncio.run(read_twice())
    assert changed == {"user": "a", "models": []} and changed is not first
    cache.delete(key)
    assert asyncio.run(read_twice()) == (None, None, None)
