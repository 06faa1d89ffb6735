"""No secret leaves: token parameters in logs and the event log, upstream headers, error events, captured bodies.

In production mode (DEBUG=0), in process (httpx.ASGITransport over Turbo's ASGI app, through run_in_process:
its database calls on the test's connection, in one transaction rolled back, not flushed); the upstream is
a scripted server on a loopback socket, since what it sends (headers, chunk boundaries, a compressed body)
is what is under test. One test runs a Turbo process of its own, on the committed test database.
"""

import gzip
import json
import logging
import textwrap
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from channels.db import database_sync_to_async

from proxy.events import events_flush
from proxy.models import Event
from proxy.redaction import EventStreamRedactor, response_headers_allowed
from testing.inprocess import run_in_process
from turbo_site.core.http import REDACTED, redact_query
from turbo_site.core.logs import SERVER_LOGGERS, log_redaction_install

pytestmark = pytest.mark.django_db

SERVER_KEY = "sk-live-server-key-0123456789abcdef"
# Keys of TURBO_CONFIG upstreams need not look like OpenAI's: only knowing them finds them.
FIRST_KEY = "first-upstream-key-0123456789"
SECOND_KEY = "second-upstream-key-9876543210"
CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}


class ScriptedUpstream:
    """An upstream on a loopback socket answering every request with `reply`: status, headers, and the
    body as chunks, each sent (and flushed) on its own, a moment apart."""

    def __init__(self):
        self.reply: tuple[int, list[tuple[str, str]], list[bytes]] = (200, [], [b"{}"])
        scripted = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _answer(self):
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                status, headers, chunks = scripted.reply
                self.send_response(status)
                for name, value in headers:
                    self.send_header(name, value)
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for index, chunk in enumerate(chunks):
                    if index:
                        time.sleep(0.05)  # two reads for the proxy, not one
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    self.wfile.flush()
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()

            do_GET = do_POST = _answer

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def scripted_server():
    server = ScriptedUpstream()
    yield server
    server.stop()


@pytest.fixture
def scripted(scripted_server, settings):
    settings.DEBUG = False
    settings.OPENAI_API_URL = scripted_server.url + "/v1"
    settings.OPENAI_API_KEY = SERVER_KEY
    return scripted_server


@pytest.fixture
def two_upstreams(scripted, settings, tmp_path):
    """A TURBO_CONFIG with two upstreams on the scripted server, each with its own key."""
    path = tmp_path / "turbo.yaml"
    path.write_text(
        textwrap.dedent(f"""
            upstreams:
              - {{name: first, base_url: {scripted.url}/v1, api_key: {FIRST_KEY}}}
              - {{name: second, base_url: {scripted.url}/v1, api_key: {SECOND_KEY}}}
            models:
              - name: gpt-4o
                deployments:
                  - {{upstream: first, model: gpt-4o}}
              - name: other
                deployments:
                  - {{upstream: second, model: gpt-4o}}
        """)
    )
    settings.TURBO_CONFIG = str(path)
    return scripted


async def asgi_client():
    from turbo_site.asgi import application

    return httpx.AsyncClient(transport=httpx.ASGITransport(app=application), base_url="http://127.0.0.1")


async def signed_up(http: httpx.AsyncClient) -> tuple[str, str]:
    """A new user, signed up through the REST API; returns (token, user id)."""
    response = await http.post("/user/signup", data={"username": f"u-{uuid.uuid4().hex[:10]}", "password": "pw-123456"})
    assert response.status_code == 200, response.text
    return response.json()["token"], response.json()["user"]["id"]


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


@database_sync_to_async
def logged_events(user_id: str) -> list[Event]:
    events_flush()
    return list(Event.objects.filter(user_id=user_id).order_by("created_at"))


# --- token parameters -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "query",
    [
        "token=SECRETVALUE",
        "%74oken=SECRETVALUE",
        "TOKEN=SECRETVALUE",
        "%2574oken=SECRETVALUE",  # encoded twice
        "api%5Fkey=SECRETVALUE",
        "id=1&%54%4F%4B%45%4E=SECRETVALUE&x=2",
        "access+token=SECRETVALUE",
    ],
)
def test_secret_parameters_are_redacted_whatever_their_spelling(query):
    for text in (query, f"GET /ws?{query} HTTP/1.1", f'"WSCONNECT /chat/stream?{query}"'):
        redacted = redact_query(text)
        assert "SECRETVALUE" not in redacted and REDACTED in redacted


def test_other_parameters_are_kept():
    assert redact_query("id=42&model=gpt-4o&stream=true") == "id=42&model=gpt-4o&stream=true"


@pytest.mark.parametrize("name", SERVER_LOGGERS)
def test_server_log_lines_never_hold_a_token(name, caplog):
    log_redaction_install()
    logger = logging.getLogger(name)
    with caplog.at_level(logging.INFO, logger=name):
        # uvicorn's access line (positional arguments) and daphne's runserver line (a dict)
        logger.info('%s - "%s %s HTTP/%s" %d', "127.0.0.1:1", "GET", "/ws?%74oken=SECRETVALUE", "1.1", 101)
        logger.info("WebSocket CONNECT %(path)s [%(client)s]", {"path": "/ws?%74oken=SECRETVALUE", "client": "x"})
        logger.info("GET /chat/stream?id=1&TOKEN=SECRETVALUE\ud800")
    assert len(caplog.records) == 3
    assert "SECRETVALUE" not in caplog.text
    assert caplog.text.encode()  # writable: the lone surrogate is gone


def test_the_event_log_never_holds_a_token_sent_as_an_encoded_parameter(scripted):
    async def scenario():
        async with await asgi_client() as http:
            token, user_id = await signed_up(http)
            stream = await http.get(f"/chat/stream?id={uuid.uuid4()}&%74oken={token}")
            scripted.reply = (200, [("Content-Type", "application/json")], [b'{"object": "list", "data": []}'])
            listed = await http.get(f"/v1/models?%74oken={token}&TOKEN={token}", headers=bearer(token))
        assert stream.status_code == 404  # the token was accepted: the chat is what does not exist
        assert listed.status_code == 200
        events = await logged_events(user_id)
        assert {event.path for event in events} >= {"/chat/stream", "/v1/models"}
        assert all(token not in event.query for event in events)
        assert any(REDACTED in event.query for event in events if event.path == "/v1/models")

    run_in_process(scenario)


@pytest.mark.django_db(transaction=True)  # a server process of its own reads the user and writes the events
def test_a_real_servers_log_and_event_log_hold_no_token_sent_as_an_encoded_parameter(start_server):
    """uvicorn at INFO (its access lines, and the WebSocket handshakes it logs even without them), then the
    events the server wrote on SIGTERM: the token, accepted under `%74oken`, is in neither."""
    from websockets.sync.client import connect

    server = start_server(log_level="info")
    port = server.url.rsplit(":", 1)[1]
    with httpx.Client(base_url=server.url, timeout=60) as http:
        signed = http.post("/user/signup", data={"username": f"u-{uuid.uuid4().hex[:10]}", "password": "pw-123456"})
        token, user_id = signed.json()["token"], signed.json()["user"]["id"]
        chat = http.post("/chat/create", data={"name": "c"}, headers=bearer(token)).json()
        with connect(f"ws://127.0.0.1:{port}/ws?%74oken={token}", open_timeout=30) as socket:
            socket.send(json.dumps({"type": "ping", "request_id": "p"}))
            assert json.loads(socket.recv(timeout=30))["type"] == "pong"  # the token was accepted
        with http.stream("GET", f"/chat/stream?id={chat['id']}&%74oken={token}") as stream:
            assert stream.status_code == 200  # accepted here too
            next(stream.iter_bytes())
        assert http.get(f"/ws?%74oken={token}").status_code == 426
        assert http.get(f"/v1/models?%74oken={token}", headers=bearer(token)).status_code == 200
    server.stop()  # SIGTERM: queued events are written
    log = server.log.read_text(errors="replace")
    assert token not in log, log[-3000:]
    assert "/ws?%74oken=" + REDACTED in log and "&%74oken=" + REDACTED in log, log[-3000:]
    events = list(Event.objects.filter(user_id=user_id))
    assert {"/chat/stream", "/ws", "/v1/models"} <= {event.path for event in events}
    assert not [event.query for event in events if token in event.query]


# --- upstream response headers ----------------------------------------------------------------------


def test_only_allowed_headers_holding_no_key_pass():
    passed = response_headers_allowed(
        [
            ("content-type", "application/json"),
            ("x-request-id", "req_1"),
            ("openai-processing-ms", "12"),
            ("x-ratelimit-remaining-requests", "99"),
            ("retry-after", "3"),
            ("x-upstream-debug-key", "anything"),
            ("www-authenticate", 'Bearer realm="x"'),
            ("set-cookie", "a=b"),
            ("server", "nginx"),
            ("openai-organization", "acme"),
            ("openai-debug", f"sent {FIRST_KEY}"),
            ("x-request-id-echo", SERVER_KEY),
            ("openai-model", "sk-abc123def"),
        ],
        [FIRST_KEY, SERVER_KEY],
    )
    assert passed == {
        "content-type": "application/json",
        "x-request-id": "req_1",
        "openai-processing-ms": "12",
        "x-ratelimit-remaining-requests": "99",
        "retry-after": "3",
    }


@pytest.mark.parametrize("status", [200, 401])
def test_upstream_headers_carrying_the_key_never_reach_the_client(scripted, status):
    async def scenario():
        scripted.reply = (
            status,
            [
                ("Content-Type", "application/json"),
                ("X-Upstream-Debug-Key", SERVER_KEY),
                ("WWW-Authenticate", f'Bearer error="invalid_token", key="{SERVER_KEY}"'),
                ("OpenAI-Echo", SERVER_KEY),
                ("X-Request-Id", "req_42"),
                ("OpenAI-Processing-Ms", "7"),
            ],
            [b'{"error": {"message": "no"}}' if status >= 400 else b'{"id": "x", "choices": []}'],
        )
        async with await asgi_client() as http:
            token, _ = await signed_up(http)
            response = await http.post("/v1/chat/completions", json=CHAT, headers=bearer(token))
        assert response.status_code == status
        assert SERVER_KEY not in json.dumps(dict(response.headers)) + response.text
        assert "x-upstream-debug-key" not in response.headers and "www-authenticate" not in response.headers
        assert "openai-echo" not in response.headers
        assert (response.headers["x-request-id"], response.headers["openai-processing-ms"]) == ("req_42", "7")

    run_in_process(scenario)


# --- streamed error events ----------------------------------------------------------------------------


def error_event(key: str) -> bytes:
    message = {"error": {"message": f"Incorrect API key provided: {key}", "type": "invalid_request_error"}}
    return b"event: error\ndata: " + json.dumps(message).encode() + b"\n\n"


def test_a_key_split_anywhere_between_two_chunks_is_redacted():
    delta = b'data: {"choices": [{"delta": {"content": "an example: sk-proj-example"}}]}\n\n'
    for key in (SERVER_KEY, FIRST_KEY):
        stream = delta + error_event(key) + b"data: [DONE]\n\n"
        for cut in range(1, len(stream)):
            redactor = EventStreamRedactor([SERVER_KEY, FIRST_KEY])
            sent = redactor.feed(stream[:cut]) + redactor.feed(stream[cut:]) + redactor.finish()
            assert key.encode() not in sent, cut
            assert sent.count(REDACTED.encode()) == 1
            assert sent.startswith(delta)  # a model's reply keeps its example key
            assert sent.endswith(b"data: [DONE]\n\n")


def test_crlf_events_and_an_event_too_long_to_hold_are_redacted_too():
    crlf = error_event(SERVER_KEY).replace(b"\n", b"\r\n")
    redactor = EventStreamRedactor([SERVER_KEY])
    cut = crlf.index(SERVER_KEY.encode()) + 5
    assert redactor.feed(crlf[:cut]) == b""  # held: the event has not ended
    sent = redactor.feed(crlf[cut:]) + redactor.finish()
    assert SERVER_KEY.encode() not in sent and sent.endswith(b"\r\n\r\n")
    # An event longer than the redactor holds is let go in parts, but never a key's straddling part.
    endless = b"data: " + b"x" * 5000 + SERVER_KEY.encode() + b"y" * 5000
    for cut in range(4000, 7000, 7):
        redactor = EventStreamRedactor([SERVER_KEY], hold_max=1000)
        sent = redactor.feed(endless[:cut]) + redactor.feed(endless[cut:]) + redactor.finish()
        assert SERVER_KEY.encode() not in sent and len(sent) == len(endless) - len(SERVER_KEY) + len(REDACTED)


def test_a_streamed_error_event_quoting_the_key_is_redacted_across_chunks(scripted):
    async def scenario():
        event = error_event(SERVER_KEY)
        split = (
            event.index(SERVER_KEY.encode()) + 10
        )  # the key's first 10 characters in one chunk, the rest in the next
        first = b'data: {"choices": [{"index": 0, "delta": {"content": "Hi"}}]}\n\n'
        scripted.reply = (200, [("Content-Type", "text/event-stream")], [first, event[:split], event[split:]])
        async with await asgi_client() as http:
            token, _ = await signed_up(http)
            response = await http.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers=bearer(token))
        assert response.status_code == 200
        # Neither part: the first looks like a key on its own, the second does not.
        assert SERVER_KEY[:10] not in response.text and SERVER_KEY[10:] not in response.text
        assert response.text.startswith(first.decode())
        assert f"Incorrect API key provided: {REDACTED}" in response.text

    run_in_process(scenario)


# --- captured bodies ----------------------------------------------------------------------------------


def test_captured_bodies_hold_no_configured_key(two_upstreams, settings):
    async def scenario():
        settings.EVENT_CAPTURE_BODIES = True
        quoted = {"error": {"message": f"keys tried: {FIRST_KEY} and {SECOND_KEY} and {SERVER_KEY}", "type": "x"}}
        two_upstreams.reply = (401, [("Content-Type", "application/json")], [json.dumps(quoted).encode()])
        async with await asgi_client() as http:
            token, user_id = await signed_up(http)
            response = await http.post(
                "/v1/chat/completions",
                json={**CHAT, "messages": [{"role": "user", "content": f"is {SECOND_KEY} mine?"}]},
                headers=bearer(token),
            )
        assert response.status_code == 401
        assert all(key not in response.text for key in (FIRST_KEY, SECOND_KEY, SERVER_KEY))
        (event,) = [event for event in await logged_events(user_id) if event.type == "proxy"]
        stored = event.request_body + event.response_body
        assert "keys tried" in event.response_body and "is " in event.request_body
        assert all(key not in stored for key in (FIRST_KEY, SECOND_KEY, SERVER_KEY))

    run_in_process(scenario)


# --- compressed error bodies --------------------------------------------------------------------------


def test_a_gzip_error_body_is_sent_decoded_without_its_encoding(scripted):
    async def scenario():
        body = json.dumps({"error": {"message": f"bad key {SERVER_KEY}", "type": "invalid_request_error"}}).encode()
        packed = gzip.compress(body)
        scripted.reply = (401, [("Content-Type", "application/json"), ("Content-Encoding", "gzip")], [packed])
        async with await asgi_client() as http:
            token, _ = await signed_up(http)
            response = await http.post("/v1/chat/completions", json=CHAT, headers=bearer(token))
        assert response.status_code == 401
        assert "content-encoding" not in response.headers
        assert response.json()["error"]["message"] == f"bad key {REDACTED}"

    run_in_process(scenario)


def test_an_error_body_in_an_unknown_encoding_is_replaced_not_mislabelled(scripted):
    async def scenario():
        scripted.reply = (500, [("Content-Type", "application/json"), ("Content-Encoding", "br")], [b"\x8b\x02\x80"])
        async with await asgi_client() as http:
            token, _ = await signed_up(http)
            response = await http.post("/v1/chat/completions", json=CHAT, headers=bearer(token))
        assert response.status_code == 500
        assert "content-encoding" not in response.headers
        assert "cannot read (br)" in response.json()["error"]["message"]

    run_in_process(scenario)


def test_a_successful_compressed_body_keeps_its_encoding(scripted):
    async def scenario():
        body = json.dumps({"id": "x", "choices": []}).encode()
        scripted.reply = (
            200,
            [("Content-Type", "application/json"), ("Content-Encoding", "gzip")],
            [gzip.compress(body)],
        )
        async with await asgi_client() as http:
            token, _ = await signed_up(http)
            response = await http.post("/v1/chat/completions", json=CHAT, headers=bearer(token))
        assert response.status_code == 200
        assert response.headers["content-encoding"] == "gzip"
        assert response.json() == {"id": "x", "choices": []}  # httpx decoded it: the label was right

    run_in_process(scenario)
