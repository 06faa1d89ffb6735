"""The live stream under faults, against real server processes and real clients.

Each test starts uvicorn subprocesses on the test database (Postgres: the server and the test share
it) and follows a chat with an SSE client (httpx) and a WebSocket client (websockets), each read on
its own thread. Faults: the Redis under the stream is killed and restarted mid-reply; the database
connections are cut (or the database refuses connections) at the final save; SIGTERM arrives while
a reply streams. Every wait is bounded; no test asserts how long something took.
"""

import signal
import subprocess

import pytest
from django.conf import settings
from django.db import transaction

from chats.models import Message
from chats.tests.processes import (
    FINAL_TYPES,
    Api,
    Follower,
    WSFollower,
    assert_sse_ids,
    assert_whole_reply,
    database_closed,
    followed_chat,
    free_port,
    last_delta,
    needs_postgres,
    numbered,
    of_message,
    redis_start,
    reply_about_to_be_saved,
    sse_when_back,
    stored,
    terminate_server_connections,
    wait_for,
    waiting_on_a_lock,
    words,
)

pytestmark = [
    pytest.mark.django_db(transaction=True),
]


# --- 1. Redis killed and restarted mid-stream -------------------------------------------------------------------


def test_redis_killed_mid_stream_then_restarted(start_server, processes):
    redis_port = free_port()
    redis_process = redis_start(redis_port)
    processes.append(redis_process)
    server = start_server(REDIS_ADDRESS=f"redis://127.0.0.1:{redis_port}/0", FINAL_SAVE_RETRY_SECONDS=60)
    api, chat_id, sse, ws = followed_chat(server, "redis-fault")

    reply = words(30)
    message = api.prompt(chat_id, "[chunk_delay:0.2] echo: " + reply)
    for follower in (sse, ws):
        follower.deltas(3)

    redis_process.kill()
    redis_process.wait(timeout=10)

    # Both subscribers are told, and their streams end (the WebSocket closes: 1013, try again later).
    for follower in (sse, ws):
        rest = follower.rest(timeout=30)
        assert rest, f"{follower.name}: the stream ended without a notice"
        assert rest[-1]["type"] == "stream.error", rest
        assert all(event["type"] == "message.delta" for event in rest[:-1]), rest
    assert sse.ended_cleanly and sse.failure is None, sse.failure
    assert ws.close_code == 1013, (ws.close_code, ws.failure)
    assert_sse_ids(sse.seen)
    seen_before = max(sse.last_seq, ws.last_seq)
    resume_from = sse.last_seq

    # While Redis is away, signed-in requests answer 503 `unavailable` with Retry-After, never 500.
    for method, path, params in (
        ("POST", "/chat/index", None),
        ("GET", "/chat/read", {"id": chat_id}),
        ("GET", "/chat/stream", {"id": chat_id}),
        ("GET", "/v1/models", None),  # the proxy's fast path
    ):
        answer = api.http.request(method, path, params=params, headers=api.headers)
        assert answer.status_code == 503, (path, answer.status_code, answer.text, server.stderr()[-3000:])
        assert answer.json()["error"]["code"] == "unavailable", answer.text
        assert answer.headers.get("Retry-After"), answer.headers

    # Redis comes back (empty) on the same port; the same server recovers on its own.
    redis_process = redis_start(redis_port)
    processes.append(redis_process)

    def answers_200():
        answer = api.http.post("/chat/index", headers=api.headers)
        assert answer.status_code in (200, 503), (answer.status_code, answer.text)
        return answer.status_code == 200

    wait_for(answers_200, 30, "requests to answer 200 again after Redis restarted", interval=0.2)

    # Resuming from the last seq seen: the restarted Redis has nothing after it, so a gap notice,
    # then the reply's final event (sent once Redis answered again) with the whole reply.
    # (A 503 here is allowed and retried: see sse_when_back.)
    resumed, refused = sse_when_back(server.url, api.token, chat_id, last_event_id=resume_from)
    print(f"SSE resumes refused (503) after Redis was back: {refused}")
    events = resumed.until(lambda event: event.get("type") in FINAL_TYPES, timeout=90)
    assert events[0]["type"] == "stream.gap", events
    assert events[0]["after"] == resume_from, events[0]
    final = events[-1]
    assert final["type"] == "message.completed", (final, server.stderr()[-3000:])
    assert final["message"]["id"] == message["id"]
    assert final["message"]["status"] == "complete" and final["message"]["reply"] == reply, final
    assert_sse_ids(events)
    after_restart = [event["seq"] for event in numbered(events)]
    assert after_restart == sorted(set(after_restart)), after_restart
    assert all(seq > seen_before for seq in after_restart), (seen_before, after_restart)
    row = stored(message["id"])
    assert (row.status, row.reply, row.error) == ("complete", reply, "")

    # A new prompt streams normally to a new WebSocket subscriber, numbered above everything before.
    fresh = WSFollower(server.url, api.token, chat_id)
    second = api.prompt(chat_id, "echo: streamed after the restart")
    events = fresh.until(
        lambda event: event.get("type") in FINAL_TYPES and event["message"]["id"] == second["id"], timeout=30
    )
    assert_whole_reply(events, second["id"], "streamed after the restart")
    assert all(event["seq"] > max(seen_before, *after_restart) for event in numbered(events))
    assert stored(second["id"]).status == "complete"
    fresh.close()
    api.close()


def test_redis_still_away_when_the_reply_ends(start_server, processes):
    """The reply ends while Redis is down: it is saved, its final event waits for Redis and then goes out."""
    redis_port = free_port()
    redis_process = redis_start(redis_port)
    processes.append(redis_process)
    server = start_server(REDIS_ADDRESS=f"redis://127.0.0.1:{redis_port}/0", FINAL_SAVE_RETRY_SECONDS=60)
    api = Api(server.url, "redis-away-at-end")
    chat_id = api.chat()
    ws = WSFollower(server.url, api.token, chat_id)
    reply = words(10)
    message = api.prompt(chat_id, "[chunk_delay:0.2] echo: " + reply)
    ws.deltas(2)
    redis_process.kill()
    redis_process.wait(timeout=10)
    assert ws.rest(timeout=30)[-1]["type"] == "stream.error"
    assert ws.close_code == 1013, (ws.close_code, ws.failure)

    # The reply ends while Redis is still down: it is saved (the row leaves `streaming`) ...
    wait_for(lambda: stored(message["id"]).status != "streaming", 60, "the reply to be saved")
    row = stored(message["id"])
    assert (row.status, row.reply) == ("complete", reply)
    answer = api.http.post("/chat/read", data={"id": chat_id}, headers=api.headers)
    assert answer.status_code == 503 and answer.json()["error"]["code"] == "unavailable", answer.text

    redis_process = redis_start(redis_port)
    processes.append(redis_process)
    resumed, refused = sse_when_back(server.url, api.token, chat_id, last_event_id=ws.last_seq)
    print(f"SSE resumes refused (503) after Redis was back: {refused}")
    # ... and its final event, retried while Redis was away, goes out once it is back.
    try:
        events = resumed.until(lambda event: event.get("type") in FINAL_TYPES, timeout=30)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nthe server wrote:\n{server.stderr()[-5000:]}") from None
    assert events[0]["type"] == "stream.gap", events
    assert events[-1]["type"] == "message.completed", (events, server.stderr()[-3000:])
    assert events[-1]["message"]["id"] == message["id"]
    assert events[-1]["message"]["reply"] == reply
    assert events[-1]["seq"] > ws.last_seq
    api.close()


# --- 2. the database connections cut at the final save ----------------------------------------------------------


@needs_postgres
def test_database_connection_cut_in_the_middle_of_the_final_save(start_server):
    """The final save's own connection is terminated while the save runs.

    The test holds the message's row lock, so the server's save waits in its UPDATE with its
    connection open; that connection is then terminated, and the lock released once the save has
    failed and is being retried.
    """
    server = start_server(REDIS_ADDRESS=settings.REDIS_ADDRESS or None, FINAL_SAVE_RETRY_SECONDS=60)
    api = Api(server.url, "db-cut-save")
    chat_id = api.chat()
    ws = WSFollower(server.url, api.token, chat_id)
    reply = words(8)
    message = api.prompt(chat_id, "[chunk_delay:0.2] echo: " + reply)
    with transaction.atomic():
        Message.objects.select_for_update().get(pk=message["id"])
        ws.until(last_delta(reply))
        wait_for(waiting_on_a_lock, 30, "the final save to wait on the row lock")
        assert terminate_server_connections() >= 1
        server.wait_log("could not save the reply, retrying")
        wait_for(waiting_on_a_lock, 30, "the retried save to wait on the row lock again")
        # Saved first, announced after: nothing final may have gone out while the save is failing.
        assert not [event for event in ws.seen if event.get("type") in FINAL_TYPES], ws.seen
    events = ws.until(lambda event: event.get("type") in FINAL_TYPES, timeout=60)
    assert events[-1]["type"] == "message.completed", (events[-1], server.stderr()[-3000:])
    assert_whole_reply(ws.seen, message["id"], reply)
    row = stored(message["id"])
    assert (row.status, row.reply) == ("complete", reply)
    ws.close()
    api.close()


@needs_postgres
def test_database_away_during_the_final_save(start_server):
    """Harder: the connections are cut and the database refuses new ones until the save has failed."""
    server = start_server(REDIS_ADDRESS=settings.REDIS_ADDRESS or None, FINAL_SAVE_RETRY_SECONDS=60)
    api, ws, message, reply = reply_about_to_be_saved(server, "db-away")
    with database_closed():
        server.wait_log("could not save the reply, retrying")
        # Saved first, announced after: nothing final may have gone out while the save is failing.
        assert not [event for event in ws.seen if event.get("type") in FINAL_TYPES], ws.seen
        assert stored(message["id"]).status == "streaming"
    events = ws.until(lambda event: event.get("type") in FINAL_TYPES, timeout=90)
    assert events[-1]["type"] == "message.completed", (events[-1], server.stderr()[-3000:])
    assert_whole_reply(ws.seen, message["id"], reply)
    row = stored(message["id"])
    assert (row.status, row.reply) == ("complete", reply)
    ws.close()
    api.close()


# --- 3. SIGTERM with SSE and WebSocket subscribers connected --------------------------------------------------


def _transport_env(transport: str, processes: list) -> str | None:
    """The server's REDIS_ADDRESS: a Redis of the test's own, or none (the in-memory backend)."""
    if transport != "redis":
        return None
    port = free_port()
    processes.append(redis_start(port))
    return f"redis://127.0.0.1:{port}/0"


def _shutdown_tail(follower: Follower) -> list[dict]:
    """The follower's events to the end, checked to close with the server.shutdown notice."""
    follower.rest(timeout=45)
    events = follower.seen
    assert events and events[-1]["type"] == "server.shutdown", (follower.name, events)
    notices = [event for event in events if "seq" not in event]
    assert len(notices) == 1, notices
    return events


def assert_streams_ended_and_server_exited(server, sse, ws) -> None:
    """After SIGTERM: the SSE response ended cleanly, the WebSocket closed with 1012, the process exited."""
    assert_sse_ids(sse.seen)
    assert sse.ended_cleanly and sse.failure is None, sse.failure
    assert ws.close_code == 1012, (ws.close_code, ws.failure)
    try:
        code = server.process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the server did not exit:\n{server.stderr()[-3000:]}") from None
    # uvicorn re-raises the SIGTERM it handled once it has shut down, hence -SIGTERM (or 0).
    assert code in (0, -signal.SIGTERM), (code, server.stderr()[-3000:])


@pytest.mark.parametrize("transport", ["memory", "redis"])
def test_sigterm_lets_the_running_reply_finish_then_ends_streams(start_server, processes, transport):
    server = start_server(REDIS_ADDRESS=_transport_env(transport, processes), SHUTDOWN_GRACE_SECONDS=10)
    api, chat_id, sse, ws = followed_chat(server, f"sigterm-{transport}")
    reply = words(20)
    message = api.prompt(chat_id, "[chunk_delay:0.1] echo: " + reply)
    for follower in (sse, ws):
        follower.deltas(3)
    api.close()

    server.process.send_signal(signal.SIGTERM)

    for follower in (sse, ws):
        events = _shutdown_tail(follower)
        assert_whole_reply(events[:-1], message["id"], reply)
    assert_streams_ended_and_server_exited(server, sse, ws)
    row = stored(message["id"])
    assert (row.status, row.reply) == ("complete", reply)


@pytest.mark.parametrize("transport", ["memory", "redis"])
def test_sigterm_saves_a_stalled_reply_as_interrupted(start_server, processes, transport):
    server = start_server(REDIS_ADDRESS=_transport_env(transport, processes), SHUTDOWN_GRACE_SECONDS=1)
    api, chat_id, sse, ws = followed_chat(server, f"stall-{transport}")
    message = api.prompt(chat_id, "[scenario:stall] echo: never finishes")
    for follower in (sse, ws):
        follower.until(lambda event: event.get("type") == "message.created")
    api.close()

    server.process.send_signal(signal.SIGTERM)

    for follower in (sse, ws):
        events = _shutdown_tail(follower)
        mine = of_message(events, message["id"])
        assert [event["type"] for event in mine] == ["message.created", "message.failed"], events
        failed = mine[-1]
        assert failed["partial"] is False
        assert failed["message"]["status"] == "error"
        assert failed["message"]["error"].startswith("interrupted"), failed
        assert mine[1]["seq"] == mine[0]["seq"] + 1
    assert_streams_ended_and_server_exited(server, sse, ws)
    row = stored(message["id"])
    assert row.status == "error" and row.error.startswith("interrupted"), (row.status, row.error)
