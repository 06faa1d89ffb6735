"""Usage reports, read from the hourly rollups only (never the event log), with the access rule inside."""

import re
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from django.apps import apps
from django.db.models import F, QuerySet, Sum
from django.db.models.functions import TruncDate
from django.utils import timezone
from django.utils.dateparse import parse_date, parse_datetime

from proxy.models import UsageRollup
from turbo_site.core.errors import Forbidden, Invalid, NotFound

GROUPINGS = {"day", "model", "key", "user", "group"}
COUNTERS = ("requests", "input_tokens", "output_tokens", "cached_tokens", "cost_usd", "estimated_requests")
_RELATIVE = re.compile(r"^(\d{1,6})([hdw])$")
_UNITS = {"h": "hours", "d": "days", "w": "weeks"}


def moment_parse(text: str, *, now: datetime | None = None) -> datetime:
    """A moment from `7d`, `24h` or `2w` (that long ago), an ISO date (its midnight, UTC) or an ISO
    date-time (UTC unless it says otherwise). Raises ValueError."""
    text = text.strip()
    now = now or timezone.now()
    relative = _RELATIVE.match(text)
    if relative:
        return now - timedelta(**{_UNITS[relative.group(2)]: int(relative.group(1))})
    try:
        moment = parse_datetime(text)
        if moment is None and (day := parse_date(text)) is not None:
            moment = datetime(day.year, day.month, day.day)
    except ValueError:
        moment = None
    if moment is None:
        raise ValueError(f"{text!r} is not a time: use 7d, 24h, 2w, a date (2026-01-31) or an ISO date-time")
    return moment if timezone.is_aware(moment) else moment.replace(tzinfo=UTC)


def usage_cost_text(cost: Decimal | None) -> str:
    """A cost in USD as exact decimal text: no exponent, no trailing zeros (`0.0000123`, `12.5`, `0`)."""
    return format((cost or Decimal(0)).normalize(), "f")


def _group_owned_by(*, user, group_id: uuid.UUID):
    """The group, if `user` owns it: a member who is not the owner is refused, anyone else is told it
    does not exist. (Groups sit above proxy: looked up by name, not imported.)"""
    group_model = apps.get_model("groups", "Group")
    group = group_model.objects.filter(pk=group_id, memberships__user=user).first()
    if group is None:
        raise NotFound("group not found")
    if group.owner_id != user.pk:
        raise Forbidden("only the group's owner may see its usage")
    return group


def usage_rollups(
    *,
    since: datetime,
    until: datetime,
    user_id: uuid.UUID | None = None,
    group_id: uuid.UUID | None = None,
    key_id: uuid.UUID | None = None,
) -> QuerySet[UsageRollup]:
    """The rollup rows of hours that begin in [since, until) (a partial hour counts whole), narrowed to
    a user, a group or an API key when given."""
    hour_of_since = since.replace(minute=0, second=0, microsecond=0)
    rows = UsageRollup.objects.filter(hour__gte=hour_of_since, hour__lt=until)
    if user_id is not None:
        rows = rows.filter(user_id=user_id)
    if group_id is not None:
        rows = rows.filter(group_id=group_id)
    if key_id is not None:
        rows = rows.filter(key_id=key_id)
    return rows


def _totals(row: dict) -> dict:
    totals = {name: row.get(f"sum_{name}") or 0 for name in COUNTERS}
    totals["cost_usd"] = usage_cost_text(row.get("sum_cost_usd"))
    return totals


def usage_report(*, rows: QuerySet[UsageRollup], by: str | None = None) -> dict:
    """`{"total": {...}, "rows": [...]}` over `rows`, grouped `by` day, model, key, user or group (costs
    as decimal text); rows by day in order, the others by cost, the highest first."""
    sums = {f"sum_{name}": Sum(name) for name in COUNTERS}
    total = _totals(rows.aggregate(**sums))
    if by is None:
        return {"total": total, "rows": []}
    if by not in GROUPINGS:
        raise Invalid(f"by: must be one of {', '.join(sorted(GROUPINGS))}")
    if by == "day":
        grouped = rows.annotate(day=TruncDate("hour", tzinfo=UTC)).values("day").annotate(**sums).order_by("day")
        column = "day"
    else:
        column = {"model": "model", "key": "key_id", "user": "user_id", "group": "group_id"}[by]
        grouped = rows.values(column).annotate(**sums).order_by(F("sum_cost_usd").desc(), column)
    result = []
    for row in grouped:
        value = row[column]
        entry = {column: value.isoformat() if by == "day" else (str(value) if value is not None else None)}
        entry.update(_totals(row))
        result.append(entry)
    return {"total": total, "rows": result}


def usage_report_for(
    *, user, since: datetime, until: datetime, by: str | None = None, group_id: uuid.UUID | None = None
) -> dict:
    """`user`'s own usage, or (with `group_id`) a group's, which only its owner may see."""
    if group_id is not None:
        group = _group_owned_by(user=user, group_id=group_id)
        rows = usage_rollups(since=since, until=until, group_id=group.pk)
    else:
        rows = usage_rollups(since=since, until=until, user_id=user.pk)
    return usage_report(rows=rows, by=by)
