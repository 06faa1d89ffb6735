"""A chat's context: the earlier exchanges sent to the model with a new prompt.

Cached under `chat-context:<id>`, rebuilt from the database when missing, extended with each final
reply and dropped when messages or the chat are deleted.
"""

from django.conf import settings
from django.core.cache import cache
from django.db import transaction

from chats import selectors

CONTEXT_CACHE_PREFIX = "chat-context:"
CONTEXT_CACHE_SECONDS = 3600


def _context_key(chat_id) -> str:
    return f"{CONTEXT_CACHE_PREFIX}{chat_id}"


def chat_context_forget_now(chat_id) -> None:
    cache.delete(_context_key(chat_id))


def chat_context_forget(chat_id) -> None:
    """Drop a chat's cached context, now and again after commit (so no prompt re-caches old rows)."""
    key = _context_key(chat_id)
    cache.delete(key)
    transaction.on_commit(lambda: cache.delete(key))


def chat_context_get(*, chat_id, size: int) -> list[tuple[str, str]]:
    """The newest `size` exchanges, from the cache or rebuilt from the database."""
    if size <= 0:
        return []
    cached = cache.get(_context_key(chat_id))
    if cached is None:
        cached = selectors.chat_context(chat_id=chat_id, size=settings.MAX_CONTEXT)
        cache.set(_context_key(chat_id), cached, CONTEXT_CACHE_SECONDS)
    return [tuple(pair) for pair in cached[-size:]]


def chat_context_extend(chat_id, prompt: str, reply: str) -> None:
    key = _context_key(chat_id)
    cached = cache.get(key)
    if cached is None:
        return  # rebuilt from the database, reply included, on the next prompt
    cache.set(key, (list(cached) + [(prompt, reply)])[-settings.MAX_CONTEXT :], CONTEXT_CACHE_SECONDS)


def context_fit(context: list[tuple[str, str]], *, prompt: str, system: str) -> list[tuple[str, str]]:
    """Keep the newest exchanges that fit CONTEXT_MAX_CHARS together with the system prompt and prompt.

    An upper bound only: each model call is then cut by tokens to its model's context window
    (proxy.gateway.context_fit, in chats.reply.reply_stream)."""
    budget = settings.CONTEXT_MAX_CHARS - len(prompt) - len(system)
    kept: list[tuple[str, str]] = []
    for earlier_prompt, earlier_reply in reversed(context):
        cost = len(earlier_prompt) + len(earlier_reply)
        if cost > budget:
            break
        budget -= cost
        kept.append((earlier_prompt, earlier_reply))
    kept.reverse()
    return kept
