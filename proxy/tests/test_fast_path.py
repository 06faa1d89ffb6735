"""The proxy's two front doors: the raw ASGI hot path (API clients) and Django (browsers, cookies)."""

import base64

import pytest

from proxy.events import events_flush
from proxy.fast import takes
from proxy.models import Event

pytestmark = pytest.mark.django_db

COMPLETION = {"model": "gpt-4o", "messages": [{"role": "user", "content": "echo: same answer"}]}


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def scope(path="/v1/models", method="GET", headers=()):
    return {"type": "http", "path": path, "method": method, "headers": list(headers)}


def test_only_token_bearing_non_browser_calls_to_v1_take_the_hot_path():
    token = (b"authorization", b"Bearer abc")
    assert takes(scope(headers=[token]))
    assert takes(scope(headers=[(b"authorization", b"Basic OmFiYw==")]))
    assert not takes(scope(headers=[token, (b"origin", b"https://app.example.com")]))  # a browser: CORS
    assert not takes(scope(headers=[(b"cookie", b"sess=abc")]))  # cookies: Django's origin rules
    assert not takes(scope())  # no token: Django's 401
    assert not takes(scope(method="OPTIONS", headers=[token]))  # preflight
    assert not takes(scope(path="/user/session", headers=[token]))
    assert not takes(scope(path="/v1", headers=[token]))
    assert not takes({"type": "websocket", "path": "/v1/models", "headers": [token]})


def test_both_doors_give_the_same_answer_and_log_it(client, upstream, signup, settings):
    token, user, _ = signup()
    settings.CORS_ALLOWED_ORIGINS = ["https://app.example.com"]
    hot = client.post("/v1/chat/completions", json=COMPLETION, headers=bearer(token))
    browser = client.post(
        "/v1/chat/completions", json=COMPLETION, headers={**bearer(token), "Origin": "https://app.example.com"}
    )
    assert hot.status_code == browser.status_code == 200
    assert hot.json()["choices"] == browser.json()["choices"]
    assert "access-control-allow-origin" not in hot.headers
    assert browser.headers["access-control-allow-origin"] == "https://app.example.com"
    for response in (hot, browser):
        assert response.headers["x-content-type-options"] == "nosniff"
        assert float(response.headers["x-turbo-overhead-ms"]) >= 0
    events_flush()
    logged = Event.objects.filter(type="proxy", user_id=user["id"])
    assert logged.count() == 2
    assert {e.model for e in logged} == {"gpt-4o"} and all(e.total_tokens for e in logged)
    assert len(upstream.requests) == 2
    assert all(r.headers["authorization"] == "Bearer sk-server-side-key" for r in upstream.requests)


def test_token_as_basic_password(client, upstream, signup):
    token, _, _ = signup()
    basic = base64.b64encode(f"any:{token}".encode()).decode()
    assert client.get("/v1/models", headers={"Authorization": f"Basic {basic}"}).status_code == 200
    wrong = base64.b64encode(b"any:nope").decode()
    refused = client.get("/v1/models", headers={"Authorization": f"Basic {wrong}"})
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "unauthorized"
    assert len(upstream.requests) == 1


def test_revoked_token_is_refused_at_once(client, upstream, signup):
    token, _, _ = signup()
    assert client.get("/v1/models", headers=bearer(token)).status_code == 200
    assert client.post("/user/logout", headers=bearer(token)).status_code == 200
    assert client.get("/v1/models", headers=bearer(token)).status_code == 401


def test_unknown_host_is_refused(client, upstream, signup):
    token, _, _ = signup()
    response = client.get("/v1/models", headers={**bearer(token), "Host": "evil.example"})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "bad_request"
    assert upstream.requests == []


def test_chunked_body_over_the_limit_is_413(client, upstream, signup, settings):
    token, _, _ = signup()
    settings.PROXY_MAX_BODY_BYTES = 1000

    def body():
        for _ in range(4):
            yield b"x" * 500

    response = client.post("/v1/chat/completions", headers=bearer(token), content=body())
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "body_too_large"
    assert upstream.requests == []
    small = client.post("/v1/chat/completions", headers=bearer(token), content=iter([b'{"model": "gpt-4o-mini"}']))
    assert small.status_code != 413 and len(upstream.requests) == 1


def test_cookie_calls_keep_the_origin_rule(new_client, upstream, signup):
    token, _, _ = signup()
    with new_client(cookies={"sess": token}) as browser:
        assert browser.get("/v1/models").status_code == 200
        foreign = browser.post("/v1/chat/completions", json=COMPLETION, headers={"Origin": "https://evil.example"})
        assert foreign.status_code == 403
    assert len(upstream.requests) == 1
