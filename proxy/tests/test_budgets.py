"""Budgets: reservations that hold under concurrency, on the embedded store and on Redis."""

import asyncio
from decimal import Decimal

import pytest
from asgiref.sync import async_to_sync

from accounts.services import user_create
from conftest import unique_name
from proxy.models import Budget
from proxy.usage.budgets import BudgetExceeded, budget_reserve, budget_rules_forget, budget_set
from proxy.usage.caller import Caller
from testing.commands import manage

# In one transaction: the scenarios run through async_to_sync, so the budgets' database reads run on the
# test's own thread and connection (asyncio.run would send them to a thread of their own, which sees
# nothing uncommitted).
pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _fresh_rules():
    budget_rules_forget()
    yield
    budget_rules_forget()


@pytest.fixture
def user():
    return user_create(username=unique_name(), password="correct-horse-battery")


async def _try(caller, usd):
    try:
        return await budget_reserve(caller, Decimal(usd))
    except BudgetExceeded as refused:
        return refused


def test_forty_concurrent_reservations_against_a_budget_for_ten(user):
    budget_set(scope="user", target_id=user.pk, usd=Decimal("1"), period="month")
    caller = Caller(user.pk)

    async def scenario():
        outcomes = await asyncio.gather(*(_try(caller, "0.1") for _ in range(40)))
        granted = [o for o in outcomes if not isinstance(o, BudgetExceeded)]
        refused = [o for o in outcomes if isinstance(o, BudgetExceeded)]
        assert len(granted) == 10 and len(refused) == 30
        assert "user's monthly budget of $1.00 is used up" in refused[0].message
        assert "resets at" in refused[0].message and refused[0].retry_after > 0
        # Calls that cost less than they reserved give the rest back.
        for reservation in granted:
            await reservation.settle(Decimal("0.05"))
        again = await asyncio.gather(*(_try(caller, "0.1") for _ in range(12)))
        assert sum(not isinstance(o, BudgetExceeded) for o in again) == 5
        for reservation in again:
            if not isinstance(reservation, BudgetExceeded):
                await reservation.settle(Decimal("0.1"))
        last = await _try(caller, "0")
        assert isinstance(last, BudgetExceeded)  # a spent budget refuses even a call that costs nothing

    async_to_sync(scenario)()


def test_every_budget_of_the_caller_applies_and_a_refusal_reserves_nothing(user):
    from accounts.keys import api_key_create

    key, _ = api_key_create(user=user, name="k")
    budget_set(scope="user", target_id=user.pk, usd=Decimal("1"), period="day")
    budget_set(scope="key", target_id=key.pk, usd=Decimal("0.3"), period="total")
    with_key = Caller(user.pk, None, key.pk)
    without_key = Caller(user.pk)

    async def scenario():
        first = await _try(with_key, "0.25")
        assert not isinstance(first, BudgetExceeded)
        refused = await _try(with_key, "0.25")
        assert isinstance(refused, BudgetExceeded)
        assert "API key's total budget of $0.30" in refused.message and "does not reset" in refused.message
        # The key's refusal left the user's budget untouched: 0.75 of it is still free.
        granted = await _try(without_key, "0.75")
        assert not isinstance(granted, BudgetExceeded)
        assert isinstance(await _try(without_key, "0.01"), BudgetExceeded)

    async_to_sync(scenario)()


def test_a_reservation_whose_process_died_expires(user, settings):
    settings.BUDGET_RESERVATION_SECONDS = 1
    budget_set(scope="user", target_id=user.pk, usd=Decimal("1"), period="week")
    caller = Caller(user.pk)

    async def scenario():
        abandoned = await _try(caller, "1")
        assert not isinstance(abandoned, BudgetExceeded)  # never settled, as if its process had died
        assert isinstance(await _try(caller, "0.5"), BudgetExceeded)
        await asyncio.sleep(1.2)
        assert not isinstance(await _try(caller, "0.5"), BudgetExceeded)

    async_to_sync(scenario)()


def test_a_caller_without_budgets_reserves_nothing(user):
    assert async_to_sync(budget_reserve)(Caller(user.pk), Decimal("100")) is None
    assert async_to_sync(budget_reserve)(None, Decimal("100")) is None


def test_bad_amounts_and_periods_are_refused():
    from turbo_site.core.errors import Invalid

    with pytest.raises(Invalid, match="period"):
        budget_set(scope="user", target_id=None, usd=Decimal("1"), period="year")
    with pytest.raises(Invalid, match="usd"):
        budget_set(scope="user", target_id=None, usd=Decimal("-1"), period="day")
    assert not Budget.objects.exists()


def test_budgets_command_sets_lists_and_clears():
    name = unique_name()
    user_create(username=name, password="correct-horse-battery")
    done = manage("budgets", "set", "--user", name, "--usd", "5", "--period", "month")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"user {name}: $5 per month"
    listed = manage("budgets", "list")
    assert listed.returncode == 0 and f"user {name}" in listed.stdout and "$5" in listed.stdout
    assert "month" in listed.stdout and "$0" in listed.stdout
    for args, problem in (
        (("set", "--user", "nobody-here", "--usd", "5"), "no user named 'nobody-here'"),
        (("set", "--user", name, "--usd", "lots"), "is not an amount of dollars"),
        (("set", "--group", "not-an-id", "--usd", "1"), "no group with id 'not-an-id'"),
        (("set", "--key", "tk-missing", "--usd", "1"), "no single live API key"),
        (("set", "--usd", "1"), "one of the arguments --user --group --key is required"),
    ):
        refused = manage("budgets", *args)
        assert refused.returncode != 0 and problem in refused.stderr, (args, refused.stderr)
        assert "Traceback" not in refused.stderr
    cleared = manage("budgets", "clear", "--user", name)
    assert cleared.returncode == 0 and "removed" in cleared.stdout
    assert manage("budgets", "list").stdout.strip() == "no budgets"
