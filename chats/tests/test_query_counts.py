"""Database queries of POST /chat/prompt and /chat/read do not grow with a chat's history.

The requests run through the whole ASGI app in process (the `new_client` fixture, testing/inprocess.py):
the views, their `database_sync_to_async` calls (thread-sensitive, so they run on this thread) and the
middleware all use this thread's connection, inside the test's transaction, which CaptureQueriesContext
watches. The prompt goes to the fake upstream over a real socket. Queries made off the request path (the
event log's writer thread) are not counted.

Not timed: these tests count queries and read their SQL, never the clock.
"""

import re

import httpx
import pytest
from django.core.cache import cache
from django.db import connection
from django.test.utils import CaptureQueriesContext

from chats.context import CONTEXT_CACHE_PREFIX
from chats.models import Chat, Message
from conftest import unique_name

pytestmark = pytest.mark.django_db

SMALL, LARGE = 5, 300
# A SELECT reading the messages table (also as a subquery).
MESSAGES_SELECT = re.compile(r'^\s*SELECT\b.*\bFROM\s+"messages"', re.IGNORECASE | re.DOTALL)
LIMIT = re.compile(r"\bLIMIT\s+(\d+)", re.IGNORECASE)


@pytest.fixture
def http(new_client, settings) -> httpx.Client:
    """A client carrying a fresh user's token; its session lookup stays cached all test long."""
    settings.SESSION_CACHE_SECONDS = 3600
    signup = {"username": unique_name("queries"), "password": "correct-horse"}
    response = new_client().post("/user/signup", data=signup)
    assert response.status_code == 200, response.text
    return new_client(headers={"Authorization": f"Bearer {response.json()['token']}"})


def chat_with_history(http: httpx.Client, size: int) -> Chat:
    """A new chat of the client's user holding `size` complete exchanges, bulk-inserted."""
    response = http.post("/chat/create", data={"name": f"history-{size}", "model": "gpt-4o-mini"})
    assert response.status_code == 200, response.text
    chat = Chat.objects.get(pk=response.json()["id"])
    Message.objects.bulk_create(
        [Message(chat=chat, author_id=chat.owner_id, prompt=f"p{n}", reply=f"r{n}") for n in range(size)],
        batch_size=500,
    )
    # One request before measuring, so that the token's session is cached as in steady use.
    assert http.get("/chat/read", params={"id": str(chat.pk), "limit": "1"}).status_code == 200
    return chat


def captured(action) -> list[str]:
    """The SQL of every query `action` makes on this thread's connection."""
    with CaptureQueriesContext(connection) as queries:
        action()
    return [query["sql"] for query in queries.captured_queries]


def message_selects(queries: list[str]) -> list[str]:
    return [sql for sql in queries if MESSAGES_SELECT.search(sql)]


def unbounded(queries: list[str], most: int) -> list[str]:
    """The message SELECTs without a LIMIT, or with one above `most` rows."""
    found = []
    for sql in message_selects(queries):
        limits = [int(n) for n in LIMIT.findall(sql)]
        if not limits or max(limits) > most:
            found.append(sql)
    return found


def prompt_queries(http: httpx.Client, chat: Chat) -> dict[str, list[str]]:
    """The queries of a cold prompt (the context is rebuilt from the database), then of a warm one."""
    key = f"{CONTEXT_CACHE_PREFIX}{chat.pk}"

    def send():
        response = http.post("/chat/prompt", data={"id": str(chat.pk), "prompt": "echo: hello", "context": "20"})
        assert response.status_code == 200, response.text
        assert response.json()["message"]["reply"] == "hello"

    cache.delete(key)
    cold = captured(send)
    assert cache.get(key) is not None, "the cold prompt should have cached the chat's context"
    warm = captured(send)
    return {"cold": cold, "warm": warm}


def read_queries(http: httpx.Client, chat: Chat) -> dict[str, list[str]]:
    """The queries of /chat/read: the newest page (default limit), and a page before a message."""
    anchor = Message.objects.filter(chat=chat).order_by("created_at", "id").values_list("pk", flat=True)[2]

    def read(**extra):
        def run():
            response = http.get("/chat/read", params={"id": str(chat.pk), **extra})
            assert response.status_code == 200, response.text

        return run

    return {"newest": captured(read()), "before": captured(read(before=str(anchor), limit="50"))}


def test_prompt_queries_do_not_grow_with_history(http, upstream, settings):
    # The caller's budgets and rate limits are read once per process and cached: read them first, and
    # keep them for the whole test, so both chats are measured alike.
    settings.BUDGET_CACHE_SECONDS = settings.RATE_LIMIT_CACHE_SECONDS = 3600
    prompt_queries(http, chat_with_history(http, 0))
    small = prompt_queries(http, chat_with_history(http, SMALL))
    large = prompt_queries(http, chat_with_history(http, LARGE))
    for phase in ("cold", "warm"):
        assert len(large[phase]) == len(small[phase]), (phase, small[phase], large[phase])
        # Only the context window the model may get is read, never the whole history.
        assert not unbounded(large[phase], most=settings.MAX_CONTEXT), large[phase]
    # The context is one query on the cold path and comes from the cache on the warm one.
    assert len(message_selects(large["warm"])) <= len(message_selects(large["cold"])) <= 1, large


def test_read_queries_do_not_grow_with_history(http):
    small = read_queries(http, chat_with_history(http, SMALL))
    large = read_queries(http, chat_with_history(http, LARGE))
    for page in ("newest", "before"):
        assert len(large[page]) == len(small[page]), (page, small[page], large[page])
        assert not unbounded(large[page], most=100), large[page]  # the page size asked for, at most
