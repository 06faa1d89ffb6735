"""Topic pub/sub over the configured Channels layer (in-memory, or Redis on the second test leg)."""

import asyncio

import pytest

from turbo_site.core.pubsub import apublish, subscribe, topic_group


def test_every_subscriber_gets_every_message_in_order():
    async def scenario():
        async with subscribe("test-order") as first, subscribe("test-order") as second:
            for n in range(5):
                await apublish("test-order", {"n": n})
            return [[await asyncio.wait_for(sub.__anext__(), timeout=10) for _ in range(5)] for sub in (first, second)]

    received = asyncio.run(scenario())
    assert received == [[{"n": n} for n in range(5)]] * 2


def test_topic_names_are_checked():
    assert topic_group("logins") == "topic.logins"
    for bad in ("", "a b", "x" * 91, "ü"):
        with pytest.raises(ValueError):
            topic_group(bad)


def test_a_subscriber_is_served_while_a_consumer_waits_on_its_own_channel():
    """channels_redis reads all of a process's channels through one inbox: a consumer waiting on its
    channel (as every WebSocket consumer does) must not keep a subscription from its messages."""
    from channels.layers import get_channel_layer

    async def scenario():
        layer = get_channel_layer()
        consumer_channel = await layer.new_channel()
        waiting = asyncio.ensure_future(layer.receive(consumer_channel))
        await asyncio.sleep(0.1)  # the consumer now holds the layer's inbox
        try:
            async with subscribe("test-shared-inbox") as sub:
                await apublish("test-shared-inbox", {"ok": True})
                return await asyncio.wait_for(sub.__anext__(), timeout=10)
        finally:
            waiting.cancel()

    assert asyncio.run(scenario()) == {"ok": True}
