"""The request and event log.

`event_record()` costs no database write: it queues the event, and a writer saves queued events (and the
usage records and stored objects' owners queued beside them) in batches, at most every EVENT_FLUSH_MS;
what is still queued at a clean exit is saved then. The log is read in the admin (and pruned by
`manage.py events prune`); it is not published anywhere.

Under the ASGI server (its lifespan: `events_writer_start`) the writer is a task on the serving event
loop, not a thread: a thread holding the GIL for its Python work (building rows, counting estimated
tokens) made the loop wait up to the interpreter's switch interval (5 ms) at a time, inside the
requests' tail. On the loop that work runs a slice at a time between requests; what is left for a
thread of its own is the statement itself (one multi-row INSERT per chunk: the driver's call and the
socket, which release the GIL). Processes without the lifespan (commands, daphne, the tests' server)
keep a writer thread.
"""

import asyncio
import atexit
import functools
import ipaddress
import json
import logging
import os
import re
import threading
import time
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any
from urllib.parse import parse_qsl, urlencode

from django.conf import settings
from django.db import close_old_connections, connection, transaction
from django.utils import timezone

from proxy.config import text_redact
from proxy.models import Event
from proxy.owners import objects_discard, objects_flush, objects_pending
from proxy.usage.records import (
    PreparedUsage,
    usage_discard,
    usage_flush,
    usage_pending,
    usage_prepare,
    usage_requeue,
    usage_resolve,
    usage_take,
    usage_write,
)
from turbo_site.core import metrics
from turbo_site.core.batches import batch_write
from turbo_site.core.http import REDACTED, SECRET_NAME, redact_query
from turbo_site.core.parsers import client_json_loads
from turbo_site.core.text import storable
from turbo_site.core.tracing import trace_id_current

logger = logging.getLogger("turbo.events")

_queue: deque[dict[str, Any]] = deque()
_wake = threading.Event()
_flush_lock = threading.Lock()
_writer_lock = threading.Lock()
_writer: threading.Thread | None = None
_writer_pid: int | None = None
_stopped = False
_last_prune = 0.0
# Events dropped because the database refused them (bad values), since the process started; /health shows it.
events_dropped = 0
PREPARE_SLICE = 50  # events or usage records the writer on the loop prepares between two turns of the loop
INSERT_ROWS_MAX = 100  # rows per INSERT: bounds how long the driver converts values at a stretch
# The writer on the serving loop (events_writer_start), when there is one; else the thread above.
_on_loop = False
_loop_writer: asyncio.Task | None = None
_loop_writer_loop: asyncio.AbstractEventLoop | None = None
_loop_wake: asyncio.Event | None = None
_loop_stopping = False
_database_thread: ThreadPoolExecutor | None = None


# --- body capture -------------------------------------------------------------------------------


def _redact_value(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: REDACTED if SECRET_NAME.search(str(k)) else _redact_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact_value(v) for v in value]
    return value


def capture_body(raw: bytes, content_type: str = "") -> str:
    """A body as stored in the log: secret fields and every configured key redacted, truncated to
    EVENT_BODY_MAX_BYTES."""
    if not settings.EVENT_CAPTURE_BODIES or not raw:
        return ""
    limit = settings.EVENT_BODY_MAX_BYTES
    content_type = content_type.split(";")[0].strip().lower()
    text: str
    if content_type == "application/json" or raw[:1] in (b"{", b"["):
        try:
            text = json.dumps(_redact_value(client_json_loads(raw)), ensure_ascii=False)
        except (ValueError, UnicodeDecodeError):
            text = raw[:limit].decode("utf-8", "replace")
    elif content_type == "application/x-www-form-urlencoded":
        pairs = parse_qsl(raw[: limit * 4].decode("utf-8", "replace"), keep_blank_values=True)
        text = urlencode([(k, REDACTED if SECRET_NAME.search(k) else v) for k, v in pairs])
    elif content_type.startswith("text/"):
        text = raw[:limit].decode("utf-8", "replace")
        # Server-sent events carry JSON lines; redact keys inside them too.
        text = re.sub(
            r'("[^"]*(?:token|key|secret|password)[^"]*"\s*:\s*)"[^"]*"', rf'\1"{REDACTED}"', text, flags=re.I
        )
    else:
        return f"[{len(raw)} bytes of {content_type or 'unknown type'}]"
    # An upstream may quote the key it was sent, any upstream's: none is stored (nor shown by the admin).
    text = text_redact(text)
    if len(text) > limit:
        text = text[:limit] + "…[truncated]"
    return text


# --- recording ----------------------------------------------------------------------------------


def _count(value: Any, limit: int) -> int | None:
    """A non-negative integer the column can hold, or nothing."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= limit:
        return None
    return value


def _address(value: Any) -> str | None:
    try:
        return str(ipaddress.ip_address(value)) if value else None
    except ValueError:
        return None


def event_record(
    *,
    type: str,
    user_id: uuid.UUID | str | None = None,
    method: str = "",
    path: str = "",
    query: str = "",
    status: int | None = None,
    duration_ms: float | None = None,
    client_ip: str | None = None,
    model: str = "",
    prompt_tokens: int | None = None,
    completion_tokens: int | None = None,
    total_tokens: int | None = None,
    request_body: str = "",
    response_body: str = "",
    attempts: tuple = (),
) -> dict[str, Any]:
    """Queue one event for the log. Never touches the database.

    Every field is cleaned here, whatever the client sent, so that one request cannot hold up the log.
    """
    body_limit = settings.EVENT_BODY_MAX_BYTES + len("…[truncated]")
    event = {
        "id": uuid.uuid4(),
        "type": storable(type, 32),
        "user_id": user_id,
        "method": storable(method, 10),
        "path": storable(path, 2000),
        "query": storable(redact_query(storable(query, 4000)), 2000),
        "status": _count(status, 32767),
        "duration_ms": round(duration_ms, 3) if duration_ms is not None else None,
        "client_ip": _address(client_ip),
        "model": storable(model, 100),
        "prompt_tokens": _count(prompt_tokens, 2147483647),
        "completion_tokens": _count(completion_tokens, 2147483647),
        "total_tokens": _count(total_tokens, 2147483647),
        "request_body": storable(request_body, body_limit),
        "response_body": storable(response_body, body_limit),
        # Attempt objects (proxy.gateway.Attempt): the last one tried is the one that answered, if any.
        "upstream": storable(attempts[-1].deployment, 200) if attempts and not attempts[-1].error else "",
        "attempts": [
            {"deployment": storable(a.deployment, 200), "error": storable(a.error, 300)} for a in attempts[:20]
        ],
        "trace_id": trace_id_current(),  # "" unless tracing is on
        "created_at": timezone.now(),
    }
    if len(_queue) >= settings.EVENT_QUEUE_MAX:
        logger.warning("event queue full (%d); dropping the oldest event", len(_queue))
        _queue.popleft()
        metrics.events_lost("queue_full")
    _queue.append(event)
    _ensure_writer()
    if len(_queue) >= settings.EVENT_BATCH_SIZE:
        _wake_now()
    return event


# --- writing ------------------------------------------------------------------------------------


def events_flush() -> int:
    """Save every queued event now; returns how many were saved. Safe to call from any thread.

    A batch the database refuses is split until the rows it refuses are found; those are dropped and
    counted (events_dropped), the rest saved. Only when the database itself is unreachable do the
    events stay queued for the next try.
    """
    saved = 0
    with _flush_lock:
        _usage_flush()
        _objects_flush()
        while _queue:
            batch = []
            while _queue and len(batch) < settings.EVENT_BATCH_SIZE:
                batch.append(_queue.popleft())
            written, unsaved = _insert_or_split(batch)
            saved += written
            if unsaved:
                # The database is away (restarting?): keep what is left for the next try.
                _queue.extendleft(reversed(unsaved))
                break
    return saved


def _usage_flush() -> None:
    """Usage records go into their rollups in the same flush (proxy.usage.records)."""
    try:
        usage_flush()
    except Exception:  # the records stay queued for the next flush; the events still go
        pass


def _objects_flush() -> None:
    """The owners of stored objects (proxy.owners) too."""
    try:
        objects_flush()
    except Exception:  # they stay queued for the next flush
        pass


def writer_wake(*, soon: bool = False) -> None:
    """Make sure the writer runs (for records queued outside event_record); `soon`: flush now."""
    _ensure_writer()
    if soon:
        _wake_now()


def _insert_or_split(batch: list[dict[str, Any]]) -> tuple[int, list[dict[str, Any]]]:
    """Insert `batch`, halving it around refused rows; returns (saved, events to keep for later)."""
    return batch_write(batch, _insert_counted, refused=_event_refused)


def _insert_counted(batch: list[dict[str, Any]]) -> None:
    _insert(batch)
    metrics.events_batch_written(len(batch))


def _event_refused(event: dict[str, Any], exc: Exception) -> None:
    global events_dropped
    events_dropped += 1
    metrics.events_lost("refused")
    logger.error("dropped an event the database refused (%s: %s)", type(exc).__name__, exc)


def events_state() -> dict[str, int | str]:
    """This process's log: events waiting to be written, events the database refused (dropped), and
    where its writer runs: `loop` (the serving event loop), `thread`, or `none` (not started yet, or stopped)."""
    if _on_loop and _loop_writer is not None and not _loop_writer.done():
        writer = "loop"
    elif not _stopped and _writer is not None and _writer.is_alive():
        writer = "thread"
    else:
        writer = "none"
    return {"queued": len(_queue), "dropped": events_dropped, "writer": writer}


def _insert(batch: list[dict[str, Any]]) -> None:
    """One multi-row INSERT of queued events, in a transaction."""
    _insert_rows([_event_row(event) for event in batch])


def _event_row(event: dict[str, Any]) -> tuple:
    """An event as the INSERT sends it.

    `bulk_create` builds a model instance and runs every field's conversion per event: about 8 ms of
    CPU for 50 events, long enough to hold up the event loop's requests. The values are already
    clean (event_record made them), so only what the database needs is converted here (no query: the
    writer on the event loop calls it there, a slice of events at a time).
    """
    ops = connection.ops
    native_uuid = connection.features.has_native_uuid_field

    def db_uuid(value):
        if value is None:
            return None
        value = value if isinstance(value, uuid.UUID) else uuid.UUID(str(value))
        return value if native_uuid else value.hex

    row = {**event, "id": db_uuid(event["id"]), "user_id": db_uuid(event["user_id"])}
    row["client_ip"] = ops.adapt_ipaddressfield_value(event["client_ip"])
    row["attempts"] = _attempts_field().get_db_prep_save(event.get("attempts") or [], connection)
    row.setdefault("upstream", "")
    row["created_at"] = ops.adapt_datetimefield_value(event["created_at"])
    return tuple(row[name] for name in _event_columns())


@functools.cache
def _event_columns() -> tuple[str, ...]:
    return tuple(field.attname for field in Event._meta.concrete_fields)


@functools.cache
def _attempts_field():
    return Event._meta.get_field("attempts")


def _insert_rows(rows: list[tuple]) -> None:
    """INSERT rows made by _event_row, in one transaction: one statement per chunk of rows, so the
    driver converts a chunk's values in one call where executemany went once per row (Python each
    time: what made the writer thread hold the GIL)."""
    ops = connection.ops
    fields = _event_columns()
    table = ops.quote_name(Event._meta.db_table)
    columns = ", ".join(ops.quote_name(name) for name in fields)
    row_placeholder = f"({', '.join(['%s'] * len(fields))})"
    size = max(1, min(len(rows), ops.bulk_batch_size(fields, rows), INSERT_ROWS_MAX))
    with transaction.atomic(), connection.cursor() as cursor:
        for start in range(0, len(rows), size):
            chunk = rows[start : start + size]
            values = [value for row in chunk for value in row]
            cursor.execute(
                f"INSERT INTO {table} ({columns}) VALUES {', '.join([row_placeholder] * len(chunk))}", values
            )


def events_prune(*, days: int | None = None) -> int:
    """Delete events older than `days` (default EVENT_RETENTION_DAYS); returns how many went."""
    days = settings.EVENT_RETENTION_DAYS if days is None else days
    cutoff = timezone.now() - timedelta(days=days)
    deleted = 0
    while True:
        ids = list(Event.objects.filter(created_at__lt=cutoff).values_list("id", flat=True)[:5000])
        if not ids:
            return deleted
        deleted += Event.objects.filter(id__in=ids).delete()[0]


def _writer_loop() -> None:
    global _last_prune
    while not _stopped and not _on_loop:
        _wake.wait(settings.EVENT_FLUSH_MS / 1000)
        _wake.clear()
        try:
            close_old_connections()
            if _queue or usage_pending() or objects_pending():
                events_flush()
            metrics.events_queued(len(_queue))
            if settings.EVENT_RETENTION_DAYS and time.monotonic() - _last_prune > 3600:
                _last_prune = time.monotonic()
                events_prune()
        except Exception:
            logger.exception("event writer failed; continuing")
        finally:
            # Hold no connection while idle.
            connection.close()


def _ensure_writer() -> None:
    global _writer, _writer_pid
    if _stopped or _on_loop or (_writer is not None and _writer_pid == os.getpid() and _writer.is_alive()):
        return
    with _writer_lock:
        if _writer is None or _writer_pid != os.getpid() or not _writer.is_alive():
            _writer = threading.Thread(target=_writer_loop, name="turbo-event-writer", daemon=True)
            _writer_pid = os.getpid()
            _writer.start()


def _wake_now() -> None:
    """Have the writer flush now (a batch is full)."""
    if not _on_loop:
        _wake.set()
        return
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is _loop_writer_loop:
        _loop_wake.set()
    elif _loop_writer_loop is not None and not _loop_writer_loop.is_closed():
        _loop_writer_loop.call_soon_threadsafe(_loop_wake.set)


# --- the writer on the serving event loop -------------------------------------------------------


def events_writer_start() -> bool:
    """Make the writer a task on the running event loop (the ASGI lifespan's startup), with one thread
    of its own that only runs the prepared statements; a writer thread already running stops. False if
    it runs already. `events_writer_stop` ends it."""
    global _on_loop, _loop_writer, _loop_writer_loop, _loop_wake, _loop_stopping, _database_thread
    if _loop_writer is not None and not _loop_writer.done():
        return False
    loop = asyncio.get_running_loop()
    _loop_writer_loop, _loop_wake, _loop_stopping = loop, asyncio.Event(), False
    _database_thread = ThreadPoolExecutor(1, thread_name_prefix="turbo-event-db")
    _on_loop = True
    _wake.set()  # a writer thread started before (an event at import time) sees _on_loop and ends
    _loop_writer = loop.create_task(_loop_writer_run(), name="turbo-event-writer")
    return True


async def events_writer_stop(timeout: float = 30.0) -> None:
    """End the writer on the loop once its flush in flight (if any) has finished; what is still queued
    is then written by events_shutdown (the lifespan's shutdown calls both, in this order)."""
    global _loop_stopping
    task = _loop_writer
    if task is None or task.done():
        return
    _loop_stopping = True
    _loop_wake.set()
    try:
        await asyncio.wait_for(task, timeout)
    except Exception:
        logger.exception("the event writer did not stop cleanly")
    if _database_thread is not None:  # a write still running (the task timed out) ends on its own, under the lock
        _database_thread.shutdown(wait=False)


async def _loop_writer_run() -> None:
    global _last_prune
    loop = asyncio.get_running_loop()
    while not (_stopped or _loop_stopping):
        try:
            await asyncio.wait_for(_loop_wake.wait(), settings.EVENT_FLUSH_MS / 1000)
        except TimeoutError:
            pass
        _loop_wake.clear()
        if _stopped or _loop_stopping:
            return
        try:
            if _queue or usage_pending() or objects_pending():
                await _flush_on_loop(loop)
            metrics.events_queued(len(_queue))
            if settings.EVENT_RETENTION_DAYS and time.monotonic() - _last_prune > 3600:
                _last_prune = time.monotonic()
                await loop.run_in_executor(_database_thread, _database_call, events_prune)
        except Exception:
            logger.exception("event writer failed; continuing")


async def _flush_on_loop(loop: asyncio.AbstractEventLoop) -> None:
    """One flush: the rows are made here, a slice at a time between requests; the database thread only
    sends them. Stopped halfway (the task cancelled), what was taken goes back to its queue."""
    records = usage_take()
    try:
        for index, record in enumerate(records, start=1):
            usage_resolve(record)  # counting an estimate's tokens: the slow part, one record at a time
            if index % PREPARE_SLICE == 0:
                await asyncio.sleep(0)
        usage: PreparedUsage | None = usage_prepare(records)
    except BaseException:
        usage_requeue(records)
        raise
    while True:
        events = [_queue.popleft() for _ in range(min(len(_queue), settings.EVENT_BATCH_SIZE))]
        try:
            rows: list[tuple] = []
            for start in range(0, len(events), PREPARE_SLICE):
                rows += [_event_row(event) for event in events[start : start + PREPARE_SLICE]]
                await asyncio.sleep(0)
        except BaseException:
            _queue.extendleft(reversed(events))
            if usage is not None:
                usage_requeue([record for kept in usage.records_of.values() for record in kept])
            raise
        unsaved = await loop.run_in_executor(
            _database_thread, _write_prepared, usage, list(zip(events, rows, strict=True))
        )
        usage = None
        if unsaved or not _queue:
            return


def _database_call(work) -> Any:
    """Run `work` on the database thread, holding no connection afterwards (as the writer thread does)."""
    try:
        close_old_connections()
        return work()
    finally:
        connection.close()


def _write_prepared(usage: PreparedUsage | None, pairs: list[tuple[dict[str, Any], tuple]]) -> int:
    """The database thread's part of a flush: write prepared rows. Returns how many events stay queued
    (the database is away: they went back to the queue for the next flush)."""

    def write() -> int:
        with _flush_lock:
            if usage is not None:
                try:
                    usage_write(usage)
                except Exception:  # the records stay queued for the next flush; the events still go
                    pass
            _objects_flush()
            if not pairs:
                return 0
            _, unsaved = batch_write(pairs, _insert_pairs, refused=_pair_refused)
            if unsaved:
                _queue.extendleft(reversed([event for event, _ in unsaved]))
            return len(unsaved)

    return _database_call(write)


def _insert_pairs(pairs: list[tuple[dict[str, Any], tuple]]) -> None:
    _insert_rows([row for _, row in pairs])
    metrics.events_batch_written(len(pairs))


def _pair_refused(pair: tuple[dict[str, Any], tuple], exc: Exception) -> None:
    _event_refused(pair[0], exc)


def events_writer_pause() -> None:
    """Stop the background writer without saving (events keep queueing); see events_writer_resume."""
    global _stopped
    _stopped = True
    _wake.set()
    if _writer is not None:
        _writer.join(timeout=10)


def events_writer_resume() -> None:
    """Start the background writer thread again (after events_writer_pause, or a writer on a loop that
    events_writer_stop ended: the tests' servers have no lifespan)."""
    global _stopped, _on_loop
    _stopped = False
    if _loop_writer is None or _loop_writer.done():
        _on_loop = False
    _ensure_writer()


def events_shutdown(*, flush: bool = True) -> None:
    """Stop the writer; save what is queued (unless told not to)."""
    global _stopped
    _stopped = True
    _wake.set()
    if flush:
        try:
            events_flush()
        except Exception:
            logger.exception("could not save queued events at shutdown")
        finally:
            connection.close()
        # What the database could not take now is lost with the process: counted, not silently.
        if _queue:
            logger.error("lost %d events at shutdown: the database could not be reached", len(_queue))
            metrics.events_lost("shutdown", len(_queue))
            _queue.clear()
        usage_discard("shutdown")
        objects_discard("shutdown")


atexit.register(events_shutdown)
