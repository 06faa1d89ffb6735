"""The event and usage writer on the serving event loop, as the ASGI lifespan starts it."""

import asyncio
import threading

import pytest
from asgiref.sync import sync_to_async

from accounts.models import User
from proxy.events import (
    event_record,
    events_state,
    events_writer_resume,
    events_writer_start,
    events_writer_stop,
    writer_wake,
)
from proxy.models import Event, UsageRollup
from proxy.usage.caller import Caller
from proxy.usage.records import Estimate, Usage, usage_pending, usage_record

pytestmark = pytest.mark.django_db(transaction=True)


def _writer_threads() -> list[str]:
    return [thread.name for thread in threading.enumerate() if thread.name == "turbo-event-writer"]


def test_the_writer_on_the_loop_writes_events_and_usage_without_a_writer_thread(settings):
    settings.EVENT_FLUSH_MS = 50
    settings.EVENT_BATCH_SIZE = 40  # three batches: the flush goes on while events are left
    user = User.objects.create_user(username="loop-writer", password="correct-horse")
    caller = Caller(user.pk)

    def written() -> tuple[int, int]:
        rollups = UsageRollup.objects.filter(user_id=user.pk)
        return Event.objects.filter(user_id=user.pk).count(), sum(row.requests for row in rollups)

    async def serving() -> None:
        assert events_writer_start()
        assert not events_writer_start()  # once per loop
        try:
            assert events_state()["writer"] == "loop"
            for number in range(100):
                event_record(type="proxy", user_id=user.pk, path=f"/v1/chat/completions/{number}", status=200)
            # One counted as the upstream said, one whose tokens the writer counts (an estimate).
            usage_record(caller, Usage("gpt-4o-mini", input_tokens=10, output_tokens=5))
            usage_record(
                caller, Usage("gpt-4o-mini"), estimate=Estimate(text="a reply of about ten tokens, counted later")
            )
            writer_wake(soon=True)
            async with asyncio.timeout(60):  # a deadline, not a wait: it ends as soon as both are in
                while await sync_to_async(written)() != (100, 2):
                    await asyncio.sleep(0.02)
                while _writer_threads():  # a writer thread of earlier tests ends once it sees the loop's
                    await asyncio.sleep(0.02)
            assert events_state()["queued"] == 0 and usage_pending() == 0
            record_only = event_record(type="proxy", user_id=user.pk, path="/v1/last", status=200)
            assert record_only and not _writer_threads()  # recording starts no thread either
        finally:
            await events_writer_stop()

    try:
        asyncio.run(serving())
    finally:
        events_writer_resume()
    assert events_state()["writer"] == "thread"  # the tests' servers (no lifespan) write from a thread again
    estimated = UsageRollup.objects.get(user_id=user.pk)
    assert (estimated.requests, estimated.estimated_requests) == (2, 1)
    assert estimated.output_tokens > 5  # the estimate was counted (by the writer, on the loop)
