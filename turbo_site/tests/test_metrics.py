"""`/metrics`: who may scrape it, and counters that move by exactly what went through every front.

Each test scrapes Turbo with prometheus-client's own parser before and after real requests
(/v1 on the fast path and through Django, streamed and not, chat prompts with SSE and WebSocket
subscribers, the /ws RPC socket, the gateway's retries, refusals, the event writer), and compares.
Requests are served in process in the test's transaction (WebSockets through Channels' communicator);
a test that holds a stream open while it scrapes, or lets a reply run on after its request, uses the
live server (transaction=True).
The last tests run two server processes sharing one METRICS_MULTIPROC_DIR: a scrape of either sums both.
"""

import json
import re
import signal
import threading
import time
from decimal import Decimal

import grpc
import httpx
import pytest
from asgiref.sync import async_to_sync, sync_to_async
from channels.testing import WebsocketCommunicator
from prometheus_client.parser import text_string_to_metric_families
from websockets.sync.client import connect

# Fixtures of other suites: server processes, fake upstreams, a TURBO_CONFIG of the test's own.
from proxy.events import event_record, events_flush, events_state
from proxy.tests.test_gateway import configure, fakes, two_deployments  # noqa: F401
from proxy.tests.test_ws_rpc import send, ws_run
from proxy.usage.budgets import budget_rules_forget, budget_set
from proxy.usage.pricing import DEFAULT_PRICES
from proxy.usage.ratelimits import ratelimits_forget
from turbo_site.core.metrics import METHODS, ROUTE_GROUPS

pytestmark = pytest.mark.django_db

TOKEN = "metrics-scraper-secret"
SCRAPE = {"Authorization": f"Bearer {TOKEN}"}


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def metrics_on(settings):
    settings.METRICS_TOKEN = TOKEN
    settings.METRICS_ALLOWED_IPS = []
    return settings


class Scrape:
    """One scrape of /metrics, parsed: samples by name and labels."""

    def __init__(self, text: str):
        self.text = text
        self.families = list(text_string_to_metric_families(text))
        self.samples = [sample for family in self.families for sample in family.samples]

    def value(self, name: str, **labels) -> float:
        """The sum of the samples called `name` whose labels include `labels`."""
        return sum(
            sample.value
            for sample in self.samples
            if sample.name == name and all(sample.labels.get(key) == value for key, value in labels.items())
        )


def scrape(http: httpx.Client) -> Scrape:
    response = http.get("/metrics", headers=SCRAPE)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return Scrape(response.text)


def moved(before: Scrape, after: Scrape, name: str, **labels) -> float:
    return round(after.value(name, **labels) - before.value(name, **labels), 9)


def wait_for(condition, timeout: float = 15, what: str = "the condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def ask(http, token, *, text="echo: one two three", model="gpt-4o-mini", headers=None, **extra):
    body = {"model": model, "messages": [{"role": "user", "content": text}], **extra}
    return http.post("/v1/chat/completions", json=body, headers={**bearer(token), **(headers or {})})


def streamed_usage(response: httpx.Response) -> dict:
    """The usage chunk of a streamed completion (asked for with stream_options.include_usage)."""
    chunks = [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: {")]
    return next(chunk["usage"] for chunk in chunks if chunk.get("usage"))


# --- who may scrape -----------------------------------------------------------------------------------------------


def test_off_without_a_token_or_addresses_then_token_and_address_rules(client, settings):
    settings.METRICS_TOKEN = ""
    settings.METRICS_ALLOWED_IPS = []
    off = client.get("/metrics", headers=SCRAPE)
    assert off.status_code == 404 and off.json()["error"]["code"] == "not_found"

    settings.METRICS_TOKEN = TOKEN
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
        refused = client.get("/metrics", headers=headers)
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "forbidden"
        assert "turbo_" not in refused.text
    assert client.get("/metrics", headers=SCRAPE).status_code == 200

    # Addresses instead of (or beside) the token: the test client calls from 127.0.0.1.
    settings.METRICS_TOKEN = ""
    settings.METRICS_ALLOWED_IPS = ["10.0.0.0/8"]
    assert client.get("/metrics").status_code == 403
    settings.METRICS_ALLOWED_IPS = ["10.0.0.0/8", "127.0.0.1"]
    assert client.get("/metrics").status_code == 200

    # X-Forwarded-For counts only from a trusted proxy.
    settings.METRICS_ALLOWED_IPS = ["10.0.0.0/8"]
    forwarded = {"X-Forwarded-For": "10.1.2.3"}
    assert client.get("/metrics", headers=forwarded).status_code == 403
    settings.TRUSTED_PROXIES = ["127.0.0.1"]
    assert client.get("/metrics", headers=forwarded).status_code == 200
    assert client.get("/metrics", headers={"X-Forwarded-For": "192.0.2.7"}).status_code == 403


# --- /v1 ----------------------------------------------------------------------------------------------------------


def test_v1_calls_on_the_fast_path_and_through_django_move_every_counter(client, signup, upstream, metrics_on):
    token, user, _ = signup()
    before = scrape(client)

    plain = ask(client, token)  # the fast path: a token, no Origin
    streamed = ask(client, token, stream=True, stream_options={"include_usage": True})
    browser = ask(client, token, headers={"Origin": "http://127.0.0.1"})  # Django's proxy_view
    assert (plain.status_code, streamed.status_code, browser.status_code) == (200, 200, 200)
    assert streamed.headers["content-type"].startswith("text/event-stream")
    usages = [plain.json()["usage"], streamed_usage(streamed), browser.json()["usage"]]

    after = scrape(client)
    assert moved(before, after, "turbo_http_requests_total", route="v1", method="POST", status="200") == 3
    assert moved(before, after, "turbo_http_request_duration_seconds_count", route="v1") == 3
    assert moved(before, after, "turbo_proxy_overhead_seconds_count") == 3
    labels = {"deployment": "default", "model": "gpt-4o-mini"}
    assert moved(before, after, "turbo_upstream_attempts_total", outcome="ok", **labels) == 3
    assert moved(before, after, "turbo_upstream_ttfb_seconds_count", **labels) == 3
    assert moved(before, after, "turbo_upstream_duration_seconds_count", **labels) == 3
    assert moved(before, after, "turbo_upstream_retries_total") == 0

    input_tokens = sum(usage["prompt_tokens"] for usage in usages)
    output_tokens = sum(usage["completion_tokens"] for usage in usages)
    assert moved(before, after, "turbo_tokens_total", model="gpt-4o-mini", direction="input") == input_tokens
    assert moved(before, after, "turbo_tokens_total", model="gpt-4o-mini", direction="output") == output_tokens
    price = DEFAULT_PRICES["gpt-4o-mini"]
    cost = (input_tokens * price.input + output_tokens * price.output) / Decimal(1_000_000)
    assert moved(before, after, "turbo_cost_usd_total", model="gpt-4o-mini") == pytest.approx(float(cost))

    # The streams have ended: nothing is left open or in flight on /v1.
    wait_for(lambda: scrape(client).value("turbo_http_requests_in_flight", route="v1") == 0, what="v1 in flight 0")
    assert scrape(client).value("turbo_streams_open", route="v1") == 0

    # The same figures as the user's own /usage report.
    events_flush()
    total = client.get("/usage", headers=bearer(token)).json()["total"]
    assert (total["input_tokens"], total["output_tokens"]) == (input_tokens, output_tokens)
    assert_no_private_labels(after, user=user, token=token, prompt="one two three")


@pytest.mark.django_db(transaction=True)
def test_an_open_v1_stream_is_counted_until_it_ends(client, signup, upstream, metrics_on, turbo_server):
    token, _, _ = signup()
    before = scrape(client)
    with httpx.Client(base_url=turbo_server.url, timeout=30) as other:
        body = {"model": "gpt-4o-mini", "stream": True, "messages": [{"role": "user", "content": "echo: held open"}]}
        with other.stream(
            "POST", "/v1/chat/completions", json=body, headers=bearer(token) | {"x-fake-scenario": "gated"}
        ) as response:
            assert response.status_code == 200
            during = scrape(client)
            assert moved(before, during, "turbo_streams_open", protocol="sse", route="v1") == 1
            assert moved(before, during, "turbo_http_requests_in_flight", route="v1") == 1
            upstream.release()
            response.read()
    wait_for(lambda: moved(before, scrape(client), "turbo_streams_open", route="v1") == 0, what="the stream to close")
    assert moved(before, scrape(client), "turbo_http_requests_in_flight", route="v1") == 0


# --- chats: prompt, SSE and WebSocket subscribers -----------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_a_chat_prompt_with_sse_and_websocket_subscribers(client, signup, upstream, metrics_on, turbo_server):
    token, user, _ = signup()
    chat = client.post("/chat/create", data={"name": "measured"}, headers=bearer(token)).json()
    before = scrape(client)

    sse_events: list[dict] = []
    ready = threading.Event()

    def listen():
        with httpx.Client(base_url=turbo_server.url, timeout=20) as http:
            with http.stream("POST", "/chat/stream", data={"id": chat["id"]}, headers=bearer(token)) as response:
                for line in response.iter_lines():
                    ready.set()
                    if line.startswith("data:"):
                        sse_events.append(json.loads(line[5:]))
                        if sse_events[-1].get("partial") is False:
                            return

    listener = threading.Thread(target=listen)
    listener.start()
    assert ready.wait(10)
    ws_events: list[dict] = []
    url = f"ws://127.0.0.1:{turbo_server.port}/chat/stream?id={chat['id']}&token={token}"
    with connect(url, open_timeout=10) as ws:
        during = scrape(client)
        assert moved(before, during, "turbo_streams_open", protocol="sse", route="chat") == 1
        assert moved(before, during, "turbo_streams_open", protocol="websocket", route="chat") == 1
        prompt = client.post(
            "/chat/prompt",
            data={"id": chat["id"], "prompt": "echo: counted words", "stream": "true"},
            headers=bearer(token),
        )
        assert prompt.status_code == 200
        while not ws_events or ws_events[-1].get("partial") is not False:
            ws_events.append(json.loads(ws.recv(timeout=15)))
        listener.join(20)
    assert not listener.is_alive()

    after = scrape(client)
    assert moved(before, after, "turbo_http_requests_total", route="chat", method="POST", status="200") == 2
    assert moved(before, after, "turbo_http_requests_total", route="chat", method="WEBSOCKET", status="101") == 1
    # Every live event reached each of the two subscribers once.
    assert len(sse_events) == len(ws_events) >= 3
    assert moved(before, after, "turbo_stream_fanout_delay_seconds_count") == len(sse_events) + len(ws_events)
    assert moved(before, after, "turbo_upstream_attempts_total", outcome="ok", model="gpt-4o-mini") == 1

    events_flush()
    total = client.get("/usage", headers=bearer(token)).json()["total"]
    assert moved(before, after, "turbo_tokens_total", direction="input") == total["input_tokens"] > 0
    assert moved(before, after, "turbo_tokens_total", direction="output") == total["output_tokens"] > 0

    wait_for(
        lambda: (
            scrape(client).value("turbo_streams_open", route="chat") == before.value("turbo_streams_open", route="chat")
        ),
        what="the chat streams to close",
    )
    assert_no_private_labels(after, user=user, token=token, prompt="counted words")


def test_a_refused_websocket_handshake_and_the_ws_rpc_socket(client, signup, upstream, metrics_on):
    token, user, _ = signup()
    outsider, _, _ = signup()
    chat = client.post("/chat/create", data={"name": "private"}, headers=bearer(token)).json()
    before = scrape(client)

    async def knock() -> bool:
        from turbo_site.asgi import application

        socket = WebsocketCommunicator(application, f"/chat/stream?id={chat['id']}&token={outsider}")
        connected, _ = await socket.connect(timeout=10)
        await socket.disconnect()  # what the server tells the app once it has refused the handshake
        return connected

    assert async_to_sync(knock)() is False

    async def over_ws(ws):
        during = await sync_to_async(scrape)(client)
        assert moved(before, during, "turbo_streams_open", protocol="websocket", route="ws") == 1
        request = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "echo: over ws"}]}
        await send(ws, "chat_completion", "r1", request)
        return json.loads(await ws.receive_from(timeout=15))

    answer = ws_run(token, over_ws)
    assert answer["type"] == "chat_completion" and answer["request_id"] == "r1"

    after = scrape(client)
    assert moved(before, after, "turbo_http_requests_total", route="chat", method="WEBSOCKET", status="403") == 1
    assert moved(before, after, "turbo_http_requests_total", route="ws", method="WEBSOCKET", status="101") == 1
    assert moved(before, after, "turbo_upstream_attempts_total", outcome="ok", model="gpt-4o-mini") == 1
    wait_for(lambda: moved(before, scrape(client), "turbo_streams_open", route="ws") == 0, what="/ws to close")
    assert_no_private_labels(after, user=user, token=token, prompt="over ws")


# --- the gateway: retries, failovers, cooldowns; refusals ---------------------------------------------------------


def test_a_failover_counts_the_failed_attempt_the_retry_and_the_cooldown(client, signup, fakes, configure, metrics_on):  # noqa: F811
    token, _, _ = signup()
    configure(two_deployments(fakes, cooldown_seconds=30))
    fakes["a"].forced_scenario = "error_500"
    before = scrape(client)
    response = ask(client, token, model="pool")
    assert response.status_code == 200 and response.headers["x-turbo-attempts"] == "2"
    after = scrape(client)
    assert moved(before, after, "turbo_upstream_attempts_total", deployment="a/gpt-4o-mini", model="pool") == 1
    assert moved(before, after, "turbo_upstream_attempts_total", outcome="server_error", model="pool") == 1
    deployment_b = response.headers["x-turbo-upstream"]
    assert moved(before, after, "turbo_upstream_attempts_total", deployment=deployment_b, outcome="ok") == 1
    assert moved(before, after, "turbo_upstream_retries_total", model="pool") == 1
    assert moved(before, after, "turbo_upstream_failovers_total", model="pool") == 1
    assert moved(before, after, "turbo_upstream_cooldowns_total", deployment="a/gpt-4o-mini") == 1

    # While a rests, the next call goes straight to b: no retry.
    again = ask(client, token, model="pool")
    assert again.status_code == 200
    last = scrape(client)
    assert moved(after, last, "turbo_upstream_retries_total") == 0
    assert moved(after, last, "turbo_upstream_attempts_total", deployment=deployment_b, outcome="ok") == 1


def test_rate_limit_and_budget_refusals(client, signup, upstream, metrics_on, settings, tmp_path):
    ratelimits_forget()
    settings.RATE_LIMIT_WINDOW_SECONDS = 3600
    settings.RATE_LIMIT_USER_RPM = 1
    token, _, _ = signup()
    before = scrape(client)
    assert ask(client, token).status_code == 200
    assert ask(client, token).status_code == 429
    after = scrape(client)
    assert moved(before, after, "turbo_ratelimit_refusals_total", scope="user", kind="requests") == 1
    assert moved(before, after, "turbo_http_requests_total", route="v1", status="429") == 1
    settings.RATE_LIMIT_USER_RPM = 0
    ratelimits_forget()

    budget_rules_forget()
    token, user, _ = signup()
    budget_set(scope="user", target_id=user["id"], usd=Decimal("0"), period="day")
    refused = ask(client, token)
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "budget_exceeded"
    last = scrape(client)
    assert moved(after, last, "turbo_budget_refusals_total", scope="user") == 1
    assert moved(after, last, "turbo_upstream_attempts_total") == 0
    budget_rules_forget()


# --- the event writer ---------------------------------------------------------------------------------------------


def test_event_writer_queue_batches_and_drops(client, metrics_on, paused_event_writer, settings):
    events_flush()
    before = scrape(client)
    for index in range(5):
        event_record(type="request", method="GET", path=f"/measured/{index}", status=200)
    queued = events_state()["queued"]
    assert queued >= 5
    assert scrape(client).value("turbo_event_queue_depth") == queued  # the scrape's own request logs nothing

    saved = events_flush()
    after = scrape(client)
    assert saved == queued
    assert moved(before, after, "turbo_events_written_total") == saved
    assert moved(before, after, "turbo_event_batches_written_total") >= 1
    assert after.value("turbo_event_queue_depth") == 0

    settings.EVENT_QUEUE_MAX = 2
    for index in range(5):
        event_record(type="request", method="GET", path=f"/overflow/{index}", status=200)
    assert moved(after, scrape(client), "turbo_events_dropped_total", reason="queue_full") == 3
    events_flush()


# --- labels -------------------------------------------------------------------------------------------------------


def assert_no_private_labels(found: Scrape, *, user: dict, token: str, prompt: str) -> None:
    """Names are turbo_, labels come from small sets, and nothing about a user or a prompt is in the text."""
    for secret in (user["id"], user["username"], token, prompt):
        assert secret not in found.text
    routes = set(ROUTE_GROUPS.values()) | {"other"}
    methods = METHODS | {"WEBSOCKET", "other"}
    outcomes = {"ok", "client_error", "rate_limited", "server_error", "timeout", "unreachable"}
    for family in found.families:
        assert family.name.startswith("turbo_")
        for sample in family.samples:
            labels = sample.labels
            assert labels.get("route", "v1") in routes
            assert labels.get("method", "GET") in methods
            assert re.fullmatch(r"\d{3}", labels.get("status", "200"))
            assert labels.get("outcome", "ok") in outcomes
            assert labels.get("protocol", "sse") in ("sse", "websocket")
            assert labels.get("direction", "input") in ("input", "output")
            assert labels.get("scope", "user") in ("user", "group", "key", "deployment")
            assert labels.get("grpc_service", "turbo.v1.Chats").startswith("turbo.v1.")
            assert labels.get("grpc_code", "OK") in grpc.StatusCode.__members__
            assert set(labels) <= {
                "grpc_service",
                "grpc_method",
                "grpc_code",
                "route",
                "method",
                "status",
                "le",
                "protocol",
                "deployment",
                "model",
                "outcome",
                "direction",
                "scope",
                "kind",
                "reason",
            }


# --- several processes --------------------------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_two_processes_sharing_a_directory_sum_their_counters(client, signup, start_server, tmp_path, upstream):  # noqa: F811
    shared = tmp_path / "metrics"
    env = {"METRICS_TOKEN": TOKEN, "METRICS_MULTIPROC_DIR": str(shared)}
    first, second = start_server(**env), start_server(**env)
    token, _, _ = signup()
    with httpx.Client(base_url=first.url, timeout=30) as one, httpx.Client(base_url=second.url, timeout=30) as two:
        start = [scrape(one), scrape(two)]
        for http, times in ((one, 2), (two, 3)):
            for _ in range(times):
                assert ask(http, token).status_code == 200
        seen = [scrape(one), scrape(two)]
        for before, after in zip(start, seen, strict=True):
            assert moved(before, after, "turbo_http_requests_total", route="v1", method="POST", status="200") == 5
            assert moved(before, after, "turbo_upstream_attempts_total", outcome="ok", model="gpt-4o-mini") == 5
            assert moved(before, after, "turbo_proxy_overhead_seconds_count") == 5

        # An SSE stream held open on the second process is one open stream, seen from the first.
        chat = two.post("/chat/create", data={"name": "held"}, headers=bearer(token)).json()
        opened = threading.Event()

        def hold():
            try:
                with httpx.Client(base_url=second.url, timeout=30) as http:
                    with http.stream("POST", "/chat/stream", data={"id": chat["id"]}, headers=bearer(token)) as stream:
                        for _ in stream.iter_lines():
                            opened.set()
            except httpx.HTTPError:
                pass  # the process is killed under it

        holder = threading.Thread(target=hold, daemon=True)
        holder.start()
        assert opened.wait(15)
        assert scrape(one).value("turbo_streams_open", protocol="sse", route="chat") == 1

    # The second process dies without cleaning up: its counters stay, its live gauges go once a new
    # process starts in the directory.
    second.process.send_signal(signal.SIGKILL)
    second.process.wait(timeout=10)
    third = start_server(**env)
    with httpx.Client(base_url=first.url, timeout=30) as one:
        after_death = scrape(one)
    assert after_death.value("turbo_streams_open", route="chat") == 0
    assert moved(start[0], after_death, "turbo_http_requests_total", route="v1", method="POST", status="200") == 5
    with httpx.Client(base_url=third.url, timeout=30) as three:
        assert scrape(three).value("turbo_upstream_attempts_total", outcome="ok") == after_death.value(
            "turbo_upstream_attempts_total", outcome="ok"
        )
