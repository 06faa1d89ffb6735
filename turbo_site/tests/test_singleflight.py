"""turbo_site.core.singleflight: callers missing the same entry together share one load, and the loads
of the /v1 hot path that use it (a token's lookup, a budget's spend) query the database once for all."""

import asyncio
import contextlib
from decimal import Decimal

import pytest
from channels.db import database_sync_to_async
from django.core.cache import cache
from django.db import connection

from conftest import unique_name
from turbo_site.core.singleflight import load_once


def test_sixteen_callers_share_one_load_and_the_next_miss_loads_again():
    loads = []

    async def load():
        loads.append(1)
        await asyncio.sleep(0.01)
        return {"rules": len(loads)}

    async def run():
        together = await asyncio.gather(*(load_once(("k", 1), load) for _ in range(16)))
        later = await load_once(("k", 1), load)
        other = await load_once(("k", 2), load)
        return together, later, other

    together, later, other = asyncio.run(run())
    assert together == [{"rules": 1}] * 16 and len({id(result) for result in together}) == 1
    assert later == {"rules": 2} and other == {"rules": 3}


def test_a_cancelled_caller_leaves_the_load_to_the_others_and_errors_reach_all():
    async def slow():
        await asyncio.sleep(0.02)
        return "loaded"

    async def failing():
        await asyncio.sleep(0.01)
        raise RuntimeError("database away")

    async def run():
        first = asyncio.ensure_future(load_once("slow", slow))
        await asyncio.sleep(0)
        second = asyncio.ensure_future(load_once("slow", slow))
        await asyncio.sleep(0)
        first.cancel()
        results = await asyncio.gather(first, second, return_exceptions=True)
        failures = await asyncio.gather(*(load_once("failing", failing) for _ in range(3)), return_exceptions=True)
        return results, failures

    (first, second), failures = asyncio.run(run())
    assert isinstance(first, asyncio.CancelledError) and second == "loaded"
    assert [str(error) for error in failures] == ["database away"] * 3
    with pytest.raises(RuntimeError):  # nothing kept from the failed load: the next one runs (and fails) anew
        asyncio.run(load_once("failing", failing))


class _Statements:
    """The SQL statements run on Django's sync thread, where database_sync_to_async runs every query of
    a scenario run by asyncio.run from a test."""

    def __init__(self):
        self.sql: list[str] = []

    def __call__(self, execute, sql, params, many, context):
        self.sql.append(sql)
        return execute(sql, params, many, context)

    def reads_of(self, table: str) -> list[str]:
        return [sql for sql in self.sql if sql.lstrip().upper().startswith("SELECT") and f'"{table}"' in sql]

    @contextlib.asynccontextmanager
    async def counting(self):
        await database_sync_to_async(lambda: connection.execute_wrappers.append(self))()
        try:
            yield self
        finally:
            await database_sync_to_async(lambda: connection.execute_wrappers.remove(self))()


@pytest.mark.django_db(transaction=True)
def test_requests_missing_a_token_s_cached_lookup_together_share_one_query():
    from accounts.services import asession_lookup, session_create, user_create
    from accounts.tokens import cache_key, token_hash

    session, token = session_create(user=user_create(username=unique_name(), password="correct-horse-battery"))
    statements = _Statements()

    async def scenario():
        async with statements.counting():
            shared = await asyncio.gather(*(asession_lookup(token, shared=True) for _ in range(16)))
            first = len(statements.reads_of("sessions"))
            await cache.adelete(cache_key(token_hash(token)))  # the cached lookup expired
            owned = await asyncio.gather(*(asession_lookup(token) for _ in range(8)))
        return shared, first, owned

    shared, first, owned = asyncio.run(scenario())
    assert [found.session_id for found in shared + owned] == [session.pk] * 24
    assert first == 1 and len(statements.reads_of("sessions")) == 2
    # A caller that may change what it is given (not `shared`) gets its own, as from the cache.
    assert len({id(found.user) for found in owned}) == 8


@pytest.mark.django_db(transaction=True)
def test_requests_finding_a_budget_s_spend_not_loaded_together_share_one_query():
    from accounts.services import user_create
    from proxy.usage.budgets import budget_reserve, budget_rules_forget, budget_set
    from proxy.usage.caller import Caller

    user = user_create(username=unique_name(), password="correct-horse-battery")
    budget_set(scope="user", target_id=user.pk, usd=Decimal("1"), period="month")
    budget_rules_forget()
    statements = _Statements()

    async def scenario():
        async with statements.counting():
            reservations = await asyncio.gather(*(budget_reserve(Caller(user.pk), Decimal("0.01")) for _ in range(16)))
        for reservation in reservations:
            await reservation.settle(Decimal("0.01"))
        return reservations

    try:
        reservations = asyncio.run(scenario())
    finally:
        budget_rules_forget()
    assert all(reservation is not None for reservation in reservations)
    # The period's spend, loaded once for the sixteen (one more at most: on Redis, a caller whose script saw
    # the figure missing may reach the load only after the first one ended; its SET nx then changes nothing).
    assert len(statements.reads_of("usage_rollups")) in (1, 2)
    # the caller's budgets (once), and the spend's target (once per load)
    assert len(statements.reads_of("budgets")) == 1 + len(statements.reads_of("usage_rollups"))
