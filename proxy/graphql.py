"""GraphQL: the model path. `models`, `usage`, `complete` (one completion) and `completionStream`
(its deltas). An API key may use all four, as on /v1 and /ws.

Calls go through proxy.gateway with the caller named (proxy.usage.Caller), so usage, budgets and rate
limits apply as everywhere; a completion is read by the one request model and run by the completion
service (proxy.completion, as on /ws and gRPC: your functions as tools, structured output with its
retries), usage's input by GET /usage's serializer.
"""

import datetime
import json
from collections.abc import AsyncGenerator
from contextlib import aclosing
from decimal import Decimal

import strawberry
from channels.db import database_sync_to_async
from django.conf import settings
from django.utils import timezone
from strawberry.scalars import JSON
from strawberry.types import Info

from accounts.graphql import viewer
from accounts.services import AuthSession
from proxy import completion, gateway
from proxy.usage.api import DEFAULT_SPAN, UsageInput
from proxy.usage.caller import Caller
from proxy.usage.selectors import usage_report_for
from turbo_site.core.graphql import MODEL_CALL, loader


def _checked(serializer_class, data: dict) -> dict:
    checked = serializer_class(data={name: value for name, value in data.items() if value is not None})
    checked.is_valid(raise_exception=True)
    return dict(checked.validated_data)


# --- models ---------------------------------------------------------------------------------------


@strawberry.type(name="Model", description="A model you may ask for.")
class ModelType:
    id: strawberry.ID
    owned_by: str


async def _models_of_upstream() -> list[dict]:
    """Without a gateway file one upstream serves every model: its own list is the answer (as /v1/models).
    Asked once per operation, however many aliases ask for `models`."""
    return await loader("upstream_models", _upstream_models_load).load("models")


async def _upstream_models_load(keys: list) -> list[list[dict]]:
    answer = await gateway.send(gateway.Call(path="models", method="GET", headers={"accept": "application/json"}))
    try:
        body = await answer.response.read_all(settings.PROXY_MAX_BODY_BYTES)
    finally:
        await answer.response.aclose()
    if answer.response.status >= 400:
        raise gateway.GatewayError(f"the upstream answered {answer.response.status} for its models", status=502)
    try:
        listed = json.loads(body).get("data")
    except (ValueError, AttributeError):
        listed = None
    if not isinstance(listed, list):
        raise gateway.GatewayError("the upstream's model list was not a list", status=502)
    return [[entry for entry in listed if isinstance(entry, dict) and isinstance(entry.get("id"), str)]] * len(keys)


# --- usage ----------------------------------------------------------------------------------------


@strawberry.type(description="What model calls used and cost (cached input tokens included in inputTokens).")
class UsageTotals:
    requests: int
    input_tokens: int
    output_tokens: int
    cached_tokens: int
    cost_usd: str = strawberry.field(description="USD, exact decimal text")
    estimated_requests: int = strawberry.field(description="calls counted offline: the upstream gave no usage")


@strawberry.type(description="Usage of one day, model or API key (`by`).")
class UsageRow(UsageTotals):
    day: datetime.date | None = None
    model: str | None = None
    key_id: strawberry.ID | None = None


@strawberry.type(description="Totals, and rows when `by` is given.")
class UsageReport:
    total: UsageTotals
    rows: list[UsageRow]


_TOTAL_FIELDS = ("requests", "input_tokens", "output_tokens", "cached_tokens", "estimated_requests")


def _totals_of(row: dict, cls=UsageTotals, **extra):
    fields = {name: int(row.get(name) or 0) for name in _TOTAL_FIELDS}
    return cls(**fields, cost_usd=str(row.get("cost_usd", Decimal(0))), **extra)


def _row_of(row: dict) -> UsageRow:
    day = row.get("day")
    if isinstance(day, str):
        day = datetime.date.fromisoformat(day)
    return _totals_of(row, UsageRow, day=day, model=row.get("model"), key_id=row.get("key_id"))


# --- completions ----------------------------------------------------------------------------------


@strawberry.input(description="One message of a conversation (OpenAI's shape; content is text).")
class MessageInput:
    role: str = strawberry.field(description="system, user, assistant, tool or developer")
    content: str | None = None
    name: str | None = None
    tool_calls: JSON | None = strawberry.field(
        default=None,
        description="an assistant message's tool calls (OpenAI's shape), answered by tool messages",
    )
    tool_call_id: str | None = strawberry.field(default=None, description="a tool message: the call it answers")


@strawberry.input(description="A one-off chat completion, as on /ws (chat_completion).")
class CompletionInput:
    messages: list[MessageInput]
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    response_format: JSON | None = strawberry.field(
        default=None, description="OpenAI's response_format: json_schema replies are validated (parsed in `data`)"
    )
    tools: JSON | None = strawberry.field(
        default=None,
        description="your functions (OpenAI's tools): the model's calls of them end the completion, in `toolCalls`",
    )
    tool_choice: JSON | None = None


@strawberry.type(description="Tokens a call used.")
class TokenUsage:
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None


def _usage_of(usage: dict | None) -> TokenUsage | None:
    if not usage:
        return None
    return TokenUsage(
        prompt_tokens=usage.get("prompt_tokens"),
        completion_tokens=usage.get("completion_tokens"),
        total_tokens=usage.get("total_tokens"),
    )


@strawberry.type(description="A whole reply.")
class Completion:
    text: str
    model: str
    finish_reason: str | None
    tool_calls: JSON
    usage: TokenUsage | None
    data: JSON | None = strawberry.field(description="the reply parsed as JSON (json_schema responseFormat only)")


@strawberry.type(description="One piece of a streamed reply; the last has done: true, the usage and `data`.")
class CompletionDelta:
    text: str
    done: bool = False
    model: str | None = None
    finish_reason: str | None = None
    usage: TokenUsage | None = None
    data: JSON | None = None
    tool_calls: JSON | None = strawberry.field(
        default=None, description="the last delta: the calls of your functions the model made (it waits for results)"
    )
    retry: JSON | None = strawberry.field(
        default=None,
        description="a structured reply failed its schema ({attempt, errors}): drop the text so far, another follows",
    )


def _request_of(input: CompletionInput) -> dict:
    """The completion request for `input`, read by the one request model (proxy.completion)."""
    fields = {
        "messages": [
            {
                "role": message.role,
                "content": message.content,
                "name": message.name,
                "tool_calls": message.tool_calls,
                "tool_call_id": message.tool_call_id,
            }
            for message in input.messages
        ],
        "model": input.model,
        "max_tokens": input.max_tokens,
        "temperature": input.temperature,
        "response_format": input.response_format,
        "tools": input.tools,
        "tool_choice": input.tool_choice,
    }
    return completion.request_read(fields, prefix="input.")


def _caller(session: AuthSession) -> Caller:
    return Caller.of(session)


@strawberry.type
class Query:
    @strawberry.field(description="The models you (or your API key) may ask for.")
    async def models(self, info: Info) -> list[ModelType]:
        session = await viewer(info, keys=True)
        allowed = session.allowed_models
        if gateway.gateway_config().is_file:
            listed = gateway.models_list(allowed)["data"]
        else:
            listed = [entry for entry in await _models_of_upstream() if allowed is None or entry["id"] in allowed]
        return [ModelType(id=entry["id"], owned_by=str(entry.get("owned_by") or "")) for entry in listed]

    @strawberry.field(
        description="Usage and cost of your model calls, or a group's (owners only), from the hourly rollups. "
        "since/until: 7d, 24h, 2w, a date or a date-time (default: the last 30 days); by: day, model or key."
    )
    async def usage(
        self,
        info: Info,
        group_id: strawberry.ID | None = None,
        since: str | None = None,
        until: str | None = None,
        by: str | None = None,
    ) -> UsageReport:
        session = await viewer(info, keys=True)
        fields = _checked(UsageInput, {"group_id": group_id, "since": since, "until": until, "by": by})
        end = fields.get("until") or timezone.now()
        report = await database_sync_to_async(usage_report_for)(
            user=session.user,
            since=fields.get("since") or end - DEFAULT_SPAN,
            until=end,
            by=fields.get("by"),
            group_id=fields.get("group_id"),
        )
        return UsageReport(total=_totals_of(report["total"]), rows=[_row_of(row) for row in report["rows"]])


@strawberry.type
class Mutation:
    @strawberry.mutation(
        description="One chat completion (not stored in any chat); an API key may call it.", metadata=MODEL_CALL
    )
    async def complete(self, info: Info, input: CompletionInput) -> Completion:
        session = await viewer(info, keys=True)
        done = await completion.complete_collect(
            _request_of(input), caller=_caller(session), allowed_models=session.allowed_models
        )
        reply = done.completion
        return Completion(
            text=reply.text,
            model=reply.model,
            finish_reason=reply.finish_reason,
            tool_calls=reply.tool_calls,
            usage=_usage_of(reply.usage),
            data=done.parsed,
        )


@strawberry.type
class Subscription:
    @strawberry.subscription(
        description="The deltas of one chat completion, as they come; an API key may call it.", metadata=MODEL_CALL
    )
    async def completion_stream(self, info: Info, input: CompletionInput) -> AsyncGenerator[CompletionDelta, None]:
        session = await viewer(info, keys=True)
        request = _request_of(input)
        async with aclosing(
            completion.complete(request, caller=_caller(session), allowed_models=session.allowed_models)
        ) as items:
            async for item in items:
                if isinstance(item, completion.Delta):
                    if item.text:
                        yield CompletionDelta(text=item.text)
                elif isinstance(item, completion.Retry):
                    yield CompletionDelta(text="", retry={"attempt": item.attempt, "errors": item.errors})
                elif isinstance(item, completion.Done):
                    reply = item.completion
                    yield CompletionDelta(
                        text="",
                        done=True,
                        model=reply.model,
                        finish_reason=reply.finish_reason,
                        usage=_usage_of(reply.usage),
                        data=item.parsed,
                        tool_calls=item.client_calls or None,
                    )
