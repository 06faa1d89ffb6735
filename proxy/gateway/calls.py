"""One upstream call for Turbo's own code, as typed results: under the completion service
(proxy.completion, which every model front, chats and `proxy.ai` use) and embeddings.

    completion = await gateway.chat({"model": "gpt-4o-mini", "messages": [...]})
    stream = gateway.chat_stream({...})
    async for delta in stream:          # Delta(chunk=<the upstream's chunk>, text=<its content>)
        ...
    stream.tool_calls, stream.usage, stream.finish_reason   # merged, once the stream has ended

Every failure is a GatewayError, with a code that says what happened (an upstream's error answer
`upstream_error`, or `context_length_exceeded` when it names the context length; a stream with an
`error` event `upstream_error_in_stream`; one that breaks `upstream_stream_error`; one that ends
without `[DONE]` `upstream_stream_incomplete`), in the upstream's own words, redacted, and logged
once with the deployment's name. The upstream's JSON and server-sent events are parsed here, and only
here: code above sees text, merged tool calls, usage and the finish reason (the /v1 passthrough,
which relays bytes unchanged, reads the model and usage for its log with `UsageReader`).
Each answered call is settled here, once, however it ends (`_settle`: usage recorded, admission and
reservation settled).
"""

import json
import logging
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from django.conf import settings

from proxy.errors import Attempt, GatewayError
from proxy.gateway import client, windows
from proxy.gateway.dispatch import ERROR_BODY_MAX_BYTES, Answer, Call, error_object, send
from proxy.usage.caller import Caller
from proxy.usage.limits import limits_settle
from proxy.usage.records import Estimate, Usage, usage_from, usage_record
from proxy.usage.tokens import output_text
from turbo_site.core import tracing
from turbo_site.core.text import json_bytes

logger = logging.getLogger("turbo.gateway")


@dataclass
class Completion:
    """A whole reply, with what the upstream said about it."""

    text: str
    model: str
    usage: dict
    tool_calls: list[dict]
    finish_reason: str | None
    data: dict  # the upstream's JSON object, for fronts that pass it on (/ws)
    deployment: str = ""
    attempts: tuple[Attempt, ...] = ()


@dataclass
class Delta:
    """One chunk of a streamed reply: the upstream's chunk as parsed, and the text it adds."""

    chunk: dict
    text: str


def _call(
    path: str, body: dict, api_key: str | None, allowed_models: frozenset[str] | None, caller: Caller | None = None
) -> Call:
    body = {**body, "model": body.get("model") or settings.DEFAULT_MODEL}
    return Call(
        path=path,
        headers={"content-type": "application/json", "accept": "application/json"},
        body=json_bytes(body),  # a lone surrogate a client sent goes on escaped, as it was written
        payload=body,
        model=body["model"],
        allowed_models=allowed_models,
        api_key=api_key,
        caller=caller,
        schema_as_instructions=True,  # Turbo's own callers validate a structured reply (proxy.structured)
    )


def _logged(answer: Answer, error: GatewayError) -> GatewayError:
    """The one log line of a model call's failure, naming the deployment."""
    logger.warning("deployment %s: %s (%s)", answer.deployment.id, error.message, error.code)
    error.is_logged = True
    return error


def _upstream_error(answer: Answer, body: bytes) -> GatewayError:
    status = answer.response.status
    error = error_object(body)
    if error is not None:
        detail = str(error.get("message") or "")
    else:
        try:
            detail = str(json.loads(body).get("error") or "")
        except (ValueError, AttributeError):
            detail = body[:300].decode("utf-8", "replace").strip()
    is_context = status == 400 and windows.context_error(error)[0]
    return _logged(
        answer,
        GatewayError(
            f"upstream error {status}: {detail or 'the upstream refused the request'}",
            status=status,
            code="context_length_exceeded" if is_context else "upstream_error",
            error_type="invalid_request_error" if status < 500 else "server_error",
            attempts=answer.attempts,
        ),
    )


async def _answer(call: Call) -> Answer:
    answer = await send(call)
    if answer.response.status >= 400:
        try:
            body = await answer.response.read_all(ERROR_BODY_MAX_BYTES)
        except client.TransportError:
            body = b""
        finally:
            await answer.response.aclose()
        tracing.answer_end(answer)
        raise _upstream_error(answer, body)
    return answer


def _usage(value: Any) -> dict:
    return (
        {name: number for name, number in (value or {}).items() if isinstance(number, int)}
        if isinstance(value, dict)
        else {}
    )


async def _json_body(answer: Answer) -> dict:
    try:
        body = await answer.response.read_all(settings.PROXY_MAX_BODY_BYTES)
    except client.TransportError as exc:
        tracing.answer_end(answer, error=str(exc))
        raise _logged(
            answer, GatewayError(str(exc), status=504 if exc.timeout else 502, attempts=answer.attempts)
        ) from None
    finally:
        await answer.response.aclose()
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        tracing.answer_end(answer, error="not a JSON object")
        raise _logged(
            answer, GatewayError("the upstream's answer was not a JSON object", status=502, attempts=answer.attempts)
        )
    _trace_end(answer, data)
    return data


def _trace_end(answer: Answer, data: dict) -> None:
    """End the answering attempt's span with what its JSON answer said (GenAI attributes)."""
    if answer.span is None:
        return
    choices = [choice for choice in data.get("choices") or () if isinstance(choice, dict)]
    tracing.answer_end(
        answer,
        response_model=data.get("model"),
        response_id=data.get("id"),
        usage=data.get("usage"),
        finish_reasons=[choice.get("finish_reason") for choice in choices],
        output=output_text(data),
    )


async def _settle(call: Call, answer: Answer, given: Any, served_model: str, *, text: str = "") -> None:
    """The end of one answered call of Turbo's own, and the only one, however it ended (a whole answer, a
    broken body or stream, a cancelled caller): its usage recorded once for its caller (none: nobody's),
    as the upstream's `given` usage or else the prompt and `text` counted offline, then its admission
    and reservation settled once. Callers reach it from a `finally`, so nothing above the gateway
    settles a call (an answer that is an upstream's error was settled by `send`)."""
    cost: Decimal | None = Decimal(0)
    if call.caller is not None:
        model, deployment = answer.model or call.model, answer.deployment.id
        usage = usage_from(given, model=model, deployment=deployment)
        if usage is not None:
            cost = usage_record(call.caller, usage, served_model=served_model)
        else:
            estimate = Estimate(text=text, prompt=call.payload)
            cost = usage_record(call.caller, Usage(model, deployment), estimate=estimate, served_model=served_model)
    tokens = _usage(given).get("total_tokens")
    await limits_settle(answer.admission, answer.reservation, cost=cost, tokens=tokens, reply_text=text)


async def chat(
    body: dict,
    *,
    api_key: str | None = None,
    allowed_models: frozenset[str] | None = None,
    caller: Caller | None = None,
) -> Completion:
    """One chat completion for a ready-made request body (model, messages, tools, ...)."""
    call = _call("chat/completions", {**body, "stream": False}, api_key, allowed_models, caller)
    answer = await _answer(call)
    data: dict = {}
    try:
        data = await _json_body(answer)
        windows.learn_ratio(answer.deployment.id, call.payload, _usage(data.get("usage")).get("prompt_tokens"))
    finally:  # an answer whose body broke (or a cancelled call) is settled too
        await _settle(call, answer, data.get("usage"), str(data.get("model") or ""), text=output_text(data))
    choices = data.get("choices") or []
    if not choices or not isinstance(choices[0], dict):
        raise GatewayError("the upstream returned no choices", status=502, attempts=answer.attempts)
    message = choices[0].get("message") or {}
    return Completion(
        text=message.get("content") or "",
        model=str(data.get("model") or ""),
        usage=_usage(data.get("usage")),
        tool_calls=list(message.get("tool_calls") or []),
        finish_reason=choices[0].get("finish_reason"),
        data=data,
        deployment=answer.deployment.id,
        attempts=answer.attempts,
    )


async def embeddings(
    body: dict,
    *,
    api_key: str | None = None,
    allowed_models: frozenset[str] | None = None,
    caller: Caller | None = None,
) -> dict:
    """Embeddings, as the upstream's JSON object."""
    call = _call("embeddings", body, api_key, allowed_models, caller)
    answer = await _answer(call)
    data: dict = {}
    try:
        data = await _json_body(answer)
    finally:
        await _settle(call, answer, data.get("usage"), str(data.get("model") or ""))
    return data


class ChatStream:
    """A streamed chat completion: iterate for Delta objects; when it ends, the merged results are here.

    A stream that breaks raises GatewayError; it never just ends. The upstream is asked for usage
    (`stream_options.include_usage`) even when the body did not ask; then the usage-only chunk is not
    yielded. When the stream ends, breaks or is abandoned, its usage is recorded for the caller: the
    upstream's, or what was streamed counted offline (estimated).
    """

    def __init__(
        self,
        body: dict,
        *,
        api_key: str | None = None,
        allowed_models: frozenset[str] | None = None,
        caller: Caller | None = None,
    ):
        options = body.get("stream_options")
        self.usage_asked = isinstance(options, dict) and options.get("include_usage") is True
        if not self.usage_asked:
            body = {**body, "stream_options": {**(options if isinstance(options, dict) else {}), "include_usage": True}}
        self.call = _call("chat/completions", {**body, "stream": True}, api_key, allowed_models, caller)
        self.text = ""
        self.usage: dict = {}
        self.finish_reason: str | None = None
        self.model = self.call.model
        self.deployment = ""
        self.attempts: tuple[Attempt, ...] = ()
        self._calls: dict[int, dict] = {}
        self._usage_given: Any = None

    @property
    def tool_calls(self) -> list[dict]:
        """The tool calls the model made, merged from their pieces, in order."""
        return [self._calls[index] for index in sorted(self._calls)]

    async def __aiter__(self) -> AsyncIterator[Delta]:
        answer = await _answer(self.call)
        self.deployment, self.attempts = answer.deployment.id, answer.attempts
        whole = False
        try:
            async for data in _events(answer):
                delta = self._take(data)
                if not self.usage_asked and "usage" in data:
                    if not data.get("choices"):
                        continue  # the usage-only chunk Turbo asked for
                    data = {name: value for name, value in data.items() if name != "usage"}
                yield Delta(chunk=data, text=delta)
            whole = True
            windows.learn_ratio(answer.deployment.id, self.call.payload, self.usage.get("prompt_tokens"))
        except client.TransportError as exc:
            raise _logged(
                answer,
                GatewayError(
                    "the upstream stream ended early" if not exc.timeout else "the upstream stopped sending",
                    status=504 if exc.timeout else 502,
                    code="upstream_stream_error",
                    attempts=answer.attempts,
                ),
            ) from None
        except GatewayError as exc:
            raise _logged(answer, exc) from None
        finally:
            try:
                tracing.answer_end(
                    answer,
                    response_model=self.model,
                    usage=self.usage,
                    finish_reasons=(self.finish_reason,),
                    output=self.text or self.tool_calls,
                    error="" if whole else "the stream did not finish",
                )
                await answer.response.aclose()
            finally:
                # A stream that broke or was abandoned is counted from what it streamed.
                calls = self.tool_calls
                arguments = "".join(call["function"]["name"] + call["function"]["arguments"] for call in calls)
                given = self._usage_given if whole else None
                await _settle(self.call, answer, given, self.model, text=self.text + arguments)

    def _take(self, data: dict) -> str:
        if isinstance(data.get("model"), str) and data["model"]:
            self.model = data["model"]
        if data.get("usage"):
            self._usage_given = data["usage"]  # as given: cached tokens are in a nested object
            for name, value in _usage(data["usage"]).items():
                self.usage[name] = value
        text = ""
        for choice in data.get("choices") or []:
            if not isinstance(choice, dict):
                continue
            delta = choice.get("delta") or {}
            for piece in delta.get("tool_calls") or []:
                self._merge(piece)
            if isinstance(delta.get("content"), str):
                text += delta["content"]
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
        self.text += text
        return text

    def _merge(self, piece: dict) -> None:
        slot = self._calls.setdefault(
            piece.get("index", 0), {"id": "", "type": "function", "function": {"name": "", "arguments": ""}}
        )
        slot["id"] = piece.get("id") or slot["id"]
        function = piece.get("function") or {}
        slot["function"]["name"] += function.get("name") or ""
        slot["function"]["arguments"] += function.get("arguments") or ""


async def _events(answer: Answer) -> AsyncIterator[dict]:
    """The JSON objects of a server-sent event stream, up to [DONE]. An `error` object raises, and so
    does a stream that ends without [DONE]."""
    buffer = b""
    async for chunk in answer.response.chunks():
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            raw = line[5:].strip()
            if raw == b"[DONE]":
                return
            try:
                data = json.loads(raw)
            except ValueError:
                continue
            if not isinstance(data, dict):
                continue
            if data.get("error"):
                error = data["error"]
                detail = error.get("message") if isinstance(error, dict) else str(error)
                is_context = windows.learn_from_error(answer.deployment, answer.model, error)
                raise GatewayError(
                    f"the upstream failed mid-stream: {detail}",
                    status=400 if is_context else 502,
                    code="context_length_exceeded" if is_context else "upstream_error_in_stream",
                    error_type="invalid_request_error" if is_context else "server_error",
                    attempts=answer.attempts,
                )
            yield data
    if buffer.strip():
        raise client.TransportError("the upstream's stream ended in the middle of an event")
    raise GatewayError(
        "the upstream's stream ended without [DONE]: the reply may be cut short",
        status=502,
        code="upstream_stream_incomplete",
        attempts=answer.attempts,
    )


def chat_stream(
    body: dict,
    *,
    api_key: str | None = None,
    allowed_models: frozenset[str] | None = None,
    caller: Caller | None = None,
) -> ChatStream:
    """A streamed chat completion (see ChatStream)."""
    return ChatStream(body, api_key=api_key, allowed_models=allowed_models, caller=caller)


SNIFF_LIMIT = 1024 * 1024  # answers larger than this are not parsed for the model name or usage
_FINISHED = re.compile(rb'"finish_reason"\s*:\s*"')  # an SSE chunk that ends a choice


class UsageReader:
    """Finds `model` and `usage` in a response as it streams by: JSON bodies and SSE chunks alike."""

    def __init__(self, is_event_stream: bool):
        self.is_event_stream = is_event_stream
        self.buffer = b""
        self.size = 0
        self.model = ""
        self.usage: dict = {}
        self.object_id = ""  # the answer's own `id` (a chat completion's, a response's): proxy.owners
        # The answer as it arrived (up to SNIFF_LIMIT), to count its tokens when no usage comes.
        self.kept: list[bytes] = []
        self.kept_size = 0
        # For the trace only: streamed chunks that end a choice are read when tracing is on.
        self.finish_reasons: list[str] = []
        self.reads_finish = tracing.enabled

    def feed(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.is_event_stream:
            if self.kept_size < SNIFF_LIMIT:
                self.kept.append(chunk)
                self.kept_size += len(chunk)
            self.buffer += chunk
            *lines, self.buffer = self.buffer.split(b"\n")
            for line in lines:
                if line.startswith(b"data:") and (
                    b'"usage"' in line
                    or (self.reads_finish and _FINISHED.search(line))
                    or (not self.object_id and b'"id"' in line)
                ):
                    self._read(line[5:])
            if len(self.buffer) > SNIFF_LIMIT:
                self.buffer = b""
        elif self.size <= SNIFF_LIMIT:
            self.buffer += chunk

    def finish(self) -> None:
        if not self.is_event_stream and self.buffer and self.size <= SNIFF_LIMIT:
            self._read(self.buffer)
            self.kept, self.kept_size = [self.buffer], len(self.buffer)
        self.buffer = b""

    def _read(self, raw: bytes) -> None:
        try:
            data = json.loads(raw)
        except ValueError:
            return
        if not isinstance(data, dict):
            return
        if isinstance(data.get("response"), dict):  # the Responses API's events: response.completed
            data = data["response"]
        if not self.object_id and isinstance(data.get("id"), str):
            self.object_id = data["id"]
        if isinstance(data.get("model"), str):
            self.model = data["model"]
        if isinstance(data.get("usage"), dict):
            self.usage = data["usage"]
        for choice in data.get("choices") or ():
            if isinstance(choice, dict) and isinstance(choice.get("finish_reason"), str):
                self.finish_reasons.append(choice["finish_reason"])

    def token(self, name: str) -> int | None:
        value = self.usage.get(name)
        return value if isinstance(value, int) else None
