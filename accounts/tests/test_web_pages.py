"""The web app's sign-in pages through Turbo's whole ASGI app (in process: testing/inprocess.py), with cookies
and CSRF as a browser has them.

/signup and /login start the same session (and set the same `sess` cookie) as the API's /user/login;
/logout revokes it; wrong credentials and a missing CSRF token change nothing. And /keys, where a user
makes (the key shown once, in that response only) and revokes API keys.
"""

from decimal import Decimal

import httpx
import pytest
from django.conf import settings

from accounts.models import ApiKey, Session, User
from accounts.tokens import token_hash
from conftest import unique_name
from groups.models import Group, GroupMember
from proxy.events import events_flush
from proxy.models import Budget, Event
from testing.pages import (
    PASSWORD,
    log_in,
    page_of,
    post_form,
    sign_up,
)

pytestmark = pytest.mark.django_db
pytest_plugins = ["testing.pages"]  # the browsers fixture


@pytest.fixture
def browser(browsers):
    return browsers()


def session_cookie(response: httpx.Response) -> str:
    cookies = [value for value in response.headers.get_list("set-cookie") if value.startswith("sess=")]
    assert len(cookies) == 1, response.headers
    return cookies[0]


def test_login_and_signup_pages_have_the_forms(browser):
    login = page_of(browser.get("/login"))
    form = login.select_one("form#login-form")
    assert form.get("method") == "post"
    assert {field.get("name") for field in form.select("input")} >= {"username", "password", "csrfmiddlewaretoken"}
    assert login.select_one("button#login-submit").get("type") == "submit"
    for field in form.select("input[name=username], input[name=password]"):
        assert login.select_one(f"label[for={field.get('id')}]").text.strip()
    assert login.select_one("main#main") and login.select_one("header a[href=/]")
    assert not login.select("#logout-form")  # signed out: no logout button

    signup = page_of(browser.get("/signup"))
    assert {field.get("name") for field in signup.select("form#signup-form input")} >= {"username", "password"}
    assert signup.select_one("button#signup-submit")


def test_signup_signs_in_with_the_api_session_and_cookie(browser, client):
    username = sign_up(browser)
    user = User.objects.get(username=username)
    assert GroupMember.objects.filter(user=user, group__name="Personal").exists()  # signup's first group
    session = Session.objects.get(user=user)
    assert session.kind == "token" and session.revoked_at is None

    index = page_of(browser.get("/"))
    assert index.select_one("form#logout-form").get("action") == "/logout"
    assert index.select_one("#logout-form button#logout")
    assert username in index.select_one("header").text

    # The cookie is the API's: it signs /user/session in too.
    token = browser.cookies["sess"]
    assert client.get("/user/session", headers={"Cookie": f"sess={token}"}).json()["user"]["username"] == username


def test_login_sets_the_cookie_like_the_api_and_logout_revokes_it(browser, client, signup):
    _, user, password = signup()
    response = log_in(browser, user["username"], password)
    assert response.status_code == 302 and response.headers["location"] == "/"
    cookie = session_cookie(response).lower()
    assert "httponly" in cookie and "samesite=lax" in cookie and "path=/" in cookie
    assert f"max-age={int(settings.SESSION_TTL.total_seconds())}" in cookie
    token = browser.cookies["sess"]
    session = Session.objects.filter(user_id=user["id"], revoked_at__isnull=True).order_by("-created_at").first()
    assert session.kind == "token"
    assert browser.get("/").status_code == 200

    response = post_form(browser, "/logout", {}, referer="/")
    assert response.status_code == 302 and response.headers["location"] == "/login"
    assert "sess" not in browser.cookies
    session.refresh_from_db()
    assert session.revoked_at is not None
    assert client.get("/user/session", headers={"Cookie": f"sess={token}"}).status_code == 401
    assert browser.get("/").headers["location"] == "/login"


def test_wrong_password_shows_an_error_and_starts_no_session(browser, signup):
    _, user, _ = signup()
    sessions = Session.objects.filter(user_id=user["id"]).count()
    response = log_in(browser, user["username"], "not-the-password")
    assert response.status_code == 200
    error = page_of(response).select_one("form#login-form .form-error")
    assert error.get("role") == "alert"
    assert "invalid username or password" in error.text.lower()
    assert page_of(response).select_one("input[name=username]").get("value") == user["username"]
    assert "sess" not in browser.cookies
    assert Session.objects.filter(user_id=user["id"]).count() == sessions
    assert browser.get("/").headers["location"] == "/login"
    events_flush()
    assert Event.objects.filter(type="login_failed", path="/login").exists()


def test_unknown_user_and_empty_fields_are_form_errors(browser):
    for data in ({"username": unique_name(), "password": PASSWORD}, {"username": "", "password": ""}):
        browser.get("/login")
        response = post_form(browser, "/login", data)
        assert response.status_code == 200
        assert page_of(response).select_one(".form-error").text.strip()
        assert "sess" not in browser.cookies


def test_signup_errors_create_nothing(browser, signup):
    _, taken, _ = signup()
    cases = [
        ({"username": taken["username"], "password": PASSWORD}, "already taken"),
        ({"username": unique_name(), "password": "abc"}, "password"),
        ({"username": "", "password": PASSWORD}, "username"),
        ({"username": "has spaces and <b>", "password": PASSWORD}, "valid username"),
    ]
    users = User.objects.count()
    for data, expected in cases:
        browser.get("/signup")
        response = post_form(browser, "/signup", data)
        assert response.status_code == 200
        page = page_of(response)
        assert expected in page.select_one("form#signup-form .form-error").text.lower()
        assert "<b>" not in response.text  # what was typed is shown escaped
        assert "sess" not in browser.cookies
    assert User.objects.count() == users


def test_signed_out_pages_redirect_to_login_and_back(browser, signup):
    assert browser.get("/").status_code == 302
    assert browser.get("/").headers["location"] == "/login"
    response = browser.get("/groups/new")
    assert response.status_code == 302 and response.headers["location"] == "/login?next=%2Fgroups%2Fnew"

    _, user, password = signup()
    response = log_in(browser, user["username"], password, next="/groups/new")
    assert response.headers["location"] == "/groups/new"
    assert browser.get("/groups/new").status_code == 200


@pytest.mark.parametrize("next_url", ["https://evil.example/", "//evil.example/x", "/\\evil.example", "javascript:x"])
def test_login_never_redirects_off_site(browser, signup, next_url):
    _, user, password = signup()
    response = log_in(browser, user["username"], password, next=next_url)
    assert response.status_code == 302 and response.headers["location"] == "/"


def test_a_revoked_cookie_is_a_redirect_that_clears_it(browser, client):
    sign_up(browser)
    token = browser.cookies["sess"]
    assert client.post("/user/logout", data={"token": token}).status_code == 200
    response = browser.get("/")
    assert response.status_code == 302 and response.headers["location"] == "/login"
    assert "sess" not in browser.cookies


def test_forms_without_the_csrf_token_are_refused_with_a_page(browser, signup):
    _, user, password = signup()
    browser.get("/login")
    response = browser.post("/login", data={"username": user["username"], "password": password})
    assert response.status_code == 403
    assert page_of(response).select_one("h1").text.strip()  # a page, not the API's JSON
    assert "sess" not in browser.cookies

    assert log_in(browser, user["username"], password).status_code == 302
    token = browser.cookies["sess"]
    response = browser.post("/logout")  # the session cookie alone does not sign a browser out
    assert response.status_code == 403
    assert Session.objects.get(token_hash=token_hash(token)).revoked_at is None
    assert browser.get("/").status_code == 200


def test_pages_are_html_with_a_strict_policy_and_their_static_files_load(browser):
    assert not settings.DEBUG  # the test server runs as production does
    sign_up(browser)
    response = browser.get("/")
    assert response.headers["content-type"].startswith("text/html")
    policy = response.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "'unsafe-inline'" not in policy
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["x-frame-options"] == "DENY"
    page = page_of(response)
    for link in page.select("link[rel=stylesheet]"):
        assert browser.get(link.get("href")).status_code == 200
    css = browser.get("/static/turbo/turbo.css")
    assert css.status_code == 200 and "prefers-color-scheme: dark" in css.text
    for name in ("chat.js", "markdown.js"):
        script = browser.get(f"/static/turbo/{name}")
        assert script.status_code == 200 and "javascript" in script.headers["content-type"]


# --- /keys: my API keys -----------------------------------------------------------------------------------


def key_form(browser: httpx.Client, **fields) -> httpx.Response:
    browser.get("/keys")
    data = {"intent": "create", "name": "", "expires_at": "", "budget_usd": "", "budget_period": "month", **fields}
    return post_form(browser, "/keys", data)


def key_rows(browser: httpx.Client) -> dict:
    """The rows of my keys on /keys, by prefix."""
    return {row.get("data-prefix"): row for row in page_of(browser.get("/keys")).select("table#keys tr.key")}


def test_the_keys_page_has_the_create_form_and_the_nav_links(browser):
    sign_up(browser)
    page = page_of(browser.get("/keys"))
    assert page.select_one("header nav a[href=/keys]") and page.select_one("header nav a[href=/usage]")
    assert page_of(browser.get("/")).select_one("header a[href=/keys]")
    form = page.select_one("form#key-create-form")
    assert form.get("method") == "post" and form.get("action") == "/keys"
    assert form.select_one("input[name=csrfmiddlewaretoken]")
    assert form.select_one("input[name=expires_at]").get("type") == "datetime-local"
    models = [box.get("value") for box in form.select("input[type=checkbox][name=models]")]
    assert settings.DEFAULT_MODEL in models
    assert [o.get("value") for o in form.select("select[name=budget_period] option")] == [
        "day",
        "week",
        "month",
        "total",
    ]
    assert form.select_one("input[name=budget_usd]") and form.select_one("button#key-create-submit")
    for field in form.select("input, select"):
        if field.get("type") not in ("hidden", "checkbox"):
            assert form.select(f"label[for={field.get('id')}]"), field
    assert not page.select("#new-key") and not page.select("table#keys")  # no keys yet
    assert browser.get("/keys").headers["cache-control"] == "no-store"


def test_a_key_made_on_the_page_is_shown_once_then_listed_without_it(browser, client, upstream):
    username = sign_up(browser)
    response = key_form(
        browser,
        name="nightly <export>",
        expires_at="2099-12-31T23:30",
        models=["gpt-4o-mini"],
        budget_usd="2.50",
        budget_period="week",
    )
    assert response.status_code == 200, response.text  # the key is in this page: never a redirect
    assert response.headers["cache-control"] == "no-store"
    page = page_of(response)
    key = page.select_one("code#new-key").text
    assert key.startswith("tk-") and len(key) > 40
    assert page.select_one("button#copy-key").get("type") == "button"
    assert "will not be shown again" in page.select_one("main").text
    (script,) = page.select("script[src]")
    assert browser.get(script.get("src")).status_code == 200

    api_key = ApiKey.objects.get(user__username=username)
    assert api_key.key_hash == token_hash(key) and api_key.name == "nightly <export>"
    assert api_key.models == ["gpt-4o-mini"]
    assert api_key.expires_at.isoformat() == "2099-12-31T23:30:00+00:00"
    assert (api_key.budget.limit_usd, api_key.budget.period) == (Decimal("2.5"), "week")
    (row,) = page.select("table#keys tr.key")
    assert row.get("data-prefix") == api_key.prefix and key.startswith(api_key.prefix)

    # The key works on /v1, and is never shown again.
    assert client.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    later = browser.get("/keys")
    assert key not in later.text and not page_of(later).select("#new-key")
    row = key_rows(browser)[api_key.prefix]
    assert row.select_one(".key-name").text == "nightly <export>"  # shown as typed, never as markup
    assert "gpt-4o-mini" in row.select_one(".key-models").text
    assert "2.5 USD a week" in row.select_one(".key-budget").text
    assert "2099-12-31 23:30" in row.text
    assert row.select_one("form input[name=csrfmiddlewaretoken]")
    assert row.select_one("button.revoke-key").get("type") == "submit"
    assert key not in browser.get("/").text
    events_flush()
    logged = Event.objects.filter(path="/keys")
    assert logged.exists()
    assert not [event for event in logged.values() if key in str(event)]  # nor in the event log


def test_revoking_a_key_on_the_page(browser, client, upstream):
    sign_up(browser)
    key = page_of(key_form(browser, name="to revoke")).select_one("#new-key").text
    kept = page_of(key_form(browser, name="kept")).select_one("#new-key").text
    api_key = ApiKey.objects.get(key_hash=token_hash(key))
    response = post_form(browser, "/keys", {"intent": "revoke", "id": str(api_key.pk)})
    assert response.status_code == 302 and response.headers["location"] == "/keys"
    api_key.refresh_from_db()
    assert api_key.revoked_at is not None
    assert set(key_rows(browser)) == {kept[:12]}
    assert client.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 401
    assert client.get("/v1/models", headers={"Authorization": f"Bearer {kept}"}).status_code == 200


def test_another_users_key_cannot_be_revoked(browsers):
    owner, stranger = browsers(), browsers()
    sign_up(owner)
    sign_up(stranger)
    page_of(key_form(owner, name="mine"))
    api_key = ApiKey.objects.get(name="mine")
    stranger.get("/keys")
    response = post_form(stranger, "/keys", {"intent": "revoke", "id": str(api_key.pk)})
    assert response.status_code == 404
    assert "not found" in page_of(response).select_one("main").text.lower()
    api_key.refresh_from_db()
    assert api_key.revoked_at is None
    assert set(key_rows(owner)) == {api_key.prefix}


@pytest.mark.parametrize(
    "fields, expected",
    [
        ({"name": ""}, "name"),
        ({"name": "   "}, "name"),
        ({"name": "x" * 101}, "name"),
        ({"name": "ok", "budget_usd": "-1"}, "budget"),
        ({"name": "ok", "budget_usd": "lots"}, "budget"),
        ({"name": "ok", "budget_period": "fortnight"}, "budget period"),
        ({"name": "ok", "expires_at": "2001-01-01T00:00"}, "future"),
        ({"name": "ok", "expires_at": "soon"}, "expires at"),
        ({"name": "ok", "models": ["no-such-model-" + "x" * 100]}, "models"),
    ],
)
def test_a_bad_key_form_stores_nothing(browser, fields, expected):
    username = sign_up(browser)
    response = key_form(browser, **fields)
    assert response.status_code == 200
    page = page_of(response)
    error = page.select_one("form#key-create-form .form-error")
    assert error.get("role") == "alert" and expected in error.text.lower(), error.text
    assert not page.select("#new-key")
    assert not ApiKey.objects.filter(user__username=username).exists()
    assert not Budget.objects.filter(scope="key").exists()
    if fields["name"].strip():
        assert page.select_one("form#key-create-form input[name=name]").get("value") == fields["name"]


def test_a_model_my_groups_may_not_use_is_a_key_form_error(browser):
    username = sign_up(browser)
    Group.objects.filter(memberships__user__username=username).update(allowed_models=["gpt-4o-mini"])
    response = key_form(browser, name="big", models=["gpt-4o"])
    assert "may not use the model" in page_of(response).select_one(".form-error").text
    assert not ApiKey.objects.filter(user__username=username).exists()
    offered = [box.get("value") for box in page_of(browser.get("/keys")).select("input[name=models]")]
    assert offered == ["gpt-4o-mini"]


def test_the_keys_and_usage_pages_need_signing_in(browser):
    response = browser.get("/keys")
    assert response.status_code == 302 and response.headers["location"] == "/login?next=%2Fkeys"
    response = browser.get("/usage", headers={"Accept": "text/html"})
    assert response.status_code == 302 and response.headers["location"] == "/login?next=%2Fusage"
    browser.get("/login")
    response = post_form(browser, "/keys", {"intent": "create", "name": "x"})
    assert response.status_code == 302 and response.headers["location"] == "/login"
    assert not ApiKey.objects.filter(name="x").exists()
