"""Topic pub/sub over the Channels layer: in-process by default, across processes with Redis.

    async with subscribe("logins") as logins:
        await apublish("logins", {"type": "login", "user": "..."})
        async for data in logins:
            ...

A topic is a Channels group; a subscriber is a fresh channel in it. Delivery is at most once: a
message published while nobody listens is gone, and a subscriber that falls too far behind loses
messages rather than slowing the publisher down.
"""

import re
from collections.abc import AsyncIterator
from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer

_TOPIC = re.compile(r"^[A-Za-z0-9_.\-]{1,90}$")
MESSAGE_TYPE = "pubsub.message"


def topic_group(topic: str) -> str:
    """The Channels group name of a topic (refuses names Channels cannot carry)."""
    if not _TOPIC.match(topic):
        raise ValueError(f"invalid topic {topic!r}: use letters, digits, '.', '-' or '_' (at most 90)")
    return f"topic.{topic}"


async def apublish(topic: str, data: Any) -> None:
    """Send `data` (JSON-serialisable) to every current subscriber of `topic`."""
    layer = get_channel_layer()
    if layer is None:
        return
    await layer.group_send(topic_group(topic), {"type": MESSAGE_TYPE, "topic": topic, "data": data})


def publish(topic: str, data: Any) -> None:
    """apublish for sync code (inside a request it runs on the server's event loop)."""
    async_to_sync(apublish)(topic, data)


class Subscription:
    """An async iterator over a topic's messages; `async with` joins before the first publish you make."""

    def __init__(self, topic: str):
        self.topic = topic
        self.group = topic_group(topic)
        self.layer = get_channel_layer()
        self.channel: str | None = None

    async def start(self) -> "Subscription":
        if self.channel is None:
            # The layer's default prefix: channels_redis reads every process-specific channel through
            # one shared inbox, which only works if they all share the prefix (consumers use it too).
            self.channel = await self.layer.new_channel()
            await self.layer.group_add(self.group, self.channel)
        return self

    async def close(self) -> None:
        if self.channel is not None:
            await self.layer.group_discard(self.group, self.channel)
            self.channel = None

    async def __aenter__(self) -> "Subscription":
        return await self.start()

    async def __aexit__(self, *exc_info) -> None:
        await self.close()

    def __aiter__(self) -> AsyncIterator[Any]:
        return self

    async def __anext__(self) -> Any:
        await self.start()
        while True:
            message = await self.layer.receive(self.channel)
            if message.get("type") == MESSAGE_TYPE:
                return message["data"]


def subscribe(topic: str) -> Subscription:
    """Messages published on `topic` from now on: `async with subscribe(t) as sub: async for data in sub`."""
    return Subscription(topic)
