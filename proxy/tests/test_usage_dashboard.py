"""The admin's Usage page over HTTP (Turbo's whole ASGI app, in process), logged in as staff the way a browser
would be: its tables and charts agree with `GET /usage` for the same range, it is refused to anyone but staff, a
range it cannot read is a message on the page, and it loads nothing from outside the server."""

import time
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from html.parser import HTMLParser
from urllib.parse import urlsplit

import httpx
import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from accounts.models import User
from accounts.tests.test_admin import log_in
from conftest import unique_name
from proxy.events import events_flush
from proxy.models import Event, UsageRollup
from proxy.usage.caller import Caller
from proxy.usage.records import Usage, usage_record
from proxy.usage.selectors import usage_overview

pytestmark = pytest.mark.django_db

PAGE = "/admin/usage/"
PASSWORD = "staff-pass-123"
COUNTERS = ("requests", "input_tokens", "output_tokens", "cached_tokens", "cost_usd", "estimated_requests")


class Page(HTMLParser):
    """What a test reads off the page: totals, table rows, chart points, and every src and href."""

    def __init__(self, html: str):
        super().__init__()
        self.totals: dict[str, str] = {}
        self.periods: dict[str, dict[str, str]] = {}
        self.tops: dict[str, dict[str, dict[str, str]]] = {}
        self.points: list[dict[str, str]] = []  # every chart point's data-* and the chart's title
        self.links: list[tuple[str, str, str]] = []  # (tag, attribute, value)
        self.deployments: list[str] = []
        self._top_by = ""
        self._row: dict[str, str] | None = None
        self._cell = ""
        self._total = ""
        self._chart_title = ""
        self._text: list[str] = []
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        for name in ("src", "href", "action", "poster", "data"):
            if attributes.get(name) is not None:
                self.links.append((tag, name, attributes[name]))
        classes = (attributes.get("class") or "").split()
        if tag == "svg":
            self._chart_title = attributes.get("aria-label", "")
        if "point" in classes:
            self.points.append(
                {**{k: v for k, v in attributes.items() if k.startswith("data-")}, "chart": self._chart_title}
            )
        if tag == "table" and "usage-top" in classes:
            self._top_by = attributes["data-by"]
            self.tops[self._top_by] = {}
        if tag == "tr" and "usage-period" in classes:
            self._row = self.periods[attributes["data-period"]] = {}
        if tag == "tr" and "usage-top-row" in classes:
            self._row = self.tops[self._top_by][attributes["data-name"]] = {}
        if tag == "tr" and attributes.get("data-deployment"):
            self.deployments.append(attributes["data-deployment"])
        if tag == "td" and self._row is not None and attributes.get("data-column"):
            self._cell, self._text = attributes["data-column"], []
        if tag == "dd" and attributes.get("data-total"):
            self._total, self._text = attributes["data-total"], []

    def handle_data(self, data):
        self._text.append(data)

    def handle_endtag(self, tag):
        if tag == "td" and self._cell:
            self._row[self._cell] = "".join(self._text).strip()
            self._cell = ""
        if tag == "dd" and self._total:
            self.totals[self._total] = "".join(self._text).strip()
            self._total = ""
        if tag == "tr":
            self._row = None


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def as_text(totals: dict) -> dict[str, str]:
    """`GET /usage` numbers as the page prints them."""
    return {name: str(totals[name]) for name in COUNTERS}


def summed(*reports: dict) -> dict[str, str]:
    """Totals of several `GET /usage` answers added up, as the page prints them."""
    result = {}
    for name in COUNTERS:
        if name == "cost_usd":
            value = sum((Decimal(report[name]) for report in reports), Decimal(0))
            result[name] = format(value.normalize(), "f") if value else "0"
        else:
            result[name] = str(sum(report[name] for report in reports))
    return result


@pytest.fixture
def browser(new_client):
    """An HTTP client that keeps cookies, like a browser (Turbo's whole ASGI app, in process)."""
    return new_client()


@pytest.fixture
def staff(browser):
    """`browser`, logged into the admin as a staff member who is not a superuser and has no permissions."""
    username = unique_name("staff")
    User.objects.create_user(username=username, password=PASSWORD, is_staff=True)
    response = log_in(browser, username, PASSWORD)
    assert response.status_code == 302, response.text
    return browser


def rollup_requests_reach(count: int, timeout: float = 10) -> None:
    """Wait until the rollups hold `count` calls (records are queued, then written by the event writer)."""
    deadline = time.monotonic() + timeout
    while True:
        events_flush()
        total = sum(UsageRollup.objects.values_list("requests", flat=True))
        if total >= count or time.monotonic() > deadline:
            assert total == count
            return
        time.sleep(0.05)


def chat(client, token: str, text: str, **headers) -> httpx.Response:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}]}
    return client.post("/v1/chat/completions", json=body, headers={**bearer(token), **headers})


@pytest.fixture
def seeded(client, signup, upstream):
    """Usage made the real way: two users' /v1 calls against the fake upstream (one of which fails), and
    calls counted against a group through the usage service. Returns the two users, their tokens and the group."""
    alice_token, alice, _ = signup(unique_name("alice"))
    bob_token, bob, _ = signup(unique_name("bob"))
    assert chat(client, alice_token, "echo: one two three").status_code == 200
    assert chat(client, alice_token, "echo: four five six seven").status_code == 200
    assert chat(client, bob_token, "echo: eight").status_code == 200
    failed = chat(client, bob_token, "echo: nine", **{"x-fake-scenario": "error_500"})
    assert failed.status_code >= 500
    group = client.post("/group/create", data={"name": unique_name("team")}, headers=bearer(alice_token)).json()
    usage_record(Caller(uuid.UUID(alice["id"]), uuid.UUID(group["id"])), Usage("gpt-4o", "default", 1000, 200))
    rollup_requests_reach(4)
    deadline = time.monotonic() + 10
    while not Event.objects.filter(type="proxy", status__gte=500).exists() and time.monotonic() < deadline:
        events_flush()
        time.sleep(0.05)
    return {"alice": (alice_token, alice), "bob": (bob_token, bob), "group": group}


def day_range() -> dict[str, str]:
    """Yesterday to tomorrow (UTC dates): a range that holds every call of the test, whenever it runs."""
    today = datetime.now(UTC).date()
    return {"since": (today - timedelta(days=1)).isoformat(), "until": (today + timedelta(days=1)).isoformat()}


def test_staff_see_tables_and_charts_that_agree_with_get_usage(staff, client, seeded):
    window = day_range()
    page = staff.get(PAGE, params={**window, "per": "day"})
    assert page.status_code == 200, page.text
    assert "<h1>Usage</h1>" in page.text
    seen = Page(page.text)

    alice_token, alice = seeded["alice"]
    bob_token, bob = seeded["bob"]
    mine = {
        name: client.get("/usage", params={**window, "by": "day"}, headers=bearer(token)).json()
        for name, token in (("alice", alice_token), ("bob", bob_token))
    }
    group_usage = client.get(
        "/usage", params={**window, "group_id": seeded["group"]["id"]}, headers=bearer(alice_token)
    ).json()

    # Everyone's totals are the sum of each user's own GET /usage.
    expected_total = summed(mine["alice"]["total"], mine["bob"]["total"])
    assert {name: seen.totals[name] for name in COUNTERS} == expected_total
    assert expected_total["requests"] == "4"
    assert seen.totals["server_errors"] == "1" and seen.totals["client_errors"] == "0"

    # The day rows: the same days, each the sum of the users' rows for that day.
    api_days: dict[str, list[dict]] = {}
    for report in mine.values():
        for row in report["rows"]:
            api_days.setdefault(row["day"], []).append(row)
    assert set(seen.periods) == set(api_days)
    for day, rows in api_days.items():
        shown = seen.periods[day]
        assert {name: shown[name] for name in COUNTERS} == summed(*rows)
    assert sum(int(row["server_errors"]) for row in seen.periods.values()) == 1

    # Top users and groups: each row is that user's (or group's) own GET /usage total.
    assert as_text(mine["alice"]["total"]) == {name: seen.tops["user"][alice["username"]][name] for name in COUNTERS}
    assert as_text(mine["bob"]["total"]) == {name: seen.tops["user"][bob["username"]][name] for name in COUNTERS}
    group_row = seen.tops["group"][seeded["group"]["name"]]
    assert as_text(group_usage["total"]) == {name: group_row[name] for name in COUNTERS}
    assert list(seen.tops["model"]) == ["gpt-4o", "gpt-4o-mini"]  # by cost, the highest first
    assert seen.tops["model"]["gpt-4o-mini"]["requests"] == "3"
    assert seen.tops["deployment"]["default"]["requests"] == "4"

    # The charts draw the table's numbers: a point per day of the range, per top row.
    def points(chart_start: str, series: str) -> dict[str, str]:
        return {
            p["data-label"]: p["data-value"]
            for p in seen.points
            if p["chart"].startswith(chart_start) and p["data-series"] == series
        }

    requests = points("Requests per day", "requests")
    assert len(requests) == 2  # yesterday and today: every day of the range, zeros included
    for day, value in requests.items():
        assert value == seen.periods.get(day, {}).get("requests", "0")
    for day, value in points("Cost per day", "cost").items():
        assert value == seen.periods.get(day, {}).get("cost_usd", "0")
    for day, value in points("Failed /v1 calls per day", "5xx").items():
        assert value == seen.periods.get(day, {}).get("server_errors", "0")
    for day, value in points("Tokens per day", "output tokens").items():
        assert value == seen.periods.get(day, {}).get("output_tokens", "0")
    top_users = points("Top users by cost", "cost")
    assert top_users == {name: row["cost_usd"] for name, row in seen.tops["user"].items()}

    # The deployments' health sits on the same page.
    assert seen.deployments == ["default"]


def test_per_hour_rows_add_up_to_the_day(staff, seeded):
    since = (datetime.now(UTC) - timedelta(hours=3)).strftime("%Y-%m-%dT%H:00:00Z")
    by_hour = Page(staff.get(PAGE, params={"since": since, "per": "hour"}).text)
    assert sum(int(row["requests"]) for row in by_hour.periods.values()) == 4
    assert all(period.endswith(":00:00+00:00") for period in by_hour.periods)
    hour_points = [p for p in by_hour.points if p["chart"].startswith("Requests per hour")]
    assert len(hour_points) >= 3  # every hour since, zeros included


def test_the_admin_index_links_to_the_page(staff):
    index = staff.get("/admin/")
    assert index.status_code == 200
    reports = index.text[index.text.index('id="turbo-reports"') : index.text.index("Proxy and event log")]
    assert f'<a href="{PAGE}" title="' in reports and ">Usage</a>" in reports
    assert "Proxy and event log" in index.text  # the stock app list is still there


def test_anyone_but_staff_is_sent_to_the_login(browser, new_client, signup):
    response = browser.get(PAGE)
    assert response.status_code == 302
    assert response.headers["location"] == f"/admin/login/?next={PAGE}"

    token, user, password = signup()  # a Turbo user, not staff: the admin refuses the login
    assert log_in(browser, user["username"], password).status_code == 200
    response = browser.get(PAGE)
    assert response.status_code == 302 and response.headers["location"].startswith("/admin/login/")
    # Nor does a Turbo token open it.
    response = new_client().get(PAGE, headers=bearer(token))
    assert response.status_code == 302 and response.headers["location"].startswith("/admin/login/")


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ({"since": "yesterday"}, "is not a time"),
        ({"until": "2026-13-45"}, "is not a time"),
        ({"since": "1d", "until": "2d"}, "since must be before until"),
        ({"since": "30d", "per": "hour"}, "at most 7 days"),
        ({"since": "9999w"}, "at most 366 days"),
        ({"per": "minute"}, "Select a valid choice"),
        ({"since": "x" * 500}, "at most 40 characters"),
        ({"since": "999999w"}, "too long ago"),
        ({"since": "0001-01-01T00:00:00+05:00"}, "out of range"),
        ({"since": "2026-01-01\x00"}, "Null characters are not allowed"),
        ({"since": "9999-12-31T00:00:00Z", "until": "9999-12-31T23:59:59Z", "per": "hour"}, "days from now"),
    ],
)
def test_a_range_it_cannot_read_is_a_message_on_the_page(staff, query, message):
    page = staff.get(PAGE, params=query)
    assert page.status_code == 400
    assert 'id="usage-problems"' in page.text and message in page.text
    assert 'id="usage-range"' in page.text  # the form is there to correct it


def test_the_page_loads_nothing_from_outside_the_server(staff, seeded):
    page = staff.get(PAGE, params=day_range())
    assert page.status_code == 200
    seen = Page(page.text)
    assert seen.points, "the charts are drawn"
    for tag, attribute, value in seen.links:
        parts = urlsplit(value)
        assert not parts.scheme and not parts.netloc, f"<{tag} {attribute}={value!r}> leaves the server"
    assets = {value for tag, attribute, value in seen.links if attribute == "src" or tag == "link"}
    assert "/static/turbo/admin_usage.css" in assets  # the page's own style, beside the admin's
    for asset in assets:
        assert staff.get(asset).status_code == 200, asset
    # The charts are inline SVG: nothing in them points anywhere but the SVG namespace.
    assert (
        "http"
        not in page.text.replace('xmlns="http://www.w3.org/2000/svg"', "")
        .split('id="content"')[1]
        .split('id="usage-deployments"')[0]
    )


def test_the_page_costs_the_same_queries_however_many_users_and_days(seeded):
    """One query per figure, none per row: more users, groups and days do not add any."""

    def queries() -> int:
        now = datetime.now(UTC)
        with CaptureQueriesContext(connection) as captured:
            usage_overview(since=now - timedelta(days=30), until=now + timedelta(hours=1), per="day")
        return len(captured)

    before = queries()
    for _ in range(5):
        usage_record(Caller(uuid.uuid4(), uuid.uuid4()), Usage("gpt-4o-mini", "other", 10, 10))
    events_flush()
    assert UsageRollup.objects.values("user_id").distinct().count() == 7
    assert queries() == before == 9  # totals, per day, failures, four tops, user and group names


def test_get_usage_refuses_a_moment_too_long_ago(client, signup):
    """`since` as the page and `GET /usage` both read it: far beyond the calendar is a 400, not a 500."""
    token = signup()[0]
    response = client.get("/usage", params={"since": "999999w"}, headers=bearer(token))
    assert response.status_code == 400
    assert "too long ago" in response.json()["error"]["message"]


def test_get_usage_refuses_a_moment_with_no_utc_equivalent(client, signup):
    token = signup()[0]
    response = client.get("/usage", params={"since": "0001-01-01T00:00:00+05:00"}, headers=bearer(token))
    assert response.status_code == 400
    assert "out of range" in response.json()["error"]["message"]
