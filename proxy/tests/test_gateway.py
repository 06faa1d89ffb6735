"""The model gateway end to end: several fake upstreams on real loopback ports, each failing on demand,
behind Turbo's ASGI app (in process; the live server where a test needs its own thread or process), with
httpx, the openai SDK, /ws and chats as clients."""

import contextlib
import socket
import textwrap
import threading
import time
from collections import Counter

import httpx
import openai
import pytest
from asgiref.sync import async_to_sync
from channels.testing import WebsocketCommunicator

# The fault tests' server processes and Redis of a test's own.
from chats.tests.processes import free_port, redis_start
from conftest import FAKE_HEADERS, SERVER_KEY
from proxy.events import events_flush
from proxy.gateway import health
from proxy.models import Event
from testing.fake_upstream import FakeUpstream
from testing.inprocess import ORIGIN, in_process_client

pytestmark = pytest.mark.django_db


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]  # nothing listens here once the socket is closed


@pytest.fixture
def fakes():
    """Three fake upstreams of this test's own (a, b, c)."""
    started = {name: FakeUpstream().start() for name in ("a", "b", "c")}
    yield started
    for fake in started.values():
        fake.stop()


@pytest.fixture
def configure(settings, tmp_path):
    """configure(yaml) -> points the running server at a TURBO_CONFIG file with that text."""
    health.forget()

    def apply(text: str):
        path = tmp_path / f"turbo-{time.monotonic_ns()}.yaml"
        path.write_text(textwrap.dedent(text))
        settings.TURBO_CONFIG = str(path)
        settings.GATEWAY_HEALTH_SYNC_SECONDS = 0
        settings.PROXY_FORWARD_HEADERS = FAKE_HEADERS
        return path

    yield apply
    health.forget()


@pytest.fixture
def token(signup):
    return signup()[0]


def two_deployments(fakes, **model_options) -> str:
    options = "".join(f"    {key}: {value}\n" for key, value in model_options.items())
    return f"""
upstreams:
  - {{name: a, base_url: {fakes["a"].url}/v1, api_key: sk-key-of-a}}
  - {{name: b, base_url: {fakes["b"].url}, api_key: sk-key-of-b}}
models:
  - name: pool
    deployments:
      - {{upstream: a, model: gpt-4o-mini}}
      - {{upstream: b, model: gpt-4o-mini-2024-07-18, priority: 1}}
{options}"""


def ask(client, token, model="pool", text="echo: hello there", **extra):
    body = {"model": model, "messages": [{"role": "user", "content": text}], **extra}
    return client.post("/v1/chat/completions", json=body, headers=bearer(token))


def sdk(token: str, **options) -> openai.OpenAI:
    """The openai SDK against Turbo served in process."""
    return openai.OpenAI(base_url=ORIGIN + "/v1", api_key=token, http_client=in_process_client(), **options)


def chat_requests(fake) -> list:
    return [r for r in fake.requests if r.path == "/v1/chat/completions"]


def proxy_events(user_token_client) -> list[Event]:
    events_flush()
    return list(Event.objects.filter(type="proxy").order_by("created_at"))


# --- balancing -------------------------------------------------------------------------------------------


def balanced_pair(fakes, strategy: str, weight_a: int = 1) -> str:
    """pool over a and b, both with the same model, in the same tier."""
    return f"""
        upstreams:
          - {{name: a, base_url: {fakes["a"].url}/v1}}
          - {{name: b, base_url: {fakes["b"].url}/v1}}
        models:
          - name: pool
            strategy: {strategy}
            deployments:
              - {{upstream: a, model: gpt-4o-mini, weight: {weight_a}}}
              - {{upstream: b, model: gpt-4o-mini, weight: 1}}
        """


def test_weighted_split_holds_over_400_requests(client, token, fakes, configure):
    configure(balanced_pair(fakes, "weighted", weight_a=3))
    served = Counter()
    for _ in range(400):
        response = ask(client, token)
        assert response.status_code == 200
        served[response.headers["x-turbo-upstream"]] += 1
    assert served["a/gpt-4o-mini"] + served["b/gpt-4o-mini"] == 400
    # Expected 300 / 100; four standard deviations (8.7 requests each) either side.
    assert 265 <= served["a/gpt-4o-mini"] <= 335, served
    assert len(chat_requests(fakes["a"])) == served["a/gpt-4o-mini"]


def test_each_deployment_gets_its_own_model_name_and_key(client, token, fakes, configure):
    configure(two_deployments(fakes))
    fakes["a"].forced_scenario = "error_500"
    response = ask(client, token)
    assert response.status_code == 200
    sent_a, sent_b = chat_requests(fakes["a"])[-1], chat_requests(fakes["b"])[-1]
    assert sent_a.json()["model"] == "gpt-4o-mini" and sent_a.headers["authorization"] == "Bearer sk-key-of-a"
    assert (
        sent_b.json()["model"] == "gpt-4o-mini-2024-07-18" and sent_b.headers["authorization"] == "Bearer sk-key-of-b"
    )
    assert response.json()["choices"][0]["message"]["content"] == "hello there"


@contextlib.contextmanager
def one_request_held(turbo_server, token, fakes):
    """A request in flight (gated at its upstream) while the block runs; yields the fake holding it.
    It is sent from a thread of its own to the live server, so its test is transactional."""
    results = {}

    def hold():
        with httpx.Client(base_url=turbo_server.url, timeout=30) as other:
            results["held"] = other.post(
                "/v1/chat/completions",
                json={"model": "pool", "messages": [{"role": "user", "content": "hi"}]},
                headers={**bearer(token), "x-fake-scenario": "gated"},
            )

    thread = threading.Thread(target=hold)
    thread.start()
    deadline = time.monotonic() + 10
    while not (chat_requests(fakes["a"]) or chat_requests(fakes["b"])):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    busy = "a" if chat_requests(fakes["a"]) else "b"
    try:
        yield busy
    finally:
        fakes[busy].release()
        thread.join(10)
    assert results["held"].status_code == 200


@pytest.mark.django_db(transaction=True)
def test_least_busy_sends_to_the_idle_deployment(client, token, fakes, configure, turbo_server):
    configure(balanced_pair(fakes, "least_busy"))
    with one_request_held(turbo_server, token, fakes) as busy:
        idle = "b" if busy == "a" else "a"
        for _ in range(10):
            assert ask(client, token).headers["x-turbo-upstream"] == f"{idle}/gpt-4o-mini"


@pytest.mark.django_db(transaction=True)
def test_an_upstream_at_max_in_flight_is_passed_over(client, token, fakes, configure, turbo_server):
    config = balanced_pair(fakes, "weighted").replace("/v1}", "/v1, max_in_flight: 1}")
    assert config.count("max_in_flight") == 2
    configure(config)
    with one_request_held(turbo_server, token, fakes) as busy:
        idle = "b" if busy == "a" else "a"
        for _ in range(10):  # weighted 1:1, yet every one goes to the upstream with room
            assert ask(client, token).headers["x-turbo-upstream"] == f"{idle}/gpt-4o-mini"
    assert len(chat_requests(fakes[busy])) == 1


def test_latency_prefers_the_deployment_that_answers_first(client, token, fakes, configure):
    configure(balanced_pair(fakes, "latency"))
    assert ask(client, token).status_code == 200  # the configuration is in force
    health.health_of("a/gpt-4o-mini").ewma_ms = 900.0  # as if a had been slow
    for _ in range(5):
        assert ask(client, token).headers["x-turbo-upstream"] == "b/gpt-4o-mini"


# --- failover ---------------------------------------------------------------------------------------------


def test_a_500_falls_over_to_the_next_deployment_and_the_log_says_why(client, token, fakes, configure):
    configure(two_deployments(fakes))
    fakes["a"].forced_scenario = "error_500"
    response = ask(client, token)
    assert response.status_code == 200
    assert response.headers["x-turbo-upstream"] == "b/gpt-4o-mini-2024-07-18"
    assert response.headers["x-turbo-attempts"] == "2"
    event = proxy_events(client)[-1]
    assert event.upstream == "b/gpt-4o-mini-2024-07-18"
    assert event.attempts == [
        {"deployment": "a/gpt-4o-mini", "error": "the upstream answered 500"},
        {"deployment": "b/gpt-4o-mini-2024-07-18", "error": ""},
    ]


def test_a_429_cools_the_deployment_for_its_retry_after(client, token, fakes, configure):
    configure(two_deployments(fakes, cooldown_seconds=1))
    fakes["a"].forced_scenario = "error_429"
    fakes["a"].retry_after = "120"
    assert ask(client, token).headers["x-turbo-upstream"] == "b/gpt-4o-mini-2024-07-18"
    fakes["a"].forced_scenario = None  # healthy again, but resting: Retry-After (120 s) beats 1 s
    time.sleep(1.2)
    for _ in range(5):
        assert ask(client, token).headers["x-turbo-upstream"] == "b/gpt-4o-mini-2024-07-18"
    assert len(chat_requests(fakes["a"])) == 1
    assert health.health_of("a/gpt-4o-mini").cool_until > time.time() + 100


def test_connection_refused_falls_over(client, token, fakes, configure):
    configure(f"""
        upstreams:
          - {{name: gone, base_url: http://127.0.0.1:{closed_port()}/v1}}
          - {{name: b, base_url: {fakes["b"].url}/v1}}
        models:
          - name: pool
            deployments:
              - {{upstream: gone, model: gpt-4o-mini}}
              - {{upstream: b, model: gpt-4o-mini, priority: 1}}
        """)
    response = ask(client, token)
    assert response.status_code == 200 and response.headers["x-turbo-upstream"] == "b/gpt-4o-mini"
    assert response.headers["x-turbo-attempts"] == "2"


def test_a_timeout_falls_over(client, token, fakes, configure):
    configure(f"""
        upstreams:
          - {{name: a, base_url: {fakes["a"].url}/v1, timeout: 0.5}}
          - {{name: b, base_url: {fakes["b"].url}/v1}}
        models:
          - name: pool
            deployments:
              - {{upstream: a, model: gpt-4o-mini}}
              - {{upstream: b, model: gpt-4o-mini, priority: 1}}
        """)
    fakes["a"].forced_scenario = "slow"  # headers after 5 s
    response = ask(client, token)
    assert response.status_code == 200 and response.headers["x-turbo-upstream"] == "b/gpt-4o-mini"
    assert "in time" in proxy_events(client)[-1].attempts[0]["error"]


def test_every_deployment_failing_returns_the_last_upstream_error(client, token, fakes, configure):
    configure(two_deployments(fakes))
    fakes["a"].forced_scenario = fakes["b"].forced_scenario = "error_500"
    response = ask(client, token)
    assert response.status_code == 500
    assert response.json()["error"]["code"] == "server_error"  # the upstream's own body
    assert response.headers["x-turbo-attempts"] == "2"


def test_all_unreachable_is_a_502_in_openai_shape(client, token, configure):
    configure(f"""
        upstreams:
          - {{name: gone, base_url: http://127.0.0.1:{closed_port()}/v1}}
        models:
          - name: pool
            deployments: [{{upstream: gone, model: gpt-4o-mini}}]
        """)
    response = ask(client, token)
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "upstream_unreachable"


def test_no_retry_after_the_first_streamed_byte(client, token, fakes, configure):
    configure(two_deployments(fakes))
    fakes["a"].forced_scenario = "die_mid_stream"
    fakes["b"].forced_scenario = "die_mid_stream"
    body = {"model": "pool", "stream": True, "messages": [{"role": "user", "content": "echo: one two three four"}]}
    with client.stream("POST", "/v1/chat/completions", json=body, headers=bearer(token)) as response:
        assert response.status_code == 200
        text = response.read().decode()
    served = response.headers["x-turbo-upstream"].split("/")[0]
    other = "b" if served == "a" else "a"
    assert response.headers["x-turbo-attempts"] == "1"
    assert "upstream_stream_error" in text  # the client sees the break
    assert chat_requests(fakes[other]) == []  # and nothing was tried again


def test_a_4xx_is_the_clients_and_is_not_retried(client, token, fakes, configure):
    configure(two_deployments(fakes))
    fakes["a"].forced_scenario = "error_400"
    fakes["b"].forced_scenario = "error_400"
    response = ask(client, token)
    assert response.status_code == 400 and response.json()["error"]["code"] == "bad_thing"
    assert len(chat_requests(fakes["a"])) + len(chat_requests(fakes["b"])) == 1


def test_context_length_exceeded_falls_over_to_a_larger_window(client, token, fakes, configure):
    configure(f"""
        upstreams:
          - {{name: a, base_url: {fakes["a"].url}/v1}}
          - {{name: b, base_url: {fakes["b"].url}/v1}}
          - {{name: c, base_url: {fakes["c"].url}/v1}}
        models:
          - name: small
            context_window: 8000
            deployments: [{{upstream: a, model: small-model}}]
            fallbacks: [same, large]
          - name: same
            context_window: 8000
            deployments: [{{upstream: c, model: same-model}}]
          - name: large
            context_window: 128000
            deployments: [{{upstream: b, model: large-model}}]
        """)
    fakes["a"].forced_scenario = "context_length"
    response = ask(client, token, model="small")
    assert response.status_code == 200 and response.headers["x-turbo-upstream"] == "b/large-model"
    assert chat_requests(fakes["c"]) == []  # a fallback no larger is skipped
    assert chat_requests(fakes["b"])[-1].json()["model"] == "large-model"


# --- cooldown ---------------------------------------------------------------------------------------------


def test_a_failed_deployment_rests_then_one_request_probes_it(client, token, fakes, configure):
    configure(two_deployments(fakes, cooldown_seconds=1))
    fakes["a"].forced_scenario = "error_500"
    assert ask(client, token).headers["x-turbo-attempts"] == "2"
    fakes["a"].forced_scenario = None
    for _ in range(5):  # resting: skipped, though it has the better priority
        assert ask(client, token).headers["x-turbo-upstream"] == "b/gpt-4o-mini-2024-07-18"
    assert len(chat_requests(fakes["a"])) == 1
    time.sleep(1.1)
    assert ask(client, token).headers["x-turbo-upstream"] == "a/gpt-4o-mini"  # the probe, which succeeds
    assert ask(client, token).headers["x-turbo-upstream"] == "a/gpt-4o-mini"
    assert health.health_of("a/gpt-4o-mini").cool_until == 0


def test_a_failed_probe_rests_again(client, token, fakes, configure):
    configure(two_deployments(fakes, cooldown_seconds=1))
    fakes["a"].forced_scenario = "error_500"
    ask(client, token)
    time.sleep(1.1)
    assert ask(client, token).headers["x-turbo-attempts"] == "2"  # the probe failed, b answered
    assert ask(client, token).headers["x-turbo-attempts"] == "1"
    assert len(chat_requests(fakes["a"])) == 2


# --- routing, names and models ------------------------------------------------------------------------------


def router_config(fakes) -> str:
    return f"""
        upstreams:
          - {{name: a, base_url: {fakes["a"].url}/v1}}
          - {{name: b, base_url: {fakes["b"].url}/v1}}
        models:
          - name: cheap-text
            capabilities: []
            context_window: 1000
            price: {{input: 0.1, output: 0.2}}
            deployments: [{{upstream: a, model: cheap}}]
          - name: pricey-all
            capabilities: [tools, vision, json_schema]
            context_window: 128000
            price: {{input: 5, output: 15}}
            deployments: [{{upstream: b, model: pricey}}]
          - name: auto
            router: {{candidates: [pricey-all, cheap-text], pick: cheapest}}
        """


def test_auto_picks_the_cheapest_model_that_can_serve_the_request(client, token, fakes, configure):
    configure(router_config(fakes))
    assert ask(client, token, model="auto").headers["x-turbo-upstream"] == "a/cheap"
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    assert ask(client, token, model="auto", tools=tools).headers["x-turbo-upstream"] == "b/pricey"
    image = [{"type": "text", "text": "what is it"}, {"type": "image_url", "image_url": {"url": "data:,"}}]
    assert ask(client, token, model="auto", text=image).headers["x-turbo-upstream"] == "b/pricey"
    schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}
    assert ask(client, token, model="auto", response_format=schema).headers["x-turbo-upstream"] == "b/pricey"
    long_prompt = "word " * 2000  # about 2,500 tokens: more than cheap-text's window
    assert ask(client, token, model="auto", text=long_prompt).headers["x-turbo-upstream"] == "b/pricey"
    assert chat_requests(fakes["a"])[-1].json()["model"] == "cheap"


def test_models_lists_the_public_names_and_unknown_models_are_404_before_any_upstream(client, token, fakes, configure):
    configure(router_config(fakes))
    listed = sdk(token).models.list()
    assert [model.id for model in listed.data] == ["cheap-text", "pricey-all", "auto"]
    assert client.get("/v1/models/auto", headers=bearer(token)).json()["id"] == "auto"
    assert client.get("/v1/models/nope", headers=bearer(token)).status_code == 404
    response = ask(client, token, model="gpt-5-imaginary")
    assert response.status_code == 404
    assert response.json()["error"] == {
        "message": "the model 'gpt-5-imaginary' does not exist on this server",
        "type": "invalid_request_error",
        "code": "model_not_found",
    }
    assert fakes["a"].requests == [] and fakes["b"].requests == []


def test_paths_without_a_model_go_to_the_first_upstream(client, token, fakes, configure):
    configure(two_deployments(fakes))
    created = client.post("/v1/responses", json={"model": "pool", "input": "echo: hi"}, headers=bearer(token))
    assert created.status_code == 200, created.text
    response_id = created.json()["id"]  # the caller's own: only they reach it (proxy/paths.py)
    response = client.get(f"/v1/responses/{response_id}", headers=bearer(token))
    assert response.headers["x-turbo-upstream"] == "a"
    assert fakes["a"].requests[-1].path == f"/v1/responses/{response_id}" and fakes["b"].requests == []
    # A model call is never one of them: one whose model cannot be read goes nowhere.
    refused = client.post(
        "/v1/embeddings", content=b"not json", headers={**bearer(token), "content-type": "text/plain"}
    )
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "invalid_json"
    assert len(fakes["a"].requests) == 2 and fakes["b"].requests == []


def test_instruction_mapping_rewrites_the_request_per_deployment(client, token, fakes, configure):
    configure(f"""
        upstreams:
          - {{name: a, base_url: {fakes["a"].url}/v1}}
        models:
          - name: reasoner
            deployments:
              - upstream: a
                model: o-model
                mapping:
                  rename: {{max_tokens: max_completion_tokens}}
                  drop: [temperature]
                  system_to_user: true
        """)
    body = {
        "model": "reasoner",
        "max_tokens": 50,
        "temperature": 0.2,
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "echo: hi"}],
    }
    assert client.post("/v1/chat/completions", json=body, headers=bearer(token)).status_code == 200
    sent = chat_requests(fakes["a"])[-1].json()
    assert sent["model"] == "o-model" and sent["max_completion_tokens"] == 50
    assert "max_tokens" not in sent and "temperature" not in sent
    assert sent["messages"] == [{"role": "user", "content": "Be brief.\n\necho: hi"}]


def test_the_openai_sdk_streams_through_a_failover(client, token, fakes, configure):
    configure(two_deployments(fakes))
    fakes["a"].forced_scenario = "error_500"
    chunks = sdk(token, max_retries=0).chat.completions.create(
        model="pool", stream=True, messages=[{"role": "user", "content": "echo: streamed after failover"}]
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "streamed after failover"


# --- Turbo's own fronts use the same path ----------------------------------------------------------------


def test_chats_fall_over_the_same_way(client, token, fakes, configure):
    configure(two_deployments(fakes))
    fakes["a"].forced_scenario = "error_500"
    chat = client.post("/chat/create", data={"name": "g", "model": "pool"}, headers=bearer(token)).json()
    reply = client.post("/chat/prompt", data={"id": chat["id"], "prompt": "echo: from b"}, headers=bearer(token))
    assert reply.status_code == 200, reply.text
    assert reply.json()["message"]["reply"] == "from b"
    assert chat_requests(fakes["b"])[-1].json()["model"] == "gpt-4o-mini-2024-07-18"


def test_a_chat_on_an_unknown_model_fails_with_a_clear_message(client, token, fakes, configure):
    configure(two_deployments(fakes))
    chat = client.post("/chat/create", data={"name": "g", "model": "nope"}, headers=bearer(token)).json()
    reply = client.post("/chat/prompt", data={"id": chat["id"], "prompt": "hi"}, headers=bearer(token))
    assert reply.status_code == 404
    assert reply.json()["error"]["code"] == "model_not_found"


def test_ws_rpc_falls_over_the_same_way(token, fakes, configure):
    from turbo_site.asgi import application

    configure(two_deployments(fakes))
    fakes["a"].forced_scenario = "error_500"

    async def over_ws() -> list[dict]:  # Channels' communicator: the app in process, on this test's connection
        ws = WebsocketCommunicator(application, f"/ws?token={token}")
        connected, _ = await ws.connect(timeout=10)
        assert connected
        payload = {"model": "pool", "messages": [{"role": "user", "content": "echo: over ws"}]}
        await ws.send_json_to({"type": "chat_completion_stream", "request_id": "1", "payload": payload})
        frames = []
        while not frames or frames[-1]["type"] not in ("chat_completion_done", "error"):
            frames.append(await ws.receive_json_from(timeout=15))
        await ws.disconnect()
        return frames

    frames = async_to_sync(over_ws)()
    assert frames[-1]["type"] == "chat_completion_done", frames[-1]
    assert frames[-1]["data"]["content"] == "over ws"
    assert len(chat_requests(fakes["b"])) == 1


def test_ai_helpers_fall_over_the_same_way(settings, fakes, configure):
    from proxy import ai

    configure(two_deployments(fakes))
    fakes["a"].forced_scenario = "error_500"
    assert ai.complete("echo: via ai", model="pool") == "via ai"
    fakes["b"].forced_scenario = "error_500"
    from proxy.gateway import GatewayError

    with pytest.raises(GatewayError) as failure:
        ai.complete("echo: nobody", model="pool")
    assert failure.value.status == 500
    assert SERVER_KEY not in failure.value.message and "sk-key-of" not in failure.value.message


# --- two processes ------------------------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)  # the servers are processes of their own: they see only what is committed
def test_a_cooldown_is_shared_by_two_processes_over_redis(start_server, processes, fakes, tmp_path):  # noqa: F811
    config = tmp_path / "turbo.yaml"
    config.write_text(textwrap.dedent(two_deployments(fakes, cooldown_seconds=60)))
    redis_port = free_port()
    processes.append(redis_start(redis_port))
    env = {
        "TURBO_CONFIG": str(config),
        "REDIS_ADDRESS": f"redis://127.0.0.1:{redis_port}/0",
        "GATEWAY_HEALTH_SYNC_SECONDS": "0",
    }
    first, second = start_server(**env), start_server(**env)
    with httpx.Client(base_url=first.url, timeout=20) as one, httpx.Client(base_url=second.url, timeout=20) as two:
        signed = one.post("/user/signup", data={"username": "gateway-two", "password": "correct-horse"})
        token = signed.json()["token"]
        fakes["a"].forced_scenario = "error_500"
        assert ask(one, token).headers["x-turbo-attempts"] == "2"
        fakes["a"].forced_scenario = None
        for _ in range(5):  # the other process knows a is resting, though it never saw it fail
            assert ask(two, token).headers["x-turbo-upstream"] == "b/gpt-4o-mini-2024-07-18"
    assert len(chat_requests(fakes["a"])) == 1


def test_a_bad_config_file_stops_turbo_at_start_in_one_line(cli_env, tmp_path, fakes):
    from conftest import run_manage

    config = tmp_path / "turbo.yaml"
    config.write_text(
        textwrap.dedent(f"""
        upstreams:
          - {{name: a, base_url: {fakes["a"].url}/v1}}
        models:
          - name: pool
            deployments: [{{upstream: backup, model: m}}]
        """)
    )
    result = run_manage({**cli_env, "TURBO_CONFIG": str(config)}, "check")
    assert result.returncode != 0
    assert result.stderr.strip() == (
        f"Turbo cannot start: TURBO_CONFIG {config}: models[0].deployments[0].upstream: no upstream named 'backup'"
    )


def test_a_file_broken_under_a_running_server_is_a_503_not_a_crash(client, token, configure):
    configure("upstreams: []\nmodels: []\n")
    response = ask(client, token)
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "gateway_misconfigured"
    assert "upstreams: must be a non-empty list" in response.json()["error"]["message"]
