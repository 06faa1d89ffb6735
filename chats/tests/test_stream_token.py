"""The SSE sign-in: /chat/stream takes `token` as a query or form parameter (EventSource sends no
headers); no other endpoint does, and the token never reaches a log or the event log."""

import logging

import httpx
import pytest

from proxy.events import events_flush
from proxy.models import Event

pytestmark = pytest.mark.django_db(transaction=True)


def first_line(server, method: str, **request) -> tuple[int, str]:
    """The status and first line of a /chat/stream response; the stream is then closed."""
    with httpx.Client(base_url=server.url, timeout=10) as http:
        with http.stream(method, "/chat/stream", **request) as response:
            if response.status_code != 200:
                response.read()
                return response.status_code, response.text
            return 200, next(response.iter_lines())


@pytest.fixture
def chat_and_token(client, signup):
    token, user, _ = signup()
    chat = client.post("/chat/create", data={"name": "sse"}, headers={"Authorization": f"Bearer {token}"}).json()
    return chat, token, user


def test_token_query_parameter_opens_the_stream_and_is_redacted_in_the_event_log(turbo_server, chat_and_token, caplog):
    chat, token, user = chat_and_token
    caplog.set_level(logging.DEBUG)
    # new EventSource("/chat/stream?id=...&token=...")
    assert first_line(turbo_server, "GET", params={"id": chat["id"], "token": token}) == (200, "retry: 2000")
    events_flush()
    event = Event.objects.get(path="/chat/stream", user_id=user["id"])
    assert event.status == 200
    assert token not in event.query
    assert f"id={chat['id']}" in event.query and "token=[redacted]" in event.query
    assert token not in caplog.text


def test_token_form_parameter_opens_the_stream(turbo_server, chat_and_token, settings):
    settings.EVENT_CAPTURE_BODIES = True
    chat, token, user = chat_and_token
    # curl http://localhost:8080/chat/stream -d 'id=...&token=...'
    assert first_line(turbo_server, "POST", data={"id": chat["id"], "token": token}) == (200, "retry: 2000")
    events_flush()
    event = Event.objects.get(path="/chat/stream", user_id=user["id"])
    assert token not in event.request_body and token not in event.query


def test_a_bad_token_parameter_is_refused(turbo_server, chat_and_token):
    chat, _, _ = chat_and_token
    status, body = first_line(turbo_server, "GET", params={"id": chat["id"], "token": "not-a-session"})
    assert status == 401 and '"unauthorized"' in body
    status, _ = first_line(turbo_server, "GET", params={"id": chat["id"]})
    assert status == 401


def test_other_endpoints_do_not_take_a_token_parameter(client, chat_and_token, upstream):
    chat, token, user = chat_and_token
    prompt = client.post(f"/chat/prompt?token={token}", data={"id": chat["id"], "prompt": "echo: hi"})
    assert prompt.status_code == 401
    assert client.post("/chat/prompt", data={"id": chat["id"], "prompt": "echo: hi", "token": token}).status_code == 401
    assert client.post(f"/chat/index?token={token}").status_code == 401
    assert upstream.requests == []
