"""Traces: spans of Turbo as an in-memory exporter sees them (requests served in process, in the test's
transaction, /ws through Channels' communicator; gRPC on the live server of this process), and once as
a real OTLP/HTTP receiver on loopback sees them from a server process of its own."""

import asyncio
import gzip
import json
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

# The admin tests' logged-in browser (over `browser`, below), and the fault tests' server processes.
from accounts.tests.test_admin import admin  # noqa: F401
from proxy import gateway
from proxy.events import events_flush
from proxy.models import Event
from turbo_site.core import tracing
from turbo_site.core.loops import loop_clients_close

pytestmark = pytest.mark.django_db

CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
SECRET_PROMPT = "the-secret-words"


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def hex_trace(span) -> str:
    return format(span.context.trace_id, "032x")


def hex_span(span_id: int) -> str:
    return format(span_id, "016x")


class Spans:
    """What the in-memory exporter received, with a bounded wait for spans that end after the response."""

    def __init__(self, exporter: InMemorySpanExporter):
        self.exporter = exporter

    def all(self) -> list:
        return list(self.exporter.get_finished_spans())

    def wait(self, name: str, count: int = 1, timeout: float = 15) -> list:
        deadline = time.monotonic() + timeout
        while True:
            found = [span for span in self.all() if span.name == name]
            if len(found) >= count:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"no {count} span(s) {name!r} after {timeout}s; got {[s.name for s in self.all()]}"
                )
            time.sleep(0.02)

    def children(self, parent) -> list:
        return [
            span for span in self.all() if span.parent is not None and span.parent.span_id == parent.context.span_id
        ]


def install(capture: bool = False):
    exporter = InMemorySpanExporter()
    return exporter, tracing.tracing_install(SimpleSpanProcessor(exporter), capture=capture)


@pytest.fixture
def browser(new_client):
    """A client that keeps cookies, like a browser: in process in this file's one-transaction tests."""
    return new_client()


@pytest.fixture
def spans():
    exporter, uninstall = install()
    yield Spans(exporter)
    uninstall()


@pytest.fixture
def spans_with_content():
    exporter, uninstall = install(capture=True)
    yield Spans(exporter)
    uninstall()


def chat_body(prompt: str = "echo: hello there", **extra) -> dict:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": prompt}], **extra}


def traceparent_parts(value: str) -> tuple[str, str]:
    version, trace_id, parent_id, flags = value.split("-")
    assert version == "00" and int(flags, 16) & 1  # sampled
    return trace_id, parent_id


def attribute_text(spans: list) -> str:
    return json.dumps([dict(span.attributes or {}) for span in spans], default=str)


def proxy_event(user_id: str) -> Event:
    events_flush()
    return Event.objects.filter(user_id=user_id, type="proxy").latest("created_at")


# --- /v1 ----------------------------------------------------------------------------------------------------------


def test_v1_call_has_a_request_span_and_an_attempt_span_with_genai_attributes(client, signup, upstream, spans):
    token, user, _ = signup()
    response = client.post("/v1/chat/completions", json=chat_body(SECRET_PROMPT), headers=bearer(token))
    assert response.status_code == 200, response.text
    answer = response.json()

    (request,) = spans.wait("POST /v1/chat/completions")
    (attempt,) = spans.wait("chat gpt-4o-mini")
    assert request.kind == SpanKind.SERVER and request.parent is None
    assert request.attributes["http.response.status_code"] == 200
    assert attempt.kind == SpanKind.CLIENT
    assert attempt.parent.span_id == request.context.span_id and hex_trace(attempt) == hex_trace(request)
    attributes = attempt.attributes
    assert attributes["gen_ai.system"] == "openai"
    assert attributes["gen_ai.operation.name"] == "chat"
    assert attributes["gen_ai.request.model"] == "gpt-4o-mini"
    assert attributes["gen_ai.response.model"] == answer["model"]
    assert attributes["gen_ai.usage.input_tokens"] == answer["usage"]["prompt_tokens"]
    assert attributes["gen_ai.usage.output_tokens"] == answer["usage"]["completion_tokens"]
    assert tuple(attributes["gen_ai.response.finish_reasons"]) == ("stop",)
    assert attributes["turbo.deployment"] == response.headers["x-turbo-upstream"]
    assert attributes["http.response.status_code"] == 200

    # the trace id comes back to the client and is in the event log
    assert response.headers["x-turbo-trace-id"] == hex_trace(request)
    assert proxy_event(user["id"]).trace_id == hex_trace(request)
    # the upstream continues the trace under the attempt's span
    trace_id, parent_id = traceparent_parts(upstream.requests[-1].headers["traceparent"])
    assert (trace_id, parent_id) == (hex_trace(request), hex_span(attempt.context.span_id))
    # no prompt or reply text without OTEL_CAPTURE_CONTENT=1
    assert SECRET_PROMPT not in attribute_text(spans.all())
    assert "gen_ai.input.messages" not in attributes and "gen_ai.output.messages" not in attributes


def test_streamed_v1_call_traces_usage_and_finish_reason(client, signup, upstream, spans):
    token, user, _ = signup()
    with client.stream(
        "POST", "/v1/chat/completions", json=chat_body("echo: one two three", stream=True), headers=bearer(token)
    ) as response:
        assert response.status_code == 200
        body = response.read().decode()
    assert "one" in body and '"usage"' not in body  # Turbo asked for the usage unseen

    (request,) = spans.wait("POST /v1/chat/completions")
    (attempt,) = spans.wait("chat gpt-4o-mini")
    assert attempt.parent.span_id == request.context.span_id
    attributes = attempt.attributes
    assert attributes["turbo.stream"] is True
    assert attributes["gen_ai.response.model"] == "gpt-4o-mini"
    assert attributes["gen_ai.usage.output_tokens"] == 3
    assert attributes["gen_ai.usage.input_tokens"] > 0
    assert tuple(attributes["gen_ai.response.finish_reasons"]) == ("stop",)
    assert attempt.status.status_code != StatusCode.ERROR
    assert response.headers["x-turbo-trace-id"] == hex_trace(request)
    assert proxy_event(user["id"]).trace_id == hex_trace(request)


def test_a_client_traceparent_is_continued_and_passed_upstream(client, signup, upstream, spans):
    token, user, _ = signup()
    response = client.post(
        "/v1/chat/completions",
        json=chat_body(),
        headers={**bearer(token), "traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"},
    )
    assert response.status_code == 200, response.text

    (request,) = spans.wait("POST /v1/chat/completions")
    (attempt,) = spans.wait("chat gpt-4o-mini")
    assert hex_trace(request) == CLIENT_TRACE
    assert request.parent is not None and request.parent.is_remote
    assert hex_span(request.parent.span_id) == CLIENT_SPAN
    assert response.headers["x-turbo-trace-id"] == CLIENT_TRACE
    assert proxy_event(user["id"]).trace_id == CLIENT_TRACE
    # the upstream sees our attempt's span as the parent, in the client's trace
    trace_id, parent_id = traceparent_parts(upstream.requests[-1].headers["traceparent"])
    assert trace_id == CLIENT_TRACE and parent_id == hex_span(attempt.context.span_id) != CLIENT_SPAN


def test_a_failed_over_attempt_is_a_span_of_its_own(client, signup, upstream, spans):
    """An upstream 500 (the fake's `error_500`) is the attempt's error, passed on as it came."""
    token, _, _ = signup()
    response = client.post(
        "/v1/chat/completions", json=chat_body(), headers={**bearer(token), "x-fake-scenario": "error_500"}
    )
    assert response.status_code == 500
    (request,) = spans.wait("POST /v1/chat/completions")
    attempts = [span for span in spans.children(request) if span.kind == SpanKind.CLIENT]
    assert attempts and all(span.status.status_code == StatusCode.ERROR for span in attempts)
    assert attempts[-1].attributes["http.response.status_code"] == 500
    assert request.status.status_code == StatusCode.ERROR


def test_an_answer_its_reader_does_not_trace_still_ends_its_span_when_closed(upstream, spans):
    """A front that reads the upstream's bytes itself (GraphQL's model list) never calls answer_end."""

    async def models_read() -> int:
        try:
            answer = await gateway.send(gateway.Call(path="models", method="GET"))
            await answer.response.read_all(100_000)
            await answer.response.aclose()
            await asyncio.sleep(0)  # the span ends on the loop's next turn
            return answer.response.status
        finally:
            await loop_clients_close()

    assert asyncio.run(models_read()) == 200
    (attempt,) = spans.wait("models")
    assert attempt.kind == SpanKind.CLIENT and attempt.attributes["http.response.status_code"] == 200
    assert attempt.status.status_code != StatusCode.ERROR


# --- Django's requests and chat prompts ---------------------------------------------------------------------------


def test_a_django_request_has_a_span_and_its_trace_id_in_the_log(client, signup, spans):
    token, user, _ = signup()
    response = client.get(
        "/user/session", headers={**bearer(token), "traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"}
    )
    assert response.status_code == 200
    (request,) = spans.wait("GET /user/session")
    assert hex_trace(request) == CLIENT_TRACE == response.headers["x-turbo-trace-id"]
    events_flush()
    event = Event.objects.filter(user_id=user["id"], path="/user/session").latest("created_at")
    assert event.trace_id == CLIENT_TRACE


def test_a_chat_prompt_traces_the_prompt_each_model_call_the_tool_round_and_the_fanout(client, signup, upstream, spans):
    token, _, _ = signup()
    chat = client.post("/chat/create", json={"name": "tools", "tools": ["calculator"]}, headers=bearer(token)).json()
    response = client.post(
        "/chat/prompt",
        data={"id": chat["id"], "prompt": f"[scenario:tool_call] {SECRET_PROMPT} 2+2?"},
        headers=bearer(token),
    )
    assert response.status_code == 200, response.text
    message = response.json()["message"]
    assert message["status"] == "complete" and message["tool_calls"][0]["name"] == "calculator"

    (prompt,) = spans.wait("chat prompt")
    (request,) = spans.wait("POST /chat/prompt")
    assert prompt.parent.span_id == request.context.span_id
    assert prompt.attributes["turbo.message.id"] == message["id"]
    assert prompt.attributes["gen_ai.request.model"] == "gpt-4o-mini"
    under_prompt = spans.children(prompt)
    calls = [span for span in under_prompt if span.name == "chat gpt-4o-mini"]
    assert len(calls) == 2  # the model asked for the tool, then answered with its result
    assert [tuple(span.attributes["gen_ai.response.finish_reasons"]) for span in calls] == [("tool_calls",), ("stop",)]
    assert all(span.attributes["gen_ai.usage.output_tokens"] > 0 for span in calls)
    (tool_round,) = [span for span in under_prompt if span.name == "chat tool round"]
    (tool,) = spans.children(tool_round)
    assert tool.name == "execute_tool calculator" and tool.attributes["gen_ai.tool.call.id"] == "call_1"
    fanout = [span.attributes["turbo.chat.event"] for span in under_prompt if span.name == "chat fan-out"]
    assert fanout == ["message.created", "message.completed"]
    # the upstream heard each call in the prompt's trace
    sent = [r for r in upstream.requests if r.path == "/v1/chat/completions"]
    assert [traceparent_parts(r.headers["traceparent"]) for r in sent] == [
        (hex_trace(prompt), hex_span(span.context.span_id)) for span in calls
    ]
    assert SECRET_PROMPT not in attribute_text(spans.all())


def test_an_operator_finds_the_event_of_a_trace_in_the_admin(client, signup, upstream, spans, admin):  # noqa: F811
    token, user, _ = signup()
    response = client.post("/v1/chat/completions", json=chat_body(), headers=bearer(token))
    trace_id = response.headers["x-turbo-trace-id"]
    spans.wait("POST /v1/chat/completions")
    events_flush()
    found = admin.get("/admin/proxy/event/", params={"q": trace_id})
    assert found.status_code == 200 and user["username"] in found.text
    missed = admin.get("/admin/proxy/event/", params={"q": "0" * 32})
    assert missed.status_code == 200 and user["username"] not in missed.text


def test_content_is_traced_only_with_capture_on(client, signup, upstream, spans_with_content):
    token, _, _ = signup()
    spans = spans_with_content
    response = client.post("/v1/chat/completions", json=chat_body(f"echo: {SECRET_PROMPT}"), headers=bearer(token))
    assert response.status_code == 200
    (attempt,) = spans.wait("chat gpt-4o-mini")
    assert SECRET_PROMPT in attempt.attributes["gen_ai.input.messages"]

    chat = client.post("/chat/create", json={"name": "c"}, headers=bearer(token)).json()
    reply = client.post(
        "/chat/prompt", data={"id": chat["id"], "prompt": f"echo: {SECRET_PROMPT}"}, headers=bearer(token)
    )
    assert reply.status_code == 200
    (prompt,) = spans.wait("chat prompt")
    assert SECRET_PROMPT in prompt.attributes["gen_ai.input.messages"]
    (call,) = [span for span in spans.children(prompt) if span.kind == SpanKind.CLIENT]
    assert SECRET_PROMPT in call.attributes["gen_ai.output.messages"]


def test_tracing_off_sends_no_header_no_traceparent_and_makes_no_spans(client, signup, upstream):
    exporter, uninstall = install()
    uninstall()
    assert not tracing.enabled
    token, user, _ = signup()
    response = client.post(
        "/v1/chat/completions",
        json=chat_body(),
        headers={**bearer(token), "traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"},
    )
    assert response.status_code == 200
    assert "x-turbo-trace-id" not in response.headers
    assert "traceparent" not in upstream.requests[-1].headers  # a client's is not forwarded either
    assert proxy_event(user["id"]).trace_id == ""
    session = client.get("/user/session", headers=bearer(token))
    assert "x-turbo-trace-id" not in session.headers
    assert exporter.get_finished_spans() == ()


# --- a real OTLP/HTTP receiver --------------------------------------------------------------------------------------


class Receiver:
    """An OTLP/HTTP trace receiver on loopback: decodes each ExportTraceServiceRequest it is sent."""

    def __init__(self):
        self.spans: list = []  # (resource attributes, span) pairs
        self.arrived = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                encoding = self.headers.get("Content-Encoding", "")
                if encoding == "gzip":
                    body = gzip.decompress(body)
                elif encoding == "deflate":
                    body = zlib.decompress(body)
                export = ExportTraceServiceRequest()
                export.ParseFromString(body)
                with receiver.arrived:
                    for resource_spans in export.resource_spans:
                        resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
                        for scope_spans in resource_spans.scope_spans:
                            receiver.spans += [(self.path, resource, span) for span in scope_spans.spans]
                    receiver.arrived.notify_all()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def wait(self, condition, timeout: float = 30) -> list:
        with self.arrived:
            if not self.arrived.wait_for(lambda: condition(self.spans), timeout=timeout):
                raise AssertionError(f"the receiver got {[s.name for _, _, s in self.spans]}")
            return list(self.spans)

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    started = Receiver()
    yield started
    started.stop()


@pytest.mark.django_db(transaction=True)
def test_a_server_with_an_otlp_endpoint_exports_its_spans_over_http(upstream, start_server, receiver):  # noqa: F811
    server = start_server(
        OTEL_EXPORTER_OTLP_ENDPOINT=receiver.url,
        # The SDK's batch interval (ms): nothing goes out before the server stops, which must send it all.
        OTEL_BSP_SCHEDULE_DELAY="600000",
        OTEL_SERVICE_NAME="turbo-under-test",
    )
    with httpx.Client(base_url=server.url, timeout=30) as http:
        signed = http.post("/user/signup", data={"username": f"otlp-{time.monotonic_ns()}", "password": "pw-123456"})
        assert signed.status_code == 200, signed.text
        response = http.post(
            "/v1/chat/completions",
            json=chat_body(),
            headers={**bearer(signed.json()["token"]), "traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"},
        )
    assert response.status_code == 200, response.text
    assert response.headers["x-turbo-trace-id"] == CLIENT_TRACE
    assert receiver.spans == []
    server.stop()  # SIGTERM: the lifespan shutdown exports what is buffered

    def in_client_trace(received):
        return [span for _, _, span in received if span.trace_id.hex() == CLIENT_TRACE]

    received = receiver.wait(lambda got: len(in_client_trace(got)) >= 2, timeout=5)
    request = next(span for span in in_client_trace(received) if span.name == "POST /v1/chat/completions")
    attempt = next(span for span in in_client_trace(received) if span.name == "chat gpt-4o-mini")
    assert request.parent_span_id.hex() == CLIENT_SPAN
    assert attempt.parent_span_id == request.span_id
    attributes = {a.key: a.value for a in attempt.attributes}
    assert attributes["gen_ai.system"].string_value == "openai"
    assert attributes["gen_ai.usage.output_tokens"].int_value > 0
    assert [v.string_value for v in attributes["gen_ai.response.finish_reasons"].array_value.values] == ["stop"]
    assert {path for path, _, _ in received} == {"/v1/traces"}
    assert {resource["service.name"] for _, resource, _ in received} == {"turbo-under-test"}
    _, parent_id = traceparent_parts(upstream.requests[-1].headers["traceparent"])
    assert parent_id == attempt.span_id.hex()


def test_a_ws_request_has_a_span_of_its_own_over_its_attempt(signup, upstream, spans):
    from proxy.tests.test_ws_rpc import send, ws_run

    token = signup()[0]
    request = {"messages": [{"role": "user", "content": "echo: over the socket"}], "model": "gpt-4o-mini"}

    async def scenario(socket):
        await send(socket, "chat_completion", "t1", request)
        return json.loads(await socket.receive_from(timeout=15))

    assert ws_run(token, scenario)["type"] == "chat_completion"
    (served,) = spans.wait("ws chat_completion")
    (attempt,) = spans.wait("chat gpt-4o-mini")
    assert served.kind == SpanKind.SERVER and served.attributes["rpc.method"] == "chat_completion"
    assert attempt.parent.span_id == served.context.span_id and hex_trace(attempt) == hex_trace(served)


@pytest.mark.django_db(transaction=True)
async def test_a_grpc_call_continues_the_client_traceparent(grpc_server, signup, upstream, spans):
    from protos.turbo.v1 import turbo_pb2, turbo_pb2_grpc
    from testing.grpc import bearer as grpc_bearer

    token = signup()[0]
    client_trace, client_span = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
    metadata = (*grpc_bearer(token), ("traceparent", f"00-{client_trace}-{client_span}-01"))
    request = turbo_pb2.CompleteRequest(
        model="gpt-4o-mini", messages=[turbo_pb2.Message(role="user", content="echo: traced over grpc")]
    )
    async with grpc_server.channel() as channel:
        reply = await turbo_pb2_grpc.CompletionsStub(channel).Complete(request, metadata=metadata)
    assert reply.content == "traced over grpc"
    (served,) = await asyncio.to_thread(spans.wait, "gRPC /turbo.v1.Completions/Complete")
    (attempt,) = await asyncio.to_thread(spans.wait, "chat gpt-4o-mini")
    assert served.kind == SpanKind.SERVER and hex_trace(served) == client_trace
    assert hex_span(served.parent.span_id) == client_span
    assert attempt.parent.span_id == served.context.span_id
