"""Usage and cost: every model call recorded once (exact, or estimated offline), rollups, /usage, the command.

Against Turbo's whole ASGI app in process (over the live server's socket where a client hangs up mid-stream)
and the fake upstream, with the official SDK where a client would use it.
"""

import json
import re
import time
import uuid
from decimal import Decimal

import httpx
import openai
import pytest
from asgiref.sync import async_to_sync
from channels.testing import WebsocketCommunicator

from accounts.services import user_create
from proxy import ai, gateway
from proxy.config import load
from proxy.events import events_flush
from proxy.gateway import ConfigError, UsageReader
from proxy.models import UsageRollup
from proxy.usage.caller import Caller
from proxy.usage.passthrough import UsageStripper, usage_asked_for
from proxy.usage.pricing import DEFAULT_PRICES, Price, cost_of, cost_usd, price_of
from proxy.usage.records import Usage, usage_from, usage_record
from proxy.usage.tokens import count_text, estimate_prompt_tokens
from testing.commands import manage

pytestmark = pytest.mark.django_db

MINI = DEFAULT_PRICES["gpt-4o-mini"]


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def account(signup):
    token, user, _ = signup()
    return token, user


@pytest.fixture
def sdk(new_client, account):
    http = new_client()
    base_url = str(http.base_url).rstrip("/") + "/v1"
    return openai.OpenAI(base_url=base_url, api_key=account[0], max_retries=0, http_client=http)


@pytest.fixture
def upstream_http():
    """A plain client for the fake upstream itself (the in-process client serves only Turbo)."""
    with httpx.Client(timeout=10) as http:
        yield http


def rollups(user_id, wait_for: int = 1, timeout: float = 10) -> list[UsageRollup]:
    """The user's rollup rows once `wait_for` calls are in them (records are queued at a stream's end)."""
    deadline = time.monotonic() + timeout
    while True:
        events_flush()
        rows = list(UsageRollup.objects.filter(user_id=user_id).order_by("model"))
        if sum(row.requests for row in rows) >= wait_for or time.monotonic() > deadline:
            return rows
        time.sleep(0.05)


def one_rollup(user_id) -> UsageRollup:
    (row,) = rollups(user_id)
    assert row.requests == 1
    return row


def exact_cost(price: Price, input_tokens: int, output_tokens: int) -> Decimal:
    return (input_tokens * price.input + output_tokens * price.output) / Decimal(1_000_000)


def normalized(raw: bytes) -> bytes:
    """A stream with the fake's per-request id and timestamp made equal."""
    raw = re.sub(rb'"id": "chatcmpl-[0-9a-f]+"', b'"id": "ID"', raw)
    return re.sub(rb'"created": \d+', b'"created": 0', raw)


def stream_bytes(http: httpx.Client, url: str, body: dict, headers: dict) -> bytes:
    with http.stream("POST", url, json=body, headers=headers) as response:
        assert response.status_code == 200
        return b"".join(response.iter_raw())


def chat_body(text: str, **extra) -> dict:
    return {"model": "gpt-4o-mini", "stream": True, "messages": [{"role": "user", "content": text}], **extra}


# --- /v1 streams ---------------------------------------------------------------------------------------


def test_stream_without_include_usage_looks_unchanged_and_is_recorded(client, upstream_http, upstream, account):
    body = chat_body("echo: one two three four five")
    direct = stream_bytes(upstream_http, upstream.url + "/v1/chat/completions", body, {})
    assert b'"usage"' not in direct
    via = stream_bytes(client, "/v1/chat/completions", body, bearer(account[0]))
    # Turbo asked the upstream for usage; the client gets exactly what it would have got without it.
    assert upstream.requests[-1].json()["stream_options"] == {"include_usage": True}
    assert normalized(via) == normalized(direct)
    row = one_rollup(account[1]["id"])
    assert (row.model, row.deployment, row.estimated_requests) == ("gpt-4o-mini", "default", 0)
    assert (row.input_tokens, row.output_tokens) == (6, 5)  # the fake counts words
    assert row.cost_usd == exact_cost(MINI, 6, 5)
    assert row.group_id is None and row.key_id is None  # a token, not a group's API key


def test_stream_with_include_usage_passes_through_byte_for_byte(client, upstream_http, upstream, account):
    body = chat_body("echo: alpha beta gamma", stream_options={"include_usage": True})
    sent = json.dumps(body).encode()
    headers = {**bearer(account[0]), "content-type": "application/json"}
    with client.stream("POST", "/v1/chat/completions", content=sent, headers=headers) as response:
        via = b"".join(response.iter_raw())
    assert upstream.requests[-1].body == sent  # nothing added to the request either
    direct = stream_bytes(upstream_http, upstream.url + "/v1/chat/completions", body, {})
    assert normalized(via) == normalized(direct)
    usage_chunk = json.loads(via.split(b"data: ")[-2])
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == 3
    row = one_rollup(account[1]["id"])
    assert (row.input_tokens, row.output_tokens, row.estimated_requests) == (4, 3, 0)


def test_sdk_stream_sees_no_usage_chunk_it_did_not_ask_for(sdk, upstream, account):
    chunks = list(
        sdk.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "echo: red green blue"}], stream=True
        )
    )
    assert all(chunk.choices and chunk.usage is None for chunk in chunks)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks) == "red green blue"
    row = one_rollup(account[1]["id"])
    assert (row.model, row.output_tokens, row.estimated_requests) == ("gpt-4o", 3, 0)
    assert row.cost_usd == exact_cost(DEFAULT_PRICES["gpt-4o"], 4, 3)


def test_usage_on_a_chunk_with_choices_is_taken_off_that_chunk_only(client, upstream_http, upstream, account):
    body = chat_body("echo: one two", metadata={"scenario": "usage_on_choices"})
    via = stream_bytes(client, "/v1/chat/completions", body, bearer(account[0]))
    direct = stream_bytes(upstream_http, upstream.url + "/v1/chat/completions", body, {})
    assert b'"usage"' not in via
    assert normalized(via) == normalized(direct)
    assert upstream.requests[-2].json()["stream_options"] == {"include_usage": True}
    row = one_rollup(account[1]["id"])
    assert (row.output_tokens, row.estimated_requests) == (2, 0)


def test_an_upstream_without_usage_is_estimated_and_never_zero(client, upstream, account):
    body = chat_body("echo: the quick brown fox jumps", metadata={"scenario": "no_usage"})
    via = stream_bytes(client, "/v1/chat/completions", body, bearer(account[0]))
    assert b"jumps" in via and b'"usage"' not in via
    row = one_rollup(account[1]["id"])
    assert row.estimated_requests == 1
    assert row.output_tokens >= count_text("the quick brown fox jumps") > 0
    assert row.input_tokens >= count_text("echo: the quick brown fox jumps")
    assert row.cost_usd == exact_cost(MINI, row.input_tokens, row.output_tokens) > 0


@pytest.mark.django_db(transaction=True)  # hangs up mid-stream: needs the stream as it comes, over a socket
def test_a_client_that_aborts_mid_stream_is_charged_for_what_was_generated(turbo_server, upstream, account):
    words = " ".join(f"word{n}" for n in range(40))
    body = chat_body(f"echo: {words}")
    received = b""
    with httpx.Client(base_url=turbo_server.url, timeout=10) as http:
        headers = {**bearer(account[0]), "x-fake-chunk-delay": "0.05"}
        with http.stream("POST", "/v1/chat/completions", json=body, headers=headers) as response:
            for chunk in response.iter_raw():
                received += chunk
                if received.count(b"word") >= 5:
                    break  # hang up
    assert upstream.wait_for_abort(timeout=10)
    row = one_rollup(account[1]["id"])
    assert row.estimated_requests == 1
    assert 5 <= row.output_tokens < count_text(words)
    assert row.input_tokens > 0 and row.cost_usd > 0


def test_a_stream_that_breaks_is_charged_as_estimated(client, upstream, account):
    body = chat_body("echo: a b c d e f", metadata={"scenario": "die_mid_stream"})
    via = stream_bytes(client, "/v1/chat/completions", body, bearer(account[0]))
    assert b"event: error" in via
    row = one_rollup(account[1]["id"])
    assert row.estimated_requests == 1 and row.output_tokens > 0


def test_an_upstream_error_is_not_charged(client, upstream, account):
    body = chat_body("echo: hi", metadata={"scenario": "error_400"})
    response = client.post("/v1/chat/completions", json=body, headers=bearer(account[0]))
    assert response.status_code == 400
    assert rollups(account[1]["id"], timeout=0.3) == []


# --- /v1 whole answers ---------------------------------------------------------------------------------


def test_chat_completion_and_embeddings_are_recorded_with_their_cost(sdk, upstream, account):
    completion = sdk.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "echo: hi there"}]
    )
    assert completion.usage.prompt_tokens == 3
    sdk.embeddings.create(model="text-embedding-3-small", input=["a b", "c"])
    chat, embedding = rollups(account[1]["id"], wait_for=2)
    assert (chat.model, chat.input_tokens, chat.output_tokens) == ("gpt-4o-mini", 3, 2)
    assert chat.cost_usd == exact_cost(MINI, 3, 2) == Decimal("0.00000165")
    assert (embedding.model, embedding.input_tokens, embedding.output_tokens) == ("text-embedding-3-small", 3, 0)
    assert embedding.cost_usd == Decimal("0.00000006")


def test_a_whole_answer_without_usage_is_estimated(client, upstream, account):
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "echo: seven eight nine"}]}
    response = client.post(
        "/v1/chat/completions", json=body, headers={**bearer(account[0]), "x-fake-scenario": "no_usage"}
    )
    assert response.status_code == 200 and "usage" not in response.json()
    row = one_rollup(account[1]["id"])
    assert row.estimated_requests == 1 and row.output_tokens == count_text("seven eight nine")


def test_config_prices_win_over_the_shipped_ones(sdk, upstream, account, tmp_path, settings):
    config = tmp_path / "turbo.yaml"
    config.write_text(
        f"upstreams: [{{name: fake, base_url: '{upstream.url}/v1'}}]\n"
        "models:\n"
        "  - name: gpt-4o-mini\n"
        "    deployments: [{upstream: fake}]\n"
        "    price: {input: 0.3, output: 1.2, cached_input: 0.03}\n"
    )
    settings.TURBO_CONFIG = str(config)
    assert price_of("gpt-4o-mini") == Price(Decimal("0.3"), Decimal("1.2"), Decimal("0.03"))
    sdk.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "echo: x y"}])
    row = one_rollup(account[1]["id"])
    assert (row.deployment, row.input_tokens, row.output_tokens) == ("fake/*", 3, 2)
    assert row.cost_usd == (3 * Decimal("0.3") + 2 * Decimal("1.2")) / 1_000_000


# --- Turbo's own calls ---------------------------------------------------------------------------------


def test_a_chat_prompt_with_a_tool_round_records_both_calls(client, upstream, account):
    token, user = account
    chat = client.post("/chat/create", json={"name": "t", "tools": ["calculator"]}, headers=bearer(token)).json()
    response = client.post(
        "/chat/prompt", data={"id": chat["id"], "prompt": "[scenario:tool_call] what is 2+2?"}, headers=bearer(token)
    )
    assert response.status_code == 200, response.text
    row = one_rollup_of(user["id"], requests=2)
    assert row.estimated_requests == 0 and row.output_tokens > 0
    assert row.group_id is None and row.key_id is None


def one_rollup_of(user_id, requests: int) -> UsageRollup:
    (row,) = rollups(user_id, wait_for=requests)
    assert row.requests == requests
    return row


def test_ws_calls_are_recorded(upstream, account):
    token, user = account

    async def calls():
        from turbo_site.asgi import application

        ws = WebsocketCommunicator(application, f"/ws?token={token}")
        connected, _ = await ws.connect(timeout=10)
        assert connected
        messages = [{"role": "user", "content": "echo: one two"}]
        for kind, payload in (
            ("chat_completion", {"messages": messages, "model": "gpt-4o-mini"}),
            ("chat_completion_stream", {"messages": messages, "model": "gpt-4o-mini"}),
            ("embedding", {"input": "a b c", "model": "text-embedding-3-small"}),
        ):
            await ws.send_json_to({"type": kind, "request_id": kind, "payload": payload})
            while (await ws.receive_json_from(timeout=15))["type"] not in (
                "chat_completion",
                "chat_completion_done",
                "embedding",
            ):
                pass
        await ws.disconnect()

    async_to_sync(calls)()
    chat, embedding = rollups(user["id"], wait_for=3)
    assert (chat.requests, chat.input_tokens, chat.output_tokens, chat.estimated_requests) == (2, 6, 4, 0)
    assert (embedding.requests, embedding.input_tokens) == (1, 3)


def test_ai_complete_and_stream_are_recorded(upstream, account):
    user_id = uuid.UUID(account[1]["id"])
    assert ai.complete("echo: four five six", user=user_id) == "four five six"

    async def streamed():
        stream = ai.stream("echo: a b", user=user_id)
        return "".join([text async for text in stream]), stream.usage

    text, usage = async_to_sync(streamed)()
    assert text == "a b" and usage["completion_tokens"] == 2  # ai.stream asked for usage for itself
    row = one_rollup_of(user_id, requests=2)
    assert (row.output_tokens, row.estimated_requests) == (5, 0)


def test_turbos_own_streams_without_usage_or_abandoned_are_estimated(upstream, account):
    user_id = uuid.UUID(account[1]["id"])

    async def calls():
        text = "".join([piece async for piece in ai.stream("[scenario:no_usage] echo: one two three", user=user_id)])
        words = " ".join(f"w{n}" for n in range(30))
        stream = gateway.chat_stream(
            {"model": "gpt-4o", "messages": [{"role": "user", "content": f"[chunk_delay:0.05] echo: {words}"}]},
            caller=Caller(user_id),
        )
        iterator = stream.__aiter__()
        while "w2" not in stream.text:
            await iterator.__anext__()
        await iterator.aclose()  # the caller walked away mid-stream
        return text

    assert async_to_sync(calls)() == "one two three"
    abandoned, without_usage = rollups(user_id, wait_for=2)  # by model: gpt-4o, gpt-4o-mini (the default)
    assert (without_usage.model, without_usage.estimated_requests) == ("gpt-4o-mini", 1)
    assert without_usage.output_tokens == count_text("one two three") and without_usage.input_tokens > 0
    assert (abandoned.model, abandoned.estimated_requests) == ("gpt-4o", 1)
    assert 3 <= abandoned.output_tokens < 30


def test_the_responses_api_usage_is_read_from_its_completed_event():
    reader = UsageReader(True)
    usage = {"input_tokens": 7, "output_tokens": 3, "input_tokens_details": {"cached_tokens": 4}}
    for event in (
        {"type": "response.created", "response": {"model": "gpt-4o", "usage": None}},
        {"type": "response.output_text.delta", "delta": "hi"},
        {"type": "response.completed", "response": {"model": "gpt-4o-2024-08-06", "usage": usage}},
    ):
        reader.feed(b"event: x\ndata: " + json.dumps(event).encode() + b"\n\n")
    reader.finish()
    assert reader.model == "gpt-4o-2024-08-06"
    assert usage_from(reader.usage, model="gpt-4o") == Usage("gpt-4o", "", 7, 3, 4)
    assert cost_usd("gpt-4o", 7, 3, 4) == (3 * Decimal("2.5") + 4 * Decimal("1.25") + 3 * Decimal(10)) / 1_000_000


# --- pricing, counting and the stream filter --------------------------------------------------------------


def test_cost_is_exact_decimal_with_cached_tokens():
    assert cost_usd("gpt-4o-mini", 1_000_000, 1_000_000) == Decimal("0.75")
    assert cost_usd("gpt-4o-mini", 1000, 500, 400) == Decimal("0.000420")  # 600*0.15 + 400*0.075 + 500*0.6
    assert cost_usd("gpt-4o-mini-2024-07-18", 1000, 0) == Decimal("0.00015")  # dated: priced as its model
    assert cost_usd("gpt-4", 1, 1) == Decimal("0.00009")
    assert cost_usd("no-such-model", 1000, 1000) == Decimal("0.04")  # DEFAULT_PRICE: $10 in, $30 out per 1M
    assert isinstance(cost_of(MINI, 1, 1), Decimal)


def test_config_price_is_checked(tmp_path):
    def models(price: str) -> str:
        upstreams = "upstreams: [{name: u, base_url: 'http://x/v1'}]\n"
        return upstreams + f"models: [{{name: m, deployments: [{{upstream: u}}], price: {price}}}]\n"

    path = tmp_path / "turbo.yaml"
    path.write_text(models("{input: 1, output: 2, cached_input: 0.5}"))
    assert load(str(path)).models["m"].price_cached_input == 0.5
    path.write_text(models("{image: 0.05, characters: 15, second: 0.0001}"))
    priced = load(str(path)).models["m"]
    assert (priced.price_image, priced.price_characters, priced.price_second, priced.price_input) == (
        0.05,
        15,
        0.0001,
        None,
    )
    for price, problem in (
        ("{input: 1, output: 2, cached_input: lots}", "models[0].price.cached_input: must be a number"),
        ("{input: 1, output: 2, cache: 1}", "models[0].price.cache: unknown key"),
        ("{input: 1}", "models[0].price: input and output go together"),
        ("{}", "models[0].price: needs input and output, or image, characters or second"),
    ):
        path.write_text(models(price))
        with pytest.raises(ConfigError, match=re.escape(problem)):
            load(str(path))


def test_tokens_are_counted_offline():
    assert count_text("hello world") == 2
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hello world"}]}
    assert estimate_prompt_tokens(body) == 2 + 1 + 3 + 3  # text, role, message framing, reply priming
    assert estimate_prompt_tokens({"model": "text-embedding-3-small", "input": ["a", "b"]}) == 2
    assert estimate_prompt_tokens(None) == 0


def test_usage_is_asked_for_only_when_the_client_did_not():
    body = b'{"model": "m", "stream": true, "messages": []}  '
    payload = json.loads(body)
    asked, sent = usage_asked_for("chat/completions", payload, body)
    assert json.loads(sent) == asked == {**payload, "stream_options": {"include_usage": True}}
    with_options = {**payload, "stream_options": {"include_usage": False, "x": 1}}
    asked, sent = usage_asked_for("chat/completions", with_options, json.dumps(with_options).encode())
    assert asked["stream_options"] == {"include_usage": True, "x": 1} and json.loads(sent) == asked
    mine = {**payload, "stream_options": {"include_usage": True}}
    assert usage_asked_for("chat/completions", mine, b"") is None
    assert usage_asked_for("chat/completions", {**payload, "stream": False}, b"") is None
    assert usage_asked_for("embeddings", payload, body) is None


def test_the_stripper_works_whatever_the_chunking():
    first = b'data: {"id":"1","choices":[{"delta":{"content":"hi"}}],"usage":null}\n\n'
    last = b'data: {"id":"1","choices":[{"delta":{},"finish_reason":"stop"}],"usage":null}\r\n\r\n'
    usage = b'data: {"id":"1","choices":[],"usage":{"prompt_tokens":1,"completion_tokens":1}}\n\n'
    on_choices = b'data: {"id": "1", "choices": [{"delta": {}}], "usage": {"prompt_tokens": 1}}\n\n'
    done = b"data: [DONE]\n\n"
    stream = first + last + usage + on_choices + done
    expected = (
        b'data: {"id":"1","choices":[{"delta":{"content":"hi"}}]}\n\n'
        b'data: {"id":"1","choices":[{"delta":{},"finish_reason":"stop"}]}\r\n\r\n'
        b'data: {"id": "1", "choices": [{"delta": {}}]}\n\n' + done
    )
    for size in (1, 2, 7, 50, len(stream)):
        stripper = UsageStripper()
        out = b"".join(stripper.feed(stream[i : i + size]) for i in range(0, len(stream), size))
        assert out + stripper.finish() == expected, size


# --- rollups, /usage and the command -------------------------------------------------------------------


def record(user_id, *, model="gpt-4o-mini", group_id=None, key_id=None, tokens=(1000, 100)):
    usage_record(Caller(uuid.UUID(str(user_id)), group_id, key_id), Usage(model, "default", *tokens))


def test_rollups_add_up_in_one_row_per_slot_even_with_nulls(account):
    user_id = account[1]["id"]
    for _ in range(3):
        record(user_id)
    events_flush()
    record(user_id)
    record(user_id, model="gpt-4o")
    events_flush()
    mini = UsageRollup.objects.get(user_id=user_id, model="gpt-4o-mini")
    assert (mini.requests, mini.input_tokens, mini.output_tokens) == (4, 4000, 400)
    assert mini.cost_usd == 4 * exact_cost(MINI, 1000, 100)
    assert mini.hour.minute == mini.hour.second == 0
    assert UsageRollup.objects.filter(user_id=user_id).count() == 2


def test_usage_api_totals_and_rows(client, account):
    token, user = account
    key_id = uuid.uuid4()
    record(user["id"])
    record(user["id"], key_id=key_id)
    record(user["id"], model="gpt-4o", tokens=(10, 10))
    events_flush()
    response = client.get("/usage", headers=bearer(token))
    assert response.status_code == 200
    total = response.json()["total"]
    expected = 2 * exact_cost(MINI, 1000, 100) + exact_cost(DEFAULT_PRICES["gpt-4o"], 10, 10)
    assert total["requests"] == 3 and total["input_tokens"] == 2010 and total["output_tokens"] == 210
    assert Decimal(total["cost_usd"]) == expected and isinstance(total["cost_usd"], str)
    assert response.json()["rows"] == []
    by_model = client.get("/usage?by=model&since=1d", headers=bearer(token)).json()["rows"]
    assert [(row["model"], row["requests"]) for row in by_model] == [("gpt-4o-mini", 2), ("gpt-4o", 1)]
    by_key = client.get("/usage", params={"by": "key"}, headers=bearer(token)).json()["rows"]
    assert {row["key_id"]: row["requests"] for row in by_key} == {None: 2, str(key_id): 1}
    (today,) = client.get("/usage?by=day&since=2w", headers=bearer(token)).json()["rows"]
    assert today["requests"] == 3 and today["day"] == time.strftime("%Y-%m-%d", time.gmtime())
    assert client.get("/usage?until=2020-01-01&since=2019-01-01", headers=bearer(token)).json()["total"] == {
        "requests": 0,
        "input_tokens": 0,
        "output_tokens": 0,
        "cached_tokens": 0,
        "cost_usd": "0",
        "estimated_requests": 0,
    }


def test_usage_api_refuses_bad_input_and_strangers(client, signup, account):
    token, user = account
    for query in ("since=yesterday", "by=week", "since=1d&until=2d", "group_id=nope"):
        response = client.get(f"/usage?{query}", headers=bearer(token))
        assert response.status_code == 400, query
        error = response.json()["error"]
        assert error["code"] and query.split("=")[0] in error["message"], error
    assert client.get("/usage").status_code == 401


def test_group_usage_is_for_its_owner_only(client, signup, account):
    owner_token, owner = account
    member_token, member, _ = signup()
    stranger_token, _, _ = signup()
    group = client.post("/group/create", data={"name": "acme"}, headers=bearer(owner_token)).json()
    added = client.post(
        "/group/members/add", json={"id": group["id"], "user_ids": [member["id"]]}, headers=bearer(owner_token)
    )
    assert added.status_code == 200, added.text
    record(member["id"], group_id=uuid.UUID(group["id"]))
    record(owner["id"], group_id=uuid.UUID(group["id"]))
    record(owner["id"])  # not the group's
    events_flush()
    report = client.get(f"/usage?group_id={group['id']}&by=model", headers=bearer(owner_token)).json()
    assert report["total"]["requests"] == 2
    forbidden = client.get(f"/usage?group_id={group['id']}", headers=bearer(member_token))
    assert forbidden.status_code == 403 and forbidden.json()["error"]["code"]
    assert client.get(f"/usage?group_id={group['id']}", headers=bearer(stranger_token)).status_code == 404
    assert client.get(f"/usage?group_id={uuid.uuid4()}", headers=bearer(owner_token)).status_code == 404


def test_usage_command_prints_a_table():
    user = user_create(username=f"usage-{uuid.uuid4().hex[:6]}", password="correct-horse")
    usage_record(Caller(user.pk), Usage("gpt-4o-mini", "default", 1000, 100))
    usage_record(Caller(user.pk), Usage("gpt-4o", "default", 10, 10))
    events_flush()
    made = user.username
    by_user = manage("usage", "--since", "7d", "--by", "user")
    assert by_user.returncode == 0, by_user.stderr
    assert any(line.startswith(made) and "0.000335" in line for line in by_user.stdout.splitlines())
    by_model = manage("usage", "--since", "7d", "--by", "model")
    lines = by_model.stdout.splitlines()
    assert lines[1].split()[:3] == ["model", "requests", "input"]
    assert any(line.split()[0] == "gpt-4o" for line in lines) and lines[-1].startswith("total")
    for args, problem in ((["--by", "week"], "invalid choice"), (["--since", "soon"], "is not a time")):
        failed = manage("usage", *args)
        assert failed.returncode == 2 and problem in failed.stderr and len(failed.stderr.strip().splitlines()) == 1
