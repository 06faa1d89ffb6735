"""Account events and authenticated requests land in the event log, off the request path."""

import asyncio

import pytest

from conftest import unique_name
from proxy.events import events_flush, events_prune
from proxy.models import Event
from turbo_site.core.pubsub import subscribe

pytestmark = pytest.mark.django_db(transaction=True)


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


def test_events_are_published_on_the_events_topic(signup, client, turbo_server):
    """A subscriber in another event loop (and thread) sees each event as it is recorded."""
    token, user, _ = signup()
    received = []

    async def listen_while_requesting():
        async with subscribe("events") as events:
            await asyncio.to_thread(client.get, "/user/session", headers={"Authorization": f"Bearer {token}"})
            # The signup's own events are published after its response, so they may still arrive first.
            while not received or received[-1]["path"] != "/user/session":
                received.append(await asyncio.wait_for(events.__anext__(), timeout=10))

    asyncio.run(listen_while_requesting())
    assert {event["path"] for event in received} <= {"/user/signup", "/user/session"}
    assert received[-1]["user_id"] == user["id"]
    assert not any("request_body" in event for event in received)


def test_forwarded_for_is_believed_only_from_trusted_proxies(client, signup, settings):
    token, user, _ = signup()
    headers = {"Authorization": f"Bearer {token}", "X-Forwarded-For": "203.0.113.9, 198.51.100.7"}
    client.get("/user/session", headers=headers, params={"n": "untrusted"})
    settings.TRUSTED_PROXIES = ["127.0.0.1", "198.51.100.7"]
    client.get("/user/session", headers=headers, params={"n": "trusted"})
    by_query = {e.query: e.client_ip for e in events_of(user["id"], type="request")}
    assert by_query == {"n=untrusted": "127.0.0.1", "n=trusted": "203.0.113.9"}


def test_flushed_events_keep_every_field(signup):
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
