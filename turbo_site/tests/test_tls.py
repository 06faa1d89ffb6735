"""Behind TLS, in production mode (DEBUG=0): every cookie of a secure request is Secure, HSTS and the HTTPS
redirect follow their settings, and only a trusted proxy's X-Forwarded-Proto makes a request secure.

Django's test client in process: `secure=True` is an https scheme (the ASGI scope's, with the async
client); the sync client's default peer, 127.0.0.1, stands for the reverse proxy."""

import json

import pytest
from django.contrib.auth import get_user_model
from django.test import AsyncClient, Client

from turbo_site.tests.test_settings import manage

HTTPS_FROM_PROXY = {"HTTP_X_FORWARDED_PROTO": "https"}
HSTS_YEAR = 31536000


@pytest.fixture
def production(settings):
    settings.DEBUG = False
    settings.TRUSTED_PROXIES = ["127.0.0.1"]
    settings.SECURE_HSTS_SECONDS = HSTS_YEAR
    settings.SECURE_HSTS_INCLUDE_SUBDOMAINS = True
    settings.SECURE_HSTS_PRELOAD = True
    return settings


def cookies_set(client: Client, **secure) -> dict:
    """Sign up (the `sess` cookie), open the login page (`csrftoken`) and sign in to the admin
    (`sessionid`); returns each cookie's morsel as it was set."""
    seen = {}
    page = client.get("/login", **secure)
    assert page.status_code == 200
    seen.update(page.cookies)
    signed = client.post("/user/signup", {"username": "tls-user", "password": "correct-horse"}, **secure)
    assert signed.status_code == 200, signed.content
    seen.update(signed.cookies)
    get_user_model().objects.create_superuser(username="tls-admin", password="correct-horse")
    admin = client.post("/admin/login/", {"username": "tls-admin", "password": "correct-horse"}, **secure)
    assert admin.status_code == 302, admin.content  # to the admin's index: signed in
    seen.update(admin.cookies)
    return seen


@pytest.mark.django_db
def test_every_cookie_is_secure_behind_a_trusted_proxys_https(production):
    client = Client()
    cookies = cookies_set(client, **HTTPS_FROM_PROXY)
    assert {"sess", "csrftoken", "sessionid"} <= set(cookies)
    assert {name: bool(cookie["secure"]) for name, cookie in cookies.items()} == dict.fromkeys(cookies, True)
    health = client.get("/health", **HTTPS_FROM_PROXY)
    assert health["Strict-Transport-Security"] == f"max-age={HSTS_YEAR}; includeSubDomains; preload"


@pytest.mark.django_db
def test_over_plain_http_cookies_are_not_secure_and_there_is_no_hsts(production):
    client = Client()
    cookies = cookies_set(client)
    assert {"sess", "csrftoken", "sessionid"} <= set(cookies)
    assert not any(cookie["secure"] for cookie in cookies.values())
    assert "Strict-Transport-Security" not in client.get("/login")


@pytest.mark.django_db
def test_x_forwarded_proto_from_anyone_else_is_not_believed(production):
    production.TRUSTED_PROXIES = ["10.0.0.1"]  # not the caller
    production.SECURE_SSL_REDIRECT = True
    client = Client()
    page = client.get("/login", **HTTPS_FROM_PROXY)
    assert page.status_code == 301 and page["Location"] == "https://testserver/login"  # the redirect is not dodged
    signed = client.post(
        "/user/signup", {"username": "tls-spoof", "password": "correct-horse"}, secure=True, **HTTPS_FROM_PROXY
    )
    assert signed.status_code == 200  # really over https, the header is not needed
    spoofed = client.post("/user/login", {"username": "tls-spoof", "password": "correct-horse"}, **HTTPS_FROM_PROXY)
    assert spoofed.status_code == 301  # a plain-HTTP login calling itself secure is sent to https


@pytest.mark.django_db
def test_ssl_redirect_sends_plain_http_to_https_except_probes(production):
    production.SECURE_SSL_REDIRECT = True
    client = Client()
    page = client.get("/login?next=/chats")
    assert page.status_code == 301 and page["Location"] == "https://testserver/login?next=/chats"
    assert client.get("/health").status_code == 200  # SECURE_REDIRECT_EXEMPT: probes stay on plain HTTP
    assert client.get("/login", **HTTPS_FROM_PROXY).status_code == 200
    assert client.get("/login", secure=True).status_code == 200


async def test_an_https_asgi_scope_is_secure(production):
    client = AsyncClient()
    page = await client.get("/login", secure=True)
    assert page.status_code == 200
    assert page.cookies["csrftoken"]["secure"] is True
    assert page["Strict-Transport-Security"].startswith(f"max-age={HSTS_YEAR}")
    plain = await AsyncClient().get("/login")
    assert not plain.cookies["csrftoken"]["secure"] and "Strict-Transport-Security" not in plain


def test_the_tls_settings_come_from_the_environment():
    names = [
        "SECURE_SSL_REDIRECT",
        "SECURE_REDIRECT_EXEMPT",
        "SECURE_HSTS_SECONDS",
        "SECURE_HSTS_INCLUDE_SUBDOMAINS",
        "SECURE_HSTS_PRELOAD",
        "SECURE_REFERRER_POLICY",
        "SECURE_CROSS_ORIGIN_OPENER_POLICY",
    ]
    script = (
        f"import json; from django.conf import settings as s; print(json.dumps({{n: getattr(s, n) for n in {names}}}))"
    )
    defaults = manage("shell", "-c", script, DEBUG="1")
    assert defaults.returncode == 0, defaults.stderr
    assert json.loads(defaults.stdout.splitlines()[-1]) == {
        "SECURE_SSL_REDIRECT": False,
        "SECURE_REDIRECT_EXEMPT": ["^health$", "^metrics$"],
        "SECURE_HSTS_SECONDS": 0,
        "SECURE_HSTS_INCLUDE_SUBDOMAINS": False,
        "SECURE_HSTS_PRELOAD": False,
        "SECURE_REFERRER_POLICY": "same-origin",
        "SECURE_CROSS_ORIGIN_OPENER_POLICY": "same-origin",
    }
    given = manage(
        "shell",
        "-c",
        script,
        DEBUG="0",
        SECRET_KEY="a-key-for-this-test-only-" + "x" * 40,
        SECURE_SSL_REDIRECT="1",
        SECURE_REDIRECT_EXEMPT="^health$",
        SECURE_HSTS_SECONDS="600",
        SECURE_HSTS_INCLUDE_SUBDOMAINS="1",
        SECURE_HSTS_PRELOAD="1",
        SECURE_REFERRER_POLICY="no-referrer",
        SECURE_CROSS_ORIGIN_OPENER_POLICY="",
    )
    assert given.returncode == 0, given.stderr
    assert json.loads(given.stdout.splitlines()[-1]) == {
        "SECURE_SSL_REDIRECT": True,
        "SECURE_REDIRECT_EXEMPT": ["^health$"],
        "SECURE_HSTS_SECONDS": 600,
        "SECURE_HSTS_INCLUDE_SUBDOMAINS": True,
        "SECURE_HSTS_PRELOAD": True,
        "SECURE_REFERRER_POLICY": "no-referrer",
        "SECURE_CROSS_ORIGIN_OPENER_POLICY": None,
    }


@pytest.mark.django_db
def test_the_v1_fast_path_sends_hsts_and_the_referrer_policy_as_django_does(production, upstream):
    """An API client's /v1 call skips Django's middleware (proxy.fast): the same security headers all the same."""
    import httpx

    from proxy.fast import takes
    from testing.inprocess import InProcessTransport

    production.SECURE_REFERRER_POLICY = "no-referrer"

    def client(scheme: str) -> httpx.Client:
        """Turbo's whole ASGI app in process, over http or https (the ASGI scope's scheme), from 127.0.0.1."""
        return httpx.Client(transport=InProcessTransport(), base_url=f"{scheme}://127.0.0.1")

    with client("http") as http:
        signed = http.post("/user/signup", data={"username": "tls-fast", "password": "correct-horse"})
        bearer = {"Authorization": f"Bearer {signed.json()['token']}"}
        plain = http.get("/v1/models", headers=bearer)
        proxied = http.get("/v1/models", headers={**bearer, "X-Forwarded-Proto": "https"})
        refused = http.get("/v1/nowhere", headers={**bearer, "X-Forwarded-Proto": "https"})
        production.TRUSTED_PROXIES = ["10.0.0.1"]  # the caller is no longer the trusted proxy
        spoofed = http.get("/v1/models", headers={**bearer, "X-Forwarded-Proto": "https"})
    with client("https") as http:
        direct = http.get("/v1/models", headers=bearer)
    assert takes({"type": "http", "path": "/v1/models", "method": "GET", "headers": [(b"authorization", b"Bearer x")]})
    assert [response.status_code for response in (plain, proxied, refused, spoofed, direct)] == [
        200,
        200,
        403,
        200,
        200,
    ]
    hsts = f"max-age={HSTS_YEAR}; includeSubDomains; preload"
    assert [response.headers.get("strict-transport-security") for response in (proxied, refused, direct)] == [hsts] * 3
    assert "strict-transport-security" not in plain.headers and "strict-transport-security" not in spoofed.headers
    for response in (plain, proxied, refused, spoofed, direct):
        assert response.headers["referrer-policy"] == "no-referrer"
        assert response.headers["x-content-type-options"] == "nosniff"
