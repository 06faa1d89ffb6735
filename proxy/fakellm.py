"""A stand-in for an OpenAI-compatible upstream, to try Turbo without a provider key: `manage.py fakellm`
serves it, and `make demo` points Turbo at it.

`GET /v1/models` lists MODELS. `POST /v1/chat/completions` answers plain or streamed (a chunk per word,
a usage chunk when `stream_options.include_usage` asks for one, then `data: [DONE]`): a last message
`echo: some words` with `some words`, anything else with DEFAULT_REPLY. `POST /v1/embeddings` gives each
input eight floats derived from its text. Token counts are word counts. Any other path is a 404, and a
body it cannot read a 400, both as OpenAI's JSON errors.

The test suite's fake upstream builds its answers from these pieces and adds what tests need around
them (failure scenarios, recorded requests, stored objects).
"""

import base64
import hashlib
import json
import re
import secrets
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

DEFAULT_REPLY = "Hello from fake upstream"
MODELS = ("gpt-4o-mini", "gpt-4o")
EMBEDDING_MODEL = "text-embedding-3-small"


class BadRequest(Exception):
    """A request the fake cannot answer: a 400, with `code` in OpenAI's error shape."""

    def __init__(self, message: str, code: str = "invalid_request") -> None:
        super().__init__(message)
        self.code = code


def error_object(message: str, kind: str, code: str) -> dict[str, Any]:
    """An error answer's body, as OpenAI shapes it."""
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def json_object(body: bytes) -> dict[str, Any]:
    """A request body that must be a JSON object."""
    try:
        payload = json.loads(body)
    except ValueError:
        raise BadRequest("The request body is not valid JSON", "invalid_json") from None
    if not isinstance(payload, dict):
        raise BadRequest("The request body must be a JSON object", "invalid_json")
    return payload


def message_text(content: Any) -> str:
    """The text of a message's content: a string, or a list of parts of which the text ones count."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [part.get("text") for part in content if isinstance(part, dict)]
        return " ".join(text for text in texts if isinstance(text, str))
    return ""


def word_count(text: str) -> int:
    return len(text.split())


def models_list() -> list[dict[str, Any]]:
    """The entries of `GET /v1/models`."""
    return [{"id": model, "object": "model", "created": 0, "owned_by": "fake"} for model in MODELS]


@dataclass(frozen=True)
class ChatRequest:
    """What a chat completion request asks for."""

    messages: list[dict[str, Any]]
    model: str
    stream: bool
    include_usage: bool
    prompt_tokens: int

    @classmethod
    def read(cls, payload: dict[str, Any]) -> "ChatRequest":
        messages = payload.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise BadRequest("'messages' must be a non-empty list of objects", "invalid_messages")
        stream = payload.get("stream") is True
        stream_options = payload.get("stream_options")
        return cls(
            messages=messages,
            model=str(payload.get("model") or MODELS[0]),
            stream=stream,
            include_usage=stream and isinstance(stream_options, dict) and stream_options.get("include_usage") is True,
            prompt_tokens=sum(word_count(message_text(message.get("content"))) for message in messages),
        )


@dataclass
class Completion:
    """A chat.completion object, or its stream of chat.completion.chunk objects, for one request."""

    model: str
    prompt_tokens: int
    id: str = field(default_factory=lambda: "chatcmpl-" + secrets.token_hex(12))
    created: int = field(default_factory=lambda: int(time.time()))

    def text(self, reply: str) -> dict[str, Any]:
        message = {"role": "assistant", "content": reply, "refusal": None}
        return self.whole(message, "stop", word_count(reply))

    def text_stream(self, reply: str, include_usage: bool) -> list[dict[str, Any]]:
        words = re.findall(r"\S+\s*", reply)
        deltas: list[dict[str, Any]] = [{"role": "assistant", "content": ""}]
        deltas += [{"content": word} for word in words]
        return self.stream(deltas, "stop", len(words), include_usage)

    def usage(self, completion_tokens: int) -> dict[str, int]:
        total = self.prompt_tokens + completion_tokens
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": total}

    def whole(self, message: dict[str, Any], finish_reason: str, completion_tokens: int) -> dict[str, Any]:
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": self.usage(completion_tokens),
        }

    def stream(
        self, deltas: list[dict[str, Any]], finish_reason: str, completion_tokens: int, include_usage: bool
    ) -> list[dict[str, Any]]:
        """The chunks of `deltas`, one that finishes, and one with the usage when it was asked for."""
        chunks = [
            self.chunk([{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}]) for delta in deltas
        ]
        chunks.append(self.chunk([{"index": 0, "delta": {}, "logprobs": None, "finish_reason": finish_reason}]))
        if include_usage:
            chunks.append({**self.chunk([]), "usage": self.usage(completion_tokens)})
        return chunks

    def chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }


def sse_events(chunks: list[dict[str, Any]]) -> list[bytes]:
    """A stream's chunks as server-sent events, ended by `data: [DONE]`."""
    return [b"data: " + json.dumps(chunk).encode() + b"\n\n" for chunk in chunks] + [b"data: [DONE]\n\n"]


def chat_completion(payload: dict[str, Any]) -> dict[str, Any] | list[dict[str, Any]]:
    """The answer to a chat completion request: the object, or the chunks of its stream."""
    request = ChatRequest.read(payload)
    content = message_text(request.messages[-1].get("content"))
    reply = content.removeprefix("echo:").strip() if content.startswith("echo:") else DEFAULT_REPLY
    completion = Completion(model=request.model, prompt_tokens=request.prompt_tokens)
    return completion.text_stream(reply, request.include_usage) if request.stream else completion.text(reply)


def fake_embedding(text: str) -> list[float]:
    """Eight floats in [-1, 1) derived from `text`; exact in float32, so base64 round-trips are lossless."""
    return [(byte - 128) / 128 for byte in hashlib.sha256(text.encode()).digest()[:8]]


def embeddings(payload: dict[str, Any]) -> dict[str, Any]:
    """The answer to an embeddings request (`encoding_format` float or base64)."""
    inputs = payload.get("input")
    if isinstance(inputs, str):
        inputs = [inputs]
    if not isinstance(inputs, list) or not inputs or not all(isinstance(item, str) for item in inputs):
        raise BadRequest("'input' must be a string or a non-empty list of strings", "invalid_input")
    encoding = payload.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise BadRequest("'encoding_format' must be 'float' or 'base64'", "invalid_encoding_format")
    data = []
    for index, text in enumerate(inputs):
        vector = fake_embedding(text)
        encoded = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        embedding = vector if encoding == "float" else encoded
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    tokens = sum(word_count(text) for text in inputs)
    model = str(payload.get("model") or EMBEDDING_MODEL)
    usage = {"prompt_tokens": tokens, "total_tokens": tokens}
    return {"object": "list", "data": data, "model": model, "usage": usage}


# --- the ASGI app `manage.py fakellm` serves -----------------------------------------------------------

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

ROUTES: dict[tuple[str, str], Callable[[bytes], Any]] = {
    ("GET", "/v1/models"): lambda body: {"object": "list", "data": models_list()},
    ("POST", "/v1/chat/completions"): lambda body: chat_completion(json_object(body)),
    ("POST", "/v1/embeddings"): lambda body: embeddings(json_object(body)),
}


async def app(scope: dict[str, Any], receive: Receive, send: Send) -> None:
    """Answer one HTTP request: JSON, or a stream of server-sent events. A WebSocket is refused."""
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1008})
    if scope["type"] != "http":
        return
    body = b""
    more = True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        body += message.get("body", b"")
        more = message.get("more_body", False)
    route = ROUTES.get((scope["method"], scope["path"]))
    try:
        status, answer = (
            (200, route(body)) if route else (404, error_object("Unknown path", "invalid_request_error", "not_found"))
        )
    except BadRequest as exc:
        status, answer = 400, error_object(str(exc), "invalid_request_error", exc.code)
    if isinstance(answer, list):
        headers = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        for event in sse_events(answer):
            await send({"type": "http.response.body", "body": event, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
        return
    encoded = json.dumps(answer).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(encoded))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": encoded})
