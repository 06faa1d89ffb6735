"""Fan-out of a chat's events to the WebSocket members connected to this process.

Each process subscribes once per chat that has members connected here, however many there are,
and hands every event to each of them: one channel-layer message per event per process (with Redis:
one round trip, not one per member), and each event serialised to JSON once, not once per member.
Events reach every member in the order they were published.
"""

import asyncio
import json
import logging
import weakref
from typing import Any, Protocol

from chats.services import chat_topic
from turbo_site.core.pubsub import Subscription, subscribe

logger = logging.getLogger("turbo.chats")


class Member(Protocol):
    async def deliver(self, text: str) -> None: ...

    async def on_control(self, data: dict[str, Any]) -> None: ...


class _Feed:
    def __init__(self, chat_id: str):
        self.chat_id = chat_id
        self.members: set[Member] = set()
        self.subscription: Subscription = subscribe(chat_topic(chat_id))
        self.ready: asyncio.Future = asyncio.get_running_loop().create_future()
        self.pump: asyncio.Task | None = None


# Per event loop (one per process in production): chat id -> its feed.
_feeds: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, _Feed]]" = weakref.WeakKeyDictionary()


def _loop_feeds() -> dict[str, _Feed]:
    return _feeds.setdefault(asyncio.get_running_loop(), {})


async def join(chat_id, member: Member) -> None:
    """From now on `member` gets every event of the chat (call before accepting the socket)."""
    key = str(chat_id)
    feeds = _loop_feeds()
    feed = feeds.get(key)
    if feed is None:
        feed = feeds[key] = _Feed(key)
        try:
            await feed.subscription.start()
        except BaseException as exc:
            feeds.pop(key, None)
            feed.ready.set_exception(exc)
            feed.ready.exception()  # retrieved: the joiners waiting on it raise it themselves
            raise
        feed.pump = asyncio.get_running_loop().create_task(_pump(feed))
        feed.ready.set_result(None)
    else:
        await asyncio.shield(feed.ready)
    feed.members.add(member)


async def leave(chat_id, member: Member) -> None:
    """`member` gets nothing more; the last one to leave ends this process's subscription."""
    key = str(chat_id)
    feeds = _loop_feeds()
    feed = feeds.get(key)
    if feed is None:
        return
    feed.members.discard(member)
    if feed.members or not feed.ready.done():
        return
    del feeds[key]
    if feed.pump is not None:
        feed.pump.cancel()
    await feed.subscription.close()


async def _pump(feed: _Feed) -> None:
    async for data in feed.subscription:
        try:
            if data.get("control"):
                for member in list(feed.members):
                    await member.on_control(data)
                continue
            text = json.dumps(data, separators=(",", ":"))
            for member in list(feed.members):
                await member.deliver(text)
        except Exception:  # one member's failure must not stop the others' stream
            logger.exception("fan-out of chat %s failed", feed.chat_id)


def members_here(chat_id) -> int:
    """How many members of the chat this process streams to (for tests and the admin)."""
    feed = _loop_feeds().get(str(chat_id))
    return len(feed.members) if feed else 0
