"""The web app's usage page (`/usage`): my usage per day over 7, 30 or 90 days, as bars and a table.

`/usage` is also the API's GET /usage (proxy.usage.api): `usage` sends a browser the page and anything
else the JSON.
"""

from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

from django.http import HttpRequest, HttpResponse
from django.utils import timezone
from django.utils.cache import patch_vary_headers
from django.views.decorators.http import require_GET

from accounts.web import page, signed_in, web_page
from proxy.usage.api import UsageView
from proxy.usage.selectors import COUNTERS, usage_cost_text, usage_report_for

USAGE_SPANS = (7, 30, 90)
USAGE_DEFAULT_SPAN = 30
CHART_WIDTH = 720
CHART_HEIGHT = 200
CHART_TOP = 8  # room above the highest bar


def _usage_days(days: int, now) -> tuple[datetime, list[date]]:
    """The last `days` UTC days, today included, and the midnight (UTC) they start at."""
    today = now.astimezone(UTC).date()
    first = today - timedelta(days=days - 1)
    return datetime(first.year, first.month, first.day, tzinfo=UTC), [first + timedelta(n) for n in range(days)]


def _usage_chart(rows: list[dict]) -> dict:
    """The bars of a per-day cost chart, in the SVG's own units (drawn here, so the page needs no script)."""
    costs = [Decimal(row["cost_usd"]) for row in rows]
    highest = max(costs, default=Decimal(0))
    step = CHART_WIDTH / max(len(rows), 1)
    gap = min(step * 0.2, 4)
    room = CHART_HEIGHT - CHART_TOP
    bars = []
    for index, (row, cost) in enumerate(zip(rows, costs, strict=True)):
        height = float(cost / highest) * room if highest else 0.0
        if row["requests"] and height < 1:
            height = 1.0  # a day with calls always shows, even when they cost (next to) nothing
        bars.append(
            {
                **row,
                "x": f"{index * step + gap / 2:.2f}",
                "y": f"{CHART_HEIGHT - height:.2f}",
                "width": f"{step - gap:.2f}",
                "height": f"{height:.2f}",
            }
        )
    return {"bars": bars, "width": CHART_WIDTH, "height": CHART_HEIGHT, "highest": usage_cost_text(highest)}


@web_page
@require_GET
@signed_in
def usage_page(request: HttpRequest) -> HttpResponse:
    """My usage over the last 7, 30 (the default) or 90 days: totals, a bar per day, the same as a table.
    Read from the hourly rollups through the usage selector, never the event log."""
    try:
        days = int(request.GET.get("days", USAGE_DEFAULT_SPAN))
    except ValueError:
        days = USAGE_DEFAULT_SPAN
    if days not in USAGE_SPANS:
        days = USAGE_DEFAULT_SPAN
    now = timezone.now()
    since, day_list = _usage_days(days, now)
    report = usage_report_for(user=request.user, since=since, until=now, by="day")
    zero = {name: 0 for name in COUNTERS} | {"cost_usd": "0"}
    by_day = {row["day"]: row for row in report["rows"]}
    rows = [{**zero, **by_day.get(day.isoformat(), {}), "day": day.isoformat()} for day in day_list]
    context = {
        "days": days,
        "spans": USAGE_SPANS,
        "total": report["total"],
        "chart": _usage_chart(rows),
        "rows": list(reversed(rows)),  # the table: the newest day first
        "first_day": day_list[0],
        "last_day": day_list[-1],
    }
    return page(request, "web/usage.html", context)


_usage_api = UsageView.as_view()


@web_page
def usage(request: HttpRequest) -> HttpResponse:
    """`/usage` is both the page and the API's `GET /usage` (proxy.usage.api): a browser asking for HTML
    (with no Authorization header) gets the page; anything else (curl, scripts, fetch: `*/*`) the JSON."""
    wants_page = "HTTP_AUTHORIZATION" not in request.META and (
        request.get_preferred_type(["application/json", "text/html"]) == "text/html"
    )
    response = usage_page(request) if wants_page else _usage_api(request)
    patch_vary_headers(response, ["Accept", "Authorization"])
    return response
