"""One completion service under the model fronts: a chat completion asked, streamed as typed items.

    async for item in complete(request, caller=caller, allowed_models=allowed):
        Delta       text (and the upstream's chunk) as it streams
        ToolCall    the model called tools (one round); `client`: those the caller runs
        ToolResult  the server ran its tools; their results go back to the model in the next round
        Retry       a structured reply failed its schema: drop what streamed of it, another attempt follows
        Usage       one upstream call's tokens (a call with tool rounds or retries makes several)
        Done        the last reply (`Completion`, usage summed), its parsed value, the client's calls

    done = await complete_collect(request, ...)        # the same, for fronts that answer once

`/ws`, GraphQL, gRPC, chat replies (chats.reply) and `ai.*` (proxy.ai) all come here, so tools,
tool results and structured output with its retries behave alike on each; a front only maps items
onto its wire format. What it owns, written once:
- structured output: a json_schema reply is validated once it has come and asked for again with the
  errors (proxy.structured), STRUCTURED_RETRIES times at most, then 502 `invalid_structured_output`;
- tools: with `server_tools` (a chat's enabled tools) the server runs the calls between rounds,
  MAX_TOOL_ROUNDS at most; a call to one of `client_functions`, or any call when the caller has no
  server tools (the fronts), ends the call with the calls in `Done.client_calls`;
- context fitting, where the caller asks for it (`fit_from`: where the current turn starts); a call
  refused for its context length before any of its reply came is cut again and sent once more when
  the refusal taught a window that cuts it (proxy.gateway.windows);
- settlement: every upstream call's usage is recorded and its admission and reservation settled by
  the gateway in one place (proxy.gateway.calls `_settle`, from a `finally`: once, however it ended,
  broken or cancelled), so no front settles anything.
A request comes read by the one request model (`request_read`, proxy.requests) from a front, or built
by Turbo's own code (a chat's settings and tools, `ai.*`'s options).
"""

import asyncio
from collections.abc import AsyncIterator, Collection
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings

from proxy import gateway, structured, tools
from proxy.errors import Attempt
from proxy.gateway import Completion, GatewayError
from proxy.requests import chat_request_read
from proxy.usage.caller import Caller
from turbo_site.core import tracing


@dataclass
class Delta:
    """A piece of the reply: its text ("" for a chunk that carries none) and the upstream's chunk ({}
    for a call that was not streamed)."""

    text: str
    chunk: dict = field(default_factory=dict)


@dataclass
class ToolCall:
    """The model called tools in one round (OpenAI's shape); `client`: the calls the caller runs."""

    calls: list[dict]
    client: list[dict]


@dataclass
class ToolResult:
    """The server ran a round's tools: a record per call (id, name, arguments, result, is_error)."""

    records: list[dict]


@dataclass
class Retry:
    """A structured reply did not match its schema (`errors`); `text`, what streamed of it, is void."""

    attempt: int
    errors: list[str]
    text: str


@dataclass
class Usage:
    """One upstream call's token counts, and the gateway's attempts at it (for the request log)."""

    usage: dict
    attempts: tuple[Attempt, ...] = ()


@dataclass
class Done:
    """The end: the last upstream reply (its usage summed over the whole call), the parsed value of a
    json_schema reply (None otherwise), and the calls the client must run (the call ended on them)."""

    completion: Completion
    parsed: Any = None
    client_calls: list[dict] = field(default_factory=list)


Item = Delta | ToolCall | ToolResult | Retry | Usage | Done


def request_read(fields: dict, *, prefix: str = "") -> dict:
    """A front's chat completion request, read by the one request model (400 naming the field)."""
    return chat_request_read(fields, prefix=prefix, default_model=settings.DEFAULT_MODEL)


async def complete(
    request: dict,
    *,
    caller: Caller | None = None,
    api_key: str | None = None,
    allowed_models: frozenset[str] | None = None,
    server_tools: Collection[str] | None = None,
    client_functions: Collection[str] = (),
    stream: bool = True,
    fit_from: int | None = None,
) -> AsyncIterator[Item]:
    """The items of one chat completion (see the module). Raises GatewayError (the upstream's or the
    gateway's failure, StructuredOutputError after the retries, 502 after MAX_TOOL_ROUNDS). A consumer
    that stops early closes it (`contextlib.aclosing`), which ends and settles the upstream call."""
    attempts = structured.Attempts(request.get("response_format"))
    total: dict[str, int] = {}
    rounds = 0
    refitted = False
    while True:
        sent = request if fit_from is None else await gateway.context_fit(request, current=fit_from)
        if stream:
            upstream = gateway.chat_stream(sent, api_key=api_key, allowed_models=allowed_models, caller=caller)
            streamed = False
            try:
                # Closed here, not when collected, when this is closed early (a client that went away):
                # its call is settled at once.
                async with aclosing(aiter(upstream)) as deltas:
                    async for delta in deltas:
                        streamed = True
                        yield Delta(delta.text, delta.chunk)
            except GatewayError as exc:
                if streamed or refitted or not await _fits_otherwise(exc, request, sent, fit_from):
                    raise
                refitted = True
                continue
            reply = Completion(
                text=upstream.text,
                model=upstream.model,
                usage=upstream.usage,
                tool_calls=upstream.tool_calls,
                finish_reason=upstream.finish_reason,
                data={},
                deployment=upstream.deployment,
                attempts=upstream.attempts,
            )
        else:
            try:
                reply = await gateway.chat(sent, api_key=api_key, allowed_models=allowed_models, caller=caller)
            except GatewayError as exc:
                if refitted or not await _fits_otherwise(exc, request, sent, fit_from):
                    raise
                refitted = True
                continue
            if reply.text:
                yield Delta(reply.text)
        yield Usage(dict(reply.usage), reply.attempts)
        for name, number in reply.usage.items():
            total[name] = total.get(name, 0) + number
        done = Completion(**{**reply.__dict__, "usage": dict(total)})
        if reply.tool_calls:
            calls = reply.tool_calls
            theirs = calls if server_tools is None else [call for call in calls if _name(call) in client_functions]
            ours = [call for call in calls if call not in theirs]
            yield ToolCall(calls, theirs)
            records, answers = await tools_run(ours, server_tools or ()) if ours else ([], [])
            if records:
                yield ToolResult(records)
            if theirs:
                yield Done(done, None, theirs)
                return
            rounds += 1
            if rounds > settings.MAX_TOOL_ROUNDS:
                raise GatewayError(
                    f"the model was still calling tools after {settings.MAX_TOOL_ROUNDS} rounds", status=502
                )
            assistant = {"role": "assistant", "content": reply.text or None, "tool_calls": calls}
            request = {**request, "messages": [*request["messages"], assistant, *answers]}
            continue
        parsed = None
        if attempts.wanted:
            parsed, errors = attempts.check(reply.text)  # raises StructuredOutputError when out of retries
            if errors:
                yield Retry(attempts.made, errors, reply.text)
                request = {**request, "messages": structured.retry_messages(request["messages"], reply.text, errors)}
                continue
        yield Done(done, parsed)
        return


async def _fits_otherwise(error: GatewayError, request: dict, sent: dict, fit_from: int | None) -> bool:
    """Was `sent` refused for its context length, and does the window that taught cut it further?"""
    if error.code != "context_length_exceeded" or fit_from is None:
        return False
    return await gateway.context_fit(request, current=fit_from) != sent


async def complete_collect(request: dict, **options: Any) -> Done:
    """`complete` for a front that answers once (not streamed unless `stream=True` is passed)."""
    options.setdefault("stream", False)
    async with aclosing(complete(request, **options)) as items:
        async for item in items:
            if isinstance(item, Done):
                return item
    raise GatewayError("the completion ended without a reply", status=502)  # not reached: complete ends on Done


def _name(call: dict) -> str:
    return str((call.get("function") or {}).get("name") or "")


@tracing.traced(
    "execute_tool {gen_ai.tool.name}",
    lambda call, allowed: {
        "gen_ai.operation.name": "execute_tool",
        "gen_ai.tool.name": _name(call),
        "gen_ai.tool.call.id": str(call.get("id") or ""),
    },
)
async def _tool_run(call: dict, allowed: Collection[str]) -> dict:
    name = _name(call)
    if name not in allowed:  # the model may only use the tools enabled for this call
        return {"tool_call_id": call.get("id", ""), "content": f"tool {name!r} is not enabled here", "is_error": True}
    return await tools.tool_execute(call)


@tracing.traced("chat tool round", lambda calls, allowed: {"turbo.tool_calls": len(calls)})
async def tools_run(calls: list[dict], allowed: Collection[str]) -> tuple[list[dict], list[dict]]:
    """Run the server's tool calls concurrently: (a record per call, the `tool` messages for the model)."""
    results = await asyncio.gather(*(_tool_run(call, allowed) for call in calls))
    records = [
        {
            "id": call.get("id", ""),
            "name": _name(call),
            "arguments": (call.get("function") or {}).get("arguments", ""),
            "result": result["content"],
            "is_error": bool(result.get("is_error")),
        }
        for call, result in zip(calls, results, strict=True)
    ]
    answers = [{"role": "tool", "tool_call_id": r["tool_call_id"], "content": r["content"]} for r in results]
    return records, answers
