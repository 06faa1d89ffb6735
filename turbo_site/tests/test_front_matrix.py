"""The front matrix: every rule through every front, in process, with the same outcome on each.

A row is a rule broken (a credential that is no good, a key where keys are not allowed, another user's
chat, a forbidden model, a rate limit, a used-up budget, a malformed request, an upstream that fails, a
reply that misses its schema) and the one outcome it has (Turbo's code and its HTTP status, from
turbo_site.core.errors.CODES). A column is a front's adapter (testing.fronts); each cell
asserts that the front told its client that outcome in the front's own terms: the status and code of an
HTTP answer or an SSE error event, the code of a /ws error frame or of GraphQL's `extensions.code`, the
gRPC status of the code, a socket's close code.

Cells a front cannot express are not generated (no skips): each `fronts` list below says which and why.
Where a front's protocol names an outcome its own way (the /ws `invalid_payload`, graphql-transport-ws's
close codes) the row says so in `spelled`, with the reason. A cell that disagrees is a bug to fix where
the outcome is made, never a mark here.

A new front joins by adding its adapter to testing.fronts and its `Front` to the lists here.
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal

import pytest
from asgiref.sync import async_to_sync, sync_to_async

from accounts.keys import api_key_create
from accounts.services import user_create
from chats.models import Chat
from chats.services import chat_create, conversation_create
from conftest import unique_name
from groups.services import group_allowed_models_set, group_create
from proxy.gateway import health
from proxy.usage.budgets import budget_set
from proxy.usage.caller import Caller
from proxy.usage.ratelimits import ratelimit_admit
from testing import fronts
from testing.fronts import Ask, Front, Seen, session_tokens_of
from testing.inprocess import run_in_process
from turbo_site.core.errors import CODES, grpc_name_of

# One transaction per test: each row's fronts run through run_in_process (testing/inprocess.py), so the async
# views' and consumers' database calls run on the test's own connection, and the world is rolled back after.
pytestmark = pytest.mark.django_db

LIMIT_BYTES = 64 * 1024  # bodies, frames: small limits, so that an oversize request is quick to send
SCHEMA = {
    "type": "json_schema",
    "json_schema": {
        "name": "answer",
        "schema": {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
    },
}

# --- the fronts -------------------------------------------------------------------------------------------

# The /ws protocol names a malformed payload `invalid_payload` (CODES: "a /ws frame whose payload is malformed").
WS = {"invalid": "invalid_payload", "invalid_json": "invalid_json"}

v1_django = Front("v1_django", fronts.v1_django, "http")
v1_fast = Front("v1_fast", fronts.v1_fast, "http")
ws_complete = Front("ws_complete", fronts.ws_complete, "code", WS)
ws_stream = Front("ws_stream", fronts.ws_stream, "code", WS)
graphql_complete = Front("graphql_complete", fronts.graphql_complete, "code")
graphql_stream = Front("graphql_stream", fronts.graphql_stream, "code")
grpc_complete = Front("grpc_complete", fronts.grpc_complete, "grpc")
grpc_stream = Front("grpc_stream", fronts.grpc_stream, "grpc")
chat_prompt = Front("chat_prompt", fronts.chat_prompt, "http")
chat_sse = Front("chat_sse", fronts.chat_sse, "http")
graphql_prompt = Front("graphql_prompt", fronts.graphql_prompt, "code")
grpc_prompt = Front("grpc_prompt", fronts.grpc_prompt, "grpc")
chat_read = Front("chat_read", fronts.chat_read, "http")
chat_stream_sse = Front("chat_stream_sse", fronts.chat_stream_sse, "http")
chat_socket = Front("chat_socket", fronts.chat_socket, "socket")
graphql_chat = Front("graphql_chat", fronts.graphql_chat, "code")
graphql_chat_events = Front("graphql_chat_events", fronts.graphql_chat_events, "code")
grpc_events = Front("grpc_events", fronts.grpc_events, "grpc")

# Sockets refuse a caller at the handshake (or, on GraphQL's, at connection_init): close codes, no body.
HANDSHAKE = {ws_complete, ws_stream, graphql_stream, graphql_chat_events, chat_socket}
# Model calls an API key may make.
KEY_MODEL_FRONTS = [
    v1_django,
    v1_fast,
    ws_complete,
    ws_stream,
    graphql_complete,
    graphql_stream,
    grpc_complete,
    grpc_stream,
]
# A chat's prompt: session tokens only.
PROMPT_FRONTS = [chat_prompt, chat_sse, graphql_prompt, grpc_prompt]
MODEL_FRONTS = KEY_MODEL_FRONTS + PROMPT_FRONTS
# A chat's objects: session tokens only. (The conversation API's /api/chat/<number> names a chat by its owner's own
# number: another user's chat cannot even be named there, so it is not a chat-object front.)
CHAT_FRONTS = [chat_read, chat_stream_sse, chat_socket, graphql_chat, graphql_chat_events, grpc_events]
CHAT_FRONTS += [chat_prompt, graphql_prompt, grpc_prompt]
EVERY_FRONT = list(dict.fromkeys(MODEL_FRONTS + CHAT_FRONTS))


def expected(front: Front, code: str, status: int, *, handshake: bool, mid_reply: bool) -> Seen:
    """What `front` shows its client for the outcome (code, status)."""
    if front is chat_sse and mid_reply:  # the stream had begun (200): the failure is its `error` event
        return Seen(200, code)
    if front in HANDSHAKE and handshake:
        # graphql-transport-ws closes every refused connection_init 4403 (it has no 4401)
        if front in (graphql_stream, graphql_chat_events):
            return Seen(403, None)
        return Seen(status, None)
    if front.carries == "http":
        return Seen(status, code)
    if front.carries == "code":
        return Seen(None, front.dialect.get(code, code))
    if front.carries == "grpc":
        return Seen(grpc_name_of(code, status), None)
    return Seen(403, None)  # a socket refused at its handshake carries no code: an HTTP 403


# --- the world a row runs in ------------------------------------------------------------------------------


@dataclass
class World:
    user: object
    live: str
    revoked: str
    expired: str
    key: str
    limited_key: str  # a key for gpt-4o-mini only
    chat: Chat
    others_chat: Chat


@pytest.fixture
def world(db, upstream, settings) -> World:
    settings.MAX_BODY_BYTES = settings.PROXY_MAX_BODY_BYTES = settings.WS_MAX_FRAME_BYTES = LIMIT_BYTES
    user = user_create(username=unique_name(), password="correct-horse-battery")
    live, revoked, expired = session_tokens_of(user)
    _, key = api_key_create(user=user, name="a program")
    _, limited_key = api_key_create(user=user, name="a small program", models=["gpt-4o-mini"])
    chat = conversation_create(owner=user, title="mine", model="gpt-4o-mini")
    other = user_create(username=unique_name(), password="correct-horse-battery")
    others_chat = chat_create(owner=other, name="theirs", model="gpt-4o-mini")
    yield World(user, live, revoked, expired, key, limited_key, chat, others_chat)
    health.forget()  # an upstream that failed on purpose is not cooled down for the next test


def _mine(world: World, chat: Chat | None = None, **fields) -> Ask:
    chat = chat or world.chat
    return Ask(world.live, chat_id=chat.pk, chat_number=chat.number, **fields)


def forbidden_by_group(world: World, settings, upstream) -> Ask:
    chat = conversation_create(owner=world.user, title="big", model="gpt-4o")
    group = group_create(owner=world.user, name=unique_name("group"))
    group_allowed_models_set(group=group, allowed_models=["gpt-4o-mini"])
    return _mine(world, chat, model="gpt-4o")


def rate_limited(world: World, settings, upstream) -> Ask:
    settings.RATE_LIMIT_USER_RPM = 1
    async_to_sync(ratelimit_admit)(Caller(world.user.pk), payload={})  # the one request of this minute
    return _mine(world)


def budget_used_up(world: World, settings, upstream) -> Ask:
    budget_set(scope="user", target_id=world.user.pk, usd=Decimal(0), period="month")
    return _mine(world)


def upstream_fails(scenario: str):
    def setup(world: World, settings, upstream) -> Ask:
        settings.PROXY_READ_TIMEOUT = 0.5  # the "slow" scenario waits 5 s before its headers
        return _mine(world, prompt=f"[scenario:{scenario}] hello")

    return setup


def reply_off_schema(world: World, settings, upstream) -> Ask:
    settings.STRUCTURED_RETRIES = 0
    chat = conversation_create(owner=world.user, title="structured", model="gpt-4o-mini")
    Chat.objects.filter(pk=chat.pk).update(response_format=SCHEMA)
    return _mine(world, chat, response_format=SCHEMA)


def malformed(kind: str):
    return lambda world, settings, upstream: _mine(world, bad=kind)


@dataclass
class Row:
    name: str
    setup: Callable  # (world, settings, upstream) -> Ask, run in a thread (it may use the ORM)
    code: str
    fronts: list[Front]
    status: int = 0  # 0: the code's status in CODES
    handshake: bool = False  # refused before a socket opens
    mid_reply: bool = False  # the failure comes once the model is called, after a prompt is stored
    upstream_asked: bool = False  # the upstream is called (and fails); else policy refuses before it
    spelled: dict = field(default_factory=dict)  # front -> Seen, where the front's protocol spells it its way


# Every cell agrees: the five disagreements the matrix first found (the chat SSE's mid-reply codes, /v1's own
# codes for an unreadable model) are fixed where they were made, not marked here.

ROWS = [
    # --- who is calling (accounts.auth): every front --------------------------------------------------
    # The fast path takes only requests with an Authorization header: one without is Django's (v1_django).
    Row(
        "no_credential",
        lambda w, s, u: Ask(None),
        "unauthorized",
        [f for f in EVERY_FRONT if f is not v1_fast],
        handshake=True,
    ),
    Row("garbage_credential", lambda w, s, u: Ask("not-a-token"), "unauthorized", EVERY_FRONT, handshake=True),
    Row("revoked_credential", lambda w, s, u: Ask(w.revoked), "unauthorized", EVERY_FRONT, handshake=True),
    Row("expired_credential", lambda w, s, u: Ask(w.expired), "unauthorized", EVERY_FRONT, handshake=True),
    Row(
        "key_where_keys_are_not_allowed",
        lambda w, s, u: Ask(w.key, chat_id=w.chat.pk, chat_number=w.chat.number),
        "key_not_allowed_here",
        [*CHAT_FRONTS, chat_sse],
        handshake=True,
        # GraphQL's socket takes a key at connection_init (its model calls may use one): the
        # subscription's field refuses it, as GraphQL over HTTP does.
        spelled={graphql_chat_events: Seen(None, "key_not_allowed_here")},
    ),
    # --- what they may see: a chat's access rule (chats.selectors), an invisible chat is a 404 ------------
    Row(
        "another_users_chat",
        lambda w, s, u: Ask(w.live, chat_id=w.others_chat.pk),
        "not_found",
        CHAT_FRONTS,
        # The socket's handshake is refused (an HTTP 403 before any frame): no code can travel.
        spelled={chat_socket: Seen(403, None)},
    ),
    # --- what they may use: model limits, rate limits, budgets -------------------------------------------
    Row("forbidden_model_by_group", forbidden_by_group, "model_not_allowed", MODEL_FRONTS),
    Row(
        "forbidden_model_by_key",
        lambda w, s, u: Ask(w.limited_key, model="gpt-4o"),
        "model_not_allowed",
        KEY_MODEL_FRONTS,  # a chat prompt takes no API key
    ),
    # A chat prompt's rate limit is taken by its model call, after the prompt is stored: mid-reply.
    Row("rate_limited", rate_limited, "rate_limited", MODEL_FRONTS, mid_reply=True),
    Row("budget_used_up", budget_used_up, "budget_exceeded", MODEL_FRONTS),
    # --- malformed requests ---------------------------------------------------------------------------
    Row(
        "deep_nesting",
        malformed("deep"),
        "invalid_json",
        MODEL_FRONTS,
        spelled={
            # graphql-transport-ws closes 4400 on a frame that breaks the protocol (JSON it cannot read)
            graphql_stream: Seen(400, None),
            # gRPC: protobuf does not nest; the schema text does, and a schema that cannot be read is
            # `invalid_response_format` (the same INVALID_ARGUMENT)
        },
    ),
    # gRPC's message size is its transport's (grpc's receive limit), which in process has no say.
    Row(
        "oversize",
        malformed("oversize"),
        "body_too_large",
        [f for f in MODEL_FRONTS if f.carries != "grpc"],
        spelled={
            ws_complete: Seen(None, "frame_too_large"),  # the /ws protocol's code for WS_MAX_FRAME_BYTES
            ws_stream: Seen(None, "frame_too_large"),
            graphql_stream: Seen(1009, None),  # the WebSocket close code "message too big"
        },
    ),
    # gRPC: protobuf types every field, so a wrong type cannot be sent.
    Row(
        "wrong_types",
        malformed("wrong_type"),
        "invalid",
        [f for f in MODEL_FRONTS if f.carries != "grpc"],
        spelled={
            # GraphQL checks its variables' types itself, before any resolver: `invalid_query`
            graphql_complete: Seen(None, "invalid_query"),
            graphql_stream: Seen(None, "invalid_query"),
            graphql_prompt: Seen(None, "invalid_query"),
        },
    ),
    # --- the upstream fails ---------------------------------------------------------------------------
    # /v1 is a byte-exact passthrough: the upstream's own error status and body reach the client.
    Row(
        "upstream_429",
        upstream_fails("error_429"),
        "upstream_error",
        MODEL_FRONTS,
        status=502,
        spelled={v1_django: Seen(429, "rate_limit_exceeded"), v1_fast: Seen(429, "rate_limit_exceeded")},
        mid_reply=True,
        upstream_asked=True,
    ),
    Row(
        "upstream_500",
        upstream_fails("error_500"),
        "upstream_error",
        MODEL_FRONTS,
        status=502,
        spelled={v1_django: Seen(500, "server_error"), v1_fast: Seen(500, "server_error")},
        mid_reply=True,
        upstream_asked=True,
    ),
    Row(
        "upstream_timeout",
        upstream_fails("slow"),
        "upstream_timeout",
        MODEL_FRONTS,
        mid_reply=True,
        upstream_asked=True,
    ),
    # /v1 is a passthrough: it never validates a reply against a schema.
    Row(
        "reply_off_its_schema",
        reply_off_schema,
        "invalid_structured_output",
        [f for f in MODEL_FRONTS if f not in (v1_django, v1_fast)],
        mid_reply=True,
        upstream_asked=True,
    ),
]


async def _row_run(row: Row, fronts: list[Front], world: World, settings, upstream) -> dict[str, tuple[Seen, Seen]]:
    """Each front's (seen, expected) for the row: one world, the fronts one after the other."""
    ask = await sync_to_async(row.setup)(world, settings, upstream)
    status = row.status or CODES[row.code].status
    cells = {}
    for front in fronts:
        health.forget()  # a failure on purpose cools the upstream down: the next front starts afresh
        want = row.spelled.get(front) or expected(
            front, row.code, status, handshake=row.handshake, mid_reply=row.mid_reply
        )
        cells[front.name] = (await front.call(ask), want)
    return cells


def _table(cells: dict[str, tuple[Seen, Seen]]) -> str:
    return "\n".join(
        f"  {name:20} saw {seen}" + ("" if seen == want else f"  EXPECTED {want}")
        for name, (seen, want) in cells.items()
    )


# One test per row (one world, so the suite stays quick); a known disagreement is a cell of its own below.
@pytest.mark.parametrize("row", ROWS, ids=lambda row: row.name)
def test_a_rule_has_one_outcome_on_every_front(row: Row, world, settings, upstream):
    async def scenario():
        return await _row_run(row, row.fronts, world, settings, upstream)

    cells = run_in_process(scenario)
    assert all(seen == want for seen, want in cells.values()), f"{row.name}:\n{_table(cells)}"
    if not row.upstream_asked:  # a refusal is decided before the upstream hears of the call
        calls = [request.path for request in upstream.requests if request.method == "POST"]
        assert calls == [], f"{row.name}: the upstream was called: {calls}"


def test_every_row_names_a_known_code_and_every_front_has_a_row():
    assert all(row.code in CODES for row in ROWS)
    assert {front for row in ROWS for front in row.fronts} == set(EVERY_FRONT)
    assert len({row.name for row in ROWS}) == len(ROWS)
