"""Usage reports, read from the hourly rollups only, with the access rule inside. The one exception is
`usage_errors`, for the admin's Usage page: failed calls cost nothing and are not in the rollups, so they
are counted in the event log."""

import re
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from django.apps import apps
from django.conf import settings
from django.db.models import Count, F, Q, QuerySet, Sum
from django.db.models.functions import TruncDate, TruncHour
from django.utils import timezone
from django.utils.dateparse import parse_date, parse_datetime

from proxy.models import Event, UsageRollup
from turbo_site.core.errors import Forbidden, Invalid, NotFound

GROUPINGS = {"hour", "day", "model", "deployment", "key", "user", "group"}
PERIODS = ("hour", "day")  # groupings that are times: rows in time order, not by cost
_COLUMNS = {"model": "model", "deployment": "deployment", "key": "key_id", "user": "user_id", "group": "group_id"}
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
        try:
            return now - timedelta(**{_UNITS[relative.group(2)]: int(relative.group(1))})
        except OverflowError:
            raise ValueError(f"{text!r} is too long ago") from None
    try:
        moment = parse_datetime(text)
        if moment is None and (day := parse_date(text)) is not None:
            moment = datetime(day.year, day.month, day.day)
    except ValueError:
        moment = None
    if moment is None:
        raise ValueError(f"{text!r} is not a time: use 7d, 24h, 2w, a date (2026-01-31) or an ISO date-time")
    try:  # a moment near year 1 or 9999 may have no UTC equivalent
        return moment.astimezone(UTC) if timezone.is_aware(moment) else moment.replace(tzinfo=UTC)
    except OverflowError:
        raise ValueError(f"{text!r} is out of range") from None


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


def usage_grouped(*, rows: QuerySet[UsageRollup], by: str, limit: int | None = None) -> list[dict]:
    """The sums of `rows` grouped `by` hour, day, model, deployment, key, user or group, one query: by hour
    or day in time order, the others by cost, the highest first (the first `limit` of them when given).
    Each row names its group in the column of that name (`day`, `hour`, `model`, `key_id`, ...)."""
    if by not in GROUPINGS:
        raise Invalid(f"by: must be one of {', '.join(sorted(GROUPINGS))}")
    sums = {f"sum_{name}": Sum(name) for name in COUNTERS}
    if by == "day":
        grouped = rows.annotate(day=TruncDate("hour", tzinfo=UTC)).values("day").annotate(**sums).order_by("day")
        column = "day"
    elif by == "hour":
        grouped = rows.values("hour").annotate(**sums).order_by("hour")
        column = "hour"
    else:
        column = _COLUMNS[by]
        grouped = rows.values(column).annotate(**sums).order_by(F("sum_cost_usd").desc(), column)
    if limit is not None:
        grouped = grouped[:limit]
    result = []
    for row in grouped:
        value = row[column]
        if by in PERIODS:
            shown = value.astimezone(UTC).isoformat() if by == "hour" else value.isoformat()
        else:
            shown = str(value) if value is not None else None
        result.append({column: shown, **_totals(row)})
    return result


def usage_report(*, rows: QuerySet[UsageRollup], by: str | None = None) -> dict:
    """`{"total": {...}, "rows": [...]}` over `rows`, the rows grouped `by` as `usage_grouped` does (costs
    as decimal text)."""
    if by is not None and by not in GROUPINGS:
        raise Invalid(f"by: must be one of {', '.join(sorted(GROUPINGS))}")
    total = _totals(rows.aggregate(**{f"sum_{name}": Sum(name) for name in COUNTERS}))
    return {"total": total, "rows": usage_grouped(rows=rows, by=by) if by is not None else []}


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


def usage_errors(*, since: datetime, until: datetime, per: str) -> list[dict]:
    """Failed model calls on `/v1` per hour or day (`per`) in the hours that begin in [since, until), as
    `usage_rollups` bounds them: `[{"period": "<ISO>", "client_errors": n, "server_errors": n}]` in time
    order, periods without a failure left out. Read from the event log (kept EVENT_RETENTION_DAYS), in
    one query: a call that failed used nothing, so the rollups never saw it."""
    if per not in PERIODS:
        raise Invalid(f"per: must be one of {', '.join(PERIODS)}")
    hour_of_since = since.replace(minute=0, second=0, microsecond=0)
    # A partial hour counts whole, as in the rollups: the last hour runs to its end.
    until_hour = until.replace(minute=0, second=0, microsecond=0)
    end = until_hour + timedelta(hours=1) if until_hour < until else until_hour
    truncate = TruncHour("created_at", tzinfo=UTC) if per == "hour" else TruncDate("created_at", tzinfo=UTC)
    failed = (
        Event.objects.filter(type=Event.Type.PROXY, created_at__gte=hour_of_since, created_at__lt=end)
        .filter(status__gte=400)
        .annotate(period=truncate)
        .values("period")
        .annotate(
            client_errors=Count("id", filter=Q(status__lt=500)),
            server_errors=Count("id", filter=Q(status__gte=500)),
        )
        .order_by("period")
    )
    result = []
    for row in failed:
        period = row["period"]
        shown = period.astimezone(UTC).isoformat() if per == "hour" else period.isoformat()
        result.append({"period": shown, "client_errors": row["client_errors"], "server_errors": row["server_errors"]})
    return result


def usage_periods(*, since: datetime, until: datetime, per: str) -> list[str]:
    """Every hour or day (`per`, ISO text as `usage_grouped` names them) that `usage_rollups` covers."""
    hour = since.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    hours = []
    while hour < until:
        hours.append(hour)
        hour += timedelta(hours=1)
    if per == "hour":
        return [moment.isoformat() for moment in hours]
    return list(dict.fromkeys(moment.date().isoformat() for moment in hours))


def _names(model_label: str, ids: list[str], field: str) -> dict[str, str]:
    """id -> display name for users or groups, in one query (proxy sits below them: looked up by name)."""
    wanted = [value for value in ids if value is not None]
    if not wanted:
        return {}
    model = apps.get_model(*model_label.split("."))
    return {str(pk): name for pk, name in model.objects.filter(pk__in=wanted).values_list("pk", field)}


def usage_overview(*, since: datetime, until: datetime, per: str, top: int = 10) -> dict:
    """Everyone's usage for the admin: totals; per hour or day (`per`) the rollups' counters and the
    failed calls (every period of the range, zeros included); the `top` users, groups, models and
    deployments by cost, with names. Nine queries whatever the range: one per figure, none per row."""
    if per not in PERIODS:
        raise Invalid(f"per: must be one of {', '.join(PERIODS)}")
    rows = usage_rollups(since=since, until=until)
    report = usage_report(rows=rows, by=per)
    errors = {row["period"]: row for row in usage_errors(since=since, until=until, per=per)}
    counted = {row[per]: row for row in report["rows"]}
    zero = {**{name: 0 for name in COUNTERS}, "cost_usd": "0"}
    periods = []
    for period in usage_periods(since=since, until=until, per=per):
        failed = errors.get(period, {})
        periods.append(
            {
                "period": period,
                **counted.get(period, zero),
                per: period,
                "client_errors": failed.get("client_errors", 0),
                "server_errors": failed.get("server_errors", 0),
            }
        )
    tops = {by: usage_grouped(rows=rows, by=by, limit=top) for by in ("user", "group", "model", "deployment")}
    user_names = _names(settings.AUTH_USER_MODEL, [row["user_id"] for row in tops["user"]], "username")
    group_names = _names("groups.Group", [row["group_id"] for row in tops["group"]], "name")
    for row in tops["user"]:
        row["name"] = user_names.get(row["user_id"], row["user_id"] or "(no user)")
    for row in tops["group"]:
        row["name"] = group_names.get(row["group_id"], row["group_id"] or "(no group)")
    for row in tops["model"]:
        row["name"] = row["model"]
    for row in tops["deployment"]:
        row["name"] = row["deployment"] or "(none)"
    return {
        "total": {
            **report["total"],
            "client_errors": sum(row["client_errors"] for row in errors.values()),
            "server_errors": sum(row["server_errors"] for row in errors.values()),
        },
        "periods": periods,
        "top": tops,
    }
