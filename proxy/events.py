"""The request and event log.

`event_record()` costs no database write: it queues the event and schedules its publication on the
pub/sub topic `events`, where the events of each EVENT_PUBLISH_MS go out together in one message
(one Redis round trip however busy the server is). A writer thread saves queued events in batches,
at most every EVENT_FLUSH_MS; what is still queued at a clean exit is saved then.
"""

import asyncio
import atexit
import ipaddress
import json
import logging
import os
import re
import threading
import time
import uuid
import weakref
from collections import deque
from datetime import timedelta
from typing import Any
from urllib.parse import parse_qsl, urlencode

from django.conf import settings
from django.db import close_old_connections, connection, transaction
from django.utils import timezone

from proxy.gateway.routing import text_redact
from proxy.models import Event
from proxy.owners import objects_discard, objects_flush, objects_pending
from proxy.usage.records import usage_discard, usage_flush, usage_pending
from turbo_site.core import metrics
from turbo_site.core.batches import batch_write
from turbo_site.core.http import REDACTED, SECRET_NAME, redact_query
from turbo_site.core.parsers import client_json_loads
from turbo_site.core.pubsub import apublish_many, publish
from turbo_site.core.text import storable
from turbo_site.core.tracing import trace_id_current

logger = logging.getLogger("turbo.events")

TOPIC = "events"

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
_pending_publishes: set[asyncio.Task] = set()
# Events waiting to be published, per event loop (a loop's batch goes out from that loop).
_outboxes: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, list[dict[str, Any]]]" = weakref.WeakKeyDictionary()


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


def _payload(event: dict[str, Any]) -> dict[str, Any]:
    """What subscribers of `events` see: no bodies."""
    shown = {k: v for k, v in event.items() if k not in ("request_body", "response_body")}
    shown["id"] = str(shown["id"])
    shown["user_id"] = str(shown["user_id"]) if shown.get("user_id") else None
    shown["created_at"] = shown["created_at"].isoformat()
    return shown


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
    """Queue one event for the log and publish it on `events`. Never touches the database.

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
        _wake.set()
    _publish_soon(_payload(event))
    return event


def _publish_soon(payload: dict[str, Any]) -> None:
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        loop = None
    if loop is None:
        try:
            publish(TOPIC, payload)
        except Exception:  # the log must never break the request it records
            logger.exception("could not publish an event")
        return
    outbox = _outboxes.get(loop)
    if outbox is None:
        outbox = _outboxes[loop] = []
        loop.call_later(settings.EVENT_PUBLISH_MS / 1000, _publish_outbox, loop)
    outbox.append(payload)


def _publish_outbox(loop: asyncio.AbstractEventLoop) -> None:
    outbox = _outboxes.pop(loop, None)
    if outbox:
        task = loop.create_task(_publish_quietly(outbox))
        _pending_publishes.add(task)
        task.add_done_callback(_pending_publishes.discard)


async def _publish_quietly(payloads: list[dict[str, Any]]) -> None:
    try:
        await apublish_many(TOPIC, payloads)
    except Exception:
        logger.exception("could not publish %d events", len(payloads))


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
        _wake.set()


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


def events_state() -> dict[str, int]:
    """This process's log: events waiting to be written, and events the database refused (dropped)."""
    return {"queued": len(_queue), "dropped": events_dropped}


def _insert(batch: list[dict[str, Any]]) -> None:
    """One multi-row INSERT of queued events, in a transaction.

    `bulk_create` builds a model instance and runs every field's conversion per event: about 8 ms of
    CPU for 50 events, long enough to hold up the event loop's requests. The values are already
    clean (event_record made them), so only what the database needs is converted here.
    """
    fields = [field.attname for field in Event._meta.concrete_fields]
    ops = connection.ops
    native_uuid = connection.features.has_native_uuid_field

    def db_uuid(value):
        if value is None:
            return None
        value = value if isinstance(value, uuid.UUID) else uuid.UUID(str(value))
        return value if native_uuid else value.hex

    attempts_field = Event._meta.get_field("attempts")
    rows = []
    for event in batch:
        row = {**event, "id": db_uuid(event["id"]), "user_id": db_uuid(event["user_id"])}
        row["client_ip"] = ops.adapt_ipaddressfield_value(event["client_ip"])
        row["attempts"] = attempts_field.get_db_prep_save(event.get("attempts") or [], connection)
        row.setdefault("upstream", "")
        row["created_at"] = ops.adapt_datetimefield_value(event["created_at"])
        rows.append(tuple(row[name] for name in fields))
    table = ops.quote_name(Event._meta.db_table)
    columns = ", ".join(ops.quote_name(name) for name in fields)
    placeholders = ", ".join(["%s"] * len(fields))
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.executemany(f"INSERT INTO {table} ({columns}) VALUES ({placeholders})", rows)


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
    while not _stopped:
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
    if _stopped or (_writer is not None and _writer_pid == os.getpid() and _writer.is_alive()):
        return
    with _writer_lock:
        if _writer is None or _writer_pid != os.getpid() or not _writer.is_alive():
            _writer = threading.Thread(target=_writer_loop, name="turbo-event-writer", daemon=True)
            _writer_pid = os.getpid()
            _writer.start()


def events_writer_pause() -> None:
    """Stop the background writer without saving (events keep queueing); see events_writer_resume."""
    global _stopped
    _stopped = True
    _wake.set()
    if _writer is not None:
        _writer.join(timeout=10)


def events_writer_resume() -> None:
    global _stopped
    _stopped = False
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
