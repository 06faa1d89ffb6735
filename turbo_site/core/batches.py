"""Batched writes that one bad row cannot hold up: the event log's and the usage rollups'."""

import logging
from collections.abc import Callable
from typing import TypeVar

from django.db import connection

logger = logging.getLogger("turbo.batches")

Row = TypeVar("Row")


def database_reachable() -> bool:
    """Does the default database answer at all (as opposed to refusing one statement)?"""
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        return True
    except Exception:
        connection.close()
        return False


def batch_write(
    batch: list[Row], write: Callable[[list[Row]], None], *, refused: Callable[[Row, Exception], None]
) -> tuple[int, list[Row]]:
    """Write `batch` with `write` (all or nothing); returns (rows written, rows to keep for later).

    A batch the database refuses is halved until the rows it refuses are found: each is handed to
    `refused` (to be counted and dropped, never retried), the rest are written. Only when the
    database cannot be reached at all are the rows not yet written returned, for the next try.
    """
    try:
        write(batch)
        return len(batch), []
    except Exception as exc:
        if not database_reachable():
            logger.warning("could not write %d rows (%s); will retry", len(batch), type(exc).__name__)
            return 0, batch
        if len(batch) == 1:
            refused(batch[0], exc)
            return 0, []
    half = len(batch) // 2
    written, kept = batch_write(batch[:half], write, refused=refused)
    if kept:
        return written, kept + batch[half:]
    more, kept = batch_write(batch[half:], write, refused=refused)
    return written + more, kept
