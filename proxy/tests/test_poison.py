"""No store or exporter can be poisoned: one hostile value (NUL, a lone surrogate, a 10 MB string, deep
nesting, odd Unicode) in a /v1 call, a REST request (a chat's JSON settings and a prompt included), a
GraphQL model call, a /ws frame or a gRPC call neither fails that request with a 500 nor stops what
comes after it from being logged, charged (usage rollups), counted (/metrics) and traced (the OTLP
encoding of the spans).

In process (httpx.ASGITransport over Turbo's ASGI app), in production mode, on whichever database the
suite runs (SQLite, or Postgres where NUL is refused), against the fake upstream. The reproductions run
through run_in_process, in one transaction rolled back, not flushed; the shutdown tests and the hypothesis
test run on committed data (each says why).
"""

import json
import uuid
from decimal import Decimal

import httpx
import pytest
from channels.db import database_sync_to_async
from hypothesis import HealthCheck, example, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families

from proxy.events import events_flush, events_shutdown, events_state, events_writer_resume
from proxy.models import Event, UsageRollup
from proxy.owners import objects_pending
from proxy.usage.caller import Caller
from proxy.usage.records import Usage, usage_pending, usage_record
from testing.inprocess import run_in_process
from turbo_site.core import metrics, tracing
from turbo_site.core.text import storable

pytestmark = pytest.mark.django_db

METRICS_TOKEN = "poison-scraper-secret"
ORDINARY = {"model": "gpt-4o", "messages": [{"role": "user", "content": "echo: all is well"}]}
POISON = ["gpt\u0000x", "\ud800", "x" * 10_000_000, "\u202egpt\ufeff\U0001f600\u0301", "\udfff\x00\ud83d"]


class Nested:
    """A value nested `levels` deep (lists in objects), written as JSON text by hand: the standard encoder
    stops at about a thousand levels; a client need not."""

    MARK = "\x00nested\x00"

    def __init__(self, levels: int):
        self.levels = levels

    def text(self) -> str:
        return '{"a": [' * self.levels + "1" + "]}" * self.levels

    def __repr__(self) -> str:
        return f"Nested({self.levels})"


def json_text(value) -> str:
    """`value` as a client may send it: lone surrogates as \\u escapes, a Nested value as its deep text."""
    found: list[Nested] = []

    def mark(item):
        if isinstance(item, Nested):
            found.append(item)
            return Nested.MARK
        raise TypeError(type(item).__name__)

    text = json.dumps(value, default=mark)
    for nested in found:
        text = text.replace(json.dumps(Nested.MARK), nested.text(), 1)
    return text


def keyed(value) -> dict:
    """`value` as the key of a JSON object (a Nested value cannot be one: as the value then)."""
    return {"poison": value} if isinstance(value, Nested) else {value: 1}


def as_text(value) -> str:
    """What a front that takes only text (a gRPC string) is sent for `value`."""
    return value.text() if isinstance(value, Nested) else value


@pytest.fixture
def production(upstream, settings):
    """DEBUG off, /metrics on, spans kept in memory: everything a poisoned value could break."""
    settings.DEBUG = False
    settings.METRICS_TOKEN = METRICS_TOKEN
    settings.METRICS_ALLOWED_IPS = []
    exporter = InMemorySpanExporter()
    uninstall = tracing.tracing_install(SimpleSpanProcessor(exporter))
    # The model names a process keeps as labels are few (then "other"): made-up ones must not use them up.
    seen = {kind: set(values) for kind, values in metrics._seen.items()}
    yield exporter
    uninstall()
    for kind, values in seen.items():
        metrics._seen[kind] = values


async def asgi_client() -> httpx.AsyncClient:
    from turbo_site.asgi import application

    return httpx.AsyncClient(transport=httpx.ASGITransport(app=application), base_url="http://127.0.0.1", timeout=60)


async def signed_up(http: httpx.AsyncClient) -> tuple[str, str]:
    response = await http.post("/user/signup", data={"username": f"u-{uuid.uuid4().hex[:10]}", "password": "pw-123456"})
    assert response.status_code == 200, response.text
    return response.json()["token"], response.json()["user"]["id"]


async def post_json(http: httpx.AsyncClient, path: str, value, token: str) -> httpx.Response:
    """POST a JSON body as a client may send it (json_text: httpx's json= cannot)."""
    headers = {**bearer(token), "Content-Type": "application/json"}
    return await http.post(path, content=json_text(value).encode(), headers=headers)


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


@database_sync_to_async
def flushed_records(user_id: str) -> tuple[list[Event], list[UsageRollup]]:
    events_flush()
    return (
        list(Event.objects.filter(user_id=user_id, type="proxy")),
        list(UsageRollup.objects.filter(user_id=user_id)),
    )


async def assert_ordinary_call_served(http: httpx.AsyncClient, exporter: InMemorySpanExporter) -> None:
    """A new user's ordinary /v1 call works, and is logged, charged, counted and traced."""
    token, user_id = await signed_up(http)
    exporter.clear()
    response = await http.post("/v1/chat/completions", json=ORDINARY, headers=bearer(token))
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "all is well"
    events, rollups = await flushed_records(user_id)
    assert [(event.model, event.status) for event in events] == [("gpt-4o", 200)]
    assert [(rollup.model, rollup.requests) for rollup in rollups] == [("gpt-4o", 1)]
    assert rollups[0].input_tokens > 0
    assert usage_pending() == 0
    scrape = await http.get("/metrics", headers=bearer(METRICS_TOKEN))
    assert scrape.status_code == 200, scrape.text
    families = {family.name: family for family in text_string_to_metric_families(scrape.text)}
    assert any(sample.labels.get("model") == "gpt-4o" for sample in families["turbo_tokens"].samples)
    spans = exporter.get_finished_spans()
    assert any(span.attributes.get("gen_ai.request.model") == "gpt-4o" for span in spans)
    assert encode_spans(spans).SerializeToString()  # what the OTLP exporter sends: every span of the batch


# --- the reproductions --------------------------------------------------------------------------------


@pytest.mark.parametrize("model", POISON[:2], ids=["nul", "lone-surrogate"])
def test_a_poisoned_model_name_is_served_and_blocks_nothing_behind_it(production, model):
    async def scenario():
        dropped = events_state()["dropped"]  # this process's count since it started: earlier tests' too
        async with await asgi_client() as http:
            token, user_id = await signed_up(http)
            production.clear()
            response = await post_json(http, "/v1/chat/completions", {**ORDINARY, "model": model}, token)
            assert response.status_code == 200, response.text
            events, rollups = await flushed_records(user_id)
            # Stored as storable text, the same on both databases; counted once, never retried.
            assert [event.model for event in events] == [storable(model)]
            assert [(rollup.model, rollup.requests) for rollup in rollups] == [(storable(model), 1)]
            assert encode_spans(production.get_finished_spans()).SerializeToString()
            assert events_state()["dropped"] == dropped  # none of this call's records was refused
            await assert_ordinary_call_served(http, production)

    run_in_process(scenario)


def test_a_lone_surrogate_in_a_message_is_sent_upstream_escaped(production, upstream, settings, tmp_path):
    config = tmp_path / "turbo.yaml"
    config.write_text(
        f"upstreams:\n  - {{name: fake, base_url: {upstream.url}/v1, api_key: sk-k}}\n"
        "models:\n  - name: public\n    deployments:\n      - {upstream: fake, model: gpt-4o}\n"
    )
    settings.TURBO_CONFIG = str(config)  # a renamed model: the gateway rewrites the body (body_for)
    poisoned = {"model": "public", "messages": [{"role": "user", "content": "echo: a\ud800b"}]}

    async def scenario():
        async with await asgi_client() as http:
            token, _ = await signed_up(http)
            plain = await post_json(http, "/v1/chat/completions", poisoned, token)
            streamed = await post_json(
                http, "/v1/chat/completions", {**poisoned, "stream": True}, token
            )  # usage asked for: the body is rewritten for that too
        assert plain.status_code == streamed.status_code == 200, plain.text
        sent = [request.json() for request in upstream.requests]
        assert [body["messages"][0]["content"] for body in sent] == ["echo: a\ud800b"] * 2
        assert sent[1]["stream_options"] == {"include_usage": True}

    run_in_process(scenario)


def test_metrics_answer_even_with_a_label_an_older_process_poisoned(production):
    async def scenario():
        metrics.tokens.labels("\ud800", "input").inc(3)  # as written before labels were made storable
        try:
            async with await asgi_client() as http:
                scrape = await http.get("/metrics", headers=bearer(METRICS_TOKEN))
        finally:
            metrics.tokens.remove("\ud800", "input")
        assert scrape.status_code == 200
        samples = [sample for family in text_string_to_metric_families(scrape.text) for sample in family.samples]
        assert any(sample.labels == {"model": "?", "direction": "input"} and sample.value == 3 for sample in samples)

    run_in_process(scenario)


def dropped(name: str, reason: str) -> float:
    families = {family.name: family for family in text_string_to_metric_families(metrics.exposition().decode())}
    return sum(sample.value for sample in families[name].samples if sample.labels["reason"] == reason)


def test_a_span_the_exporter_cannot_encode_is_dropped_alone_and_counted(production):
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    from turbo_site.tests.test_tracing import Receiver

    with tracing.span("before", {"model": "\ud800 made storable"}):
        pass
    # A span made past Turbo's hooks (a library's, say): its name cannot be encoded. (An attribute
    # that cannot is left out by the encoder itself; a name, or a status message, fails the batch.)
    tracing._tracer.start_span("chat \ud800", attributes={"model": "\ud800"}).end()
    with tracing.span("after"):
        pass
    batch = production.get_finished_spans()
    receiver = Receiver()
    try:
        before = dropped("turbo_spans_dropped", "refused")
        exporter = tracing.EncodableSpans(OTLPSpanExporter(endpoint=receiver.url + "/v1/traces"))
        assert exporter.export(batch).name == "SUCCESS"
        received = receiver.wait(lambda spans: len(spans) >= 2)
    finally:
        receiver.stop()
    assert [span.name for _, _, span in received] == ["before", "after"]
    assert dropped("turbo_spans_dropped", "refused") - before == 1


@database_sync_to_async
def _write_a_refused_record_and_a_good_one() -> tuple[list[UsageRollup], float]:
    from accounts.models import User

    users = [User.objects.create_user(username=f"u-{uuid.uuid4().hex[:10]}", password="x") for _ in range(2)]
    before = dropped("turbo_usage_records_dropped", "refused")
    # An upstream that reports 2^70 tokens: no column holds it, on any database.
    huge = f"huge-{uuid.uuid4().hex[:8]}"
    try:
        usage_record(Caller(user_id=users[0].pk), Usage(huge, input_tokens=2**70))
        usage_record(Caller(user_id=users[1].pk), Usage("gpt-4o", input_tokens=5, output_tokens=1))
        events_flush()
        events_flush()  # nothing is left to retry
    finally:
        # Its 2^70 in turbo_tokens_total (and cost) would swallow later tests' small increments.
        for counter, labels in ((metrics.tokens, (huge, "input")), (metrics.cost, (huge,))):
            if labels in counter._metrics:
                counter.remove(*labels)
    after = dropped("turbo_usage_records_dropped", "refused")
    return list(UsageRollup.objects.filter(user_id__in=[user.pk for user in users])), after - before


def test_a_usage_record_the_database_refuses_is_dropped_and_counted(production):
    async def scenario():
        rollups, dropped = await _write_a_refused_record_and_a_good_one()
        assert [(rollup.input_tokens, rollup.output_tokens) for rollup in rollups] == [(5, 1)]
        assert dropped == 1
        assert usage_pending() == 0

    run_in_process(scenario)


@database_sync_to_async
def _usage_written_at_shutdown() -> list[UsageRollup]:
    from accounts.models import User

    user = User.objects.create_user(username=f"u-{uuid.uuid4().hex[:10]}", password="x")
    usage_record(Caller(user_id=user.pk), Usage("gpt-4o", input_tokens=7, output_tokens=2))
    try:
        events_shutdown()
    finally:
        events_writer_resume()
    return list(UsageRollup.objects.filter(user_id=user.pk))


@pytest.mark.django_db(transaction=True)  # the shutdown's flush closes its thread's connection
async def test_pending_usage_is_written_at_shutdown(production):
    rollups = await _usage_written_at_shutdown()
    assert [(rollup.input_tokens, rollup.output_tokens, rollup.cost_usd > Decimal(0)) for rollup in rollups] == [
        (7, 2, True)
    ]
    assert usage_pending() == 0


@database_sync_to_async
def _shutdown_with_the_database_away() -> tuple[int, int]:
    """The shutdown flush with the database unreachable (its address changed: a closed port, or a file
    that cannot be opened); returns what is left queued (usage records, object owners)."""
    import socket

    from django.db import connection

    database = connection.settings_dict  # shared by every thread's connection to it
    saved = dict(database)
    connection.close()
    if connection.vendor == "postgresql":
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            closed_port = probe.getsockname()[1]  # nothing listens once the probe is closed
        database.update(HOST="127.0.0.1", PORT=str(closed_port))
    else:
        database["NAME"] = f"/nonexistent-{uuid.uuid4().hex}/turbo.sqlite3"
    try:
        events_shutdown()
        return usage_pending(), objects_pending()
    finally:
        connection.close()
        database.clear()
        database.update(saved)
        events_writer_resume()


@pytest.mark.django_db(transaction=True)  # the shutdown's flush closes its thread's connection
async def test_what_is_pending_at_shutdown_with_the_database_away_is_counted(production, paused_event_writer):
    # The writer paused: the records stay queued for the shutdown's flush, not written just before it.
    from proxy.owners import object_record

    user_id = await database_sync_to_async(_new_user_id)()
    usage_record(Caller(user_id=user_id), Usage("gpt-4o", input_tokens=7, output_tokens=2))
    object_record("responses", f"resp_{uuid.uuid4().hex}", user_id)
    before = dropped("turbo_usage_records_dropped", "shutdown"), dropped("turbo_object_owners_dropped", "shutdown")
    assert await _shutdown_with_the_database_away() == (0, 0)
    after = dropped("turbo_usage_records_dropped", "shutdown"), dropped("turbo_object_owners_dropped", "shutdown")
    assert (after[0] - before[0], after[1] - before[1]) == (1, 1)  # not written, and not lost silently
    assert not await UsageRollup.objects.filter(user_id=user_id).aexists()


def _new_user_id() -> str:
    from accounts.models import User

    return str(User.objects.create_user(username=f"u-{uuid.uuid4().hex[:10]}", password="x").pk)


# --- any poison, through every front ------------------------------------------------------------------

poison_text = st.one_of(
    st.sampled_from(POISON),
    # lone surrogates, NUL, controls, bidi and zero-width marks among any other characters
    st.text(alphabet=st.one_of(st.characters(), st.sampled_from("\x00\ud800\udfff\u202e\ufeff\u200b")), max_size=40),
    st.text(min_size=1, max_size=20).map(lambda text: text * 50_000),  # long strings
)
# Where a string is expected, or inside a JSON value: nesting deeper than any parser's recursion.
poison = st.one_of(poison_text, st.integers(min_value=500, max_value=100_000).map(Nested))


# Each kind of poison in every place at least once, whatever hypothesis draws besides. Transactional: its
# program chat's opening turn (/chat/create) runs a generation from a sync view through async_to_sync, whose
# database calls would wait for ever in process on the test's thread, busy in that view.
@pytest.mark.django_db(transaction=True)
@example(model=POISON[0], content=POISON[2], name=POISON[1])  # NUL, 10 MB, a lone surrogate
@example(model=POISON[1], content=Nested(100_000), name=POISON[0])
@example(model=Nested(5_000), content=POISON[3], name=POISON[2])  # odd Unicode
@example(model=POISON[4], content=POISON[0], name=Nested(100_000))
@hypothesis_settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(model=poison, content=poison, name=poison)
async def test_poison_anywhere_leaves_ordinary_requests_served(production, model, content, name):
    async with await asgi_client() as http:
        token, _ = await signed_up(http)
        chat = {"model": model, "messages": [{"role": "user", "content": content}], "user": name}
        for body in (chat, {**chat, "stream": True}, {"model": model, "input": content}):
            answered = await post_json(http, "/v1/chat/completions", body, token)
            assert answered.status_code < 500, answered.text
        ordinary_chat = await post_json(http, "/chat/create", {"name": "ordinary"}, token)
        assert ordinary_chat.status_code == 200, ordinary_chat.text
        chat_id = ordinary_chat.json()["id"]
        for path, body in (
            ("/chat/create", {"name": name, "model": model, "system_prompt": content}),
            # JSON values a chat keeps (Postgres's jsonb refuses \u0000 where SQLite stores it)
            ("/chat/create", {"name": "settings", "settings": {"stop": [content], **keyed(name)}}),
            ("/chat/create", {"name": "program", "program": "horoscope", "program_context": {"a": content}}),
            ("/chat/update", {"id": chat_id, "settings": {"stop": [name]}}),
            ("/user/keys/create", {"name": name, "models": [model]}),
            ("/group/create", {"name": name, "description": content}),
        ):
            answered = await post_json(http, path, body, token)
            assert answered.status_code < 500, (path, answered.text)
            assert "error" in answered.json() or answered.status_code == 200
        # GraphQL over HTTP: a model call whose every string is the poison, and a chat's JSON settings.
        query = "mutation($input: CompletionInput!) { complete(input: $input) { content } }"
        variables = {"input": {"model": model, "messages": [{"role": "user", "content": content, "name": name}]}}
        answered = await post_json(http, "/graphql", {"query": query, "variables": variables}, token)
        assert answered.status_code < 500, answered.text
        query = "mutation($n: String!, $s: JSON!) { chatCreate(name: $n, settings: $s) { id } }"
        variables = {"n": name, "s": {"stop": [content]}}
        answered = await post_json(http, "/graphql", {"query": query, "variables": variables}, token)
        assert answered.status_code < 500, answered.text
        assert "internal_error" not in answered.text, answered.text
        # /ws: the same call as an RPC frame; the socket answers it (a result or an error frame).
        frame = {"type": "chat_completion", "request_id": "p", "payload": chat}
        answer = await ws_answer(token, frame)
        assert (answer.get("error") or {}).get("code") != "internal_error", answer
        assert answer.get("request_id") == "p" or answer["error"]["code"] in ("frame_too_large", "invalid_json"), answer
        # gRPC: the Completions servicer, as the server calls it.
        await grpc_complete(token, as_text(model), as_text(content))
        await assert_ordinary_call_served(http, production)


async def ws_answer(token: str, frame: dict) -> dict:
    """The /ws answer to one frame (sent as a client may: json_text)."""
    from channels.testing import WebsocketCommunicator

    from turbo_site.asgi import application

    headers = [(b"host", b"127.0.0.1"), (b"authorization", f"Bearer {token}".encode())]
    communicator = WebsocketCommunicator(application, "/ws", headers=headers)
    connected, _ = await communicator.connect()
    assert connected
    try:
        await communicator.send_to(text_data=json_text(frame))
        return json.loads(await communicator.receive_from(timeout=30))
    finally:
        await communicator.disconnect()


class CallContext:
    """What the gRPC servicer reads of its call: the metadata (and, refused, the status it aborts with)."""

    def __init__(self, token: str):
        self.metadata = (("authorization", f"Bearer {token}"),)

    def invocation_metadata(self):
        return self.metadata


async def grpc_complete(token: str, model: str, content: str) -> None:
    """A Complete call with poison: answered, or refused with a status that is not INTERNAL or UNKNOWN."""
    import grpc

    from protos.turbo.v1 import turbo_pb2
    from proxy.grpc import CompletionsServicer
    from turbo_site.core.grpc import grpc_status

    # A gRPC client can send only UTF-8: a lone surrogate cannot leave it (protobuf refuses to encode it).
    model, content = (text.encode("utf-8", "replace").decode("utf-8") for text in (model, content))
    request = turbo_pb2.CompleteRequest(model=model, messages=[turbo_pb2.Message(role="user", content=content)])
    try:
        await CompletionsServicer().Complete(request, CallContext(token))
    except Exception as exc:  # noqa: BLE001 (what the server's status mapping makes of it is checked)
        status, _, _ = grpc_status(exc)
        assert status not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), exc
