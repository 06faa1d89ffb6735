"""App code's way to the model, through the gateway (same model names, routing and failover as /v1).

    text = ai.complete("Who are you?", user=request.user)                 # sync
    text = await ai.acomplete("Who are you?", context=[("Hi", "Hello!")])  # async
    async for delta in ai.stream("Tell me a story"):                       # async
        ...
    person = ai.structured("Invent a person", schema={"type": "object", ...})  # the parsed, valid JSON
    person = await ai.astructured("Invent a person", response_format={"type": "json_schema", ...})

Every call goes through the completion service (proxy.completion), as the fronts' do. A
`response_format` of type json_schema (an option of complete/acomplete/stream too) is validated: an
invalid reply is asked for again with the errors (STRUCTURED_RETRIES times), then
StructuredOutputError (502 `invalid_structured_output`); a bad schema is ResponseFormatInvalid (400).

Failures raise gateway.GatewayError (with an HTTP-ish `status`: 502 unreachable, 504 timeout, 503 not
configured, 404 an unknown model, or the upstream's own 4xx/5xx); a stream that breaks raises too, it
never just ends.
"""

import hashlib
from collections.abc import AsyncIterator, Iterable
from contextlib import aclosing
from typing import Any

from asgiref.sync import async_to_sync

from proxy import completion
from proxy import structured as structured_output
from proxy.usage.caller import Caller

ContextItem = tuple[str, str] | list[str] | dict[str, Any]


def build_messages(prompt: str, context: Iterable[ContextItem] = (), system: str | None = None) -> list[dict]:
    """system prompt, then context (prompt/reply pairs or ready-made messages), then the prompt."""
    messages: list[dict] = []
    if system:
        messages.append({"role": "system", "content": system})
    for item in context:
        if isinstance(item, dict):
            messages.append(item)
        else:
            earlier_prompt, earlier_reply = item
            messages.append({"role": "user", "content": earlier_prompt})
            messages.append({"role": "assistant", "content": earlier_reply})
    messages.append({"role": "user", "content": prompt})
    return messages


def user_tag(user: Any) -> str | None:
    """A stable, non-reversible id for the upstream's `user` field (no raw ids leave the server)."""
    if user is None:
        return None
    raw = str(getattr(user, "pk", user))
    return hashlib.sha256(f"turbo-user:{raw}".encode()).hexdigest()[:32]


def _caller(user: Any) -> Caller | None:
    """Usage and limits count against `user` (a User or a user id), when one is given."""
    if user is None:
        return None
    return Caller(getattr(user, "pk", user))


def _request(prompt, user, context, model, system, options) -> dict:
    request = {"messages": build_messages(prompt, context, system), **options}
    if model:
        request["model"] = model
    tag = user_tag(user)
    if tag:
        request["user"] = tag
    return request


async def acomplete(
    prompt: str,
    *,
    user: Any = None,
    context: Iterable[ContextItem] = (),
    model: str | None = None,
    system: str | None = None,
    **options: Any,
) -> str:
    """The model's whole reply to `prompt` (model: a public name; DEFAULT_MODEL if not given). A
    json_schema `response_format` option is validated (see astructured for the parsed value)."""
    request = _request(prompt, user, context, model, system, options)
    if "response_format" in request:
        request["response_format"] = structured_output.response_format_check(request["response_format"])
        if request["response_format"] is None:
            del request["response_format"]
    done = await completion.complete_collect(request, caller=_caller(user))
    return done.completion.text


async def astructured(
    prompt: str,
    *,
    schema: dict | None = None,
    response_format: dict | None = None,
    name: str = "reply",
    user: Any = None,
    context: Iterable[ContextItem] = (),
    model: str | None = None,
    system: str | None = None,
    **options: Any,
) -> Any:
    """The model's reply to `prompt` as the JSON value it must be: valid against `schema` (a JSON Schema;
    or a whole json_schema `response_format`), parsed. Raises ResponseFormatInvalid for a bad schema,
    StructuredOutputError when no reply matched it."""
    if (schema is None) == (response_format is None):
        raise TypeError("astructured() takes a schema or a response_format, one of the two")
    if schema is not None:
        response_format = {"type": "json_schema", "json_schema": {"name": name, "schema": schema}}
    checked = structured_output.response_format_check(response_format)
    if checked is None or checked["type"] != "json_schema":
        raise structured_output.ResponseFormatInvalid("response_format: astructured() needs type json_schema")
    request = _request(prompt, user, context, model, system, {**options, "response_format": checked})
    done = await completion.complete_collect(request, caller=_caller(user))
    return done.parsed


def structured(
    prompt: str,
    *,
    schema: dict | None = None,
    response_format: dict | None = None,
    name: str = "reply",
    user: Any = None,
    context: Iterable[ContextItem] = (),
    model: str | None = None,
    system: str | None = None,
    **options: Any,
) -> Any:
    """astructured for sync code."""
    return async_to_sync(astructured)(
        prompt,
        schema=schema,
        response_format=response_format,
        name=name,
        user=user,
        context=context,
        model=model,
        system=system,
        **options,
    )


def complete(
    prompt: str,
    *,
    user: Any = None,
    context: Iterable[ContextItem] = (),
    model: str | None = None,
    system: str | None = None,
    **options: Any,
) -> str:
    """acomplete for sync code."""
    return async_to_sync(acomplete)(prompt, user=user, context=context, model=model, system=system, **options)


class TextStream:
    """The reply as it is generated, delta by delta (`async for`). Once iteration ends, `usage` holds
    the token counts if the upstream sent them, and with a json_schema `response_format` `parsed` the
    valid value; `retries` the attempts whose replies failed their schema (their text was yielded
    before the retry: only the text after the last one is the reply)."""

    def __init__(self, request: dict, caller: Caller | None = None):
        self.request = request
        self.caller = caller
        self.usage: dict = {}
        self.parsed: Any = None
        self.retries: list[completion.Retry] = []

    async def __aiter__(self) -> AsyncIterator[str]:
        async with aclosing(completion.complete(self.request, caller=self.caller)) as items:
            async for item in items:
                if isinstance(item, completion.Delta):
                    if item.text:
                        yield item.text
                elif isinstance(item, completion.Retry):
                    self.retries.append(item)
                elif isinstance(item, completion.Done):
                    self.usage, self.parsed = item.completion.usage, item.parsed


def stream(
    prompt: str,
    *,
    user: Any = None,
    context: Iterable[ContextItem] = (),
    model: str | None = None,
    system: str | None = None,
    **options: Any,
) -> TextStream:
    """The model's reply to `prompt`, delta by delta."""
    return TextStream(_request(prompt, user, context, model, system, options), _caller(user))
