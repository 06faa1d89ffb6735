"""Usage records: what each model call used and cost, kept as hourly rollups.

`usage_record(caller, usage)` costs no database write: it prices the call and queues it. The event
writer (proxy.events) writes queued records in its batches as upserts into `UsageRollup` (one row per
hour, model, deployment, user, group and API key), so reports and budget checks read a few rollup rows,
never the event log. A call whose upstream said nothing about usage, or that was cut short, carries an
`Estimate`: its tokens are counted offline by the writer (off the request path), and it is marked
estimated.
"""

import hashlib
import logging
import threading
import uuid
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from proxy.usage import tokens
from proxy.usage.caller import Caller
from proxy.usage.pricing import Price, cost_of, price_known, price_of
from turbo_site.core import metrics
from turbo_site.core.batches import batch_write
from turbo_site.core.text import storable

logger = logging.getLogger("turbo.usage")

MAX_PENDING = 100_000  # records waiting for the writer; beyond it the oldest go (and are counted)


@dataclass(slots=True)
class Usage:
    """What one model call used. `input_tokens` includes the `cached_tokens`."""

    model: str
    deployment: str = ""
    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    estimated: bool = False


@dataclass(slots=True)
class Estimate:
    """What to count offline when the upstream gave no (or no complete) usage: the request body, and
    the output as text, as server-sent events or as a JSON body. `scale`: the output seen was cut at a
    size limit, so its count is scaled up by this."""

    prompt: dict | None = None
    text: str = ""
    stream: bytes = b""
    body: bytes = b""
    scale: float = 1.0
    counted_input: bool = False  # the upstream's input count is known; only the output is estimated

    def apply(self, usage: Usage) -> None:
        """Fill in `usage` with counted tokens (slow for long texts: the writer thread calls it)."""
        model = usage.model
        if not self.counted_input:
            usage.input_tokens = tokens.estimate_prompt_tokens(self.prompt)
        output = tokens.count_text(self.text, model)
        if self.stream:
            output += tokens.count_output_stream(self.stream, model)
        if self.body:
            output += tokens.count_output_body(self.body, model)
        usage.output_tokens = max(usage.output_tokens, round(output * self.scale))
        usage.estimated = True


@dataclass(slots=True)
class _Record:
    at: datetime
    caller: Caller
    usage: Usage
    price: Price | None
    estimate: Estimate | None = None
    cost: Decimal = field(default=Decimal(0))


_pending: deque[_Record] = deque()
_lock = threading.Lock()
records_dropped = 0


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def usage_from(raw: Any, *, model: str, deployment: str = "") -> Usage | None:
    """The Usage in an upstream's `usage` object (chat, completions, embeddings or the Responses API),
    or None if it has no token counts."""
    if not isinstance(raw, dict):
        return None
    input_tokens = _int(raw.get("prompt_tokens")) or _int(raw.get("input_tokens"))
    output_tokens = _int(raw.get("completion_tokens")) or _int(raw.get("output_tokens"))
    if not input_tokens and not output_tokens and not _int(raw.get("total_tokens")):
        return None
    details = raw.get("prompt_tokens_details") or raw.get("input_tokens_details")
    cached = _int(details.get("cached_tokens")) if isinstance(details, dict) else 0
    return Usage(model, deployment, input_tokens, output_tokens, cached)


def usage_record(
    caller: Caller | None,
    usage: Usage,
    *,
    estimate: Estimate | None = None,
    served_model: str = "",
    cost: Decimal | None = None,
) -> Decimal | None:
    """Price one call and queue it for the rollups (written by the event writer). Never touches the
    database. `served_model`: the model the upstream said it used, priced if `usage.model` has no price.
    `cost`: the call's cost when it is priced by what it made (images, speech, audio seconds), not tokens.
    Returns the cost, or None when it is only known later (the tokens are counted offline by the writer)."""
    # Storable before it is priced, counted or queued: one model name a database refuses ("gpt\x00x")
    # must not hold up the records queued behind it.
    usage.model, usage.deployment = storable(usage.model, 100), storable(usage.deployment, 200)
    if caller is None or not usage.model:
        return Decimal(0)
    price = price_known(usage.model) or price_known(served_model) or price_of(usage.model)
    record = _Record(timezone.now(), caller, usage, price, None if cost is not None else estimate)
    if cost is not None:
        record.cost = cost
        metrics.usage_counted(usage.model, usage.input_tokens, usage.output_tokens, record.cost)
        _queue(record)
        return cost
    if estimate is None:
        record.cost = cost_of(price, usage.input_tokens, usage.output_tokens, usage.cached_tokens)
        metrics.usage_counted(usage.model, usage.input_tokens, usage.output_tokens, record.cost)
    _queue(record)
    return record.cost if estimate is None else None


def _queue(record: _Record) -> None:
    global records_dropped
    from proxy.writer_bell import writer_wake

    with _lock:
        if len(_pending) >= MAX_PENDING:
            _pending.popleft()
            records_dropped += 1
            metrics.usage_lost("queue_full")
            logger.warning("usage queue full (%d); dropped the oldest record", MAX_PENDING)
        _pending.append(record)
    writer_wake(soon=len(_pending) >= settings.EVENT_BATCH_SIZE)


def usage_pending() -> int:
    return len(_pending)


def usage_discard(reason: str) -> int:
    """Drop what is still queued, counted under `reason` (at shutdown, once the last flush has failed:
    the records would go with the process anyway); returns how many."""
    global records_dropped
    with _lock:
        count = len(_pending)
        _pending.clear()
        records_dropped += count
    if count:
        metrics.usage_lost(reason, count)
        logger.error("lost %d usage records (%s): the database could not be reached", count, reason)
    return count


# --- the writer's side ----------------------------------------------------------------------------


def _slot(hour: datetime, model: str, deployment: str, caller: Caller) -> str:
    key = f"{hour.isoformat()}|{model}|{deployment}|{caller.user_id}|{caller.group_id}|{caller.key_id}"
    return hashlib.sha256(key.encode()).hexdigest()[:40]


def _resolved(record: _Record) -> _Record:
    if record.estimate is not None:
        try:
            record.estimate.apply(record.usage)
        except Exception:  # a record must not stop the batch: keep the counts the upstream gave
            logger.exception("could not count the tokens of a call to %s", record.usage.model)
            record.usage.estimated = True
        record.estimate = None
        usage = record.usage
        record.cost = cost_of(record.price, usage.input_tokens, usage.output_tokens, usage.cached_tokens)
        metrics.usage_counted(usage.model, usage.input_tokens, usage.output_tokens, record.cost)
    return record


def usage_flush() -> int:
    """Write every queued record into the rollups (the event writer calls it in its flush); returns how
    many were written. A rollup row the database refuses is dropped and its records counted
    (`turbo_usage_records_dropped_total`), the others written; if the database is away, the records
    stay queued for the next try."""
    return usage_write(usage_prepare(usage_take()))


def usage_take() -> list[_Record]:
    """Every queued record, out of the queue (give them to usage_prepare, then usage_write)."""
    with _lock:
        batch = list(_pending)
        _pending.clear()
    return batch


def usage_requeue(batch: list[_Record]) -> None:
    """Put records taken but not prepared back at the front of the queue (a writer stopped halfway)."""
    with _lock:
        _pending.extendleft(reversed(batch))


def usage_resolve(record: _Record) -> None:
    """Count an estimated record's tokens and price it (CPU only, no database): the writer on the event
    loop calls it one record at a time, so that no long text holds the loop up."""
    _resolved(record)


@dataclass(slots=True)
class PreparedUsage:
    """Queued records as rollup rows, each with the values its statement sends: what the database gets."""

    count: int = 0
    rows: list[tuple[dict, tuple]] = field(default_factory=list)
    records_of: dict[str, list[_Record]] = field(default_factory=dict)


def usage_prepare(batch: list[_Record]) -> PreparedUsage:
    """The rollup rows of `batch` (estimates counted here, if not yet), ready to write; no database."""
    rows: dict[str, dict] = {}
    records_of: dict[str, list[_Record]] = {}
    for record in map(_resolved, batch):
        usage, caller = record.usage, record.caller
        hour = record.at.replace(minute=0, second=0, microsecond=0)
        slot = _slot(hour, usage.model, usage.deployment, caller)
        records_of.setdefault(slot, []).append(record)
        row = rows.get(slot)
        if row is None:
            row = rows[slot] = {
                "slot": slot,
                "hour": hour,
                "model": usage.model,
                "deployment": usage.deployment,
                "user_id": caller.user_id,
                "group_id": caller.group_id,
                "key_id": caller.key_id,
                "requests": 0,
                "input_tokens": 0,
                "output_tokens": 0,
                "cached_tokens": 0,
                "cost_usd": Decimal(0),
                "estimated_requests": 0,
            }
        row["requests"] += 1
        row["input_tokens"] += usage.input_tokens
        row["output_tokens"] += usage.output_tokens
        row["cached_tokens"] += usage.cached_tokens
        row["cost_usd"] += record.cost
        row["estimated_requests"] += usage.estimated
    return PreparedUsage(len(batch), [(row, _values(row)) for row in rows.values()], records_of)


def usage_write(prepared: PreparedUsage) -> int:
    """Write prepared rollup rows (see usage_flush); returns how many records they hold were written."""
    if not prepared.rows:
        return 0
    _, kept = batch_write(prepared.rows, _upsert, refused=_row_refused)
    if kept:
        unwritten = [record for row, _ in kept for record in prepared.records_of[row["slot"]]]
        with _lock:
            _pending.extendleft(reversed(unwritten))  # now resolved: not counted twice
        logger.warning("could not write %d usage records; will retry", len(unwritten))
    return prepared.count - sum(len(prepared.records_of[row["slot"]]) for row, _ in kept)


def _row_refused(row: tuple[dict, tuple], exc: Exception) -> None:
    global records_dropped
    requests = row[0]["requests"]
    records_dropped += requests
    metrics.usage_lost("refused", requests)
    logger.error("dropped %d usage records the database refused (%s: %s)", requests, type(exc).__name__, exc)


COUNTERS = ("requests", "input_tokens", "output_tokens", "cached_tokens", "cost_usd", "estimated_requests")
COLUMNS = ("slot", "hour", "model", "deployment", "user_id", "group_id", "key_id", *COUNTERS)


def _db_uuid(value):
    if value is None:
        return None
    value = value if isinstance(value, uuid.UUID) else uuid.UUID(str(value))
    return value if connection.features.has_native_uuid_field else value.hex


def _values(row: dict) -> tuple:
    """A rollup row as its statement sends it (the conversions the database needs, done once)."""
    from proxy.models import UsageRollup

    cost_field = UsageRollup._meta.get_field("cost_usd")
    ops = connection.ops
    return (
        row["slot"],
        ops.adapt_datetimefield_value(row["hour"]),
        row["model"],
        row["deployment"],
        _db_uuid(row["user_id"]),
        _db_uuid(row["group_id"]),
        _db_uuid(row["key_id"]),
        row["requests"],
        row["input_tokens"],
        row["output_tokens"],
        row["cached_tokens"],
        ops.adapt_decimalfield_value(row["cost_usd"], cost_field.max_digits, cost_field.decimal_places),
        row["estimated_requests"],
    )


def _upsert(rows: list[tuple[dict, tuple]]) -> None:
    """One INSERT ... ON CONFLICT DO UPDATE adding to each (hour, model, deployment, user, group, key)
    row; both SQLite and Postgres have it. The unique `slot` stands for that tuple (NULLs never conflict
    in a unique constraint, so the columns themselves cannot be the conflict target). One statement with
    every row: the driver converts them in one call, where executemany would go once per row."""
    from proxy.models import UsageRollup

    ops = connection.ops
    table = ops.quote_name(UsageRollup._meta.db_table)
    quoted = [ops.quote_name(name) for name in COLUMNS]
    updates = ", ".join(
        f"{ops.quote_name(name)} = {table}.{ops.quote_name(name)} + excluded.{ops.quote_name(name)}"
        for name in COUNTERS
    )
    row_placeholder = f"({', '.join(['%s'] * len(COLUMNS))})"
    size = max(1, min(len(rows), ops.bulk_batch_size(COLUMNS, rows)))
    with transaction.atomic(), connection.cursor() as cursor:
        for start in range(0, len(rows), size):
            chunk = rows[start : start + size]
            sql = (
                f"INSERT INTO {table} ({', '.join(quoted)}) VALUES {', '.join([row_placeholder] * len(chunk))} "
                f"ON CONFLICT ({ops.quote_name('slot')}) DO UPDATE SET {updates}"
            )
            cursor.execute(sql, [value for _, values in chunk for value in values])
