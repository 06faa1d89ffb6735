"""A reply through a chat's whole life, against real server processes (DEBUG=0) and real clients:
deletes that stick (the message or its chat deleted mid-reply, in another process on Postgres + Redis),
a final save that outlives its window, text a database cannot hold, and the sweeper that ends what a
dead process left `streaming`."""

import asyncio
import signal
import uuid
from datetime import timedelta

import httpx
import pytest
from django.conf import settings
from django.core.cache import cache
from django.utils import timezone

from accounts.services import user_create
from chats import running
from chats.models import Chat, Message
from chats.services import chat_create
from chats.stream import MESSAGE_DELTA, aevent_send, chat_stream_key, message_event
from chats.sweeper import ABANDONED, messages_sweep
from chats.tests.processes import (
    FINAL_TYPES,
    Api,
    SSEFollower,
    WSFollower,
    database_closed,
    needs_postgres,
    reply_about_to_be_saved,
    stored,
    words,
)
from testing.commands import manage
from turbo_site.core import streams
from turbo_site.core.loops import loop_clients_close

pytestmark = pytest.mark.django_db(transaction=True)

# A reply long enough to be deleted while it streams (200 deltas, 0.1 s apart).
LONG = "[chunk_delay:0.1] echo: " + words(200)


def two_servers(start_server):
    """Two processes sharing the database and Redis (one process on the embedded defaults, which share
    no stream between processes)."""
    first = start_server(REDIS_ADDRESS=settings.REDIS_ADDRESS or None)
    second = start_server(REDIS_ADDRESS=settings.REDIS_ADDRESS) if settings.REDIS_ADDRESS else first
    return first, second


def assert_clean_log(*servers) -> None:
    for server in servers:
        text = server.stderr()
        for trouble in ("Traceback", "did not affect any rows", "could not save the reply"):
            assert trouble not in text, text[-3000:]


def test_a_message_deleted_mid_reply_stops_and_never_comes_back(start_server, upstream):
    generating, other = two_servers(start_server)
    api = Api(generating.url, "delete-message")
    chat_id = api.chat()
    ws = WSFollower(other.url, api.token, chat_id)  # follows from the process that does not generate
    sse = SSEFollower(generating.url, api.token, chat_id)
    message = api.prompt(chat_id, LONG)
    ws.deltas(3)

    deleted = httpx.post(other.url + "/chat/message/delete", json={"id": message["id"]}, headers=api.headers)
    assert deleted.status_code == 200, deleted.text
    assert upstream.wait_for_abort(timeout=20), "the generation went on after its message was deleted"

    # A later prompt's whole reply arrives: nothing of the deleted message may come between.
    after = api.prompt(chat_id, "echo: still here")
    for follower in (ws, sse):
        events = follower.until(
            lambda event: event.get("type") in FINAL_TYPES and event["message"]["id"] == after["id"]
        )
        deletion = next(i for i, event in enumerate(follower.seen) if event.get("type") == "message.deleted")
        later = [event for event in follower.seen[deletion:] if (event.get("message") or {}).get("id") == message["id"]]
        assert later == [], later
        assert events[-1]["type"] == "message.completed"
    assert not Message.objects.filter(pk=message["id"]).exists()
    assert stored(after["id"]).reply == "still here"
    ws.close()
    api.close()
    assert_clean_log(generating, other)


def test_a_chat_deleted_mid_reply_stops_its_generation(start_server, upstream):
    generating, other = two_servers(start_server)
    api = Api(generating.url, "delete-chat")
    chat_id = api.chat()
    ws = WSFollower(other.url, api.token, chat_id)
    message = api.prompt(chat_id, LONG)
    ws.deltas(3)

    deleted = httpx.post(other.url + "/chat/delete", json={"id": chat_id}, headers=api.headers)
    assert deleted.status_code == 200, deleted.text
    assert upstream.wait_for_abort(timeout=20), "the generation went on after its chat was deleted"
    rest = ws.rest()
    assert ws.close_code == 4404
    assert not [event for event in rest if event.get("type") in FINAL_TYPES], rest
    assert not Chat.objects.filter(pk=chat_id).exists()
    assert not Message.objects.filter(pk=message["id"]).exists()
    api.close()
    assert_clean_log(generating, other)


def test_a_reply_holding_nul_is_stored_alike_on_both_databases(start_server, upstream):
    server = start_server(REDIS_ADDRESS=settings.REDIS_ADDRESS or None)
    api = Api(server.url, "nul-reply")
    chat_id = api.chat()
    answered = api.http.post(
        "/chat/prompt", data={"id": chat_id, "prompt": "echo: before[nul]after"}, headers=api.headers
    )
    assert answered.status_code == 200, answered.text
    reply = answered.json()["message"]
    assert (reply["status"], reply["reply"]) == ("complete", "beforeafter")
    assert (stored(reply["id"]).status, stored(reply["id"]).reply) == ("complete", "beforeafter")
    api.close()
    assert_clean_log(server)


@needs_postgres
def test_a_final_save_past_its_window_says_so_and_stores_the_reply_when_the_database_is_back(start_server):
    server = start_server(REDIS_ADDRESS=settings.REDIS_ADDRESS or None, FINAL_SAVE_RETRY_SECONDS=2)
    api, ws, message, reply = reply_about_to_be_saved(server, "db-away-long")
    with database_closed():
        failed = ws.until(lambda event: event.get("type") in FINAL_TYPES, timeout=60)[-1]
        assert failed["type"] == "message.failed" and failed["code"] == "storage_unavailable", failed
        assert (failed["message"]["status"], failed["message"]["reply"]) == ("error", reply)
        assert stored(message["id"]).status == "streaming"  # never reported complete while unstored
    completed = ws.until(lambda event: event.get("type") in FINAL_TYPES, timeout=90)[-1]
    assert completed["type"] == "message.completed", completed
    assert completed["message"]["reply"] == reply
    row = stored(message["id"])
    assert (row.status, row.reply) == ("complete", reply)
    ws.close()
    api.close()


@pytest.mark.skipif(not settings.REDIS_ADDRESS, reason="another process's generation is known through Redis")
def test_a_reply_left_streaming_by_a_killed_process_is_ended_by_the_sweeper(start_server, upstream):
    # The alive mark lasts 6 s: short, but longer than a loaded 2-core machine may starve the doomed
    # server's loop (with 2 s, the survivor swept a reply that was still running).
    doomed = start_server(REDIS_ADDRESS=settings.REDIS_ADDRESS, GENERATION_ALIVE_SECONDS=6)
    survivor = start_server(REDIS_ADDRESS=settings.REDIS_ADDRESS, GENERATION_ALIVE_SECONDS=6, SWEEP_SECONDS=1)
    api = Api(doomed.url, "sweep-killed")
    chat_id = api.chat()
    message = api.prompt(chat_id, LONG)
    ws = WSFollower(survivor.url, api.token, chat_id)
    ws.deltas(3)
    doomed.process.send_signal(signal.SIGKILL)
    doomed.process.wait(timeout=10)

    failed = ws.until(lambda event: event.get("type") in FINAL_TYPES, timeout=60)[-1]
    assert failed["type"] == "message.failed" and failed["message"]["id"] == message["id"]
    row = stored(message["id"])
    assert (row.status, row.error) == ("error", ABANDONED)
    assert row.reply and words(200).startswith(row.reply)  # the reply as far as the stream had it
    assert failed["message"]["reply"] == row.reply
    ws.close()
    api.close()


def run(coroutine):
    async def main():
        try:
            return await coroutine
        finally:
            await loop_clients_close()

    return asyncio.run(main())


def _streaming_message(*, age_seconds: int) -> Message:
    owner = user_create(username=f"sweep-{uuid.uuid4().hex[:8]}", password="correct-horse")
    chat = chat_create(owner=owner, name="sweep")
    message = Message.objects.create(chat=chat, author=owner, prompt="p", status=Message.Status.STREAMING)
    Message.objects.filter(pk=message.pk).update(updated_at=timezone.now() - timedelta(seconds=age_seconds))
    return message


def test_the_sweeper_ends_only_what_runs_nowhere():
    abandoned = _streaming_message(age_seconds=600)
    alive = _streaming_message(age_seconds=600)
    young = _streaming_message(age_seconds=0)
    cache.set(running.alive_key(alive.pk), 1, 60)

    async def scenario():
        snapshot = {"id": str(abandoned.pk), "reply": "as far as it got", "tool_calls": []}
        await aevent_send(abandoned.chat_id, MESSAGE_DELTA, **message_event(MESSAGE_DELTA, snapshot, "got"))
        ended = await messages_sweep()
        entries, _ = await streams.replay(chat_stream_key(abandoned.chat_id), 0)
        return ended, entries

    ended, entries = run(scenario())
    assert ended == 1
    row = Message.objects.get(pk=abandoned.pk)
    assert (row.status, row.error, row.reply) == ("error", ABANDONED, "as far as it got")
    assert entries[-1].type == "message.failed" and entries[-1].data["message"]["reply"] == "as far as it got"
    assert Message.objects.get(pk=alive.pk).status == "streaming"
    assert Message.objects.get(pk=young.pk).status == "streaming"
    assert run(messages_sweep()) == 0  # what was ended stays ended


def test_chats_sweep_command_needs_the_shared_cache_and_says_how_many(settings):
    """Through manage.py's entry point, in this process: the leg's Redis (if any) is the shared cache."""
    shared = settings.REDIS_ADDRESS
    settings.REDIS_ADDRESS = ""
    refused = manage("chats", "sweep")
    assert refused.returncode == 1 and "sweep needs REDIS_ADDRESS" in refused.stderr
    assert "streaming" in manage("chats", "sweep", "--help").stdout
    if shared:
        settings.REDIS_ADDRESS = shared
        done = manage("chats", "sweep")
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "ended 0 abandoned messages"


def test_a_resume_from_beyond_the_last_event_gets_a_gap_then_the_live_events(start_server, upstream):
    server = start_server(REDIS_ADDRESS=settings.REDIS_ADDRESS or None)
    api = Api(server.url, "resume-beyond")
    chat_id = api.chat()
    first = api.prompt(chat_id, "echo: one")
    ws = WSFollower(server.url, api.token, chat_id, after=0)
    last = ws.until(lambda event: event.get("type") in FINAL_TYPES and event["message"]["id"] == first["id"])[-1]
    ws.close()
    beyond = last["seq"] + 1000
    followers = [
        SSEFollower(server.url, api.token, chat_id, last_event_id=beyond),
        WSFollower(server.url, api.token, chat_id, after=beyond),
    ]
    for follower in followers:
        assert follower.next(timeout=20)["type"] == "stream.gap"
    second = api.prompt(chat_id, "echo: two")
    for follower in followers:
        events = follower.until(
            lambda event: event.get("type") in FINAL_TYPES and event["message"]["id"] == second["id"]
        )
        assert events[0]["type"] == "message.created" and events[0]["seq"] == last["seq"] + 1
        assert events[-1]["message"]["reply"] == "two"
    followers[1].close()
    api.close()
