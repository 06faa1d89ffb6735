"""What real model servers send, taught to the fake upstream: each reported as what it is, cooling down only
a deployment that failed; a pooled connection closed under a request is retried once; a chat request is cut
to its model's context window, declared or learned."""

import asyncio
import logging

import pytest

from proxy import gateway
from proxy.gateway import health, windows
from proxy.tests.test_gateway import configure, fakes, two_deployments  # noqa: F401 (fixtures)
from proxy.usage.tokens import count_messages


@pytest.fixture
def fresh_health():
    health.forget()
    yield
    health.forget()


@pytest.fixture
def pair(fakes, configure, fresh_health):  # noqa: F811
    """Fake upstreams a and b behind one model `pool` (a first), with cooldowns; `configure(window)` redeclares it."""

    def declare(window: int | None = None) -> None:
        configure(two_deployments(fakes, cooldown_seconds=60, **({"context_window": window} if window else {})))

    declare()
    return {**fakes, "configure": declare}


def chats_sent(fake) -> list:
    return [r for r in fake.requests if r.path == "/v1/chat/completions"]


def ask(text: str, model: str = "pool", **extra) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": text}], **extra}


async def stream_text(body: dict) -> str:
    stream = gateway.chat_stream(body)
    return "".join([delta.text async for delta in stream])


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "turbo.gateway" and r.levelno >= logging.WARNING]


# --- what real servers send ------------------------------------------------------------------------------


async def test_an_empty_200_stream_is_its_own_error_logged_once_and_cools_nothing(pair, caplog):
    with pytest.raises(gateway.GatewayError) as failed:
        await stream_text(ask("[scenario:empty_stream] hi"))
    assert failed.value.code == "upstream_empty_answer" and failed.value.status == 502
    assert "empty" in failed.value.message
    assert not health.is_cooling("a/gpt-4o-mini")  # the request's doing: a stays in service...
    assert chats_sent(pair["b"]) == []  # ...and the request is not sent to b as well
    assert warnings_of(caplog) == [f"deployment a/gpt-4o-mini: {failed.value.message}"]
    # No window known: asked once more unstreamed for one token, which the fake answers empty as well.
    probe = chats_sent(pair["a"])[-1].json()
    assert "stream" not in probe and probe["max_tokens"] == 1
    assert await stream_text(ask("echo: still here")) == "still here"
    assert len(chats_sent(pair["a"])) == 3


async def test_an_empty_stream_with_no_known_window_is_asked_unstreamed_which_teaches_the_window(
    upstream, fresh_health, caplog
):
    upstream.n_ctx = 100  # llama-cpp-python's server: its listing says no window
    with pytest.raises(gateway.GatewayError) as failed:
        await stream_text(ask("echo: " + "word " * 150, model="gpt-4o-mini"))
    assert failed.value.code == "context_length_exceeded" and failed.value.status == 400
    assert "maximum context length is 100 tokens" in failed.value.message  # the upstream's own words
    streamed, probe = (request.json() for request in chats_sent(upstream))
    assert streamed["stream"] is True and "stream" not in probe and probe["max_tokens"] == 1
    assert probe["messages"] == streamed["messages"]
    assert (await windows.window_of("gpt-4o-mini"))[0] == 100
    assert not health.is_cooling("default")
    assert warnings_of(caplog) == [f"deployment default: {failed.value.message}"]


async def test_an_empty_stream_for_a_prompt_longer_than_the_window_says_context_length(pair):
    pair["configure"](window=40)
    with pytest.raises(gateway.GatewayError) as failed:
        await stream_text(ask("[scenario:empty_stream] " + "word " * 200))
    assert failed.value.code == "context_length_exceeded" and failed.value.status == 400
    assert "context window of 40 tokens" in failed.value.message


async def test_a_stream_without_done_is_incomplete_not_a_whole_reply(upstream):
    stream = gateway.chat_stream(ask("[scenario:no_done] echo: one two three", model="gpt-4o-mini"))
    seen = []
    with pytest.raises(gateway.GatewayError) as failed:
        async for delta in stream:
            seen.append(delta.text)
    assert failed.value.code == "upstream_stream_incomplete"
    assert "".join(seen) == "one two three"  # what came is still shown


async def test_an_error_event_in_a_stream_carries_the_upstreams_words(upstream, caplog):
    with pytest.raises(gateway.GatewayError) as failed:
        await stream_text(ask("[scenario:error_event] echo: one two three", model="gpt-4o-mini"))
    assert failed.value.code == "upstream_error_in_stream"
    assert "the model server failed while generating" in failed.value.message
    assert warnings_of(caplog) == [f"deployment default: {failed.value.message} (upstream_error_in_stream)"]


async def test_an_html_502_from_a_proxy_is_reported_by_its_title(upstream, caplog):
    with pytest.raises(gateway.GatewayError) as failed:
        await gateway.chat(ask("[scenario:html_502] hi", model="gpt-4o-mini"))
    assert failed.value.code == "upstream_html_error" and failed.value.status == 502
    assert "502 Bad Gateway" in failed.value.message and "<" not in failed.value.message
    assert len(warnings_of(caplog)) == 1 and "deployment default" in warnings_of(caplog)[0]


async def test_an_html_502_cools_its_deployment_and_the_next_one_answers(pair):
    pair["a"].forced_scenario = "html_502"
    completion = await gateway.chat(ask("echo: from b"))
    assert completion.text == "from b" and completion.deployment == "b/gpt-4o-mini-2024-07-18"
    assert health.is_cooling("a/gpt-4o-mini")  # a 5xx is the deployment's failure


@pytest.mark.parametrize(("scenario", "window"), [("context_length", 100), ("context_length_llama", 512)])
async def test_a_400_naming_the_context_length_is_context_length_exceeded_and_teaches_the_window(
    pair, scenario, window
):
    pair["a"].forced_scenario = scenario
    with pytest.raises(gateway.GatewayError) as failed:
        await stream_text(ask("hi"))
    assert failed.value.code == "context_length_exceeded" and failed.value.status == 400
    assert not health.is_cooling("a/gpt-4o-mini") and chats_sent(pair["b"]) == []
    assert await windows.window_of("pool") == (window, 1.0)


async def test_invalid_parameters_cool_nothing(pair):
    pair["a"].forced_scenario = "error_400"
    with pytest.raises(gateway.GatewayError) as failed:
        await gateway.chat(ask("hi"))
    assert failed.value.code == "upstream_error" and "Bad thing" in failed.value.message
    assert not health.is_cooling("a/gpt-4o-mini") and chats_sent(pair["b"]) == []


# --- safe retries ----------------------------------------------------------------------------------------


async def test_a_pooled_connection_closed_under_a_request_is_sent_again_once(upstream):
    first = await gateway.chat(ask("[scenario:close_after_answer] echo: first", model="gpt-4o-mini"))
    assert first.text == "first"
    # The next request goes out on the pooled connection, which the fake closes before answering a byte.
    second = await gateway.chat(ask("echo: second", model="gpt-4o-mini"))
    assert second.text == "second"
    assert [r.json()["messages"][-1]["content"] for r in chats_sent(upstream)][-1] == "echo: second"
    assert len(chats_sent(upstream)) == 2  # the closed attempt never reached it; the retry did, once


async def test_nothing_is_sent_again_after_the_first_byte_of_an_answer(upstream):
    assert (await gateway.chat(ask("echo: warm", model="gpt-4o-mini"))).text == "warm"
    with pytest.raises(gateway.GatewayError) as failed:
        await stream_text(ask("[scenario:die_mid_stream] echo: one two three four", model="gpt-4o-mini"))
    assert failed.value.code == "upstream_stream_error"
    warm, broken = chats_sent(upstream)  # sent once, although it went out on a pooled connection
    assert broken.connection == warm.connection


@pytest.mark.parametrize(("keepalive", "is_reused"), [(0.2, False), (30.0, True)])
async def test_idle_pooled_connections_are_dropped_after_proxy_keepalive_seconds(
    upstream, settings, keepalive, is_reused
):
    settings.PROXY_KEEPALIVE_SECONDS = keepalive  # the fake (uvicorn) keeps an idle connection 5 s
    await gateway.chat(ask("echo: one", model="gpt-4o-mini"))
    await asyncio.sleep(0.5)  # idle for longer than 0.2 s (the time passing is what is tested)
    await gateway.chat(ask("echo: two", model="gpt-4o-mini"))
    first, second = (request.connection for request in chats_sent(upstream))
    assert (first == second) is is_reused


# --- context windows -------------------------------------------------------------------------------------


def long_chat(exchanges: int, words: int = 60) -> list[dict]:
    messages = [{"role": "system", "content": "You are terse."}]
    for number in range(exchanges):
        messages.append({"role": "user", "content": f"question {number} " + "ask " * words})
        messages.append({"role": "assistant", "content": f"answer {number} " + "reply " * words})
    messages.append({"role": "user", "content": "echo: the newest question"})
    return messages


@pytest.mark.parametrize("field", ["max_model_len", "n_ctx_train"])
async def test_a_window_learned_from_the_model_listing_cuts_the_oldest_exchanges(upstream, fresh_health, field):
    setattr(upstream, field, 400)
    body = {"model": "gpt-4o-mini", "messages": long_chat(8), "max_tokens": 4096}
    fitted = await gateway.context_fit(body)
    messages = fitted["messages"]
    assert [r.path for r in upstream.requests] == ["/v1/models"]  # asked once, before any model call
    assert messages[0] == body["messages"][0] and messages[-1] == body["messages"][-1]  # system and prompt kept
    assert 2 < len(messages) < len(body["messages"])
    assert messages[1:-1] == body["messages"][len(body["messages"]) - len(messages) + 1 : -1]  # the newest ones
    assert count_messages(messages) + fitted["max_tokens"] <= 400
    assert fitted["max_tokens"] >= 200  # room for the reply: at most half the window was kept for it
    assert await stream_text(fitted) == "the newest question"
    await gateway.context_fit(body)
    assert [r.path for r in upstream.requests].count("/v1/models") == 1  # remembered


async def test_a_declared_window_fits_and_a_prompt_that_cannot_fit_is_refused_before_any_call(pair):
    pair["configure"](window=300)
    fitted = await gateway.context_fit({"model": "pool", "messages": long_chat(4)})
    assert count_messages(fitted["messages"]) + fitted["max_tokens"] <= 300
    assert pair["a"].requests == []  # a declared window needs no listing
    with pytest.raises(gateway.GatewayError) as refused:
        await gateway.context_fit(ask("word " * 400))
    assert refused.value.code == "context_length_exceeded" and refused.value.status == 400
    assert chats_sent(pair["a"]) == [] and chats_sent(pair["b"]) == []


async def test_without_a_known_window_nothing_is_cut(upstream, fresh_health):
    body = {"model": "gpt-4o-mini", "messages": long_chat(8)}
    assert await gateway.context_fit(body) == body


async def test_a_turn_with_its_retries_stays_whole_while_earlier_exchanges_go(pair):
    pair["configure"](window=400)
    messages = long_chat(6)
    turn = len(messages) - 1
    retried = [*messages, {"role": "assistant", "content": "not json"}, {"role": "user", "content": "errors: fix it"}]
    fitted = await gateway.context_fit({"model": "pool", "messages": retried}, current=turn)
    assert fitted["messages"][-3:] == retried[turn:]  # the prompt, the failed reply and the errors
    assert len(fitted["messages"]) < len(retried)


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("scenario", "code"), [("empty_stream", "upstream_empty_answer"), ("html_502", "upstream_html_error")]
)
def test_the_v1_passthrough_reports_an_empty_answer_and_an_html_page_in_openai_shape(
    client, signup, upstream, scenario, code, caplog
):
    token = signup()[0]
    response = client.post(
        "/v1/chat/completions",
        json={"model": "gpt-4o-mini", "stream": True, "messages": [{"role": "user", "content": "hi"}]},
        headers={"Authorization": f"Bearer {token}", "x-fake-scenario": scenario},
    )
    assert response.status_code == 502
    assert response.headers["content-type"].startswith("application/json")
    assert response.json()["error"]["code"] == code and "<html" not in response.text
    said = response.json()["error"]["message"]
    logged = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and said in r.getMessage()]
    assert logged == [f"deployment default: {said}"]  # once, naming the deployment
