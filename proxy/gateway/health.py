"""How each deployment is doing: cooling down until, recent failures, EWMA latency, requests in flight.

Cooldowns are shared by every process when REDIS_ADDRESS is set: a failure writes
`turbo:gw:cool:<deployment>` (expiring with the cooldown), and each process reads them all with one
MGET at most every GATEWAY_HEALTH_SYNC_SECONDS, so no request waits on Redis in the steady state.
At the same time it publishes its own latency and in-flight figures (`turbo:gw:proc:<id>`, expiring)
for `manage.py upstreams list` and the admin. After a cooldown, one request probes the deployment
(half-open): a probe is claimed with SET NX, so only one process sends it.

Without Redis all of this is per process, which is all there is.
"""

import asyncio
import json
import logging
import os
import time
import uuid
from collections import deque
from dataclasses import dataclass, field

import redis.asyncio
from django.conf import settings

from turbo_site.core import metrics
from turbo_site.core.redis_retry import redis_client

logger = logging.getLogger("turbo.gateway")

FAILURE_WINDOW_SECONDS = 300  # "recent failures" counts this far back
PROCESS_KEY_SECONDS = 15
PROCESS_ID = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
EWMA_ALPHA = 0.2
REDIS_WAIT_SECONDS = 0.25  # a request waits no longer than this on shared health
REDIS_BACKOFF_SECONDS = 5.0


@dataclass
class Health:
    cool_until: float = 0.0  # time.time(); 0 when healthy
    probing: bool = False
    last_error: str = ""
    failures: deque = field(default_factory=deque)  # time.time() of each recent failure
    ewma_ms: float | None = None
    in_flight: int = 0
    requests: int = 0

    def recent_failures(self, now: float) -> int:
        while self.failures and self.failures[0] < now - FAILURE_WINDOW_SECONDS:
            self.failures.popleft()
        return len(self.failures)


_health: dict[str, Health] = {}
_in_flight_by_upstream: dict[str, int] = {}
_last_sync = 0.0
# What else hangs on the deployments and goes when they are forgotten (proxy.gateway.windows: what was
# learned of their context windows), added by those modules: health imports none of them.
_forgets: list = []
_syncing = False


def health_of(deployment_id: str) -> Health:
    found = _health.get(deployment_id)
    if found is None:
        found = _health[deployment_id] = Health()
    return found


def upstream_in_flight(upstream_name: str) -> int:
    return _in_flight_by_upstream.get(upstream_name, 0)


def is_cooling(deployment_id: str, now: float | None = None) -> bool:
    found = _health.get(deployment_id)
    return found is not None and found.cool_until > (now or time.time())


def started(deployment_id: str, upstream_name: str) -> None:
    state = health_of(deployment_id)
    state.in_flight += 1
    state.requests += 1
    _in_flight_by_upstream[upstream_name] = _in_flight_by_upstream.get(upstream_name, 0) + 1


def ended(deployment_id: str, upstream_name: str) -> None:
    state = health_of(deployment_id)
    state.in_flight = max(0, state.in_flight - 1)
    _in_flight_by_upstream[upstream_name] = max(0, _in_flight_by_upstream.get(upstream_name, 0) - 1)


def _key(kind: str, name: str) -> str:
    return f"turbo:gw:{kind}:{name}"


def _redis() -> redis.asyncio.Redis | None:
    url = settings.REDIS_ADDRESS
    if not url:
        return None
    return redis_client(url, purpose="gateway", socket_timeout=2, socket_connect_timeout=2)


async def succeeded(deployment_id: str, first_byte_ms: float) -> None:
    """A deployment answered: learn its latency; a probe that succeeded ends its cooldown everywhere."""
    state = health_of(deployment_id)
    state.ewma_ms = (
        first_byte_ms if state.ewma_ms is None else (1 - EWMA_ALPHA) * state.ewma_ms + EWMA_ALPHA * first_byte_ms
    )
    if state.cool_until or state.probing:
        state.cool_until = 0.0
        state.probing = False
        client = _redis()
        if client is not None:
            try:
                await asyncio.wait_for(
                    client.delete(_key("cool", deployment_id), _key("probe", deployment_id)), REDIS_WAIT_SECONDS
                )
            except Exception as exc:  # health is advice: a Redis blip must not fail the request
                logger.warning("could not clear the cooldown of %s: %s", deployment_id, exc)


async def failed(deployment_id: str, error: str, cooldown_seconds: float) -> None:
    """A deployment failed: it rests for `cooldown_seconds` (in every process when Redis is set)."""
    now = time.time()
    state = health_of(deployment_id)
    state.failures.append(now)
    state.last_error = error[:200]
    state.probing = False
    if cooldown_seconds <= 0:
        return
    state.cool_until = max(state.cool_until, now + cooldown_seconds)
    metrics.upstream_cooldown(deployment_id)
    logger.warning("deployment %s cools down for %.0fs: %s", deployment_id, cooldown_seconds, error)
    client = _redis()
    if client is None:
        return
    record = json.dumps({"until": state.cool_until, "error": state.last_error})
    try:
        async with client.pipeline(transaction=False) as pipe:
            pipe.set(_key("cool", deployment_id), record, px=int(cooldown_seconds * 1000))
            pipe.delete(_key("probe", deployment_id))
            pipe.rpush(_key("fail", deployment_id), now)
            pipe.ltrim(_key("fail", deployment_id), -100, -1)
            pipe.expire(_key("fail", deployment_id), FAILURE_WINDOW_SECONDS)
            await asyncio.wait_for(pipe.execute(), REDIS_WAIT_SECONDS)
    except Exception as exc:
        logger.warning("could not share the cooldown of %s: %r", deployment_id, exc)


async def probe_claim(deployment_id: str, cooldown_seconds: float) -> bool:
    """A cooldown has ended: may this request be the one probe? (Only one, in all processes.)"""
    state = health_of(deployment_id)
    if state.probing:
        return False
    client = _redis()
    if client is not None:
        try:
            claimed = await asyncio.wait_for(
                client.set(_key("probe", deployment_id), PROCESS_ID, nx=True, px=int(max(cooldown_seconds, 5) * 1000)),
                REDIS_WAIT_SECONDS,
            )
        except Exception:
            claimed = True  # no shared state to ask: probe from here
        if not claimed:
            return False
    state.probing = True
    return True


def probe_release(deployment_id: str) -> None:
    """A claimed probe was not sent after all (the request ended first)."""
    health_of(deployment_id).probing = False


async def sync(deployment_ids: list[str]) -> None:
    """Learn other processes' cooldowns and publish this one's figures, at most every
    GATEWAY_HEALTH_SYNC_SECONDS. Without Redis there is nothing to do."""
    global _last_sync, _syncing
    now = time.monotonic()
    if now - _last_sync < settings.GATEWAY_HEALTH_SYNC_SECONDS:
        return
    client = _redis()
    if client is None:
        _last_sync = now
        return
    if _syncing:
        return  # another request is syncing; this one goes on with what is known
    _syncing, _last_sync = True, now
    figures = {
        deployment_id: {"ewma_ms": state.ewma_ms, "in_flight": state.in_flight, "requests": state.requests}
        for deployment_id, state in _health.items()
    }
    try:
        async with client.pipeline(transaction=False) as pipe:
            pipe.mget([_key("cool", deployment_id) for deployment_id in deployment_ids])
            pipe.set(_key("proc", PROCESS_ID), json.dumps(figures), ex=PROCESS_KEY_SECONDS)
            records, _ = await asyncio.wait_for(pipe.execute(), REDIS_WAIT_SECONDS)
    except Exception as exc:
        # Health is advice: go on with this process's view, and leave Redis alone for a while.
        logger.warning("could not read the shared deployment health: %r", exc)
        _last_sync = now + REDIS_BACKOFF_SECONDS
        return
    finally:
        _syncing = False
    wall = time.time()
    for deployment_id, record in zip(deployment_ids, records, strict=True):
        state = health_of(deployment_id)
        if record is None:
            if state.cool_until > wall:
                # Cleared elsewhere (a probe succeeded) or expired there first.
                state.cool_until = 0.0
            continue
        try:
            shared = json.loads(record)
        except ValueError:
            continue
        state.cool_until = max(state.cool_until, float(shared.get("until") or 0))
        state.last_error = state.last_error or str(shared.get("error") or "")


def forget_also(forget_other) -> None:
    """Have `forget()` call `forget_other()` too (for state kept per deployment outside this module)."""
    if forget_other not in _forgets:
        _forgets.append(forget_other)


def forget() -> None:
    """Start from nothing (tests, and a configuration that changed)."""
    global _last_sync
    for forget_other in _forgets:
        forget_other()
    _health.clear()
    _in_flight_by_upstream.clear()
    _last_sync = 0.0


async def shared_problem() -> str:
    """Why the health shared over Redis cannot be read now, for operators ("" when it can, or without Redis)."""
    client = _redis()
    if client is None:
        return ""
    try:
        await asyncio.wait_for(client.ping(), 2)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return ""


async def snapshot(deployment_ids: list[str]) -> dict[str, dict]:
    """Each deployment's health, for operators: shared figures when Redis is set, else this process's.

    `probing`: out of its cooldown but not yet proven (half-open: one request probes it), here or, with
    Redis, with a probe claimed in any process."""
    now = time.time()
    view = {}
    for deployment_id in deployment_ids:
        state = _health.get(deployment_id) or Health()
        view[deployment_id] = {
            "cooling_until": state.cool_until if state.cool_until > now else None,
            "last_error": state.last_error,
            "recent_failures": state.recent_failures(now),
            "ewma_ms": state.ewma_ms,
            "in_flight": state.in_flight,
            "requests": state.requests,
            "probing": state.probing or 0 < state.cool_until <= now,
        }
    client = _redis()
    if client is None:
        return view
    try:
        async with client.pipeline(transaction=False) as pipe:
            pipe.mget([_key("cool", deployment_id) for deployment_id in deployment_ids])
            pipe.mget([_key("probe", deployment_id) for deployment_id in deployment_ids])
            for deployment_id in deployment_ids:
                pipe.lrange(_key("fail", deployment_id), 0, -1)
            cools, probes, *fails = await pipe.execute()
        processes = [key async for key in client.scan_iter(match=_key("proc", "*"), count=200)]
        figures = [json.loads(raw) for raw in await client.mget(processes) if raw] if processes else []
    except Exception as exc:
        logger.warning("could not read the shared deployment health: %s", exc)
        return view
    for deployment_id, cool, probe, failures in zip(deployment_ids, cools, probes, fails, strict=True):
        entry = view[deployment_id]
        entry["probing"] = entry["probing"] or bool(probe)
        if cool:
            shared = json.loads(cool)
            entry["cooling_until"] = float(shared.get("until") or 0) or None
            entry["last_error"] = entry["last_error"] or shared.get("error", "")
        entry["recent_failures"] = max(
            entry["recent_failures"], sum(1 for moment in failures if float(moment) > now - FAILURE_WINDOW_SECONDS)
        )
        theirs = [figure[deployment_id] for figure in figures if deployment_id in figure]
        if theirs:
            entry["in_flight"] = sum(figure.get("in_flight") or 0 for figure in theirs)
            entry["requests"] = sum(figure.get("requests") or 0 for figure in theirs)
            latencies = [figure["ewma_ms"] for figure in theirs if figure.get("ewma_ms") is not None]
            entry["ewma_ms"] = sum(latencies) / len(latencies) if latencies else entry["ewma_ms"]
    return view
