"""The admin's "Usage" page (`/admin/usage/`, staff only, linked from the admin index): requests, tokens,
cost and failed calls per hour or day over a chosen range, the top users, groups, models and deployments,
each drawn as a server-side SVG chart (turbo_site.core.charts) beside a table of the same numbers, and
the deployments' live health.

A thin adapter: the numbers come from proxy.usage.selectors (`usage_overview`, over the same rollups and
range rules as `GET /usage`), the health from proxy.upstreams, as the "Upstream health" page shows it.
"""

from datetime import UTC, datetime, timedelta
from decimal import Decimal

from asgiref.sync import async_to_sync
from django import forms
from django.contrib import admin
from django.http import HttpRequest
from django.template.response import TemplateResponse
from django.utils import timezone
from django.utils.safestring import mark_safe

from proxy.gateway import GatewayError, gateway_config
from proxy.upstreams import deployments_health, health_is_shared, shared_health_problem
from proxy.usage.selectors import PERIODS, moment_parse, usage_overview
from turbo_site.core.charts import Series, bar_chart, line_chart

DEFAULT_SINCE = "7d"
MAX_SPAN = {"hour": timedelta(days=7), "day": timedelta(days=366)}
TOP = 10
# The quick choices above the form: (since, per, label).
SPANS = (
    ("24h", "hour", "last 24 hours"),
    ("7d", "day", "7 days"),
    ("30d", "day", "30 days"),
    ("90d", "day", "90 days"),
)
TOPS = (("user", "users"), ("group", "groups"), ("model", "models"), ("deployment", "deployments"))
CHART_WIDTH = 860
BARS_AT_MOST = 60  # more periods than this are drawn as a line


class UsageRangeForm(forms.Form):
    """The range chooser: since and until as `GET /usage` takes them (7d, 24h, a date, an ISO date-time),
    and hour or day rows."""

    since = forms.CharField(required=False, max_length=40)
    until = forms.CharField(required=False, max_length=40)
    per = forms.ChoiceField(choices=[(period, period) for period in PERIODS], required=False)

    def __init__(self, *args, now: datetime, **kwargs):
        super().__init__(*args, **kwargs)
        self.now = now

    def _moment(self, name: str) -> datetime | None:
        text = self.cleaned_data.get(name, "").strip()
        if not text:
            return None
        try:
            # In UTC, as the rollups' hours are (an offset of half an hour would otherwise split them).
            return moment_parse(text, now=self.now).astimezone(UTC)
        except (ValueError, OverflowError) as exc:
            raise forms.ValidationError(f"{name}: {exc}") from None

    def clean_since(self) -> datetime | None:
        return self._moment("since")

    def clean_until(self) -> datetime | None:
        return self._moment("until")

    def clean(self) -> dict:
        data = super().clean()
        if self.errors:
            return data
        until = data.get("until") or self.now
        since = data.get("since") or moment_parse(DEFAULT_SINCE, now=until)
        per = data.get("per") or "day"
        if since >= until:
            raise forms.ValidationError("since must be before until")
        if until > self.now + MAX_SPAN["day"]:
            raise forms.ValidationError(f"until may be at most {MAX_SPAN['day'].days} days from now")
        if until - since > MAX_SPAN[per]:
            days = MAX_SPAN[per].days
            hint = "; choose per day for longer ones" if per == "hour" else ""
            raise forms.ValidationError(f"per {per}, the range may span at most {days} days{hint}")
        return {**data, "since": since, "until": until, "per": per}


def _period_label(period: str, per: str) -> str:
    """`2026-12-02` for a day, `2026-12-02 14:00` for an hour (UTC)."""
    return period if per == "day" else period[:16].replace("T", " ")


def _charts(overview: dict, per: str) -> dict[str, str]:
    """Every chart of the page as SVG text, from the same rows the tables show."""
    periods = overview["periods"]
    labels = [_period_label(row["period"], per) for row in periods]
    over_time = bar_chart if len(periods) <= BARS_AT_MOST else line_chart
    size = {"width": CHART_WIDTH, "height": 260}
    charts = {
        "requests": over_time(
            title=f"Requests per {per}",
            labels=labels,
            series=[Series("requests", [row["requests"] for row in periods])],
            **size,
        ),
        "tokens": over_time(
            title=f"Tokens per {per}",
            labels=labels,
            series=[
                Series("input tokens", [row["input_tokens"] for row in periods]),
                Series("output tokens", [row["output_tokens"] for row in periods]),
            ],
            **size,
        ),
        "cost": over_time(
            title=f"Cost per {per} (USD)",
            labels=labels,
            series=[Series("cost", [Decimal(row["cost_usd"]) for row in periods])],
            unit="USD",
            **size,
        ),
        "errors": over_time(
            title=f"Failed /v1 calls per {per}",
            labels=labels,
            series=[
                Series("4xx", [row["client_errors"] for row in periods]),
                Series("5xx", [row["server_errors"] for row in periods]),
            ],
            **size,
        ),
    }
    for by, title in TOPS:
        rows = overview["top"][by]
        charts[f"top_{by}"] = bar_chart(
            title=f"Top {title} by cost (USD)",
            labels=[str(row["name"]) for row in rows],
            series=[Series("cost", [Decimal(row["cost_usd"]) for row in rows])],
            unit="USD",
            width=CHART_WIDTH,
            height=240,
        )
    # Built by the renderer, which escapes every text it is given.
    return {name: mark_safe(svg) for name, svg in charts.items()}


def _deployments() -> tuple[list, str]:
    """The deployments' health and a problem to show ("" when none), as the Upstream health page reads them."""
    try:
        problem = ""
        if shared := async_to_sync(shared_health_problem)():
            problem = f"The shared health cannot be read from Redis ({shared}): this is the process's own."
        return async_to_sync(deployments_health)(), problem
    except GatewayError as exc:
        return [], exc.message


def usage_dashboard_page(request: HttpRequest) -> TemplateResponse:
    """The page for `?since=&until=&per=` (defaults: the last 7 days, per day); a range it cannot read is
    a 400 with the reason on the page."""
    now = timezone.now()
    form = UsageRangeForm(request.GET, now=now)  # every field may be left out: the defaults apply
    context = {
        **admin.site.each_context(request),
        "title": "Usage",
        "form": form,
        "spans": SPANS,
        "now": now,
        "health_is_shared": health_is_shared(),
        "source": _config_source(),
    }
    context["deployments"], context["health_problem"] = _deployments()
    status = 200
    if not form.is_valid():
        status = 400
        context["problems"] = [message for messages in form.errors.values() for message in messages]
    else:
        fields = form.cleaned_data
        overview = usage_overview(since=fields["since"], until=fields["until"], per=fields["per"], top=TOP)
        charts = _charts(overview, fields["per"])
        context.update(
            since=fields["since"],
            until=fields["until"],
            per=fields["per"],
            overview=overview,
            periods=[{**row, "label": _period_label(row["period"], fields["per"])} for row in overview["periods"]],
            charts=charts,
            tops=[(by, title, overview["top"][by], charts[f"top_{by}"]) for by, title in TOPS],
        )
    request.current_app = admin.site.name
    return TemplateResponse(request, "admin/proxy/usage.html", context, status=status)


def _config_source() -> str:
    try:
        return gateway_config().source
    except GatewayError:
        return ""


# Staff only: anyone else is sent to the admin's login, as for every admin page.
usage_dashboard = admin.site.admin_view(usage_dashboard_page)
