"""A model call's rate limits and budgets together: one Redis round trip before the call, one after.

Before the call, `limits_take` admits it through its caller's rate limits and reserves what it may
cost against the caller's budgets. When both apply and Redis holds them, one script does both, all or
nothing: a call refused by either takes nothing from the other. After the call, `limits_settle`
corrects the tokens taken and swaps the reservation for the cost, again in one script. Without Redis,
or when only one of the two applies, each module does its own part (proxy.usage.ratelimits,
proxy.usage.budgets); the rules are theirs, this module only saves round trips.

On the `/v1` hot path the caller itself comes unconfirmed: the token's lookup as this process read it
last (turbo_site.core.acache's `CachedCheck`). The joint script then first checks that Redis still holds
those bytes, so the token lookup and the admission share one round trip; a changed entry (a revoked
key, a changed user) takes nothing and raises CacheChanged, and the request starts again. Whenever the
joint script does not run, the check is confirmed on its own before anything is taken.
"""

import logging
import uuid
from collections.abc import Callable
from decimal import Decimal

from django.conf import settings

from proxy.errors import GatewayError
from proxy.usage import budgets, ratelimits
from proxy.usage.budgets import BudgetExceeded, Reservation
from proxy.usage.caller import Caller
from proxy.usage.pricing import UnpricedModel
from proxy.usage.ratelimits import Admission
from turbo_site.core.acache import CachedCheck

logger = logging.getLogger("turbo.proxy")

# KEYS: the r rate-limit counters, then three keys per budget (spent, reserved, expires).
# ARGV: r, then TAKE_SCRIPT's arguments (window; limit and cost per counter), then RESERVE_SCRIPT's
# (now, ttl, id, amount, n; limit and keep per budget). Nothing is written unless both let the call through.
# Returns {1, wait, readings...} (rate-limited), {-1, budgets without figures...}, {2, budget, spent,
# reserved} (over budget), or {0, 0, readings...} (taken and reserved); three numbers per reading.
TAKE_AND_RESERVE_SCRIPT = """
local r = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local clock = redis.call('TIME')
local rnow = tonumber(clock[1]) * 1000 + tonumber(clock[2]) / 1000
local before, after, intervals = {}, {}, {}
local wait = 0
for i = 1, r do
  local interval = window / tonumber(ARGV[1 + 2 * i])
  local tat = math.max(tonumber(redis.call('GET', KEYS[i]) or '0'), rnow)
  intervals[i] = interval
  before[i] = tat
  after[i] = tat + tonumber(ARGV[2 + 2 * i]) * interval
  wait = math.max(wait, after[i] - rnow - window)
end
local admitted = wait <= 0.001
local result = {admitted and 0 or 1, admitted and 0 or math.ceil(wait)}
for i = 1, r do
  local tat = admitted and after[i] or before[i]
  local remaining = math.floor((window - (tat - rnow)) / intervals[i] + 0.000001)
  table.insert(result, math.max(remaining, 0))
  table.insert(result, math.ceil(tat - rnow))
  table.insert(result, (after[i] - rnow - window > 0.001) and 1 or 0)
end
if not admitted then return result end
local o = 2 + 2 * r
local now = tonumber(ARGV[o + 1])
local ttl = tonumber(ARGV[o + 2])
local id = ARGV[o + 3]
local amount = tonumber(ARGV[o + 4])
local n = tonumber(ARGV[o + 5])
local missing = {-1}
for i = 1, n do
  if redis.call('EXISTS', KEYS[r + 3 * i - 2]) == 0 then table.insert(missing, i) end
end
if #missing > 1 then return missing end
for i = 1, n do
  local res, exp = KEYS[r + 3 * i - 1], KEYS[r + 3 * i]
  local expired = redis.call('ZRANGEBYSCORE', exp, '-inf', now)
  if #expired > 0 then
    redis.call('ZREM', exp, unpack(expired))
    redis.call('HDEL', res, unpack(expired))
  end
  local reserved = 0
  for _, value in ipairs(redis.call('HVALS', res)) do reserved = reserved + tonumber(value) end
  local spent = tonumber(redis.call('GET', KEYS[r + 3 * i - 2]))
  local limit = tonumber(ARGV[o + 4 + 2 * i])
  if spent + reserved + amount > limit or spent + reserved >= limit then
    return {2, i, spent, reserved}
  end
end
for i = 1, r do
  redis.call('SET', KEYS[i], string.format('%.3f', after[i]), 'PX', math.ceil(after[i] - rnow) + 1000)
end
for i = 1, n do
  redis.call('HSET', KEYS[r + 3 * i - 1], id, amount)
  redis.call('ZADD', KEYS[r + 3 * i], now + ttl, id)
  local keep = tonumber(ARGV[o + 5 + 2 * i])
  if keep > 0 then
    redis.call('EXPIRE', KEYS[r + 3 * i - 1], keep)
    redis.call('EXPIRE', KEYS[r + 3 * i], keep)
  end
end
return result
"""

# The same, first checking an unconfirmed token lookup: its cache key is the last key, the SHA1 (hex) of
# the bytes it was read from the last argument. Other bytes there (or none) return {3}, having done nothing.
CHECKED_TAKE_AND_RESERVE_SCRIPT = (
    """
local held = redis.call('GET', KEYS[#KEYS])
if not held or redis.sha1hex(held) ~= ARGV[#ARGV] then return {3} end
"""
    + TAKE_AND_RESERVE_SCRIPT
)

# KEYS: three per budget, then the rate-limit counters to correct. ARGV: n, id, the actual cost, then
# ADJUST_SCRIPT's arguments (window; limit and units per counter).
SETTLE_AND_ADJUST_SCRIPT = """
local n = tonumber(ARGV[1])
local id = ARGV[2]
local actual = tonumber(ARGV[3])
for i = 1, n do
  redis.call('HDEL', KEYS[3 * i - 1], id)
  redis.call('ZREM', KEYS[3 * i], id)
  if actual > 0 and redis.call('EXISTS', KEYS[3 * i - 2]) == 1 then
    redis.call('INCRBY', KEYS[3 * i - 2], actual)
  end
end
local clock = redis.call('TIME')
local rnow = tonumber(clock[1]) * 1000 + tonumber(clock[2]) / 1000
local window = tonumber(ARGV[4])
for i = 1, #KEYS - 3 * n do
  local key = KEYS[3 * n + i]
  local interval = window / tonumber(ARGV[3 + 2 * i])
  local tat = math.max(tonumber(redis.call('GET', key) or '0'), rnow) + tonumber(ARGV[4 + 2 * i]) * interval
  if tat <= rnow then
    redis.call('DEL', key)
  else
    redis.call('SET', key, string.format('%.3f', tat), 'PX', math.ceil(tat - rnow) + 1000)
  end
end
return 1
"""


def budget_refused(refused: BudgetExceeded) -> GatewayError:
    return GatewayError(
        refused.message,
        status=429,
        code="budget_exceeded",
        error_type="insufficient_quota",
        retry_after=refused.retry_after,
    )


async def limits_take(
    caller: Caller | None,
    *,
    payload: dict | None,
    cost_ceiling: Callable[[], Decimal],
    token_check: CachedCheck | None = None,
) -> tuple[Admission, Reservation | None]:
    """Admit a model call by `caller` (its body: `payload`) through its rate limits and reserve what it
    may cost (`cost_ceiling()`, worked out only when a budget applies) against its budgets. Raises
    GatewayError 429 `rate_limited` or `budget_exceeded` (403 `model_not_priced`: UNPRICED_MODELS=refuse),
    having taken and reserved nothing. `token_check`: the caller's unconfirmed token lookup, confirmed
    here before anything is taken (in the joint script when it runs); CacheChanged if it changed."""
    asked_ceiling = cost_ceiling

    def cost_ceiling() -> Decimal:
        try:
            return asked_ceiling()
        except UnpricedModel as unpriced:
            raise GatewayError(
                str(unpriced), status=403, code="model_not_priced", error_type="invalid_request_error"
            ) from None

    admission, wanted = await ratelimits.ratelimit_wanted(caller, payload=payload)
    limits = await budgets.budget_limits(caller)
    if settings.REDIS_ADDRESS and wanted and limits:
        joint = await _take_and_reserve(admission, wanted, limits, cost_ceiling, token_check)
        if joint is not None:
            return joint
    if token_check is not None:  # a round trip of its own (a no-op if the joint script confirmed it)
        await token_check.confirm()
    # One of the two (or Redis failed just now): each module on its own, with its own failure rules.
    if wanted:
        admission = ratelimits.ratelimit_taken(admission, wanted, *await ratelimits.counters_take(wanted))
    if not limits:
        return admission, None
    try:
        return admission, await budgets.budget_reserve(caller, cost_ceiling)
    except BudgetExceeded as refused:
        await ratelimits.ratelimit_release(admission)
        raise budget_refused(refused) from None
    except BaseException:
        await ratelimits.ratelimit_release(admission)
        raise


async def _take_and_reserve(
    admission, wanted, limits, cost_ceiling, token_check: CachedCheck | None
) -> tuple[Admission, Reservation] | None:
    """Both in one script (checking `token_check` first, when unconfirmed); None if Redis failed (the
    caller falls back to one at a time)."""
    reservation = Reservation(limits, uuid.uuid4().hex, budgets.to_nano(cost_ceiling()))
    keys, take = ratelimits.take_arguments(wanted)
    keys += budgets.redis_keys(limits)
    args = [len(wanted), *take, *budgets.reserve_arguments(limits, reservation.reservation_id, reservation.amount)]
    for _ in range(3):
        if token_check is not None and not token_check.confirmed:
            found = await ratelimits.redis_script(
                CHECKED_TAKE_AND_RESERVE_SCRIPT, [*keys, token_check.key], [*args, token_check.digest]
            )
        else:
            found = await ratelimits.redis_script(TAKE_AND_RESERVE_SCRIPT, keys, args)
        if found is None:
            return None
        status = int(found[0])
        if status == 3:
            raise token_check.changed()
        if token_check is not None:
            token_check.confirmed = True  # the script found the bytes in place before anything else
        if status == -1:
            await budgets.spent_load(limits, [int(index) for index in found[1:]])
            continue
        if status == 2:
            _, index, spent, reserved = (int(value) for value in found)
            raise budget_refused(BudgetExceeded(limits[index - 1], spent, reserved))
        readings = ratelimits.readings_of(wanted, found, 2)
        return ratelimits.ratelimit_taken(admission, wanted, status == 0, float(found[1]), readings), reservation
    raise RuntimeError("budget figures could not be initialised")


async def limits_settle(
    admission: Admission | None,
    reservation: Reservation | None,
    *,
    cost: Decimal | None,
    tokens: int | None,
    reply_text: str = "",
) -> None:
    """After a call: correct its rate limits' tokens to `tokens` (None: estimated from `reply_text`)
    and settle its reservation with `cost` (None: counted later, so it keeps what it reserved)."""
    corrections = ratelimits.ratelimit_corrections(admission, tokens=tokens, reply_text=reply_text)
    if reservation is None or reservation.settled:
        await ratelimits.counters_adjust(corrections)
        return
    actual = budgets.to_nano(budgets.from_nano(reservation.amount) if cost is None else cost)
    if not (settings.REDIS_ADDRESS and corrections):
        await budgets.reservation_settle(reservation, cost)
        await ratelimits.counters_adjust(corrections)
        return
    reservation.settled = True
    keys, adjust = ratelimits.adjust_arguments(corrections)
    args = [len(reservation.limits), reservation.reservation_id, actual, *adjust]
    keys = budgets.redis_keys(reservation.limits) + keys
    failed = "a budget reservation could not be settled"  # it expires on its own; the rollups keep the truth
    # Sent, not waited for: the reply (1) tells nothing, and the next call's admission goes after it.
    if ratelimits.redis_script_soon(SETTLE_AND_ADJUST_SCRIPT, keys, args, failed):
        return
    if await ratelimits.redis_script(SETTLE_AND_ADJUST_SCRIPT, keys, args) is None:
        logger.warning(failed)
