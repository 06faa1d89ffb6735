"""Memories that keep a chat program's messages from one turn to the next.

`ChatMemory` (the default for the program a chat runs) keeps them with the chat in the database, saved
in the same transaction as the turn's recorded steps. `RedisMemory` keeps them in Redis (REDIS_ADDRESS),
written after the turn. Each remembers how many recorded steps it reflects: when that is not the chat's
count (a write that was lost, an expired key), the turn's replay rebuilds the memory instead.
Outside a chat both are plain lists.
"""

import json

import redis.asyncio
from django.conf import settings

from chats.programs.library import ListMemory, PrefixMessage, ProgramError, message_from, runtime_current
from turbo_site.core.acache import redis_client

REDIS_MEMORY_PREFIX = "turbo:program-memory:"
REDIS_MEMORY_SECONDS = 30 * 24 * 3600  # a chat idle this long rebuilds its memory by replay


class ChatMemory(ListMemory):
    """The chat's own memory, in the database with the chat's program state."""

    persistent = True

    async def init(self, context) -> None:
        state = getattr(runtime_current(), "state", None)
        if state is not None and state.memory_steps == state.committed:
            self.messages = [message_from(item) for item in state.memory]
            self.in_step = True


def _redis() -> redis.asyncio.Redis:
    if not settings.REDIS_ADDRESS:
        raise ProgramError("RedisMemory needs Redis: set REDIS_ADDRESS")
    return redis_client(settings.REDIS_ADDRESS)


class RedisMemory(ListMemory):
    """The chat's memory in Redis, under `turbo:program-memory:<chat id>` (kept REDIS_MEMORY_SECONDS)."""

    persistent = True

    def __init__(self, messages: list[PrefixMessage] | None = None, *, seconds: int = REDIS_MEMORY_SECONDS):
        super().__init__(messages)
        self.seconds = seconds
        self.key: str | None = None

    async def init(self, context) -> None:
        state = getattr(runtime_current(), "state", None)
        if state is None:
            return  # outside a chat: a list
        self.key = f"{REDIS_MEMORY_PREFIX}{state.chat_id}"
        raw = await _redis().get(self.key)
        stored = json.loads(raw) if raw else None
        if stored and stored.get("steps") == state.committed:
            self.messages = [message_from(item) for item in stored["messages"]]
            self.in_step = True

    async def turn_end(self, steps: int) -> None:
        if self.key:
            body = json.dumps({"steps": steps, "messages": await self.get_dicts()})
            await _redis().set(self.key, body, ex=self.seconds)
