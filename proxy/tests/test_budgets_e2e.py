"""Budgets on every path that reaches a model: /v1 and chats through Turbo's whole ASGI app in process, and two
server processes."""

import textwrap
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal

import httpx
import pytest
from django.conf import settings
from django.db import connection
from django.test import TestCase

from chats.models import Message
from conftest import SERVER_KEY
from proxy.events import events_flush
from proxy.usage.budgets import budget_rules_forget
from proxy.usage.budgets import budget_set as budget_set_uncommitted

pytestmark = pytest.mark.django_db

# Ten words of reply at $1000 per 1M output tokens: every call costs exactly $0.01, and reserves as much
# (max_tokens 10), so a $0.10 budget lets exactly ten through whatever the timing.
TEN_WORDS = "echo: one two three four five six seven eight nine ten"


def priced_config(tmp_path, upstream_url: str) -> str:
    path = tmp_path / "turbo.yaml"
    path.write_text(
        textwrap.dedent(
            f"""
            upstreams:
              - {{name: main, base_url: {upstream_url}/v1, api_key: {SERVER_KEY}}}
            models:
              - name: priced
                price: {{input: 0, output: 1000}}
                deployments:
                  - {{upstream: main, model: gpt-4o-mini}}
            """
        )
    )
    return str(path)


def budget_set(**fields):
    """budget_set, then what its commit sets off (the cached rules forgotten), as when it commits: a test that
    runs in one transaction never commits."""
    with TestCase.captureOnCommitCallbacks(execute=True):
        return budget_set_uncommitted(**fields)


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def ask(http, token):
    body = {"model": "priced", "max_tokens": 10, "messages": [{"role": "user", "content": TEN_WORDS}]}
    return http.post("/v1/chat/completions", json=body, headers=bearer(token))


def spent_of(user_id) -> Decimal:
    from django.db.models import Sum

    from proxy.models import UsageRollup

    events_flush()
    return UsageRollup.objects.filter(user_id=user_id).aggregate(total=Sum("cost_usd"))["total"] or Decimal(0)


@pytest.fixture
def priced(settings, tmp_path, upstream):
    budget_rules_forget()
    settings.TURBO_CONFIG = priced_config(tmp_path, upstream.url)
    yield
    budget_rules_forget()


def test_v1_calls_stop_at_the_budget_with_openai_s_error_shape(client, signup, priced):
    token, user, _ = signup()
    budget_set(scope="user", target_id=user["id"], usd=Decimal("0.03"), period="day")
    statuses = [ask(client, token).status_code for _ in range(3)]
    assert statuses == [200, 200, 200]
    refused = ask(client, token)
    assert refused.status_code == 429
    error = refused.json()["error"]
    assert error["code"] == "budget_exceeded" and "user's daily budget of $0.03" in error["message"]
    assert "resets at" in error["message"] and int(refused.headers["retry-after"]) > 0
    assert spent_of(user["id"]) == Decimal("0.03")


def test_a_chat_prompt_over_budget_is_refused_and_stores_nothing(client, signup, priced):
    token, user, _ = signup()
    chat = client.post(
        "/chat/create", json={"name": "b", "model": "priced", "settings": {"max_tokens": 10}}, headers=bearer(token)
    ).json()
    budget_set(scope="user", target_id=user["id"], usd=Decimal("0.01"), period="month")
    body = {"id": chat["id"], "prompt": TEN_WORDS, "stream": "false"}
    first = client.post("/chat/prompt", data=body, headers=bearer(token))
    assert first.status_code == 200, first.text
    refused = client.post("/chat/prompt", data=body, headers=bearer(token))
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "budget_exceeded"
    assert "monthly budget" in refused.json()["error"]["message"]
    assert Message.objects.filter(chat_id=chat["id"]).count() == 1  # nothing half-written


@pytest.mark.skipif(
    not settings.REDIS_ADDRESS or connection.vendor != "postgresql",
    reason="two processes share only Postgres + Redis",
)
@pytest.mark.django_db(transaction=True)  # two server processes of their own on the test database
def test_forty_concurrent_requests_on_two_processes_against_a_budget_for_ten(
    start_server,  # noqa: F811
    upstream,
    tmp_path,
):
    env = {"REDIS_ADDRESS": settings.REDIS_ADDRESS, "TURBO_CONFIG": priced_config(tmp_path, upstream.url)}
    first, second = start_server(**env), start_server(**env)
    with httpx.Client(base_url=first.url, timeout=60) as one:
        signed = one.post("/user/signup", data={"username": "budget-two", "password": "correct-horse"}).json()
    token, user_id = signed["token"], signed["user"]["id"]
    budget_set(scope="user", target_id=user_id, usd=Decimal("0.10"), period="month")

    def call(index: int) -> tuple[int, str]:
        server = first if index % 2 else second
        with httpx.Client(base_url=server.url, timeout=60) as http:
            response = ask(http, token)
            code = response.json().get("error", {}).get("code", "") if response.status_code != 200 else ""
            return response.status_code, code

    with ThreadPoolExecutor(40) as pool:
        outcomes = list(pool.map(call, range(40)))
    assert outcomes.count((200, "")) == 10
    assert outcomes.count((429, "budget_exceeded")) == 30
    for server in (first, second):
        server.stop()  # their event writers flush on the way out
    assert spent_of(user_id) == Decimal("0.10")


def test_a_key_created_with_a_budget_stops_at_it(client, signup, priced):
    token, _, _ = signup()
    created = client.post(
        "/user/keys/create",
        json={"name": "capped", "budget_usd": "0.02", "budget_period": "week"},
        headers=bearer(token),
    )
    assert created.status_code == 200, created.text
    assert (created.json()["budget_usd"], created.json()["budget_period"]) == ("0.02", "week")
    listed = client.get("/user/keys/list", headers=bearer(token)).json()["keys"]
    assert (listed[0]["budget_usd"], listed[0]["budget_period"]) == ("0.02", "week")
    key = created.json()["key"]
    assert [ask(client, key).status_code for _ in range(3)] == [200, 200, 429]
    assert ask(client, token).status_code == 200  # the user's own token is not the key: no budget
    bad = client.post("/user/keys/create", json={"name": "x", "budget_usd": "-1"}, headers=bearer(token))
    assert bad.status_code == 400
    assert len(client.get("/user/keys/list", headers=bearer(token)).json()["keys"]) == 1  # nothing stored


def test_a_budget_and_a_rate_limit_together_refuse_without_taking_from_each_other(client, signup, priced, settings):
    """With both, one script takes from both or neither (on Redis): a call over budget uses none of the
    rate limit, and a rate-limited call reserves none of the budget."""
    from proxy.usage.ratelimits import ratelimits_forget

    ratelimits_forget()
    settings.RATE_LIMIT_USER_RPM = 5
    settings.RATE_LIMIT_USER_TPM = 100_000  # settled with the tokens used, with the budget, after each call
    token, user, _ = signup()
    budget_set(scope="user", target_id=user["id"], usd=Decimal("0.02"), period="day")
    answers = [ask(client, token) for _ in range(2)]
    assert [a.status_code for a in answers] == [200, 200]
    assert answers[-1].headers["x-ratelimit-remaining-requests"] == "3"
    for _ in range(4):  # over budget: refused, and the rate limit keeps its three
        refused = ask(client, token)
        assert (refused.status_code, refused.json()["error"]["code"]) == (429, "budget_exceeded")
    budget_set(scope="user", target_id=user["id"], usd=Decimal("1.00"), period="day")
    again = [ask(client, token) for _ in range(3)]
    assert [a.status_code for a in again] == [200, 200, 200]
    assert again[-1].headers["x-ratelimit-remaining-requests"] == "0"
    limited = ask(client, token)
    assert (limited.status_code, limited.json()["error"]["code"]) == (429, "rate_limited")
    assert spent_of(user["id"]) == Decimal("0.05")  # the rate-limited call reserved and spent nothing
    budget_set(scope="user", target_id=user["id"], usd=Decimal("0.06"), period="day")
    settings.RATE_LIMIT_USER_RPM = 0
    # The last cent is still there to reserve: every earlier reservation was settled, none left to expire.
    assert ask(client, token).status_code == 200
    assert ask(client, token).json()["error"]["code"] == "budget_exceeded"


def _top_level_commands(monitor, until: str, db: int) -> list[list[str]]:
    """The commands Redis received from clients (not those a script ran) on database `db` (MONITOR sees
    every database: the suite's other workers use their own) up to the ECHO of `until`."""
    seen = []
    while True:
        command = monitor.next_command()
        if int(command["db"]) != db:
            continue
        words = command["command"].split()
        if words[:2] == ["ECHO", until]:
            return seen
        if command["client_type"] != "lua":
            seen.append(words)


@pytest.mark.skipif(not settings.REDIS_ADDRESS, reason="the token's lookup and the admission meet on Redis")
def test_a_keys_lookup_and_admission_share_one_round_trip_and_its_revocation_holds_at_once(
    client, signup, priced, upstream, settings
):
    """The production setup (a key with rpm/tpm and a budget): once this process has read the key's
    lookup, a call sends Redis no GET for it; the admission's script checks it in place. A revocation
    (which deletes the cached lookup) is refused by the very next call, whatever that call carries."""
    import redis as redis_py

    from proxy.usage.ratelimits import ratelimits_forget

    ratelimits_forget()
    settings.PROXY_MAX_BODY_BYTES = 4096
    token, _, _ = signup()
    made = client.post(
        "/user/keys/create",
        json={"name": "limited", "rpm": 100, "tpm": 100_000, "budget_usd": "1", "budget_period": "day"},
        headers=bearer(token),
    ).json()
    key = made["key"]
    for _ in range(2):  # from the database (and cached), then from the cache: this process holds it now
        assert ask(client, key).status_code == 200
    observer = redis_py.Redis.from_url(settings.REDIS_ADDRESS)
    with observer.monitor() as monitor:
        answer = ask(client, key)
        observer.echo("end-of-call")
        commands = _top_level_commands(monitor, "end-of-call", observer.connection_pool.connection_kwargs.get("db", 0))
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-ratelimit-remaining-requests"] == "97"
    names = [words[0].upper() for words in commands]
    assert "GET" not in names, commands  # no lookup of its own
    assert names.count("EVALSHA") + names.count("EVAL") == 2, commands  # the admission, then the settlement

    heard = len(upstream.requests)
    assert client.post("/user/keys/revoke", json={"id": made["id"]}, headers=bearer(token)).status_code == 200
    refused = ask(client, key)
    assert (refused.status_code, refused.json()["error"]["code"]) == (401, "unauthorized")
    # A request that would be refused for itself still learns first that its key is revoked.
    unreadable = client.post("/v1/chat/completions", content=b"{not json", headers=bearer(key))
    assert unreadable.status_code == 401
    too_big = client.post("/v1/chat/completions", content=b"x" * 5000, headers=bearer(key))
    assert too_big.status_code == 401
    assert len(upstream.requests) == heard  # nothing reached the upstream
    assert ask(client, token).status_code == 200  # the user's session goes on


def test_a_revoked_tokens_bad_request_is_refused_as_unauthenticated(client, signup, upstream, settings):
    """On both legs: once a token is revoked, a request that is wrong in itself (unreadable, too big)
    gets 401, as a request with a revoked token always did."""
    settings.PROXY_MAX_BODY_BYTES = 4096
    token, _, _ = signup()
    for _ in range(2):
        assert ask(client, token).status_code == 200
    assert client.post("/user/logout", headers=bearer(token)).status_code == 200
    for response in (
        client.post("/v1/chat/completions", content=b"{not json", headers=bearer(token)),
        client.post("/v1/chat/completions", content=b"x" * 5000, headers=bearer(token)),
        client.get("/v1/models", headers=bearer(token)),
    ):
        assert response.status_code == 401, response.text
