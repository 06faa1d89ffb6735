"""Budgets that hold under concurrency: every model call reserves what it may cost first.

A call's caller may have up to three budgets (its user's, the group it counts against, its API key's).
Before the call, `budget_reserve` reserves the most the call can cost against all of them at once,
atomically: on Redis with one script (so every process sees every reservation), in this process
without Redis. A budget whose spent plus reserved plus this call would pass its limit refuses the call
(429 `budget_exceeded`, naming the budget and when it resets) and nothing is reserved anywhere. After
the call, `budget_settle` swaps the reservation for what the call really cost. A reservation whose
process died expires after BUDGET_RESERVATION_SECONDS.

Amounts are kept as integer nano-dollars (1e-9 USD) so no float ever touches money. What a period has
spent lives in Redis (or this process); when that is missing (a new period, a Redis restart), it is
rebuilt from the usage rollups in the database before anything is reserved.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import ROUND_CEILING, Decimal

from channels.db import database_sync_to_async
from django.conf import settings

from proxy.usage.caller import Caller
from turbo_site.core import metrics
from turbo_site.core.singleflight import load_once

logger = logging.getLogger("turbo.proxy")

NANO = Decimal("0.000000001")
KEY_PREFIX = "turbo:budget:"
SCOPE_WORDS = {"user": "user's", "group": "group's", "key": "API key's"}
PERIOD_WORDS = {"day": "daily", "week": "weekly", "month": "monthly", "total": "total"}


def to_nano(usd: Decimal) -> int:
    return int((Decimal(usd) / NANO).to_integral_value(rounding=ROUND_CEILING))


def from_nano(amount: int) -> Decimal:
    return (Decimal(amount) * NANO).quantize(NANO)


def usd_text(amount: Decimal) -> str:
    return f"${amount.quantize(Decimal('0.01')) if amount >= Decimal('0.01') else amount.normalize():,}"


# --- periods ------------------------------------------------------------------------------------------


def period_bounds(period: str, now: datetime) -> tuple[datetime, datetime | None]:
    """The UTC start of the period holding `now`, and when the next one starts (None: never)."""
    now = now.astimezone(UTC)
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "day":
        return day, day + timedelta(days=1)
    if period == "week":
        start = day - timedelta(days=day.weekday())
        return start, start + timedelta(days=7)
    if period == "month":
        start = day.replace(day=1)
        following = (start + timedelta(days=32)).replace(day=1)
        return start, following
    return datetime(1970, 1, 1, tzinfo=UTC), None


# --- which budgets apply ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BudgetRule:
    budget_id: uuid.UUID
    scope: str
    limit_nano: int
    period: str
    limit_usd: Decimal


@dataclass(frozen=True, slots=True)
class Limit:
    """A budget in its current period."""

    rule: BudgetRule
    start: datetime
    resets_at: datetime | None

    @property
    def key(self) -> str:
        return f"{KEY_PREFIX}{self.rule.budget_id}:{int(self.start.timestamp())}"

    @property
    def keep_seconds(self) -> int:
        """How long Redis keeps the period's figures: a day past its end (a total budget: always)."""
        if self.resets_at is None:
            return 0
        return int((self.resets_at - datetime.now(UTC)).total_seconds()) + 86_400


_rules_cache: dict[tuple[str, uuid.UUID], tuple[float, BudgetRule | None]] = {}
_rules_lock = threading.Lock()


def _rules_from_db(targets: list[tuple[str, uuid.UUID]]) -> dict[tuple[str, uuid.UUID], BudgetRule | None]:
    from django.db.models import Q

    from proxy.models import Budget

    query = Q()
    for scope, target in targets:
        query |= Q(scope=scope, **{f"{scope}_id": target})
    found: dict[tuple[str, uuid.UUID], BudgetRule | None] = dict.fromkeys(targets)
    for budget in Budget.objects.filter(query):
        target = getattr(budget, f"{budget.scope}_id")
        found[(budget.scope, target)] = BudgetRule(
            budget.pk, budget.scope, to_nano(budget.limit_usd), budget.period, budget.limit_usd
        )
    return found


async def _rules_for(caller: Caller) -> list[BudgetRule]:
    """The caller's budgets, each cached in this process for BUDGET_CACHE_SECONDS."""
    targets = [
        (scope, target)
        for scope, target in (("user", caller.user_id), ("group", caller.group_id), ("key", caller.key_id))
        if target is not None
    ]
    now = time.monotonic()
    rules: list[BudgetRule] = []
    missing = []
    with _rules_lock:
        for target in targets:
            cached = _rules_cache.get(target)
            if cached is None or cached[0] < now:
                missing.append(target)
            elif cached[1] is not None:
                rules.append(cached[1])
    if missing:
        # Requests that miss the same budgets together share one query (turbo_site.core.singleflight).
        loaded = await load_once(("budget-rules", *missing), lambda: database_sync_to_async(_rules_from_db)(missing))
        until = now + settings.BUDGET_CACHE_SECONDS
        with _rules_lock:
            for target, rule in loaded.items():
                _rules_cache[target] = (until, rule)
        rules += [rule for rule in loaded.values() if rule is not None]
    return rules


def budget_rules_forget() -> None:
    """Forget this process's cached budgets (after a change here; other processes wait out the cache)."""
    with _rules_lock:
        _rules_cache.clear()


# --- what a period has spent so far, from the database -----------------------------------------------


def _spent_in_db(limit: Limit) -> int:
    """What the budget's target spent in the period, from the usage rollups (nano-dollars)."""
    from django.db.models import Sum

    from proxy.models import Budget

    try:
        from proxy.models import UsageRollup
    except ImportError:  # no usage rollups yet: nothing recorded
        return 0
    budget = Budget.objects.filter(pk=limit.rule.budget_id).values("scope", "user_id", "group_id", "key_id").first()
    if budget is None:
        return 0
    target = {f"{budget['scope']}_id": budget[f"{budget['scope']}_id"]}
    spent = UsageRollup.objects.filter(hour__gte=limit.start, **target).aggregate(total=Sum("cost_usd"))["total"]
    return to_nano(spent or Decimal(0))


# --- the reservation stores ---------------------------------------------------------------------------

RESERVE_SCRIPT = """
local now = tonumber(ARGV[1])
local ttl = tonumber(ARGV[2])
local id = ARGV[3]
local amount = tonumber(ARGV[4])
local n = tonumber(ARGV[5])
local missing = {}
for i = 1, n do
  if redis.call('EXISTS', KEYS[3 * i - 2]) == 0 then table.insert(missing, i) end
end
if #missing > 0 then
  table.insert(missing, 1, -1)
  return missing
end
for i = 1, n do
  local res, exp = KEYS[3 * i - 1], KEYS[3 * i]
  local expired = redis.call('ZRANGEBYSCORE', exp, '-inf', now)
  if #expired > 0 then
    redis.call('ZREM', exp, unpack(expired))
    redis.call('HDEL', res, unpack(expired))
  end
  local reserved = 0
  for _, value in ipairs(redis.call('HVALS', res)) do reserved = reserved + tonumber(value) end
  local spent = tonumber(redis.call('GET', KEYS[3 * i - 2]))
  local limit = tonumber(ARGV[5 + 2 * i - 1])
  if spent + reserved + amount > limit or spent + reserved >= limit then
    return {i, spent, reserved}
  end
end
for i = 1, n do
  redis.call('HSET', KEYS[3 * i - 1], id, amount)
  redis.call('ZADD', KEYS[3 * i], now + ttl, id)
  local keep = tonumber(ARGV[5 + 2 * i])
  if keep > 0 then
    redis.call('EXPIRE', KEYS[3 * i - 1], keep)
    redis.call('EXPIRE', KEYS[3 * i], keep)
  end
end
return {0}
"""

SETTLE_SCRIPT = """
local id = ARGV[1]
local actual = tonumber(ARGV[2])
local n = tonumber(ARGV[3])
for i = 1, n do
  redis.call('HDEL', KEYS[3 * i - 1], id)
  redis.call('ZREM', KEYS[3 * i], id)
  if actual > 0 and redis.call('EXISTS', KEYS[3 * i - 2]) == 1 then
    redis.call('INCRBY', KEYS[3 * i - 2], actual)
  end
end
return 0
"""


def redis_keys(limits: list[Limit]) -> list[str]:
    """The Redis keys of the budgets' periods: spent, reserved and when each reservation expires."""
    keys = []
    for limit in limits:
        keys += [limit.key + ":spent", limit.key + ":reserved", limit.key + ":expires"]
    return keys


def reserve_arguments(limits: list[Limit], reservation_id: str, amount: int) -> list:
    """RESERVE_SCRIPT's arguments (also run inside proxy.usage.limits' joint script)."""
    args = [int(time.time() * 1000), settings.BUDGET_RESERVATION_SECONDS * 1000, reservation_id, amount, len(limits)]
    for limit in limits:
        args += [limit.rule.limit_nano, limit.keep_seconds]
    return args


async def spent_load(limits: list[Limit], indexes: list[int]) -> None:
    """A period's first call (or Redis lost its figures): what it spent so far, from the database.

    Requests that find a figure missing together share one query and one write (turbo_site.core.
    singleflight): the load they wait for ends once the figure is in Redis."""
    for index in indexes:  # 1-based, as the scripts answer
        limit = limits[index - 1]
        await load_once(("budget-spent", "redis", limit.key), functools.partial(_spent_to_redis, limit))


async def _spent_to_redis(limit: Limit) -> None:
    from turbo_site.core.acache import redis_client

    spent = await database_sync_to_async(_spent_in_db)(limit)
    await redis_client(settings.REDIS_ADDRESS).set(limit.key + ":spent", spent, nx=True, ex=limit.keep_seconds or None)


class RedisStore:
    """Reservations in Redis: every process sees them."""

    def _client(self):
        from turbo_site.core.acache import redis_client

        return redis_client(settings.REDIS_ADDRESS)

    async def reserve(self, limits: list[Limit], reservation_id: str, amount: int) -> tuple[int, int, int]:
        """(0, 0, 0) when reserved; else (the 1-based index of the refusing limit, its spent, its reserved)."""
        client = self._client()
        args = reserve_arguments(limits, reservation_id, amount)
        for _ in range(3):
            answer = await client.eval(RESERVE_SCRIPT, len(limits) * 3, *redis_keys(limits), *args)
            if int(answer[0]) != -1:
                head = [int(value) for value in answer] + [0, 0]
                return head[0], head[1], head[2]
            await spent_load(limits, [int(index) for index in answer[1:]])
        raise RuntimeError("budget figures could not be initialised")

    async def settle(self, limits: list[Limit], reservation_id: str, actual: int) -> None:
        await self._client().eval(
            SETTLE_SCRIPT, len(limits) * 3, *redis_keys(limits), reservation_id, actual, len(limits)
        )


class MemoryStore:
    """Reservations in this process (the embedded default: one process)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.spent: dict[str, int] = {}
        self.reserved: dict[str, dict[str, tuple[int, float]]] = {}

    async def reserve(self, limits: list[Limit], reservation_id: str, amount: int) -> tuple[int, int, int]:
        for limit in limits:
            if limit.key not in self.spent:  # requests that find it missing together share one query
                await load_once(("budget-spent", "memory", limit.key), functools.partial(self._spent_load, limit))
        now = time.monotonic()
        with self.lock:
            for index, limit in enumerate(limits, start=1):
                live = {
                    rid: (value, until)
                    for rid, (value, until) in self.reserved.get(limit.key, {}).items()
                    if until > now
                }
                self.reserved[limit.key] = live
                reserved = sum(value for value, _ in live.values())
                used = self.spent[limit.key] + reserved
                if used + amount > limit.rule.limit_nano or used >= limit.rule.limit_nano:
                    return index, self.spent[limit.key], reserved
            for limit in limits:
                self.reserved[limit.key][reservation_id] = (amount, now + settings.BUDGET_RESERVATION_SECONDS)
        return 0, 0, 0

    async def _spent_load(self, limit: Limit) -> None:
        spent = await database_sync_to_async(_spent_in_db)(limit)
        with self.lock:
            self.spent.setdefault(limit.key, spent)

    async def settle(self, limits: list[Limit], reservation_id: str, actual: int) -> None:
        with self.lock:
            for limit in limits:
                self.reserved.get(limit.key, {}).pop(reservation_id, None)
                if limit.key in self.spent:
                    self.spent[limit.key] += actual


_memory_store = MemoryStore()


def _store():
    return RedisStore() if settings.REDIS_ADDRESS else _memory_store


# --- reserving and settling ---------------------------------------------------------------------------


class BudgetExceeded(Exception):
    """A budget that applies to the call cannot cover it: 429 `budget_exceeded`."""

    status = 429
    code = "budget_exceeded"

    def __init__(self, limit: Limit, spent: int, reserved: int):
        metrics.budget_refused(limit.rule.scope)  # made only where a call is refused
        self.limit = limit
        words = f"the {SCOPE_WORDS[limit.rule.scope]} {PERIOD_WORDS[limit.rule.period]} budget"
        used = from_nano(spent + reserved)
        message = f"{words} of {usd_text(limit.rule.limit_usd)} is used up ({usd_text(used)} spent or reserved)"
        if limit.resets_at is not None:
            message += f"; it resets at {limit.resets_at.strftime('%Y-%m-%dT%H:%M:%SZ')}"
        else:
            message += "; it does not reset"
        self.message = message
        self.retry_after = (
            max(1, int((limit.resets_at - datetime.now(UTC)).total_seconds())) if limit.resets_at else None
        )
        super().__init__(message)


@dataclass
class Reservation:
    """What a call has reserved; settle it once with what the call cost."""

    limits: list[Limit]
    reservation_id: str
    amount: int
    settled: bool = field(default=False)

    async def settle(self, actual_usd: Decimal) -> None:
        if self.settled:
            return
        self.settled = True
        try:
            await _store().settle(self.limits, self.reservation_id, to_nano(actual_usd))
        except Exception as exc:  # the reservation expires on its own; the rollups keep the truth
            logger.warning("a budget reservation could not be settled: %s", exc)


async def reservation_settle(reservation: Reservation | None, cost: Decimal | None) -> None:
    """Settle a call's reservation with its cost; None (counted later, offline): keep what it reserved."""
    if reservation is None:
        return
    await reservation.settle(from_nano(reservation.amount) if cost is None else cost)


async def budget_reserve(caller: Caller | None, amount_usd: Decimal | Callable[[], Decimal]) -> Reservation | None:
    """Reserve `amount_usd` against every budget of `caller` (None when none applies). A callable
    amount is worked out only when a budget applies (counting a prompt's tokens is not free).

    Raises BudgetExceeded, having reserved nothing, when one of them cannot cover it.
    """
    limits = await budget_limits(caller)
    if not limits:
        return None
    reservation = Reservation(limits, uuid.uuid4().hex, to_nano(amount_usd() if callable(amount_usd) else amount_usd))
    refused, spent, reserved = await _store().reserve(limits, reservation.reservation_id, reservation.amount)
    if refused:
        raise BudgetExceeded(limits[refused - 1], spent, reserved)
    return reservation


async def budget_limits(caller: Caller | None) -> list[Limit]:
    """The budgets that apply to a call by `caller`, in their current periods."""
    if caller is None:
        return []
    rules = await _rules_for(caller)
    if not rules:
        return []
    now = datetime.now(UTC)
    return [Limit(rule, *period_bounds(rule.period, now)) for rule in rules]


# --- setting budgets (the admin and `manage.py budgets`) ---------------------------------------------


def budget_set(*, scope: str, target_id, usd: Decimal, period: str):
    """Set (or replace) the budget of a user, group or API key; returns the Budget."""
    from django.db import transaction

    from proxy.models import Budget
    from turbo_site.core.errors import Invalid

    if scope not in Budget.Scope.values:
        raise Invalid(f"scope: must be one of {', '.join(Budget.Scope.values)}")
    if period not in Budget.Period.values:
        raise Invalid(f"period: must be one of {', '.join(Budget.Period.values)}")
    usd = Decimal(usd)
    if not usd.is_finite() or usd < 0 or usd >= Decimal("100000000"):
        raise Invalid("usd: must be a number from 0 to 99999999.999999")
    with transaction.atomic():
        budget, _ = Budget.objects.update_or_create(
            scope=scope,
            **{f"{scope}_id": target_id},
            defaults={"limit_usd": usd.quantize(Decimal("0.000001")), "period": period},
        )
        transaction.on_commit(budget_rules_forget)
    return budget


def budget_clear(*, scope: str, target_id) -> bool:
    """Remove the budget of a user, group or API key; was there one?"""
    from django.db import transaction

    from proxy.models import Budget

    with transaction.atomic():
        removed, _ = Budget.objects.filter(scope=scope, **{f"{scope}_id": target_id}).delete()
        transaction.on_commit(budget_rules_forget)
    return bool(removed)


def budget_spent(budget) -> tuple[Decimal, datetime | None]:
    """What the budget's target spent in its current period (from the rollups), and when it resets."""
    rule = BudgetRule(budget.pk, budget.scope, to_nano(budget.limit_usd), budget.period, budget.limit_usd)
    limit = Limit(rule, *period_bounds(budget.period, datetime.now(UTC)))
    return from_nano(_spent_in_db(limit)), limit.resets_at


# --- what a call may cost at most ---------------------------------------------------------------------


def _int_field(body: dict, *names: str) -> int | None:
    for name in names:
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def call_cost_ceiling(path: str, model: str, body: dict | None, *, raw: bytes = b"", content_type: str = "") -> Decimal:
    """The most a call may cost: for images, speech and transcriptions what it asks to make (images
    by number and size, characters, the seconds its upload may hold: `raw`, read as a form when
    `content_type` says so); else its prompt's tokens (counted offline) plus the reply it may get
    (`max_tokens` or the like, else BUDGET_DEFAULT_MAX_TOKENS; times `n`), at the model's price.
    A model with no known price counts at DEFAULT_PRICE (UnpricedModel: refused, UNPRICED_MODELS=refuse)."""
    from proxy.forms import form_fields
    from proxy.usage.pricing import cost_of, price_for_budget, units_cost
    from proxy.usage.tokens import estimate_prompt_tokens

    price = price_for_budget(model)
    if price is None:
        return Decimal(0)
    body = body if isinstance(body, dict) else {}
    if not body and raw and content_type.lower().startswith("multipart/form-data"):
        body = form_fields(raw, content_type) or {}
    units = units_cost(path, price, body, body_size=len(raw))
    if units is not None:
        return units
    prompt = estimate_prompt_tokens(body)
    if path.startswith("embeddings"):
        return cost_of(price, prompt, 0)
    reply = _int_field(body, "max_completion_tokens", "max_tokens", "max_output_tokens")
    reply = reply or settings.BUDGET_DEFAULT_MAX_TOKENS
    choices = _int_field(body, "n") or 1
    return cost_of(price, prompt, reply * min(choices, 128))
