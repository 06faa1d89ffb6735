"""Rate limits: requests and tokens per minute for each user, group and API key, and per deployment.

A caller's limits (0: none) are the RATE_LIMIT_* settings, replaced by a user's or a group's RateLimit
(the admin) or a key's own `rpm` / `tpm`; a deployment's are its `rpm` / `tpm` in TURBO_CONFIG.

Each limit is a GCRA counter (the "generic cell rate algorithm": a leaky bucket kept as one number, the
theoretical arrival time TAT). A limit of L per window W lets one unit through every W/L with bursts of
up to L, and a unit is refused while TAT + cost * W/L would lie more than W ahead of now. A model call
is admitted when every counter of its caller (user; group; key) can take it, the request and its
estimated tokens, and then all of them take it at once: a refused request consumes nothing. With
REDIS_ADDRESS one Lua script does that on Redis in one round trip, against Redis's clock, for every
process; without, the same arithmetic runs in this process.

Tokens are admitted against an estimate (the prompt counted offline plus its max_tokens), then settled
with what the upstream reported once the call ended (`ratelimit_settle`): a call that used less gives
the difference back, one that used more leaves the counter in debt, which delays the calls after it.

A caller with no limits costs nothing here (no Redis, no query but one per RATE_LIMIT_CACHE_SECONDS to
learn that). Should Redis fail, calls are admitted (and the failure logged): a limit is not worth an outage.
"""

import asyncio
import logging
import math
import threading
import time
import uuid
from dataclasses import dataclass, field

import redis
from channels.db import database_sync_to_async
from django.conf import settings

from proxy.errors import GatewayError
from proxy.usage.caller import Caller
from proxy.usage.tokens import estimate_prompt_tokens
from turbo_site.core import metrics
from turbo_site.core.acache import redis_client
from turbo_site.core.fastredis import script_sha
from turbo_site.core.redis_retry import fast_redis
from turbo_site.core.singleflight import load_once

logger = logging.getLogger("turbo.ratelimits")

KEY_PREFIX = "turbo:rl:"
REDIS_WAIT_SECONDS = 2.0
EPSILON_MS = 0.001  # float slack: L units of W/L each must fit W exactly (the scripts say 0.001 too)
DEFAULTS = {
    "user": ("RATE_LIMIT_USER_RPM", "RATE_LIMIT_USER_TPM"),
    "group": ("RATE_LIMIT_GROUP_RPM", "RATE_LIMIT_GROUP_TPM"),
    "key": ("RATE_LIMIT_KEY_RPM", "RATE_LIMIT_KEY_TPM"),
}
SCOPE_WORDS = {"user": "your user", "group": "the group", "key": "this API key", "deployment": "the deployment"}

# KEYS: the counters. ARGV[1]: the window (ms); then for each counter its limit and the units it takes.
# Returns {admitted (0/1), wait (ms), then per counter: remaining, reset (ms), refused (0/1)}.
TAKE_SCRIPT = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + tonumber(clock[2]) / 1000
local window = tonumber(ARGV[1])
local before, after, intervals = {}, {}, {}
local wait = 0
for i, key in ipairs(KEYS) do
  local interval = window / tonumber(ARGV[2 * i])
  local tat = math.max(tonumber(redis.call('GET', key) or '0'), now)
  intervals[i] = interval
  before[i] = tat
  after[i] = tat + tonumber(ARGV[2 * i + 1]) * interval
  wait = math.max(wait, after[i] - now - window)
end
local admitted = wait <= 0.001
local result = {admitted and 1 or 0, admitted and 0 or math.ceil(wait)}
for i, key in ipairs(KEYS) do
  local tat = before[i]
  if admitted then
    tat = after[i]
    redis.call('SET', key, string.format('%.3f', tat), 'PX', math.ceil(tat - now) + 1000)
  end
  local remaining = math.floor((window - (tat - now)) / intervals[i] + 0.000001)
  table.insert(result, math.max(remaining, 0))
  table.insert(result, math.ceil(tat - now))
  table.insert(result, (after[i] - now - window > 0.001) and 1 or 0)
end
return result
"""

# KEYS: the counters. ARGV[1]: the window (ms); then for each counter its limit and the units to add
# (negative: given back). A counter given back to below now is simply full again.
ADJUST_SCRIPT = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + tonumber(clock[2]) / 1000
local window = tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  local interval = window / tonumber(ARGV[2 * i])
  local tat = math.max(tonumber(redis.call('GET', key) or '0'), now) + tonumber(ARGV[2 * i + 1]) * interval
  if tat <= now then
    redis.call('DEL', key)
  else
    redis.call('SET', key, string.format('%.3f', tat), 'PX', math.ceil(tat - now) + 1000)
  end
end
return 1
"""


@dataclass(frozen=True, slots=True)
class Counter:
    """One limit: `limit` requests or tokens per window, for one scope (a user, a group, a key, a deployment)."""

    scope: str  # user | group | key | deployment
    name: str  # the scope's id
    kind: str  # requests | tokens
    limit: int

    @property
    def key(self) -> str:
        return f"{KEY_PREFIX}{self.scope}:{self.name}:{self.kind}"


@dataclass(frozen=True, slots=True)
class Reading:
    """What a counter says once a call was admitted (or refused)."""

    counter: Counter
    remaining: int
    reset_ms: float
    refused: bool = False


@dataclass(slots=True)
class Admission:
    """A call let through: what it took from which counters, to settle once its tokens are known."""

    prompt_tokens: int = 0  # the estimate of the prompt, for a reply whose usage never came
    taken: dict[Counter, int] = field(default_factory=dict)  # caller's and deployment's counters
    readings: list[Reading] = field(default_factory=list)  # the caller's, after this call took its share
    settled: bool = False

    @property
    def headers(self) -> dict[str, str]:
        """OpenAI's x-ratelimit-* headers for the caller's tightest limits ({} for a caller without)."""
        headers = {}
        for kind in ("requests", "tokens"):
            readings = [reading for reading in self.readings if reading.counter.kind == kind]
            if readings:
                headers.update(_headers_of(min(readings, key=lambda reading: reading.remaining)))
        return headers


def _headers_of(reading: Reading) -> dict[str, str]:
    kind = reading.counter.kind
    return {
        f"x-ratelimit-limit-{kind}": str(reading.counter.limit),
        f"x-ratelimit-remaining-{kind}": str(reading.remaining),
        f"x-ratelimit-reset-{kind}": duration_text(reading.reset_ms),
    }


def duration_text(milliseconds: float) -> str:
    """A duration as OpenAI writes it in x-ratelimit-reset-*: 250ms, 6s, 1.5s, 6m0s, 1h2m3s."""
    if milliseconds < 1000:
        return f"{max(0, math.ceil(milliseconds))}ms"
    seconds = math.ceil(milliseconds / 100) / 10
    if seconds < 60:
        return f"{seconds:g}s"
    whole = math.ceil(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes}m{seconds}s" if hours else f"{minutes}m{seconds}s"


# --- the counters, on Redis or in this process -----------------------------------------------------------


def _window_ms() -> float:
    return float(settings.RATE_LIMIT_WINDOW_SECONDS) * 1000


async def redis_script(script: str, keys: list[str], args: list) -> list | None:
    """Run a script on Redis in one round trip (EVALSHA, EVAL the first time); None if Redis failed."""
    try:
        fast = fast_redis(settings.REDIS_ADDRESS)
        if fast is not None:
            async with asyncio.timeout(REDIS_WAIT_SECONDS):
                return await fast.script(script, keys, args)
        client = redis_client(settings.REDIS_ADDRESS)
        try:
            return await asyncio.wait_for(
                client.evalsha(script_sha(script), len(keys), *keys, *args), REDIS_WAIT_SECONDS
            )
        except redis.exceptions.NoScriptError:
            return await asyncio.wait_for(client.eval(script, len(keys), *keys, *args), REDIS_WAIT_SECONDS)
    except (redis.exceptions.RedisError, OSError) as exc:  # TimeoutError is an OSError
        logger.warning("rate limits could not be counted on Redis, the call goes through: %r", exc)
        return None


def redis_script_soon(script: str, keys: list[str], args: list, failed: str) -> bool:
    """Send a script without waiting for its reply (a settlement: nothing waits on its answer), on the
    connection the next call's admission will use, so that admission finds it done. False when it could
    not be sent that way: await `redis_script` instead. A failure is logged as `failed`."""
    fast = fast_redis(settings.REDIS_ADDRESS)
    sent = fast.script_nowait(script, keys, args) if fast is not None else None
    if sent is None:
        return False

    def answered(future) -> None:
        if future.cancelled():
            return
        exc = future.exception()
        if isinstance(exc, redis.exceptions.NoScriptError):  # flushed: again, whole, and waited for
            task = asyncio.ensure_future(redis_script(script, keys, args))
            _sending.add(task)
            task.add_done_callback(_sending.discard)
        elif exc is not None:
            logger.warning("%s: %r", failed, exc)

    sent.add_done_callback(answered)
    return True


_sending: set[asyncio.Task] = set()

_tats: dict[str, float] = {}  # without Redis: counter key -> TAT (ms on the monotonic clock)
_tats_lock = threading.Lock()


def _take_here(wanted: list[tuple[Counter, int]], window: float) -> tuple[bool, float, list[Reading]]:
    now = time.monotonic() * 1000
    with _tats_lock:
        if len(_tats) > 100_000:
            for key in [key for key, tat in _tats.items() if tat <= now]:
                del _tats[key]
        befores = [max(_tats.get(counter.key, 0.0), now) for counter, _ in wanted]
        afters = [tat + cost * window / counter.limit for tat, (counter, cost) in zip(befores, wanted, strict=True)]
        wait = max((after - now - window for after in afters), default=0.0)
        admitted = wait <= EPSILON_MS
        readings = []
        for (counter, _), before, after in zip(wanted, befores, afters, strict=True):
            tat = after if admitted else before
            if admitted:
                _tats[counter.key] = tat
            remaining = math.floor((window - (tat - now)) / (window / counter.limit) + 1e-6)
            readings.append(Reading(counter, max(remaining, 0), tat - now, after - now - window > EPSILON_MS))
    return admitted, 0.0 if admitted else wait, readings


def _adjust_here(changes: list[tuple[Counter, int]], window: float) -> None:
    now = time.monotonic() * 1000
    with _tats_lock:
        for counter, units in changes:
            tat = max(_tats.get(counter.key, 0.0), now) + units * window / counter.limit
            if tat <= now:
                _tats.pop(counter.key, None)
            else:
                _tats[counter.key] = tat


def take_arguments(wanted: list[tuple[Counter, int]]) -> tuple[list[str], list]:
    """TAKE_SCRIPT's keys and arguments for `wanted` (also run inside proxy.usage.limits' joint script)."""
    args: list = [_window_ms()]
    for counter, cost in wanted:
        args += [counter.limit, cost]
    return [counter.key for counter, _ in wanted], args


def readings_of(wanted: list[tuple[Counter, int]], found: list, offset: int) -> list[Reading]:
    """The counters' readings in a script's answer, three numbers each from `offset`."""
    return [
        Reading(
            counter,
            int(found[offset + 3 * index]),
            float(found[offset + 1 + 3 * index]),
            bool(found[offset + 2 + 3 * index]),
        )
        for index, (counter, _) in enumerate(wanted)
    ]


async def counters_take(wanted: list[tuple[Counter, int]]) -> tuple[bool, float, list[Reading]]:
    """Take `cost` from every counter, or from none if any cannot: (admitted, wait in ms, readings)."""
    wanted = [(counter, min(cost, counter.limit)) for counter, cost in wanted]  # a cost above the limit
    if not settings.REDIS_ADDRESS:  # waits for a whole free window rather than never going through
        return _take_here(wanted, _window_ms())
    found = await redis_script(TAKE_SCRIPT, *take_arguments(wanted))
    if found is None:
        return True, 0.0, []
    return bool(found[0]), float(found[1]), readings_of(wanted, found, 2)


def adjust_arguments(changes: list[tuple[Counter, int]]) -> tuple[list[str], list]:
    """ADJUST_SCRIPT's keys and arguments for `changes`."""
    args: list = [_window_ms()]
    for counter, units in changes:
        args += [counter.limit, units]
    return [counter.key for counter, _ in changes], args


async def counters_adjust(changes: list[tuple[Counter, int]]) -> None:
    changes = [(counter, units) for counter, units in changes if units]
    if not changes:
        return
    if not settings.REDIS_ADDRESS:
        _adjust_here(changes, _window_ms())
        return
    await redis_script(ADJUST_SCRIPT, *adjust_arguments(changes))


def ratelimits_forget() -> None:
    """Start from nothing in this process: counters kept here, overrides read, deployments known full."""
    with _tats_lock:
        _tats.clear()
    _overrides.clear()
    _full_until.clear()


# --- whose limits ---------------------------------------------------------------------------------------

_overrides: dict[tuple[str, uuid.UUID], tuple[float, int | None, int | None]] = {}  # -> (read at, rpm, tpm)


def ratelimit_overrides_forget() -> None:
    """Forget the overrides read (after one changed here; other processes follow within RATE_LIMIT_CACHE_SECONDS)."""
    _overrides.clear()


def _overrides_read(wanted: list[tuple[str, uuid.UUID]]) -> dict[tuple[str, uuid.UUID], tuple[int | None, int | None]]:
    from django.db.models import Q

    from accounts.models import ApiKey
    from proxy.models import RateLimit

    found: dict[tuple[str, uuid.UUID], tuple[int | None, int | None]] = {scope: (None, None) for scope in wanted}
    ids = {scope: name for scope, name in wanted}
    query = Q(pk__in=[])
    if "user" in ids:
        query |= Q(scope=RateLimit.Scope.USER, user_id=ids["user"])
    if "group" in ids:
        query |= Q(scope=RateLimit.Scope.GROUP, group_id=ids["group"])
    if "user" in ids or "group" in ids:
        for row in RateLimit.objects.filter(query).values("scope", "user_id", "group_id", "rpm", "tpm"):
            name = row["user_id"] if row["scope"] == RateLimit.Scope.USER else row["group_id"]
            found[(row["scope"], name)] = (row["rpm"], row["tpm"])
    if "key" in ids:
        row = ApiKey.objects.filter(pk=ids["key"]).values_list("rpm", "tpm").first()
        if row is not None:
            found[("key", ids["key"])] = row
    return found


async def ratelimit_counters(caller: Caller | None) -> list[Counter]:
    """The counters a call by `caller` must pass: its user's, its group's and its key's, those with a limit."""
    if caller is None:
        return []
    wanted = [
        (scope, name)
        for scope, name in (("user", caller.user_id), ("group", caller.group_id), ("key", caller.key_id))
        if name is not None
    ]
    now = time.monotonic()
    fresh_after = now - settings.RATE_LIMIT_CACHE_SECONDS
    missing = [scope for scope in wanted if (_overrides.get(scope) or (-math.inf,))[0] < fresh_after]
    if missing:
        if len(_overrides) > 100_000:
            _overrides.clear()
        # Requests that miss the same limits together share one query (turbo_site.core.singleflight).
        read = await load_once(("rate-limits", *missing), lambda: database_sync_to_async(_overrides_read)(missing))
        for scope, (rpm, tpm) in read.items():
            _overrides[scope] = (now, rpm, tpm)
    counters = []
    for scope, name in wanted:
        _, rpm, tpm = _overrides[(scope, name)]
        rpm_setting, tpm_setting = DEFAULTS[scope]
        rpm = getattr(settings, rpm_setting) if rpm is None else rpm
        tpm = getattr(settings, tpm_setting) if tpm is None else tpm
        if rpm > 0:
            counters.append(Counter(scope, str(name), "requests", rpm))
        if tpm > 0:
            counters.append(Counter(scope, str(name), "tokens", tpm))
    return counters


# --- how many tokens a call may take ----------------------------------------------------------------------


def prompt_tokens_estimate(payload: dict | None) -> int:
    """The tokens a request sends, counted offline (proxy.usage.tokens)."""
    return estimate_prompt_tokens(payload) if isinstance(payload, dict) else 0


def _reply_tokens_asked(payload: dict | None) -> int:
    if not isinstance(payload, dict):
        return 0
    asked = payload.get("max_completion_tokens") or payload.get("max_tokens") or payload.get("max_output_tokens")
    return asked if isinstance(asked, int) and not isinstance(asked, bool) and asked > 0 else 0


# --- the interface --------------------------------------------------------------------------------------


def _refusal(readings: list[Reading], wait_ms: float) -> GatewayError:
    refused = next((reading for reading in readings if reading.refused), readings[0])
    counter = refused.counter
    metrics.ratelimit_refused(counter.scope, counter.kind)
    retry_after = max(1, math.ceil(wait_ms / 1000))
    message = (
        f"rate limit reached for {counter.kind} per minute of {SCOPE_WORDS[counter.scope]}: "
        f"limit {counter.limit}; try again in {retry_after}s"
    )
    shown = [reading for reading in readings if reading.counter.scope != "deployment"]
    headers = Admission(readings=shown).headers
    return GatewayError(
        message,
        status=429,
        code="rate_limited",
        error_type=counter.kind,
        retry_after=retry_after,
        headers=headers,
        redact=False,
    )


async def ratelimit_wanted(
    caller: Caller | None, *, payload: dict | None
) -> tuple[Admission, list[tuple[Counter, int]]]:
    """What a model call by `caller` must take from which counters (none: the caller has no limits)."""
    counters = await ratelimit_counters(caller)
    admission = Admission()
    if not counters:
        return admission, []
    tokens = 0
    if any(counter.kind == "tokens" for counter in counters):
        admission.prompt_tokens = prompt_tokens_estimate(payload)
        tokens = admission.prompt_tokens + _reply_tokens_asked(payload)
    # A cost above a limit waits for a whole free window rather than never going through.
    return admission, [
        (counter, min(1 if counter.kind == "requests" else tokens, counter.limit)) for counter in counters
    ]


def ratelimit_taken(
    admission: Admission, wanted: list[tuple[Counter, int]], admitted: bool, wait_ms: float, readings: list[Reading]
) -> Admission:
    """The admission once the counters answered; GatewayError 429 `rate_limited` if they refused."""
    if not admitted:
        raise _refusal(readings, wait_ms)
    admission.taken.update(wanted)
    admission.readings = readings
    return admission


async def ratelimit_admit(caller: Caller | None, *, payload: dict | None) -> Admission:
    """Let a model call by `caller` through its limits, or raise GatewayError 429 `rate_limited` (with
    Retry-After and the x-ratelimit-* headers). Either every counter takes the call or none does."""
    admission, wanted = await ratelimit_wanted(caller, payload=payload)
    if not wanted:
        return admission
    return ratelimit_taken(admission, wanted, *await counters_take(wanted))


_full_until: dict[str, float] = {}  # deployment id -> time.monotonic() until which it was found full


def deployment_is_full(deployment_id: str) -> bool:
    """Was this deployment found at its limit for the rest of its window? (Routing tries it after the others.)"""
    until = _full_until.get(deployment_id)
    return until is not None and until > time.monotonic()


async def ratelimit_deployment_admit(deployment, *, payload: dict | None, admission: Admission) -> float:
    """Count a call against a deployment's own rpm/tpm: 0 when it took the call (now part of
    `admission`), else the seconds until it could."""
    counters = []
    if deployment.rpm:
        counters.append(Counter("deployment", deployment.id, "requests", deployment.rpm))
    if deployment.tpm:
        counters.append(Counter("deployment", deployment.id, "tokens", deployment.tpm))
    tokens = 0
    if deployment.tpm:
        if not admission.prompt_tokens:
            admission.prompt_tokens = prompt_tokens_estimate(payload)
        tokens = admission.prompt_tokens + _reply_tokens_asked(payload)
    wanted = [(counter, 1 if counter.kind == "requests" else tokens) for counter in counters]
    admitted, wait_ms, _ = await counters_take(wanted)
    if not admitted:
        _full_until[deployment.id] = time.monotonic() + wait_ms / 1000
        return max(wait_ms / 1000, 0.001)
    _full_until.pop(deployment.id, None)
    admission.taken.update((counter, min(cost, counter.limit)) for counter, cost in wanted)
    return 0.0


def deployments_full_error(waits: list[float]) -> GatewayError:
    """Every deployment that could serve the call is at its own limit: 429, as the provider would say."""
    retry_after = max(1, math.ceil(min(waits)))
    metrics.ratelimit_refused("deployment", "requests")
    return GatewayError(
        f"every deployment of this model is at its rate limit; try again in {retry_after}s",
        status=429,
        code="rate_limited",
        error_type="requests",
        retry_after=retry_after,
        redact=False,
    )


def ratelimit_corrections(
    admission: Admission | None, *, tokens: int | None, reply_text: str = ""
) -> list[tuple[Counter, int]]:
    """How to correct the tokens a call was admitted with to those it used (`tokens`; None: unknown, then
    the prompt's estimate plus `reply_text`'s, or the estimate stays if there is no reply text either).
    Marks the admission settled: ask once."""
    if admission is None or admission.settled:
        return []
    admission.settled = True
    taken = [(counter, units) for counter, units in admission.taken.items() if counter.kind == "tokens"]
    if not taken:
        return []
    if tokens is None and reply_text:
        tokens = admission.prompt_tokens + math.ceil(len(reply_text) / 4)
    if tokens is None:
        return []
    return [(counter, tokens - units) for counter, units in taken if tokens != units]


async def ratelimit_settle(admission: Admission | None, *, tokens: int | None, reply_text: str = "") -> None:
    """Apply ratelimit_corrections."""
    await counters_adjust(ratelimit_corrections(admission, tokens=tokens, reply_text=reply_text))


async def ratelimit_release(admission: Admission | None) -> None:
    """Give back what a call took from its caller's counters: it reached no upstream answer."""
    if admission is None or admission.settled:
        return
    admission.settled = True
    await counters_adjust(
        [(counter, -units) for counter, units in admission.taken.items() if counter.scope != "deployment"]
    )
