"""SIGTERM is always honoured: SIGTERM during a long reply, again and again.

Each run starts a server (Redis under the stream when REDIS_ADDRESS is set, else in memory) with a
1 s grace, sends a 600-delta reply (its deltas 10 ms apart: it would take 6 s and more), follows it
over SSE and WebSocket, and sends SIGTERM after a different number of deltas each time. Every run:
the reply is cut short (it did not run to its end), each subscriber gets exactly one final event for
it (`message.failed`, interrupted) before `server.shutdown`, the partial text that event carries is
stored, and the process exits. The suite runs SIGTERM_RUNS runs (`SIGTERM_RUNS=20` is the issue's 20-run
loop). By default 5 with Redis under the stream: the bug this loop was written for (#26, redis-py swallowing
a cancellation mid-command) lost 12 of 20 SIGTERMs under load, so 5 runs miss it about once in a hundred;
2 on the in-memory stream, which has no Redis command to swallow one.
"""

import os
import signal
import subprocess

import pytest
from django.conf import settings

from chats.tests.processes import FINAL_TYPES, followed_chat, of_message, stored, words

pytestmark = pytest.mark.django_db(transaction=True)

RUNS = int(os.environ.get("SIGTERM_RUNS") or (5 if settings.REDIS_ADDRESS else 2))
DELTAS = 600


@pytest.mark.parametrize("run", range(RUNS))
def test_sigterm_during_a_long_reply_cuts_it_short_ends_it_for_everyone_and_stores_it(start_server, run):
    server = start_server(REDIS_ADDRESS=settings.REDIS_ADDRESS or None, SHUTDOWN_GRACE_SECONDS=1)
    api, chat_id, sse, ws = followed_chat(server, f"sigterm-loop-{run}")
    reply = words(DELTAS)
    message = api.prompt(chat_id, "[chunk_delay:0.01] echo: " + reply)
    api.close()
    for follower in (sse, ws):
        follower.deltas(3 + 7 * run)

    server.process.send_signal(signal.SIGTERM)

    finals = []
    for follower in (sse, ws):
        follower.rest(timeout=60)
        events = follower.seen
        assert events and events[-1]["type"] == "server.shutdown", (follower.name, events[-3:])
        mine = [event for event in of_message(events, message["id"]) if event["type"] in FINAL_TYPES]
        assert len(mine) == 1, (follower.name, mine)
        finals.append(mine[0])
    try:
        code = server.process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the server did not exit:\n{server.stderr()[-3000:]}") from None
    assert code in (0, -signal.SIGTERM), (code, server.stderr()[-3000:])
    for final in finals:
        assert final["type"] == "message.failed", final["type"]
        assert final["message"]["error"].startswith("interrupted"), final["message"]["error"]
    row = stored(message["id"])
    assert row.status == "error" and row.error.startswith("interrupted"), (row.status, row.error)
    assert reply.startswith(row.reply) and len(row.reply) < len(reply), "the reply ran to its end"
    assert all(final["message"]["reply"] == row.reply for final in finals)
