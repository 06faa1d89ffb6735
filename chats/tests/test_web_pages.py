"""The web app's chat pages over HTTP (Turbo's whole ASGI app in process; the live server where a test says
why): the index (my chats and groups, the new-chat form) and a chat's page (its history as the browser tests
and chat.js expect it), without a browser.

What a user sees is read from the HTML; what the forms did (or, refused, did not do) from the database.
And /usage: my usage per day, from the usage rollups.
"""

import json
import re
import time
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from django.conf import settings
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext

from chats.models import Chat, ChatMember, Message
from conftest import PROJECT_ROOT, unique_name
from groups.models import Group, GroupMember
from testing.pages import page_of, post_form

pytestmark = pytest.mark.django_db
pytest_plugins = ["testing.pages"]  # the browsers and person fixtures

XSS_PROMPT = "<script>alert(1)</script> and <img src=x onerror=alert(1)>"
STATIC = PROJECT_ROOT / "templates" / "static" / "turbo"
TEMPLATES = PROJECT_ROOT / "templates" / "web"


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def api_chat(client, token, **fields) -> dict:
    response = client.post("/chat/create", data={"name": unique_name("chat"), **fields}, headers=bearer(token))
    assert response.status_code == 200, response.text
    return response.json()


def api_group(client, token, name=None) -> dict:
    response = client.post("/group/create", data={"name": name or unique_name("group")}, headers=bearer(token))
    assert response.status_code == 200, response.text
    return response.json()


def create_chat_form(browser, **fields):
    browser.get("/")
    data = {"name": "", "model": "", "group_id": "", "system_prompt": "", "program": "", **fields}
    return post_form(browser, "/", data)


# --- the index --------------------------------------------------------------------------------------


def test_index_lists_my_chats_and_my_groups_chats_newest_first(client, person):
    token, user, browser = person()
    stranger_token, stranger, _ = person()
    group = api_group(client, token, "Team <b>")
    older = api_chat(client, token, name="older")
    in_group = api_chat(client, stranger_token, name="theirs in my group")
    client.post("/group/members/add", data={"id": group["id"], "user_ids": stranger["id"]}, headers=bearer(token))
    Chat.objects.filter(pk=in_group["id"]).update(group_id=group["id"])  # a group chat of another member
    newer = api_chat(client, token, name="newer & <i>bold</i>")
    hidden = api_chat(client, stranger_token, name="not mine")

    page = page_of(browser.get("/"))
    links = page.select("a.chat-link")
    assert [link.get("href") for link in links] == [f"/chats/{c['id']}" for c in (newer, in_group, older)]
    assert links[0].text == "newer & <i>bold</i>"  # shown as typed, never as markup
    assert not page.select("a.chat-link i")
    assert f"/chats/{hidden['id']}" not in browser.get("/").text
    groups = {link.text: link.get("href") for link in page.select("a.group-link")}
    assert groups == {"Personal": groups["Personal"], "Team <b>": f"/groups/{group['id']}"}


def test_the_new_chat_form_offers_models_groups_programs_and_tools(client, person):
    token, _, browser = person()
    group = api_group(client, token, "Team")
    form = page_of(browser.get("/")).select_one("form#chat-create-form")
    assert form.get("method") == "post" and form.get("action") == "/"
    models = form.select_one("select[name=model]")
    assert [o.get("value") for o in models.select("option[selected]")] == [settings.DEFAULT_MODEL]
    groups = form.select("select[name=group_id] option")
    assert groups[0].get("value") == "" and group["id"] in [o.get("value") for o in groups]
    programs = [o.get("value") for o in form.select("select[name=program] option")]
    assert programs[0] == "" and {"horoscope", "tutor"} <= set(programs)
    assert form.select("input[type=checkbox][name=tools]")
    assert form.select_one("input[name=name]") and form.select_one("textarea[name=system_prompt]")
    assert form.select_one("button#chat-create-submit")
    for field in form.select("input, select, textarea"):
        if field.get("type") not in ("hidden", "checkbox"):
            assert form.select(f"label[for={field.get('id')}]"), field
    group_form = page_of(browser.get("/")).select_one("form#group-create-form")
    assert group_form.select_one("input[name=name]") and group_form.select_one("button#group-create-submit")


def test_creating_a_one_to_one_chat(person):
    _, user, browser = person()
    response = create_chat_form(browser, name="Plans", model="gpt-4o", system_prompt="Be brief.", tools=["calculator"])
    assert response.status_code == 302
    chat = Chat.objects.get(owner_id=user["id"], name="Plans")
    assert response.headers["location"] == f"/chats/{chat.pk}"
    assert (chat.model, chat.group_id, chat.system_prompt, chat.tools) == ("gpt-4o", None, "Be brief.", ["calculator"])
    assert ChatMember.objects.filter(chat=chat, user_id=user["id"]).exists()
    page = page_of(browser.get(response.headers["location"]))
    assert page.select_one("h1#chat-title").text == "Plans"


def test_creating_a_group_chat_and_refusing_a_group_i_am_not_in(client, person):
    token, user, browser = person()
    stranger_token, _, _ = person()
    mine = api_group(client, token)
    theirs = api_group(client, stranger_token)

    response = create_chat_form(browser, name="Team talk", group_id=mine["id"])
    assert response.status_code == 302
    assert str(Chat.objects.get(name="Team talk").group_id) == mine["id"]

    response = create_chat_form(browser, name="Sneaky", group_id=theirs["id"])
    assert response.status_code == 200
    error = page_of(response).select_one("form#chat-create-form .form-error")
    assert error.get("role") == "alert" and "group not found" in error.text.lower()
    assert (
        page_of(response).select_one("#chat-create-form input[name=name]").get("value") == "Sneaky"
    )  # what was typed stays
    assert not Chat.objects.filter(name="Sneaky").exists()


# Live server: the form's sync view runs the opening turn through a nested async_to_sync, whose generation task
# (a fresh context) saves the reply through the loop's thread executor, in process the test's own thread, which
# is busy in that view: the save would wait for ever.
@pytest.mark.django_db(transaction=True)
def test_creating_a_chat_with_a_program_runs_its_opening_turn(person, upstream):
    _, user, browser = person()
    response = create_chat_form(browser, name="Stars", program="horoscope")
    assert response.status_code == 302, response.text
    chat = Chat.objects.get(owner_id=user["id"], name="Stars")
    assert chat.program == "horoscope"
    page = page_of(browser.get(f"/chats/{chat.pk}"))
    (opening,) = page.select("#messages article.message")
    assert opening.get("data-status") == "complete"
    assert not opening.select(".prompt")  # a program's message has no author and no prompt
    assert opening.select_one(".reply").text == "What do you want to know?"


@pytest.mark.parametrize(
    "fields, expected",
    [
        ({"name": ""}, "name"),
        ({"name": "x" * 201}, "name"),
        ({"name": "ok", "tools": ["no-such-tool"]}, "unknown tool"),
        ({"name": "ok", "program": "no-such-program"}, "no-such-program"),
        ({"name": "ok", "group_id": "not-a-uuid"}, "group"),
    ],
)
def test_a_bad_new_chat_form_creates_nothing(person, fields, expected):
    _, user, browser = person()
    response = create_chat_form(browser, **fields)
    assert response.status_code == 200
    assert expected in page_of(response).select_one("#chat-create-form .form-error").text.lower()
    assert not Chat.objects.filter(owner_id=user["id"]).exists()


def test_a_model_my_groups_may_not_use_is_a_form_error(person):
    _, user, browser = person()
    Group.objects.filter(memberships__user_id=user["id"]).update(allowed_models=["gpt-4o-mini"])
    response = create_chat_form(browser, name="Big", model="gpt-4o")
    assert response.status_code == 200
    assert "may not use the model" in page_of(response).select_one(".form-error").text
    assert not Chat.objects.filter(owner_id=user["id"]).exists()
    # Only the allowed model is offered.
    assert [o.get("value") for o in page_of(browser.get("/")).select("select[name=model] option")] == ["gpt-4o-mini"]


def test_the_index_reads_the_same_number_of_queries_for_2_or_20_chats(signup):
    token, user, _ = signup()
    http = Client()
    http.cookies["sess"] = token

    def queries() -> int:
        with CaptureQueriesContext(connection) as captured:
            assert http.get("/").status_code == 200
        return len(captured.captured_queries)

    for n in range(2):
        Chat.objects.create(owner_id=user["id"], name=f"chat {n}", model="gpt-4o-mini")
    queries()  # the session lookup is cached from here on
    few = queries()
    for n in range(2, 20):
        Chat.objects.create(owner_id=user["id"], name=f"chat {n}", model="gpt-4o-mini")
    assert queries() == few


# --- a chat's page ----------------------------------------------------------------------------------


def test_a_chat_page_shows_its_history_in_the_contract_shape(client, person, upstream):
    token, user, browser = person()
    friend_token, friend, _ = person()
    chat = api_chat(client, token, name="History")
    client.post("/chat/user/add", data={"chat_id": chat["id"], "user_id": friend["id"]}, headers=bearer(token))
    first = client.post("/chat/prompt", data={"id": chat["id"], "prompt": "echo: one two"}, headers=bearer(token))
    second = client.post("/chat/prompt", data={"id": chat["id"], "prompt": "echo: three"}, headers=bearer(friend_token))
    assert first.status_code == second.status_code == 200
    failed = Message.objects.create(
        chat_id=chat["id"], author_id=user["id"], prompt="and?", reply="partial", status="error", error="stopped"
    )

    response = browser.get(f"/chats/{chat['id']}")
    assert response.status_code == 200
    page = page_of(response)
    assert page.select_one("body").get("data-chat-id") == chat["id"]
    assert page.select_one("h1#chat-title").text == "History"
    log = page.select_one("div#messages")
    assert log.get("role") == "log" and log.get("aria-live") == "polite"
    articles = log.select("article.message")
    assert [a.get("data-message-id") for a in articles] == [
        first.json()["message"]["id"],
        second.json()["message"]["id"],
        str(failed.pk),
    ]
    assert [a.get("data-status") for a in articles] == ["complete", "complete", "error"]
    assert [a.select_one(".prompt .author").text for a in articles] == [
        user["username"],
        friend["username"],
        user["username"],
    ]
    assert articles[0].select_one(".reply").text == "one two"
    assert articles[0].select_one(".prompt").text.endswith("echo: one two")
    assert not articles[0].select(".error")
    assert articles[2].select_one("p.error").text == "stopped"
    assert articles[2].select_one(".reply").text == "partial"

    assert page.select_one("button#load-older").get("hidden") is not None  # nothing older
    form = page.select_one("form#prompt-form")
    assert form.select_one("textarea#prompt").get("name") == "prompt"
    assert form.select_one("label[for=prompt]")
    assert form.select_one("button#send").get("type") == "submit"
    stop = form.select_one("button#stop")
    assert stop.get("type") == "button" and stop.get("disabled") is not None
    assert page.select_one("#prompt-error").get("role") == "alert"
    assert page.select_one("span#connection").get("data-state") == "closed"
    assert json.loads(page.select_one("script#chat-users").text)[friend["id"]] == friend["username"]
    (script,) = page.select("script[src]")
    assert script.get("type") == "module" and browser.get(script.get("src")).status_code == 200


def test_html_in_prompts_and_replies_is_shown_as_text(client, person, upstream):
    token, _, browser = person()
    chat = api_chat(client, token, name="<script>alert('name')</script>")
    response = client.post(
        "/chat/prompt", data={"id": chat["id"], "prompt": f"echo: {XSS_PROMPT}"}, headers=bearer(token)
    )
    assert response.json()["message"]["reply"] == XSS_PROMPT

    html = browser.get(f"/chats/{chat['id']}").text
    assert "<script>alert" not in html and "<img src=x" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "&lt;img src=x onerror=alert(1)&gt;" in html
    page = page_of(browser.get(f"/chats/{chat['id']}"))
    (article,) = page.select("article.message")
    assert article.select_one(".reply").text == XSS_PROMPT  # what the user sees: the text, not markup
    assert article.select_one(".prompt-text").text == f"echo: {XSS_PROMPT}"
    assert page.select_one("h1#chat-title").text == "<script>alert('name')</script>"
    assert not page.select("img") and not page.select("#messages script")
    assert {s.get("src") or s.get("type") for s in page.select("script")} == {
        "application/json",
        "/static/turbo/chat.js",
    }


def test_a_chat_i_may_not_see_is_a_404_page(client, person):
    token, _, _ = person()
    _, _, stranger_browser = person()
    chat = api_chat(client, token)
    for path in (f"/chats/{chat['id']}", f"/chats/{uuid.uuid4()}"):
        response = stranger_browser.get(path)
        assert response.status_code == 404
        page = page_of(response)
        assert "not found" in page.select_one("main").text.lower()
        assert "History" not in response.text and chat["name"] not in response.text


def test_a_long_history_shows_the_latest_page_and_offers_older(client, person):
    token, user, browser = person()
    chat = api_chat(client, token)
    Message.objects.bulk_create(
        [Message(chat_id=chat["id"], author_id=user["id"], prompt=f"p{n}", reply=f"r{n}") for n in range(60)]
    )
    page = page_of(browser.get(f"/chats/{chat['id']}"))
    shown = [a.select_one(".reply").text for a in page.select("article.message")]
    newest = [m.reply for m in Message.objects.filter(chat_id=chat["id"]).order_by("-created_at", "-id")[:50]]
    assert shown == list(reversed(newest))
    assert page.select_one("button#load-older").get("hidden") is None


def test_the_chat_page_reads_the_same_number_of_queries_for_any_history(signup):
    token, user, _ = signup()
    http = Client()
    http.cookies["sess"] = token
    counts = []
    for size in (3, 120):
        chat = Chat.objects.create(owner_id=user["id"], name=f"c{size}", model="gpt-4o-mini")
        Message.objects.bulk_create(
            [Message(chat=chat, author_id=user["id"], prompt=f"p{n}", reply=f"r{n}") for n in range(size)]
        )
        assert http.get(f"/chats/{chat.pk}").status_code == 200  # the session lookup is cached from here on
        with CaptureQueriesContext(connection) as captured:
            assert http.get(f"/chats/{chat.pk}").status_code == 200
        counts.append(len(captured.captured_queries))
    assert counts[0] == counts[1]


# --- the page's own files ---------------------------------------------------------------------------


def test_pages_carry_no_inline_script_or_handlers_and_scripts_build_no_html():
    """A strict CSP (script-src 'self', no inline) works, and no script turns text into markup."""
    for template in TEMPLATES.glob("*.html"):
        text = template.read_text()
        assert not re.search(r"\son[a-z]+\s*=", text), template.name
        assert "<script>" not in text and "style=" not in text, template.name
        assert "|safe" not in text and "autoescape off" not in text, template.name
    for script in STATIC.glob("*.js"):
        text = script.read_text()
        for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
            assert sink not in text, f"{script.name} uses {sink}"


def test_group_members_outside_the_chat_are_named_too(client, person, upstream):
    """A group chat's messages name the group's members who wrote them, read in the same one query."""
    token, user, browser = person()
    friend_token, friend, _ = person()
    group = api_group(client, token)
    client.post("/group/members/add", data={"id": group["id"], "user_ids": friend["id"]}, headers=bearer(token))
    chat = api_chat(client, token, group_id=group["id"])
    assert GroupMember.objects.filter(group_id=group["id"], user_id=friend["id"]).exists()
    client.post("/chat/prompt", data={"id": chat["id"], "prompt": "echo: hi"}, headers=bearer(friend_token))
    page = page_of(browser.get(f"/chats/{chat['id']}"))
    assert page.select_one("article.message .author").text == friend["username"]


def test_static_files_exist_where_the_templates_say():
    for name in ("turbo.css", "chat.js", "markdown.js"):
        assert (STATIC / name).is_file()
    assert Path(settings.STATICFILES_DIRS[0]) == PROJECT_ROOT / "templates" / "static"


# --- /usage: my usage per day -----------------------------------------------------------------------

HTML = {"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}  # as a browser asks


def v1_calls(client, token: str, prompts: list[str]) -> None:
    for prompt in prompts:
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": prompt}]}
        response = client.post("/v1/chat/completions", json=body, headers=bearer(token))
        assert response.status_code == 200, response.text


def usage_rollups(user_id: str, calls: int) -> list:
    """The user's rollup rows once `calls` calls are in them (the records are written in batches)."""
    from proxy.events import events_flush
    from proxy.models import UsageRollup

    deadline = time.monotonic() + 10
    while True:
        events_flush()
        rows = list(UsageRollup.objects.filter(user_id=user_id))
        if sum(row.requests for row in rows) >= calls or time.monotonic() > deadline:
            return rows
        time.sleep(0.05)


def test_the_usage_page_shows_my_totals_and_a_bar_per_day(client, person, upstream):
    token, user, browser = person()
    other_token, _, _ = person()
    v1_calls(client, token, ["echo: one two three", "echo: four five", "echo: six"])
    v1_calls(client, other_token, ["echo: not mine at all"])
    rows = usage_rollups(user["id"], 3)
    requests = sum(row.requests for row in rows)
    cost = sum((row.cost_usd for row in rows), Decimal(0))
    assert requests == 3 and cost > 0

    response = browser.get("/usage", headers=HTML)
    assert response.status_code == 200 and response.headers["cache-control"] == "no-store"
    assert "Accept" in response.headers["vary"]
    page = page_of(response)
    totals = {dd.get("data-total"): dd.text for dd in page.select("#usage-totals dd")}
    assert totals == {
        "requests": "3",
        "input_tokens": str(sum(row.input_tokens for row in rows)),
        "output_tokens": str(sum(row.output_tokens for row in rows)),
        "cost_usd": format(cost.normalize(), "f"),  # exact decimal text
    }
    chart = page.select_one("svg#usage-chart")
    assert chart.get("role") == "img" and "30 days" in chart.get("aria-label")
    bars = chart.select("rect.bar")
    today = datetime.now(UTC).date()
    assert [bar.get("data-day") for bar in bars] == [str(today - timedelta(days=n)) for n in range(29, -1, -1)]
    assert bars[-1].get("data-cost") == format(cost.normalize(), "f")
    assert float(bars[-1].get("height")) > 100  # the highest day fills the chart
    assert {bar.get("data-cost") for bar in bars[:-1]} == {"0"} and {bar.get("height") for bar in bars[:-1]} == {"0.00"}
    table = page.select("table#usage-days tbody tr")
    assert len(table) == 30 and table[0].get("data-day") == str(today)  # the newest day first
    assert [cell.text for cell in table[0].select("td")] == [
        "3",
        totals["input_tokens"],
        totals["output_tokens"],
        totals["cost_usd"],
    ]
    assert page.select_one("header nav a[href=/usage]").get("aria-current") == "page"

    # Seven or ninety days; anything else is the default thirty.
    for days, expected in (("7", 7), ("90", 90), ("12", 30), ("x", 30)):
        page = page_of(browser.get(f"/usage?days={days}", headers=HTML))
        assert len(page.select("svg#usage-chart rect.bar")) == expected
        assert page.select_one("#usage-totals dd[data-total=requests]").text == "3"


def test_the_usage_page_reads_the_rollups_not_the_event_log(person):
    from proxy.models import Event, UsageRollup

    _, user, browser = person()
    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(days=2)
    UsageRollup.objects.create(
        hour=hour,
        model="gpt-4o",
        deployment="default",
        user_id=user["id"],
        requests=4,
        input_tokens=100,
        output_tokens=50,
        cost_usd=Decimal("0.0000125"),
    )
    Event.objects.create(type="proxy", user_id=user["id"], path="/v1/chat/completions", model="gpt-4o")
    page = page_of(browser.get("/usage?days=7", headers=HTML))
    assert page.select_one("#usage-totals dd[data-total=cost_usd]").text == "0.0000125"
    assert page.select_one("#usage-totals dd[data-total=requests]").text == "4"
    (bar,) = [bar for bar in page.select("rect.bar") if bar.get("data-cost") != "0"]
    assert bar.get("data-day") == str(hour.date())


def test_usage_is_still_the_apis_json_for_programs(client, person):
    token, _, browser = person()
    for headers in (bearer(token), {**bearer(token), **HTML}, {"Cookie": f"sess={browser.cookies['sess']}"}):
        response = client.get("/usage", headers=headers)
        assert response.status_code == 200 and response.headers["content-type"] == "application/json"
        assert response.json()["total"]["requests"] == 0
    assert client.get("/usage").status_code == 401  # no page redirect for a program
    assert client.get("/usage", headers=bearer(token), params={"since": "nonsense"}).status_code == 400


def test_signed_out_the_usage_page_is_a_redirect_to_login(browsers):
    response = browsers().get("/usage", headers=HTML)
    assert response.status_code == 302 and response.headers["location"] == "/login?next=%2Fusage"


def test_the_model_picker_offers_what_the_upstream_serves(person, upstream, settings):
    """Zero config: the chat models the upstream lists at /models (the default first), not the aliases."""
    settings.MODEL_ALIASES = {"gpt-3": "gpt-3.5-turbo"}
    _, _, browser = person()
    offered = [o.get("value") for o in page_of(browser.get("/")).select("select[name=model] option")]
    assert offered == ["gpt-4o-mini", "gpt-4o"]


def test_the_model_picker_offers_only_what_my_groups_allow_of_it(person, upstream):
    _, user, browser = person()
    Group.objects.filter(memberships__user_id=user["id"]).update(allowed_models=["gpt-4o", "gpt-5"])
    offered = [o.get("value") for o in page_of(browser.get("/")).select("select[name=model] option")]
    assert offered == ["gpt-4o"]  # gpt-5: allowed, but the upstream does not list it
