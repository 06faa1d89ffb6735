"""Account events and authenticated requests land in the event log, off the request path."""

import pytest

from conftest import unique_name
from proxy.events import events_flush, events_prune
from proxy.models import Event

pytestmark = pytest.mark.django_db


def events_of(user_id=None, **filters):
    events_flush()
    found = Event.objects.filter(**filters)
    if user_id is not None:
        found = found.filter(user_id=user_id)
    return list(found.order_by("created_at"))


def test_signup_login_logout_and_requests_are_events(client, signup):
    token, user, password = signup()
    client.post("/user/login", data={"username": user["username"], "password": password})
    client.get("/user/session", headers={"Authorization": f"Bearer {token}"}, params={"x": "1"})
    client.post(
        "/user/password/update",
        data={"old_password": password, "new_password": "another-pass"},
        headers={"Authorization": f"Bearer {token}"},
    )
    client.post("/user/logout", headers={"Authorization": f"Bearer {token}"})
    types = [event.type for event in events_of(user["id"])]
    assert types == ["signup", "login", "request", "password_change", "logout"]
    request = events_of(user["id"], type="request")[0]
    assert (request.method, request.path, request.query, request.status) == ("GET", "/user/session", "x=1", 200)
    assert request.client_ip == "127.0.0.1"
    assert request.duration_ms > 0


def test_failed_login_is_an_event_without_bodies(client, signup):
    _, user, _ = signup()
    client.post("/user/login", data={"username": user["username"], "password": "wrong-password"})
    failed = events_of(type="login_failed")
    assert len(failed) == 1
    assert failed[0].status == 401
    assert failed[0].request_body == ""


def test_unauthenticated_requests_are_not_logged(client):
    client.get("/user/session")
    client.get("/no/such/page")
    assert events_of() == []


def test_requests_write_nothing_until_the_batch_is_flushed(client, signup, paused_event_writer):
    token, user, _ = signup()
    from proxy.events import _queue

    before = Event.objects.filter(user_id=user["id"]).count()
    client.get("/user/session", headers={"Authorization": f"Bearer {token}"})
    assert any(str(e["user_id"]) == user["id"] and e["path"] == "/user/session" for e in _queue)
    assert Event.objects.filter(user_id=user["id"], path="/user/session").count() == 0
    assert before <= 1
    assert [e.path for e in events_of(user["id"], type="request")] == ["/user/session"]


def test_bodies_are_captured_redacted_and_truncated_when_enabled(client, settings):
    settings.EVENT_CAPTURE_BODIES = True
    settings.EVENT_BODY_MAX_BYTES = 200
    name = unique_name()
    response = client.post(
        "/user/signup", json={"username": name, "password": "hunter2-secret", "last_name": "L" * 150}
    )
    token = response.json()["token"]
    (event,) = events_of(type="signup")
    assert name in event.request_body
    assert "hunter2-secret" not in event.request_body
    assert "[redacted]" in event.request_body
    assert token not in event.response_body
    assert len(event.request_body) <= 200 + len("…[truncated]")


def test_prune_deletes_only_old_events(signup, client):
    from datetime import timedelta

    from django.utils import timezone

    token, user, _ = signup()
    events_flush()
    Event.objects.create(type="request", path="/old", created_at=timezone.now() - timedelta(days=100))
    assert events_prune(days=90) == 1
    assert not Event.objects.filter(path="/old").exists()
    assert Event.objects.filter(type="signup", user_id=user["id"]).exists()


def test_prune_command(capsys):
    from datetime import timedelta

    from django.core.management import call_command
    from django.utils import timezone

    Event.objects.create(type="request", path="/old", created_at=timezone.now() - timedelta(days=10))
    call_command("events", "prune", "--days", "5")
    assert "deleted 1 events" in capsys.readouterr().out


def test_forwarded_for_is_believed_only_from_trusted_proxies(client, signup, settings):
    token, user, _ = signup()
    headers = {"Authorization": f"Bearer {token}", "X-Forwarded-For": "203.0.113.9, 198.51.100.7"}
    client.get("/user/session", headers=headers, params={"n": "untrusted"})
    settings.TRUSTED_PROXIES = ["127.0.0.1", "198.51.100.7"]
    client.get("/user/session", headers=headers, params={"n": "trusted"})
    by_query = {e.query: e.client_ip for e in events_of(user["id"], type="request")}
    assert by_query == {"n=untrusted": "127.0.0.1", "n=trusted": "203.0.113.9"}


def test_flushed_events_keep_every_field(signup, paused_event_writer):
    from proxy.events import event_record

    _, user, _ = signup()
    events_flush()
    recorded = [
        event_record(
            type="proxy",
            user_id=user["id"],
            method="POST",
            path="/v1/chat/completions",
            query="a=1",
            status=200,
            duration_ms=1.23456,
            client_ip="2001:db8::1",
            model="gpt-4o",
            prompt_tokens=3,
            completion_tokens=4,
            total_tokens=7,
            request_body='{"model": "gpt-4o"}',
            response_body="ok",
        ),
        event_record(type="request", path="/user/session"),  # no user, no address, no usage
    ]
    assert events_flush() == 2
    for event in recorded:
        saved = Event.objects.get(pk=event["id"])
        assert saved.created_at == event["created_at"]
        for name in ("type", "method", "path", "query", "status", "duration_ms", "model", "prompt_tokens"):
            assert getattr(saved, name) == event[name], name
        for name in ("completion_tokens", "total_tokens", "request_body", "response_body", "client_ip"):
            assert getattr(saved, name) == event[name], name
    assert str(Event.objects.get(pk=recorded[0]["id"]).user_id) == user["id"]
    assert Event.objects.get(pk=recorded[1]["id"]).user_id is None


# --- one bad request cannot stop the log ------------------------------------------------------------


def wait_for_event(**filters) -> Event:
    """The event matching `filters` once it has been saved (a proxied call logs when its stream ends)."""
    import time

    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        events_flush()
        found = Event.objects.filter(**filters).first()
        if found is not None:
            return found
        time.sleep(0.05)
    raise AssertionError(f"no event matching {filters}")


def assert_next_events_are_written(client, token, user_id, marker):
    for n in range(20):
        client.get("/user/session", headers={"Authorization": f"Bearer {token}"}, params={"after": f"{marker}-{n}"})
    events_flush()
    written = Event.objects.filter(user_id=user_id, query__startswith=f"after={marker}-")
    assert written.count() == 20
    from proxy.events import _queue

    assert not any(str(event["user_id"]) == user_id for event in _queue)


def test_a_lone_surrogate_model_does_not_stop_the_log(client, signup, upstream):
    token, user, _ = signup()
    body = '{"model": "\\ud800", "messages": [{"role": "user", "content": "echo: hi"}]}'
    response = client.post(
        "/v1/chat/completions",
        content=body,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    assert response.status_code < 500
    logged = wait_for_event(user_id=user["id"], type="proxy")
    assert "\ud800" not in logged.model
    assert_next_events_are_written(client, token, user["id"], "surrogate")


def test_a_nul_model_on_the_ws_does_not_stop_the_log(client, signup, upstream):
    from asgiref.sync import async_to_sync
    from channels.testing import WebsocketCommunicator

    from turbo_site.asgi import application

    token, user, _ = signup()

    async def call():
        socket = WebsocketCommunicator(application, f"/ws?token={token}")
        connected, _ = await socket.connect(timeout=10)
        assert connected
        frame = {"type": "chat_completion", "request_id": "n1", "payload": {"model": "\u0000", "messages": []}}
        await socket.send_json_to(frame)
        answer = await socket.receive_json_from(timeout=15)
        await socket.disconnect()
        return answer

    answer = async_to_sync(call)()
    assert answer["type"] == "error" and answer["request_id"] == "n1"
    logged = wait_for_event(user_id=user["id"], path="/ws", query="type=chat_completion")
    assert "\x00" not in logged.model
    assert_next_events_are_written(client, token, user["id"], "nul-ws")


def test_a_nul_in_the_path_does_not_stop_the_log(client, signup, upstream):
    token, user, _ = signup()
    client.get("/v1/models%00", headers={"Authorization": f"Bearer {token}"})
    logged = wait_for_event(user_id=user["id"], path__startswith="/v1/models")
    assert "\x00" not in logged.path
    assert_next_events_are_written(client, token, user["id"], "nul-path")


def test_rows_the_database_refuses_are_dropped_and_counted_the_rest_saved(client, signup, paused_event_writer):
    from proxy.events import _queue, event_record

    _, user, _ = signup()
    events_flush()
    dropped_before = client.get("/health").json()["events"]["dropped"]
    good = [event_record(type="request", user_id=user["id"], path=f"/good/{n}") for n in range(7)]
    # A value no database accepts (no UTF-8 for a lone surrogate), as if it had slipped past the cleaning.
    bad = {**good[0], "id": __import__("uuid").uuid4(), "path": "/bad/\ud800"}
    _queue.insert(3, bad)
    assert events_flush() == 7
    assert not _queue
    assert Event.objects.filter(user_id=user["id"], path__startswith="/good/").count() == 7
    assert not Event.objects.filter(path__startswith="/bad/").exists()
    assert client.get("/health").json()["events"]["dropped"] == dropped_before + 1


def test_recorded_fields_are_cleaned_and_bounded(signup):
    from proxy.events import event_record

    recorded = event_record(
        type="request",
        method="G\x00ET",
        path="/p\x00ath\udfff",
        query="x=\x00" + "q" * 5000,
        model="m" * 500,
        status=70000,
        prompt_tokens=-1,
        total_tokens=2**40,
        client_ip="not an address",
    )
    assert events_flush() == 1
    saved = Event.objects.get(pk=recorded["id"])
    assert (saved.method, saved.path) == ("GET", "/path?")
    assert saved.query.startswith("x=qqq") and len(saved.query) == 2000
    assert len(saved.model) == 100
    assert (saved.status, saved.prompt_tokens, saved.total_tokens, saved.client_ip) == (None, None, None, None)


def test_tokens_in_query_strings_are_redacted_in_the_log(client, signup, upstream):
    token, user, _ = signup()
    headers = {"Authorization": f"Bearer {token}"}
    client.get("/user/session", headers=headers, params={"token": token, "n": "1"})
    client.get("/v1/models", headers=headers, params={"n": "2", "api_key": token})
    session = wait_for_event(user_id=user["id"], path="/user/session")
    proxied = wait_for_event(user_id=user["id"], path="/v1/models")
    assert (session.query, proxied.query) == ("token=[redacted]&n=1", "n=2&api_key=[redacted]")
    assert not Event.objects.filter(query__contains=token).exists()
