"""App code's way to the model, over the configured upstream (the `openai` SDK's async client).

    text = ai.complete("Who are you?", user=request.user)                 # sync
    text = await ai.acomplete("Who are you?", context=[("Hi", "Hello!")])  # async
    async for delta in ai.stream("Tell me a story"):                       # async
        ...
    for delta in ai.stream("Tell me a story"):                             # sync
        ...

Failures raise AIError (with an HTTP-ish status: 502 unreachable, 504 timeout, 503 not configured,
or the upstream's own 4xx/5xx); a stream that breaks raises too, it never just ends.
"""

import asyncio
import hashlib
import weakref
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Any

import openai
from django.conf import settings

from proxy.upstream import UpstreamNotConfigured, is_azure, upstream_base, upstream_text_redact


class AIError(Exception):
    """The model call failed; `status` says how (as an HTTP status).

    Every surface (the /chat/prompt body, message.error, stream error events, /ws error frames) shows
    `message`, so keys an upstream quoted back are redacted here, once.
    """

    def __init__(self, message: str, *, status: int = 502):
        message = upstream_text_redact(message)
        super().__init__(message)
        self.message = message
        self.status = status


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


def _client_options(api_key: str | None = None) -> dict:
    try:
        base = upstream_base()
    except UpstreamNotConfigured as exc:
        raise AIError(str(exc), status=503) from exc
    key = api_key or settings.OPENAI_API_KEY or "not-needed"
    return {
        "base_url": base,
        "api_key": key,
        "default_headers": {"api-key": key} if is_azure() else None,
        "organization": settings.OPENAI_ORGANIZATION or None,
        "project": settings.OPENAI_PROJECT or None,
        "timeout": openai.Timeout(settings.PROXY_READ_TIMEOUT, connect=settings.PROXY_CONNECT_TIMEOUT),
        "max_retries": 1,
    }


_async_clients: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, openai.AsyncOpenAI]]" = (
    weakref.WeakKeyDictionary()
)
_sync_clients: dict[str, openai.OpenAI] = {}


def _options_key(options: dict) -> str:
    return repr(sorted(options.items(), key=lambda item: item[0]))


def async_client(api_key: str | None = None) -> openai.AsyncOpenAI:
    """The SDK's async client for this event loop and key (rebuilt if the settings changed)."""
    options = _client_options(api_key)
    per_loop = _async_clients.setdefault(asyncio.get_running_loop(), {})
    key = _options_key(options)
    if key not in per_loop:
        if len(per_loop) > 64:  # per-chat keys: keep the pool of clients bounded
            per_loop.clear()
        per_loop[key] = openai.AsyncOpenAI(**options)
    return per_loop[key]


def sync_client(api_key: str | None = None) -> openai.OpenAI:
    options = _client_options(api_key)
    key = _options_key(options)
    if key not in _sync_clients:
        if len(_sync_clients) > 64:
            _sync_clients.clear()
        _sync_clients[key] = openai.OpenAI(**options)
    return _sync_clients[key]


def _translate(exc: Exception) -> AIError:
    if isinstance(exc, AIError):
        return exc
    if isinstance(exc, openai.APITimeoutError):
        return AIError("the upstream did not answer in time", status=504)
    if isinstance(exc, openai.APIConnectionError):
        return AIError("the upstream could not be reached", status=502)
    if isinstance(exc, openai.APIStatusError):
        detail = exc.message or "the upstream refused the request"
        return AIError(f"upstream error {exc.status_code}: {detail}", status=exc.status_code)
    return AIError(f"the upstream call failed: {type(exc).__name__}", status=502)


class Completion:
    """A whole reply with what the upstream said about it."""

    def __init__(self, text: str, model: str, usage: dict, tool_calls: list):
        self.text = text
        self.model = model
        self.usage = usage
        self.tool_calls = tool_calls


def _usage_of(usage: Any) -> dict:
    if usage is None:
        return {}
    return {name: getattr(usage, name, None) for name in ("prompt_tokens", "completion_tokens", "total_tokens")}


def _request(prompt, user, context, model, system, options) -> dict:
    request = {
        "model": model or settings.DEFAULT_MODEL,
        "messages": build_messages(prompt, context, system),
        **options,
    }
    tag = user_tag(user)
    if tag:
        request["user"] = tag
    return request


def _completion_of(completion) -> Completion:
    if not completion.choices:
        raise AIError("the upstream returned no choices", status=502)
    message = completion.choices[0].message
    tool_calls = [call.model_dump() for call in (message.tool_calls or [])]
    return Completion(message.content or "", completion.model or "", _usage_of(completion.usage), tool_calls)


async def acreate(request: dict, *, api_key: str | None = None) -> Completion:
    """One chat completion for a ready-made request body (messages, model, tools, ...)."""
    try:
        completion = await async_client(api_key).chat.completions.create(**request)
    except Exception as exc:
        raise _translate(exc) from exc
    return _completion_of(completion)


async def acomplete(
    prompt: str,
    *,
    user: Any = None,
    context: Iterable[ContextItem] = (),
    model: str | None = None,
    system: str | None = None,
    **options: Any,
) -> str:
    """The model's whole reply to `prompt`."""
    return (await acreate(_request(prompt, user, context, model, system, options))).text


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
    request = _request(prompt, user, context, model, system, options)
    try:
        completion = sync_client().chat.completions.create(**request)
    except Exception as exc:
        raise _translate(exc) from exc
    return _completion_of(completion).text


class TextStream:
    """The reply as it is generated, delta by delta: iterate with `async for` or plain `for`.

    Once iteration ends, `usage` holds the token counts if the upstream sent them.
    """

    def __init__(self, request: dict, *, api_key: str | None = None):
        self.request = {**request, "stream": True}
        self.api_key = api_key
        self.usage: dict = {}

    async def __aiter__(self) -> AsyncIterator[str]:
        try:
            chunks = await async_client(self.api_key).chat.completions.create(**self.request)
            async with chunks:
                async for chunk in chunks:
                    if chunk.usage is not None:
                        self.usage = _usage_of(chunk.usage)
                    if chunk.choices and chunk.choices[0].delta.content:
                        yield chunk.choices[0].delta.content
        except AIError:
            raise
        except Exception as exc:
            raise _translate(exc) from exc

    def __iter__(self) -> Iterator[str]:
        try:
            with sync_client(self.api_key).chat.completions.create(**self.request) as chunks:
                for chunk in chunks:
                    if chunk.usage is not None:
                        self.usage = _usage_of(chunk.usage)
                    if chunk.choices and chunk.choices[0].delta.content:
                        yield chunk.choices[0].delta.content
        except AIError:
            raise
        except Exception as exc:
            raise _translate(exc) from exc


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
    return TextStream(_request(prompt, user, context, model, system, options))


# --- raw OpenAI-shaped calls (the /ws RPC endpoint passes these through) ---------------------------


async def achat(request: dict) -> dict:
    """A chat completion as the upstream's JSON object."""
    try:
        completion = await async_client().chat.completions.create(**{**request, "stream": False})
    except Exception as exc:
        raise _translate(exc) from exc
    return completion.model_dump(exclude_none=True)


async def achat_stream(request: dict, *, api_key: str | None = None) -> AsyncIterator[dict]:
    """A streamed chat completion, chunk by chunk, as the upstream's JSON objects."""
    try:
        chunks = await async_client(api_key).chat.completions.create(**{**request, "stream": True})
        async with chunks:
            async for chunk in chunks:
                yield chunk.model_dump(exclude_none=True)
    except AIError:
        raise
    except Exception as exc:
        raise _translate(exc) from exc


async def aembed(request: dict) -> dict:
    """Embeddings as the upstream's JSON object."""
    try:
        result = await async_client().embeddings.create(**request)
    except Exception as exc:
        raise _translate(exc) from exc
    return result.model_dump(exclude_none=True)
