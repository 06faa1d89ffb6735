"""Rate limits end to end: requests and tokens per minute of users, groups, API keys and deployments,
through Turbo's whole ASGI app in process (/v1 with httpx and the openai SDK, /ws, chat prompts), and across two
server processes."""

import textwrap
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from asgiref.sync import async_to_sync
from channels.testing import WebsocketCommunicator
from django.conf import settings as django_settings
from django.db import connection

# The fault tests' server processes.
from proxy.config import ConfigError, load
from proxy.models import RateLimit
from proxy.tests.test_gateway import configure, fakes  # noqa: F401 (fixtures: three fake upstreams, TURBO_CONFIG)
from proxy.usage.ratelimits import duration_text, ratelimits_forget

pytestmark = pytest.mark.django_db

HOUR = 3600  # a long "minute": no request's share comes back while a test runs


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(autouse=True)
def limits(settings):
    """Counters kept in this process (the test server's) start from nothing; the window is an hour."""
    ratelimits_forget()
    settings.RATE_LIMIT_WINDOW_SECONDS = HOUR
    yield settings
    ratelimits_forget()


def ask(client, token, text="echo: hello there", model="gpt-4o-mini", **extra):
    body = {"model": model, "messages": [{"role": "user", "content": text}], **extra}
    return client.post("/v1/chat/completions", json=body, headers=bearer(token))


def chat_requests(fake) -> list:
    return [request for request in fake.requests if request.path == "/v1/chat/completions"]


def test_a_user_rpm_limit_counts_down_then_answers_429_with_retry_after(client, signup, upstream, limits, new_client):
    limits.RATE_LIMIT_USER_RPM = 3
    token = signup()[0]
    http = new_client()
    sdk = openai.OpenAI(base_url=str(http.base_url).rstrip("/") + "/v1", api_key=token, max_retries=0, http_client=http)
    remaining = []
    for _ in range(3):
        raw = sdk.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "echo: hi"}]
        )
        assert raw.parse().choices[0].message.content == "hi"
        assert raw.headers["x-ratelimit-limit-requests"] == "3"
        assert raw.headers["x-ratelimit-reset-requests"].endswith("s")
        remaining.append(raw.headers["x-ratelimit-remaining-requests"])  # ours, never the upstream's 99
    assert remaining == ["2", "1", "0"]

    with pytest.raises(openai.RateLimitError) as refused:
        sdk.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "echo: hi"}])
    response = refused.value.response
    assert response.status_code == 429
    assert 1 <= int(response.headers["retry-after"]) <= HOUR
    assert response.headers["x-ratelimit-remaining-requests"] == "0"
    assert response.json()["error"]["code"] == "rate_limited"
    assert response.json()["error"]["type"] == "requests"
    assert len(chat_requests(upstream)) == 3  # the refused request never left Turbo

    # Another user has limits of their own; the upstream's headers pass for a caller with none.
    limits.RATE_LIMIT_USER_RPM = 0
    other = ask(client, signup()[0])
    assert other.status_code == 200
    assert other.headers["x-ratelimit-remaining-requests"] == "99"
    assert "x-ratelimit-limit-requests" not in other.headers


def test_a_keys_own_rpm_and_a_refused_request_consumes_nothing(client, signup, upstream, limits):
    limits.RATE_LIMIT_USER_RPM = 2
    token = signup()[0]
    created = client.post("/user/keys/create", json={"name": "slow", "rpm": 1}, headers=bearer(token))
    assert created.status_code == 200, created.text
    assert created.json()["rpm"] == 1 and created.json()["tpm"] is None
    listed = client.get("/user/keys/list", headers=bearer(token)).json()["keys"]
    assert (listed[0]["rpm"], listed[0]["tpm"]) == (1, None)
    key = created.json()["key"]

    assert ask(client, key).status_code == 200
    refused = ask(client, key)  # the key's limit; the user has one request left, and keeps it
    assert refused.status_code == 429
    assert "API key" in refused.json()["error"]["message"]
    assert ask(client, token).status_code == 200  # the user's last request
    assert ask(client, token).status_code == 429
    assert len(chat_requests(upstream)) == 2


def test_a_key_rpm_or_tpm_below_one_is_refused(client, signup, upstream):
    token = signup()[0]
    for field in ("rpm", "tpm"):
        response = client.post("/user/keys/create", json={"name": "k", field: 0}, headers=bearer(token))
        assert response.status_code == 400
        assert field in response.json()["error"]["message"]


def test_tokens_per_minute_are_settled_with_the_actual_usage(client, signup, upstream, limits):
    limits.RATE_LIMIT_USER_TPM = 300
    token = signup()[0]
    # Each call is admitted against about 210 tokens (its max_tokens and prompt) but uses fewer than 10:
    # without settling, the second would not fit in 300.
    first = ask(client, token, max_tokens=200)
    assert first.status_code == 200
    assert first.headers["x-ratelimit-limit-tokens"] == "300"
    assert int(first.headers["x-ratelimit-remaining-tokens"]) < 100
    second = ask(client, token, max_tokens=200)
    assert second.status_code == 200, second.text
    used = first.json()["usage"]["total_tokens"]
    assert int(second.headers["x-ratelimit-remaining-tokens"]) == 300 - used - (
        300 - int(first.headers["x-ratelimit-remaining-tokens"])
    )
    # A call that may take the whole limit waits until nothing is held: 429 now.
    refused = ask(client, token, max_tokens=300)
    assert refused.status_code == 429
    assert refused.json()["error"]["type"] == "tokens"


def test_a_group_limit_holds_for_every_member_prompting_in_its_chat(client, signup, upstream):
    owner_token, _, _ = signup()
    member_token, member, _ = signup()
    group = client.post("/group/create", data={"name": "team"}, headers=bearer(owner_token)).json()
    client.post("/group/members/add", data={"id": group["id"], "user_ids": member["id"]}, headers=bearer(owner_token))
    RateLimit.objects.create(scope="group", group_id=group["id"], rpm=2)
    chat = client.post(
        "/chat/create", data={"name": "shared", "group_id": group["id"]}, headers=bearer(owner_token)
    ).json()

    def prompt(token):
        return client.post("/chat/prompt", data={"id": chat["id"], "prompt": "echo: hi"}, headers=bearer(token))

    assert prompt(owner_token).status_code == 200
    assert prompt(member_token).status_code == 200
    refused = prompt(member_token)
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "rate_limited"
    assert int(refused.headers["Retry-After"]) >= 1
    # Outside the group's chat, the member's own calls are not the group's.
    own = client.post("/chat/create", data={"name": "mine"}, headers=bearer(member_token)).json()
    mine = client.post("/chat/prompt", data={"id": own["id"], "prompt": "echo: hi"}, headers=bearer(member_token))
    assert mine.status_code == 200


def test_ws_answers_an_error_frame_rate_limited(signup, upstream, limits):
    from turbo_site.asgi import application

    limits.RATE_LIMIT_USER_RPM = 1
    token = signup()[0]
    payload = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "echo: hi"}]}

    async def calls():
        ws = WebsocketCommunicator(application, f"/ws?token={token}")
        connected, _ = await ws.connect(timeout=10)
        assert connected
        await ws.send_json_to({"type": "chat_completion", "request_id": "r1", "payload": payload})
        assert (await ws.receive_json_from(timeout=10))["type"] == "chat_completion"
        await ws.send_json_to({"type": "chat_completion", "request_id": "r2", "payload": payload})
        frame = await ws.receive_json_from(timeout=10)
        await ws.disconnect()
        return frame

    frame = async_to_sync(calls)()
    assert frame["type"] == "error" and frame["request_id"] == "r2"
    assert frame["error"]["code"] == "rate_limited"


def test_an_admin_rate_limit_replaces_the_default_and_is_validated(client, signup, upstream, limits):
    from django.core.exceptions import ValidationError

    from accounts.models import User

    limits.RATE_LIMIT_USER_RPM = 1
    token, user, _ = signup()
    RateLimit.objects.create(scope="user", user_id=user["id"], rpm=0)  # 0: no limit for this user
    for _ in range(3):
        assert ask(client, token).status_code == 200
    with pytest.raises(ValidationError):
        RateLimit(scope="group", user=User.objects.get(pk=user["id"]), rpm=1).full_clean()


# --- deployments -------------------------------------------------------------------------------------------


def test_a_deployment_at_its_rpm_sends_routing_to_the_next_then_429_when_all_are_full(client, signup, fakes, configure):  # noqa: F811
    run = uuid.uuid4().hex[:8]  # deployments' counters are shared over Redis: names of this test's own
    configure(f"""
        upstreams:
          - {{name: a, base_url: {fakes["a"].url}/v1}}
          - {{name: b, base_url: {fakes["b"].url}/v1}}
        models:
          - name: pool
            deployments:
              - {{name: a-{run}, upstream: a, model: gpt-4o-mini, rpm: 2}}
              - {{name: b-{run}, upstream: b, model: gpt-4o-mini, priority: 1, rpm: 1}}
        """)
    token = signup()[0]
    served = [ask(client, token, model="pool").headers["x-turbo-upstream"] for _ in range(3)]
    assert served == [f"a-{run}", f"a-{run}", f"b-{run}"]
    refused = ask(client, token, model="pool")
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "rate_limited"
    assert "every deployment" in refused.json()["error"]["message"]
    assert int(refused.headers["retry-after"]) >= 1
    # Turbo kept the providers under their limits: none of them was asked more often than it allows.
    assert (len(chat_requests(fakes["a"])), len(chat_requests(fakes["b"]))) == (2, 1)


def test_deployment_tpm_counts_tokens(client, signup, fakes, configure):  # noqa: F811
    run = uuid.uuid4().hex[:8]
    configure(f"""
        upstreams:
          - {{name: a, base_url: {fakes["a"].url}/v1}}
          - {{name: b, base_url: {fakes["b"].url}/v1}}
        models:
          - name: pool
            deployments:
              - {{name: a-{run}, upstream: a, model: gpt-4o-mini, tpm: 300}}
              - {{name: b-{run}, upstream: b, model: gpt-4o-mini, priority: 1}}
        """)
    token = signup()[0]
    assert ask(client, token, model="pool", max_tokens=250).headers["x-turbo-upstream"] == f"a-{run}"
    # The first call was settled to what it used: the same again still fits a.
    assert ask(client, token, model="pool", max_tokens=250).headers["x-turbo-upstream"] == f"a-{run}"
    # One that may take all of a's minute must wait until a holds nothing: b serves it.
    assert ask(client, token, model="pool", max_tokens=300).headers["x-turbo-upstream"] == f"b-{run}"


@pytest.mark.parametrize(
    "value, problem", [("0", "must be at least 1"), ("1.5", "must be a whole number"), ("lots", "must be a number")]
)
def test_a_bad_deployment_limit_is_one_config_error_line(tmp_path, value, problem):
    path = tmp_path / "turbo.yaml"
    path.write_text(
        textwrap.dedent(f"""
        upstreams:
          - {{name: a, base_url: http://127.0.0.1:9/v1}}
        models:
          - name: pool
            deployments:
              - {{upstream: a, rpm: {value}}}
        """)
    )
    with pytest.raises(ConfigError) as failed:
        load(str(path))
    assert str(failed.value) == f"TURBO_CONFIG {path}: models[0].deployments[0].rpm: {problem}"
    assert "\n" not in str(failed.value)


def test_reset_durations_read_like_openais():
    assert [duration_text(ms) for ms in (250, 1000, 1500, 6000, 60000, 360000, 3723000)] == [
        "250ms",
        "1s",
        "1.5s",
        "6s",
        "1m0s",
        "6m0s",
        "1h2m3s",
    ]


# --- two processes -----------------------------------------------------------------------------------------


@pytest.mark.skipif(
    not django_settings.REDIS_ADDRESS or connection.vendor != "postgresql",
    reason="needs DB_ADDRESS=postgresql://... and REDIS_ADDRESS",
)
@pytest.mark.django_db(transaction=True)  # two server processes of their own on the test database
def test_forty_concurrent_requests_on_two_processes_let_exactly_the_limit_through(
    start_server,  # noqa: F811
    upstream,
):
    env = {
        "REDIS_ADDRESS": django_settings.REDIS_ADDRESS,
        "RATE_LIMIT_USER_RPM": "10",
        "RATE_LIMIT_WINDOW_SECONDS": str(HOUR),
    }
    first, second = start_server(**env), start_server(**env)
    with httpx.Client(base_url=first.url, timeout=30) as one:
        signed = one.post("/user/signup", data={"username": f"rl-{uuid.uuid4().hex[:8]}", "password": "correct-horse"})
        token = signed.json()["token"]

    def call(index: int) -> int:
        with httpx.Client(base_url=(first, second)[index % 2].url, timeout=30) as http:
            return ask(http, token).status_code

    with ThreadPoolExecutor(max_workers=40) as pool:
        statuses = list(pool.map(call, range(40)))
    assert sorted(statuses) == [200] * 10 + [429] * 30
    assert len(chat_requests(upstream)) == 10
