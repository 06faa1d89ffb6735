"""The completion service (proxy.completion) in process, against the fake upstream: plain and streamed
replies, a server tool round, a client's function, structured output retried then valid or refused, an
upstream that breaks, and the settlement of every call (its usage recorded once, its budget
reservation back to zero) however it ended. Each scenario runs on asgiref's loop through run_in_process,
its database calls on the test's connection, inside its transaction (rolled back, not flushed)."""

import asyncio
import json
from decimal import Decimal

import pytest

from accounts.services import user_create
from conftest import unique_name
from proxy import completion
from proxy.gateway import GatewayError
from proxy.structured import RETRY_INSTRUCTION, StructuredOutputError
from proxy.usage.budgets import _store, budget_limits, budget_rules_forget, budget_set
from proxy.usage.caller import Caller
from proxy.usage.records import usage_pending
from testing.inprocess import run_in_process

pytestmark = pytest.mark.django_db

SCHEMA = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"]}
ANSWER = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}}
LOOKUP = {
    "type": "function",
    "function": {"name": "lookup", "description": "the client's own", "parameters": {"type": "object"}},
}


def asking(text: str, **extra) -> dict:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}], **extra}


async def items_of(request: dict, **options) -> list:
    return [item async for item in completion.complete(request, **options)]


def kinds(items: list) -> list[str]:
    return [type(item).__name__ for item in items]


def sent(fake) -> list[dict]:
    return [request.json() for request in fake.requests if request.path == "/v1/chat/completions"]


@pytest.fixture
def caller():
    """A user with a monthly budget of $10, as the caller of the model calls."""
    budget_rules_forget()
    user = user_create(username=unique_name(), password="correct-horse-battery")
    budget_set(scope="user", target_id=user.pk, usd=Decimal("10"), period="month")
    yield Caller(user.pk)
    budget_rules_forget()


async def reserved(caller: Caller) -> int:
    """What the caller's budget holds reserved now (a probe far above the budget is refused, saying so)."""
    limits = await budget_limits(caller)
    refused, _, held = await _store().reserve(limits, "probe", 10**18)
    assert refused == 1
    return held


def test_a_plain_reply_is_one_delta_then_its_usage_and_done(upstream, caller, paused_event_writer):
    async def scenario():
        before = usage_pending()
        done = await completion.complete_collect(asking("echo: one two three"), caller=caller)
        assert (done.completion.text, done.parsed, done.client_calls) == ("one two three", None, [])
        assert done.completion.usage["completion_tokens"] == 3 and done.completion.data["object"] == "chat.completion"
        assert sent(upstream)[-1]["stream"] is False
        assert usage_pending() - before == 1 and await reserved(caller) == 0

        items = await items_of(asking("echo: one two three"), stream=False)
        assert kinds(items) == ["Delta", "Usage", "Done"] and items[0].text == "one two three"

    run_in_process(scenario)


def test_a_streamed_reply_comes_as_deltas(upstream, caller, paused_event_writer):
    async def scenario():
        before = usage_pending()
        items = await items_of(asking("echo: one two three"), caller=caller)
        deltas = [item for item in items if isinstance(item, completion.Delta)]
        assert "".join(delta.text for delta in deltas) == "one two three"
        assert len([delta for delta in deltas if delta.text]) == 3 and all(delta.chunk for delta in deltas)
        assert kinds(items)[-2:] == ["Usage", "Done"] and items[-2].usage["completion_tokens"] == 3
        assert items[-1].completion.text == "one two three" and items[-1].completion.finish_reason == "stop"
        assert sent(upstream)[-1]["stream"] is True
        assert usage_pending() - before == 1 and await reserved(caller) == 0

    run_in_process(scenario)


def test_a_server_tool_runs_between_rounds(upstream, caller):
    async def scenario():
        items = await items_of(asking("[scenario:tool_call] what is 2+2?"), caller=caller, server_tools=["calculator"])
        assert kinds(items).count("Usage") == 2  # two upstream calls: the tool call, then the answer
        call = next(item for item in items if isinstance(item, completion.ToolCall))
        assert call.client == [] and call.calls[0]["function"]["name"] == "calculator"
        result = next(item for item in items if isinstance(item, completion.ToolResult))
        assert result.records[0]["name"] == "calculator" and result.records[0]["is_error"] is False
        done = items[-1]
        assert done.completion.text == f"Tool said: {result.records[0]['result']}" and done.client_calls == []
        assert done.completion.usage["total_tokens"] == sum(
            item.usage["total_tokens"] for item in items if isinstance(item, completion.Usage)
        )
        tool_message = sent(upstream)[-1]["messages"][-1]
        assert tool_message["role"] == "tool" and tool_message["tool_call_id"] == call.calls[0]["id"]

        # A tool the call may not use is refused to the model, not run.
        items = await items_of(asking("[scenario:tool_call] what is 2+2?"), server_tools=["get_weather"])
        result = next(item for item in items if isinstance(item, completion.ToolResult))
        assert result.records[0]["is_error"] is True and "not enabled here" in result.records[0]["result"]

    run_in_process(scenario)


def test_a_client_function_ends_the_call_with_its_calls(upstream, caller):
    async def scenario():
        request = asking("[scenario:tool_call][tool:lookup] find it", tools=[LOOKUP])
        for stream in (True, False):
            items = await items_of(request, caller=caller, stream=stream)
            assert kinds(items)[-2:] == ["ToolCall", "Done"]
            done = items[-1]
            assert [call["function"]["name"] for call in done.client_calls] == ["lookup"]
            assert items[-2].client == done.client_calls
        # With server tools, only the client's named functions end it.
        items = await items_of(request, server_tools=["calculator"], client_functions={"lookup"})
        assert items[-1].client_calls[0]["function"]["name"] == "lookup"
        assert not any(isinstance(item, completion.ToolResult) for item in items)
        assert len(sent(upstream)) == 3

    run_in_process(scenario)


def test_a_structured_reply_is_retried_then_parsed(upstream, caller):
    async def scenario():
        for stream in (True, False):
            upstream.reset()
            request = asking('sequence: {"answer": "x"} ||| {"answer": 42}', response_format=ANSWER)
            items = await items_of(request, caller=caller, stream=stream)
            retry = next(item for item in items if isinstance(item, completion.Retry))
            assert retry.attempt == 1 and retry.text == '{"answer": "x"}'
            assert retry.errors == ["at $.answer: 'x' is not of type 'integer'"]
            assert items[-1].parsed == {"answer": 42} and items[-1].completion.text == '{"answer": 42}'
            first, second = sent(upstream)
            assert second["messages"][-1]["content"].startswith(RETRY_INSTRUCTION)
            assert items[-1].completion.usage["total_tokens"] == sum(
                item.usage["total_tokens"] for item in items if isinstance(item, completion.Usage)
            )

    run_in_process(scenario)


def test_a_structured_reply_that_never_matches_is_refused(upstream, caller, settings, paused_event_writer):
    async def scenario():
        settings.STRUCTURED_RETRIES = 2
        before = usage_pending()
        seen = []
        with pytest.raises(StructuredOutputError) as refused:
            async for item in completion.complete(
                asking('echo: {"answer": "no"}', response_format=ANSWER), caller=caller
            ):
                seen.append(item)
        assert refused.value.code == "invalid_structured_output" and refused.value.status == 502
        assert kinds(seen).count("Retry") == 2 and len(sent(upstream)) == 3
        assert usage_pending() - before == 3 and await reserved(caller) == 0

    run_in_process(scenario)


@pytest.mark.parametrize("stream", [True, False])
def test_an_upstream_that_breaks_is_an_error_and_its_call_is_settled(upstream, caller, paused_event_writer, stream):
    async def scenario():
        before = usage_pending()
        with pytest.raises(GatewayError) as broken:
            await items_of(
                asking("[scenario:die_mid_stream] echo: one two three four five"), caller=caller, stream=stream
            )
        assert broken.value.status == 502
        assert usage_pending() - before == 1  # what it may have made is counted, once
        assert await reserved(caller) == 0

        # An upstream's 500 before any reply: nothing generated, nothing recorded, nothing left reserved.
        before = usage_pending()
        with pytest.raises(GatewayError) as refused:
            await items_of(asking("[scenario:error_500] hi"), caller=caller, stream=stream)
        assert refused.value.status == 500 and refused.value.code == "upstream_error"
        assert usage_pending() == before and await reserved(caller) == 0

    run_in_process(scenario)


def test_an_error_event_mid_stream_is_an_error(upstream, caller, paused_event_writer):
    async def scenario():
        before = usage_pending()
        items = []
        with pytest.raises(GatewayError) as broken:
            async for item in completion.complete(asking("[scenario:error_event] echo: one two three"), caller=caller):
                items.append(item)
        assert broken.value.code == "upstream_error_in_stream" and items and not kinds(items).count("Done")
        assert usage_pending() - before == 1 and await reserved(caller) == 0

    run_in_process(scenario)


def test_a_cancelled_call_is_settled_once(upstream, caller, paused_event_writer):
    async def scenario():
        before = usage_pending()
        first = asyncio.Event()

        async def consume():
            async for item in completion.complete(asking("[scenario:stall] echo: one two three"), caller=caller):
                if isinstance(item, completion.Delta):
                    first.set()

        task = asyncio.create_task(consume())
        await asyncio.wait_for(first.wait(), 10)
        assert await reserved(caller) > 0  # the call in flight holds its reservation
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert usage_pending() - before == 1 and await reserved(caller) == 0

    run_in_process(scenario)


def test_the_request_model_reads_a_front_s_fields():
    request = completion.request_read(
        {
            "messages": [{"role": "user", "content": "hi"}],
            "tools": [LOOKUP],
            "tool_choice": "auto",
            "response_format": json.dumps(ANSWER),
        },
        prefix="input.",
    )
    assert request["tools"] == [LOOKUP] and request["response_format"] == ANSWER and request["model"]
    with pytest.raises(Exception, match="input.messages"):
        completion.request_read({"messages": []}, prefix="input.")


def test_a_consumer_that_stops_reading_settles_the_call_at_once(upstream, caller, paused_event_writer):
    async def scenario():
        before = usage_pending()
        items = completion.complete(asking("[scenario:stall] echo: one two three"), caller=caller)
        async for item in items:
            if isinstance(item, completion.Delta):
                break
        assert await reserved(caller) > 0
        await items.aclose()  # as a front does when its client goes away (contextlib.aclosing)
        assert usage_pending() - before == 1 and await reserved(caller) == 0

    run_in_process(scenario)
