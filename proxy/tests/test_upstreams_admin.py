"""The admin's read-only "Upstream health" page over HTTP (Turbo's whole ASGI app, in process): what the server
knows of each deployment (in this process, or shared through Redis on that leg), for staff only, never a key."""

import textwrap
import time
import uuid

import pytest

from accounts.models import User
from accounts.tests.test_admin import log_in
from conftest import unique_name
from proxy.gateway import health
from testing.fake_upstream import FakeUpstream

pytestmark = pytest.mark.django_db

PAGE = "/admin/proxy/upstreamhealth/"
PASSWORD = "staff-pass-123"
GOOD_KEY = "sk-good-upstream-key-0123456789"
BAD_KEY = "sk-bad-upstream-key-9876543210"


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


@pytest.fixture
def fakes():
    started = {name: FakeUpstream().start() for name in ("good", "bad")}
    yield started
    for fake in started.values():
        fake.stop()


@pytest.fixture
def gateway(settings, tmp_path, fakes):
    """The server pointed at two upstreams of this test's own: `bad` (tried first) and `good`."""
    suffix = uuid.uuid4().hex[:6]  # health in a shared Redis is keyed by deployment id
    names = {"good": f"good-{suffix}", "bad": f"bad-{suffix}"}
    path = tmp_path / "turbo.yaml"
    path.write_text(
        textwrap.dedent(f"""
            upstreams:
              - {{name: {names["bad"]}, base_url: {fakes["bad"].url}/v1, api_key: {BAD_KEY}}}
              - {{name: {names["good"]}, base_url: {fakes["good"].url}/v1, api_key: {GOOD_KEY}}}
            models:
              - name: m
                deployments:
                  - {{upstream: {names["bad"]}, model: gpt-4o-mini}}
                  - {{upstream: {names["good"]}, model: gpt-4o-mini, priority: 1, weight: 2.5}}
            """)
    )
    health.forget()
    settings.TURBO_CONFIG = str(path)
    settings.GATEWAY_HEALTH_SYNC_SECONDS = 0
    yield names
    health.forget()


def row_of(html: str, deployment: str) -> str:
    start = html.index(f'<th scope="row">{deployment}</th>')
    return html[html.rindex("<tr", 0, start) : html.index("</tr>", start)]


def test_staff_see_each_deployment_and_the_one_cooling_down(staff, client, signup, fakes, gateway):
    fakes["bad"].forced_scenario = "error_500"
    token = signup()[0]
    body = {"model": "m", "messages": [{"role": "user", "content": "echo: hi"}]}
    response = client.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200  # the bad deployment failed, the good one answered
    assert response.headers["x-turbo-upstream"] == f"{gateway['good']}/gpt-4o-mini"

    page = staff.get(PAGE)
    assert page.status_code == 200
    assert "<h1>Upstream health</h1>" in page.text
    cooling = row_of(page.text, f"{gateway['bad']}/gpt-4o-mini")
    assert 'class="deployment-cooling"' in cooling and "cooling until " in cooling
    assert "<td>1</td>" in cooling and "the upstream answered 500" in cooling
    assert f"{fakes['bad'].url}/v1" in cooling
    healthy = row_of(page.text, f"{gateway['good']}/gpt-4o-mini")
    assert 'class="deployment-healthy"' in healthy and "<td>2.5</td>" in healthy
    assert GOOD_KEY not in page.text and BAD_KEY not in page.text


def test_the_page_is_listed_under_the_proxy_app_and_offers_no_add_change_or_delete(staff, gateway):
    index = staff.get("/admin/")
    assert index.status_code == 200
    proxy_app = index.text[index.text.index("Proxy and event log") :]
    assert f'<a href="{PAGE}">Upstream health</a>' in proxy_app
    assert f"{PAGE}add/" not in index.text
    assert staff.get("/admin/proxy/").status_code == 200
    for path in ("add/", "1/change/", "1/delete/", "1/history/"):
        assert staff.get(PAGE + path).status_code == 404, path
    page = staff.get(PAGE)
    assert page.status_code == 200
    assert "addlink" not in page.text and "<form" not in page.text.split('id="content-main"')[1]


def test_without_a_config_file_it_shows_the_one_default_upstream(staff, upstream, settings):
    settings.TURBO_CONFIG = None
    health.forget()
    page = staff.get(PAGE)
    assert page.status_code == 200
    row = row_of(page.text, "default")
    assert f"{upstream.url}/v1" in row and "healthy" in row
    assert settings.OPENAI_API_KEY not in page.text


def test_anyone_but_staff_is_sent_to_the_login(browser, signup, gateway):
    response = browser.get(PAGE)
    assert response.status_code == 302
    assert response.headers["location"] == f"/admin/login/?next={PAGE}"

    _, user, password = signup()  # a Turbo user, not staff: the admin refuses the login
    refused = log_in(browser, user["username"], password)
    assert refused.status_code == 200
    response = browser.get(PAGE)
    assert response.status_code == 302
    assert response.headers["location"].startswith("/admin/login/")


def test_after_its_cooldown_a_deployment_shows_as_probing_until_a_request_succeeds(
    staff, client, signup, fakes, gateway, settings, tmp_path
):
    path = tmp_path / "short.yaml"
    path.write_text(
        f"upstreams: [{{name: {gateway['bad']}, base_url: '{fakes['bad'].url}/v1', api_key: {BAD_KEY}}}]\n"
        f"models: [{{name: m, cooldown_seconds: 0.3, deployments: [{{upstream: {gateway['bad']}}}]}}]\n"
    )
    settings.TURBO_CONFIG = str(path)
    token = signup()[0]
    body = {"model": "m", "messages": [{"role": "user", "content": "echo: hi"}]}
    fakes["bad"].forced_scenario = "error_500"
    assert (
        client.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {token}"}).status_code == 500
    )
    deployment = f"{gateway['bad']}/*"
    assert "cooling until " in row_of(staff.get(PAGE).text, deployment)

    time.sleep(0.5)
    assert 'class="deployment-probing"' in row_of(staff.get(PAGE).text, deployment)

    fakes["bad"].forced_scenario = None
    assert (
        client.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {token}"}).status_code == 200
    )
    assert 'class="deployment-healthy"' in row_of(staff.get(PAGE).text, deployment)
