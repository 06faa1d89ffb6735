"""A fake OpenAI-compatible upstream, served by uvicorn on a real loopback socket, for tests.

Its answers are built from the product's own stand-in, proxy.fakellm (what `manage.py fakellm` serves):
the same models, chat completions, streams and embeddings, with what tests need around them here.

    fake = FakeUpstream().start()
    client = openai.OpenAI(base_url=fake.url + "/v1", api_key="sk-test")
    ...
    assert fake.requests[-1].path == "/v1/chat/completions"
    fake.stop()

Routes: ``GET /v1/models``, ``POST /v1/chat/completions`` (plain and streamed), ``POST /v1/embeddings``,
``POST /v1/files`` (multipart), ``POST /v1/responses`` (plain and streamed, the reply as chat's); anything
else is a JSON 404, but for the objects it stores, as OpenAI does under one key for every caller: chat
completions made with ``store: true`` (``GET /v1/chat/completions`` lists them; ``GET``, ``POST``,
``DELETE /v1/chat/completions/{id}``, ``GET .../messages``) and responses unless ``store: false``
(``GET``, ``DELETE /v1/responses/{id}``, ``GET .../input_items``, ``POST .../cancel``).

A request picks its behaviour with the ``x-fake-scenario`` header, or ``metadata.scenario`` in its JSON body
(see ``SCENARIOS``). Knobs, read from a header or else from the same ``metadata`` object:

* ``x-fake-delay`` / ``delay``: seconds the ``slow`` scenario waits before the response headers (default 5);
* ``x-fake-chunk-delay`` / ``chunk_delay``: seconds between streamed chunks (default 0);
* ``x-fake-tool`` / ``tool`` and ``x-fake-tool-args`` / ``tool_args``: the ``tool_call`` scenario's call (a
  ``[tool:NAME]`` marker in the prompt names it too: a client's own function, say).

Chat replies: the text after ``echo:`` when the last message starts with it; ``Tool said: <content>`` when the
last message is a tool result (or, in the ``tool_call`` scenario, when any tool result is present); otherwise
``Hello from fake upstream``. Token counts are word counts.

What real model servers do, as scenarios: ``empty_stream`` (a ``200 text/event-stream`` with no body at all,
as llama.cpp's server answers a streamed request it cannot serve), ``no_done`` (a stream that ends without
``data: [DONE]``), ``error_event`` (an ``error`` object inside a stream, after some text), ``html_502`` (a proxy's
HTML error page in front of the model server), ``context_length`` (OpenAI's and vLLM's 400) and
``context_length_llama`` (llama.cpp's), and ``close_after_answer``: the answer as usual, then the connection is
closed when the next request arrives on it, before a byte of that one's answer (a keep-alive connection the
server closed under its client). A ``/v1/models`` listing says each model's context length when
``max_model_len`` (vLLM's field) or ``n_ctx_train`` (llama.cpp's ``meta``) is set on the fake. With ``n_ctx``
set, the fake is llama-cpp-python's server with that window and a listing that says nothing of it: a chat
request whose prompt (in words) fills the window is answered, streamed, with an empty ``200`` (no data, no
``[DONE]``) and, unstreamed, with its ``400 context_length_exceeded`` naming the window and the prompt's tokens.

Replies that change across calls (structured output's retries): a user message ``sequence: A ||| B ||| C``
answers A; with one more user message after it (the validation errors Turbo sends back) B, then C, and the
last item from then on. The ``sequence:`` message need not be the last one, so a retried conversation
(prompt, reply, errors) moves along it. Each request's body is in ``requests`` to check what was asked
(``response_format``, instructions, the errors sent back).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import re
import secrets
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from email.message import Message
from email.parser import HeaderParser
from email.utils import collapse_rfc2231_value
from typing import Any

import uvicorn

from proxy.fakellm import (
    DEFAULT_REPLY,
    MODELS,
    BadRequest,
    ChatRequest,
    Completion,
    embeddings,
    error_object,
    fake_embedding,
    json_object,
    message_text,
    models_list,
    sse_events,
    word_count,
)

__all__ = ["DEFAULT_REPLY", "MODELS", "SCENARIOS", "FakeUpstream", "RecordedRequest", "fake_embedding"]

ASGIMessage = dict[str, Any]
Receive = Callable[[], Awaitable[ASGIMessage]]
Send = Callable[[ASGIMessage], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]

DEFAULT_TOOL = "calculator"
DEFAULT_TOOL_ARGS = '{"expression": "2+2"}'

ERROR_SCENARIOS: dict[str, tuple[int, str, str, str]] = {
    "error_400": (400, "Bad thing", "invalid_request_error", "bad_thing"),
    "error_429": (429, "Rate limit reached for requests", "rate_limit_exceeded", "rate_limit_exceeded"),
    "error_500": (500, "The server had an error while processing your request", "server_error", "server_error"),
    "context_length": (
        400,
        "This model's maximum context length is 100 tokens. However, your messages resulted in 500 tokens.",
        "invalid_request_error",
        "context_length_exceeded",
    ),
}
# llama.cpp's server: the window in `n_ctx`, its own type, the HTTP status as the code.
LLAMA_CONTEXT_ERROR = {
    "code": 400,
    "message": "the request exceeds the available context size, try increasing it",
    "type": "exceed_context_size_error",
    "n_prompt_tokens": 600,
    "n_ctx": 512,
}
HTML_502 = (
    b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n<center><h1>502 Bad Gateway</h1>"
    b"</center>\r\n<hr><center>nginx/1.24.0</center>\r\n</body>\r\n</html>\r\n"
)
ERROR_EVENT = {"code": 500, "message": "the model server failed while generating", "type": "server_error"}
# Bent deliveries of what real servers send (see the module's docstring).
SERVER_SCENARIOS = frozenset(
    {"empty_stream", "no_done", "error_event", "html_502", "context_length_llama", "close_after_answer"}
)
# OpenAI's answer to a wrong key quotes the key it was sent; so does this scenario.
ECHO_KEY_SCENARIO = "error_401_echo"
# Usage as some upstreams give it: "no_usage" never sends any (not even when asked); "usage_on_choices"
# puts a stream's usage on its last chunk with choices instead of a chunk of its own.
USAGE_SCENARIOS = frozenset({"no_usage", "usage_on_choices"})
SCENARIOS = frozenset(
    {
        *ERROR_SCENARIOS,
        *USAGE_SCENARIOS,
        *SERVER_SCENARIOS,
        ECHO_KEY_SCENARIO,
        "slow",
        "gated",
        "die_mid_stream",
        "stall",
        "tool_call",
    }
)


@dataclass
class RecordedRequest:
    """One request as the fake received it; ``aborted`` turns True if the client left before the response ended."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes
    aborted: bool = False
    connection: tuple | None = None  # the client's address: one per connection

    def json(self) -> Any:
        """The body parsed as JSON."""
        return json.loads(self.body)


class FakeUpstream:
    """The fake OpenAI API on ``127.0.0.1:<free port>``, run by uvicorn in a daemon thread."""

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.requests: list[RecordedRequest] = []
        # Set to a scenario name (e.g. "error_500", "slow", "die_mid_stream") to answer every request
        # that way, whatever it asks: one upstream of several failing on demand. None: as asked.
        self.forced_scenario: str | None = None
        self.retry_after = "7"  # the Retry-After of error_429
        self.stored: dict[str, dict[str, Any]] = {}  # id -> {"object": ..., "messages": [...]}
        self.max_model_len: int | None = None  # said by /v1/models as vLLM does
        self.n_ctx_train: int | None = None  # said by /v1/models as llama.cpp's server does
        self.n_ctx: int | None = None  # a window enforced as llama-cpp-python's server does (see the module)
        self._doomed: set[tuple] = set()  # connections closed when their next request arrives
        self._gate = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing: asyncio.Event | None = None
        # IPPROTO_TCP, not the default 0: asyncio turns Nagle off (TCP_NODELAY) only on sockets that say they
        # are TCP, and with Nagle on, a response written as headers then body waits ~40 ms for the client's
        # delayed ACK.
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind((host, port))
        self.port: int = self._socket.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        config = uvicorn.Config(
            self.app,
            log_level="warning",
            lifespan="off",
            interface="asgi3",
            ws="none",
            http=_protocol_closing(self._doomed),
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, name=f"fake-upstream-{self.port}", daemon=True)
        _install_log_filter()

    # --- lifecycle, called from the test thread ------------------------------------------------------------------

    def start(self) -> FakeUpstream:
        """Serve in the background; returns once the socket accepts requests."""
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the fake upstream failed to start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        """Drop any request still in flight and shut the server down."""
        if not self._thread.is_alive():
            self._socket.close()
            return
        try:
            self._call_soon(self._drop_in_flight)
        except RuntimeError:  # the loop is already closing
            pass
        self._server.should_exit = True
        self._thread.join(timeout=10)

    def __enter__(self) -> FakeUpstream:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def reset(self) -> None:
        """Forget recorded requests and start over with a closed gate, answering as asked."""
        self.requests.clear()
        self.stored.clear()
        self.forced_scenario = None
        self.retry_after = "7"
        self.max_model_len = self.n_ctx_train = self.n_ctx = None
        self._gate = asyncio.Event()

    def release(self) -> None:
        """Open the gate that ``gated`` requests wait on (thread-safe)."""
        gate = self._gate
        self._call_soon(gate.set)

    def wait_for_abort(self, timeout: float = 5) -> bool:
        """Wait until the last recorded request was abandoned by its client; False on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            if self.requests and self.requests[-1].aborted:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)

    def _call_soon(self, callback: Callable[[], object]) -> None:
        if self._loop is None:
            raise RuntimeError("the fake upstream is not running")
        self._loop.call_soon_threadsafe(callback)

    def _drop_in_flight(self) -> None:
        if self._closing is not None:
            self._closing.set()

    def _run(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._closing = asyncio.Event()
        await self._server.serve(sockets=[self._socket])

    # --- the ASGI app, on the server's loop -----------------------------------------------------------------------

    async def app(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        """Record the request, then answer it while watching for the client going away."""
        if scope["type"] != "http":
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
            return
        body, disconnected = await _read_body(receive)
        headers: dict[str, str] = {}
        for name, value in scope["headers"]:
            headers[name.decode("latin-1").lower()] = value.decode("latin-1")
        request = RecordedRequest(
            method=scope["method"],
            path=scope["path"],
            query=scope["query_string"].decode("latin-1"),
            headers=headers,
            body=body,
            aborted=disconnected,
            connection=scope.get("client"),
        )
        self.requests.append(request)
        if disconnected:
            return

        writer = _Writer(send)
        assert self._closing is not None
        handler = asyncio.create_task(self._respond(request, writer))
        watcher = asyncio.create_task(_wait_for_disconnect(receive))
        closing = asyncio.create_task(self._closing.wait())
        try:
            done, _ = await asyncio.wait({handler, watcher, closing}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (handler, watcher, closing):
                task.cancel()
            await asyncio.gather(handler, watcher, closing, return_exceptions=True)
        if handler in done:
            handler.result()  # re-raises _DropConnection, which makes uvicorn cut the connection
        elif watcher in done:
            request.aborted = not writer.finished
        else:
            raise _DropConnection("the fake upstream is shutting down")

    async def _respond(self, request: RecordedRequest, writer: _Writer) -> None:
        try:
            options = _Options.of(request)
            if self.forced_scenario is not None:
                options = dataclasses.replace(options, scenario=self.forced_scenario)
            if options.scenario == "close_after_answer" and request.connection:
                self._doomed.add(tuple(request.connection))
            reply = self._reply(request, options)
        except BadRequest as exc:
            options, reply = _Options.plain(), _error(400, str(exc), "invalid_request_error", exc.code)
        await self._deliver(reply, options, writer)

    def _reply(self, request: RecordedRequest, options: _Options) -> _Reply:
        route = {
            ("GET", "/v1/models"): self._models,
            ("POST", "/v1/chat/completions"): self._chat_completions,
            ("POST", "/v1/embeddings"): self._embeddings,
            ("POST", "/v1/files"): self._files,
            ("POST", "/v1/images/generations"): self._images,
            ("POST", "/v1/audio/speech"): self._speech,
            ("POST", "/v1/audio/transcriptions"): self._transcription,
            ("POST", "/v1/moderations"): self._moderations,
            ("POST", "/v1/responses"): self._responses,
            ("GET", "/v1/chat/completions"): self._stored_list,
        }.get((request.method, request.path)) or self._stored_route(request)
        if route is None:
            return _error(404, "Unknown path", "invalid_request_error", "not_found")
        if options.scenario == ECHO_KEY_SCENARIO:
            sent = request.headers.get("authorization", "").removeprefix("Bearer ")
            message = f"Incorrect API key provided: {sent}. You can find your API key at https://platform.openai.com."
            return _error(401, message, "invalid_request_error", "invalid_api_key")
        if options.scenario in ERROR_SCENARIOS:
            status, message, kind, code = ERROR_SCENARIOS[options.scenario]
            extra = [(b"retry-after", self.retry_after.encode())] if status == 429 else []
            return _error(status, message, kind, code, extra)
        if options.scenario == "context_length_llama":
            return _Reply(status=400, payload={"error": LLAMA_CONTEXT_ERROR})
        return route(request, options)

    async def _deliver(self, reply: _Reply, options: _Options, writer: _Writer) -> None:
        """Send ``reply``, bent the way the request's scenario asks."""
        scenario = options.scenario
        if scenario == "slow":
            await asyncio.sleep(options.delay)
        headers = _standard_headers() + reply.headers
        if scenario == "html_502":
            await writer.start(502, [(b"content-type", b"text/html"), (b"content-length", b"%d" % len(HTML_502))])
            await writer.body(HTML_502)
            return
        if scenario == "empty_stream" and reply.status == 200:
            await writer.start(200, headers + [(b"content-type", b"text/event-stream")])
            await writer.body(b"")
            return
        if reply.events is not None and scenario == "no_done":
            reply.events = reply.events[:-1]
        elif reply.events is not None and scenario == "error_event":
            reply.events = [
                *reply.events[: reply.first_word + 1],
                b"data: " + json.dumps({"error": ERROR_EVENT}).encode(),
            ]
            reply.events[-1] += b"\n\n"
        if reply.events is None:
            body = json.dumps(reply.payload).encode()
            headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            if scenario == "gated":
                await self._gate.wait()
            await writer.start(reply.status, headers)
            if scenario in ("die_mid_stream", "stall"):
                await writer.body(body[: len(body) // 2], more=True)
                if scenario == "stall":
                    await asyncio.Event().wait()
                raise _DropConnection("die_mid_stream")
            await writer.body(body)
            return

        headers += [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
        await writer.start(reply.status, headers)
        cut = {
            "gated": reply.first_word + 1,
            "die_mid_stream": min(3, len(reply.events) - 1),
            "stall": 1,
        }.get(scenario or "")
        for index, event in enumerate(reply.events):
            if index == cut:
                if scenario == "gated":
                    await self._gate.wait()
                elif scenario == "stall":
                    await asyncio.Event().wait()
                else:
                    raise _DropConnection("die_mid_stream")
            if index and options.chunk_delay:
                await asyncio.sleep(options.chunk_delay)
            await writer.body(event, more=True)
        await writer.body(b"")

    # --- routes ---------------------------------------------------------------------------------------------------

    def _models(self, request: RecordedRequest, options: _Options) -> _Reply:
        data = models_list()
        for entry in data:
            if self.max_model_len is not None:
                entry["max_model_len"] = self.max_model_len
            if self.n_ctx_train is not None:
                entry["meta"] = {"vocab_type": 2, "n_vocab": 32000, "n_ctx_train": self.n_ctx_train, "n_embd": 64}
        return _Reply(payload={"object": "list", "data": data})

    def _chat_completions(self, request: RecordedRequest, options: _Options) -> _Reply:
        payload = _json_object(request)
        asked = ChatRequest.read(payload)
        messages, model, stream, include_usage = asked.messages, asked.model, asked.stream, asked.include_usage
        tool_results = [message for message in messages if message.get("role") == "tool"]
        completion = _Completion(model=model, prompt_tokens=asked.prompt_tokens, usage_style=options.scenario or "")
        if self.n_ctx is not None and asked.prompt_tokens >= self.n_ctx:
            if stream:
                return _Reply(events=[])  # headers, then the end of the body
            room = payload.get("max_tokens") if isinstance(payload.get("max_tokens"), int) else None
            message = (
                f"This model's maximum context length is {self.n_ctx} tokens. However, you requested "
                f"{(room or 0) + asked.prompt_tokens} tokens ({asked.prompt_tokens} in the messages, {room} in the "
                "completion). Please reduce the length of the messages or completion."
            )
            return _error(400, message, "invalid_request_error", "context_length_exceeded")

        if options.scenario == "tool_call" and not tool_results:
            if stream:
                return _Reply(
                    events=sse_events(completion.tool_call_stream(options.tool, options.tool_args, include_usage))
                )
            return _Reply(payload=completion.tool_call(options.tool, options.tool_args))

        last = messages[-1]
        if last.get("role") == "tool" or (options.scenario == "tool_call" and tool_results):
            reply = "Tool said: " + message_text(tool_results[-1].get("content"))
        elif (sequenced := _sequence_reply(messages)) is not None:
            reply = sequenced
        elif (content := _MARKER.sub("", message_text(last.get("content")), count=1)).startswith("echo:"):
            # "[nul]" stands for U+0000, which models do send and a prompt cannot carry (Turbo refuses it).
            reply = content.removeprefix("echo:").strip().replace("[nul]", "\x00")
        else:
            reply = DEFAULT_REPLY
        if stream:
            answer = _Reply(events=sse_events(completion.text_stream(reply, include_usage)))
        else:
            answer = _Reply(payload=completion.text(reply))
        if payload.get("store") is True:
            stored = {"id": completion.id, "object": "chat.completion", "model": model, "metadata": {}}
            self.stored[completion.id] = {"object": stored, "messages": messages}
        return answer

    def _responses(self, request: RecordedRequest, options: _Options) -> _Reply:
        payload = _json_object(request)
        given = payload.get("input")
        text = given if isinstance(given, str) else " ".join(message_text(item.get("content")) for item in given or [])
        reply = text.removeprefix("echo:").strip() if text.startswith("echo:") else DEFAULT_REPLY
        words = word_count(text), word_count(reply)
        response = {
            "id": "resp_" + secrets.token_hex(12),
            "object": "response",
            "created_at": int(time.time()),
            "status": "completed",
            "model": str(payload.get("model") or MODELS[0]),
            "previous_response_id": payload.get("previous_response_id"),
            "output": [{"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": reply}]}],
            "usage": {"input_tokens": words[0], "output_tokens": words[1], "total_tokens": sum(words)},
        }
        if payload.get("store") is not False:
            self.stored[response["id"]] = {"object": response, "messages": [{"role": "user", "content": text}]}
        if payload.get("stream") is not True:
            return _Reply(payload=response)
        started = {**response, "status": "in_progress", "output": [], "usage": None}
        events = [
            ("response.created", {"response": started}),
            ("response.output_text.delta", {"output_index": 0, "delta": reply}),
            ("response.completed", {"response": response}),
        ]
        return _Reply(
            events=[f"event: {kind}\ndata: {json.dumps({'type': kind, **data})}\n\n".encode() for kind, data in events]
        )

    def _stored_list(self, request: RecordedRequest, options: _Options) -> _Reply:
        data = [entry["object"] for entry in self.stored.values() if entry["object"]["object"] == "chat.completion"]
        return _Reply(payload={"object": "list", "data": data})

    def _stored_route(self, request: RecordedRequest) -> Callable[[RecordedRequest, _Options], _Reply] | None:
        """A stored object's routes: ``/v1/chat/completions/{id}[/messages]``, ``/v1/responses/{id}[/...]``."""
        found = re.fullmatch(
            r"/v1/(chat/completions|responses)/([^/]+)(?:/(messages|input_items|cancel))?", request.path
        )
        if found is None:
            return None
        collection, object_id, sub = found.groups()
        entry = self.stored.get(object_id)
        kind = "chat.completion" if collection == "chat/completions" else "response"
        if entry is None or entry["object"]["object"] != kind:
            return lambda request, options: _error(
                404, f"No object with id {object_id!r}", "invalid_request_error", "not_found"
            )
        if request.method == "DELETE" and sub is None:
            del self.stored[object_id]
            return lambda request, options: _Reply(
                payload={"id": object_id, "object": f"{kind}.deleted", "deleted": True}
            )
        if request.method == "GET" and sub in ("messages", "input_items"):
            return lambda request, options: _Reply(payload={"object": "list", "data": entry["messages"]})
        if request.method == "GET" and sub is None or request.method == "POST" and sub in (None, "cancel"):
            return lambda request, options: _Reply(payload=entry["object"])
        return None

    def _embeddings(self, request: RecordedRequest, options: _Options) -> _Reply:
        return _Reply(payload=embeddings(_json_object(request)))

    def _images(self, request: RecordedRequest, options: _Options) -> _Reply:
        count = _json_object(request).get("n") or 1
        data = [{"url": f"https://images.example/{index}.png"} for index in range(int(count))]
        return _Reply(payload={"created": int(time.time()), "data": data})

    def _speech(self, request: RecordedRequest, options: _Options) -> _Reply:
        return _Reply(payload={"audio": "fake", "characters": len(str(_json_object(request).get("input") or ""))})

    def _transcription(self, request: RecordedRequest, options: _Options) -> _Reply:
        """The text, and (as OpenAI's whisper-1 does) the audio's length: a second per 1000 bytes here."""
        parts = _parse_multipart(request.body, request.headers.get("content-type", ""))
        upload = next((part for part in parts if part.name == "file"), None)
        if upload is None:
            raise BadRequest("a 'file' upload is required", "invalid_upload")
        seconds = max(1, len(upload.content) // 1000)
        return _Reply(payload={"text": DEFAULT_REPLY, "usage": {"type": "duration", "seconds": seconds}})

    def _moderations(self, request: RecordedRequest, options: _Options) -> _Reply:
        model = str(_json_object(request).get("model") or "omni-moderation-latest")
        return _Reply(payload={"id": "modr-fake", "model": model, "results": [{"flagged": False}]})

    def _files(self, request: RecordedRequest, options: _Options) -> _Reply:
        parts = _parse_multipart(request.body, request.headers.get("content-type", ""))
        upload = next((part for part in parts if part.name == "file" and part.filename is not None), None)
        purpose = next((part.content.decode() for part in parts if part.name == "purpose"), None)
        if upload is None or purpose is None:
            raise BadRequest("a 'file' upload and a 'purpose' field are required", "invalid_upload")
        payload = {
            "id": "file-" + secrets.token_hex(12),
            "object": "file",
            "bytes": len(upload.content),
            "created_at": int(time.time()),
            "filename": upload.filename,
            "purpose": purpose,
            "status": "processed",
        }
        return _Reply(payload=payload)


# --- internals ------------------------------------------------------------------------------------------------------


class _DropConnection(Exception):
    """Raised out of the app so uvicorn closes the connection without finishing the response."""


class _QuietDrops(logging.Filter):
    """Keeps uvicorn from logging a traceback for every connection the fake drops on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], _DropConnection))


def _protocol_closing(doomed: set[tuple]) -> type:
    """uvicorn's HTTP protocol, closing a connection in `doomed` as soon as its next request arrives."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as Base
    except ImportError:
        from uvicorn.protocols.http.h11_impl import H11Protocol as Base

    class ClosingProtocol(Base):
        def data_received(self, data: bytes) -> None:
            if self.client is not None and tuple(self.client) in doomed:
                doomed.discard(tuple(self.client))
                self.transport.close()  # no byte of an answer: the client sees the connection end
                return
            super().data_received(data)

    return ClosingProtocol


def _install_log_filter() -> None:
    logger = logging.getLogger("uvicorn.error")
    if not any(isinstance(existing, _QuietDrops) for existing in logger.filters):
        logger.addFilter(_QuietDrops())


@dataclass
class _Reply:
    """A JSON ``payload``, or a list of SSE ``events`` (``first_word``: index of the first one with content)."""

    status: int = 200
    payload: Any = None
    events: list[bytes] | None = None
    first_word: int = 1
    headers: Headers = field(default_factory=list)


_MARKER = re.compile(r"^(?:\[(?:scenario|delay|chunk_delay|tool):[a-z0-9_.]+\]\s*)+")
_MARKER_ITEM = re.compile(r"\[(scenario|delay|chunk_delay|tool):([a-z0-9_.]+)\]")
SEQUENCE_PREFIX = "sequence:"
SEQUENCE_SEPARATOR = "|||"


def _sequence_reply(messages: list[dict]) -> str | None:
    """The reply a ``sequence: A ||| B`` user message asks for, by how many user messages follow it."""
    for position in range(len(messages) - 1, -1, -1):
        message = messages[position]
        if message.get("role") != "user":
            continue
        text = _MARKER.sub("", message_text(message.get("content")), count=1)
        if text.startswith(SEQUENCE_PREFIX):
            items = [item.strip() for item in text.removeprefix(SEQUENCE_PREFIX).split(SEQUENCE_SEPARATOR)]
            later = sum(1 for after in messages[position + 1 :] if after.get("role") == "user")
            return items[min(later, len(items) - 1)]
    return None


def _scenario_marker(messages: Any) -> dict[str, str] | None:
    """The knobs set by leading markers in the last message: "[scenario:NAME]", "[chunk_delay:0.05]",
    "[delay:2]" (apps that control only the prompt text, like Turbo's chats, pick behaviour this way)."""
    if not isinstance(messages, list) or not messages or not isinstance(messages[-1], dict):
        return None
    match = _MARKER.match(message_text(messages[-1].get("content")))
    return dict(_MARKER_ITEM.findall(match.group(0))) if match else None


@dataclass(frozen=True)
class _Options:
    """The scenario and its knobs, from ``x-fake-*`` headers or else the JSON body's ``metadata``."""

    scenario: str | None
    delay: float
    chunk_delay: float
    tool: str
    tool_args: str

    @classmethod
    def plain(cls) -> _Options:
        return cls(None, 5.0, 0.0, DEFAULT_TOOL, DEFAULT_TOOL_ARGS)

    @classmethod
    def of(cls, request: RecordedRequest) -> _Options:
        metadata: dict[str, Any] = {}
        if request.body[:1] == b"{":
            try:
                payload = request.json()
            except ValueError:
                payload = None
            if isinstance(payload, dict) and isinstance(payload.get("metadata"), dict):
                metadata = payload["metadata"]
            elif isinstance(payload, dict) and (marked := _scenario_marker(payload.get("messages"))):
                # Apps that control only the prompt text (Turbo's chats) pick one with "[scenario:NAME] ...".
                metadata = marked

        def pick(header: str, key: str, default: str) -> str:
            value = request.headers.get(header) or metadata.get(key)
            return default if value is None else str(value)

        def seconds(header: str, key: str, default: str) -> float:
            value = pick(header, key, default)
            try:
                return max(float(value), 0.0)
            except ValueError:
                raise BadRequest(
                    f"{header} must be a number of seconds, not {value!r}", "invalid_fake_option"
                ) from None

        scenario = pick("x-fake-scenario", "scenario", "").strip().lower() or None
        if scenario is not None and scenario not in SCENARIOS:
            raise BadRequest(f"Unknown fake scenario {scenario!r}", "unknown_scenario")
        return cls(
            scenario=scenario,
            delay=seconds("x-fake-delay", "delay", "5"),
            chunk_delay=seconds("x-fake-chunk-delay", "chunk_delay", "0"),
            tool=pick("x-fake-tool", "tool", DEFAULT_TOOL),
            tool_args=pick("x-fake-tool-args", "tool_args", DEFAULT_TOOL_ARGS),
        )


@dataclass
class _Completion(Completion):
    """proxy.fakellm's completions, with tool calls, and usage as some upstreams give it (`usage_style`:
    "no_usage" or "usage_on_choices", USAGE_SCENARIOS; otherwise as OpenAI does)."""

    usage_style: str = ""

    def tool_call(self, name: str, arguments: str) -> dict[str, Any]:
        call = {"id": "call_1", "type": "function", "function": {"name": name, "arguments": arguments}}
        message = {"role": "assistant", "content": None, "refusal": None, "tool_calls": [call]}
        return self.whole(message, "tool_calls", word_count(arguments))

    def tool_call_stream(self, name: str, arguments: str, include_usage: bool) -> list[dict[str, Any]]:
        half = len(arguments) // 2
        opening = {"index": 0, "id": "call_1", "type": "function", "function": {"name": name, "arguments": ""}}
        deltas: list[dict[str, Any]] = [{"role": "assistant", "content": None, "tool_calls": [opening]}]
        for piece in (arguments[:half], arguments[half:]):
            deltas.append({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})
        return self.stream(deltas, "tool_calls", word_count(arguments), include_usage)

    def whole(self, message: dict[str, Any], finish_reason: str, completion_tokens: int) -> dict[str, Any]:
        payload = super().whole(message, finish_reason, completion_tokens)
        if self.usage_style == "no_usage":
            del payload["usage"]
        return payload

    def stream(
        self, deltas: list[dict[str, Any]], finish_reason: str, completion_tokens: int, include_usage: bool
    ) -> list[dict[str, Any]]:
        as_openai = include_usage and self.usage_style not in USAGE_SCENARIOS
        chunks = super().stream(deltas, finish_reason, completion_tokens, as_openai)
        if include_usage and self.usage_style == "usage_on_choices":
            chunks[-1]["usage"] = self.usage(completion_tokens)
        return chunks


class _Writer:
    """Sends the response, remembering whether it started and whether it finished."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self.started = False
        self.finished = False

    async def start(self, status: int, headers: Headers) -> None:
        self.started = True
        await self._send({"type": "http.response.start", "status": status, "headers": headers})

    async def body(self, data: bytes, *, more: bool = False) -> None:
        await self._send({"type": "http.response.body", "body": data, "more_body": more})
        if not more:
            self.finished = True


@dataclass
class _FormPart:
    name: str | None
    filename: str | None
    content: bytes


async def _read_body(receive: Receive) -> tuple[bytes, bool]:
    """The whole request body, and whether the client disconnected while sending it."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return b"".join(chunks), True
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks), False


async def _wait_for_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def _standard_headers() -> Headers:
    return [
        (b"x-request-id", ("req_" + secrets.token_hex(12)).encode()),
        (b"openai-processing-ms", b"1"),
        (b"x-ratelimit-remaining-requests", b"99"),
        # What a proxy must pass on (a header it has never heard of) and must not (a cookie for its domain).
        (b"x-fake-upstream", b"yes"),
        (b"set-cookie", b"fake-upstream-session=1; Path=/"),
    ]


def _error(status: int, message: str, kind: str, code: str, headers: Headers | None = None) -> _Reply:
    return _Reply(status=status, payload=error_object(message, kind, code), headers=headers or [])


def _json_object(request: RecordedRequest) -> dict[str, Any]:
    return json_object(request.body)


def _parse_multipart(body: bytes, content_type: str) -> list[_FormPart]:
    """The parts of a ``multipart/form-data`` body (RFC 7578), split on its boundary."""
    header = Message()
    header["content-type"] = content_type
    boundary = header.get_boundary()
    if header.get_content_type() != "multipart/form-data" or not boundary:
        raise BadRequest("Expected a multipart/form-data body with a boundary", "invalid_upload")
    sections = (b"\r\n" + body).split(b"\r\n--" + boundary.encode("latin-1"))
    parts: list[_FormPart] = []
    for section in sections[1:]:  # sections[0] is the preamble
        if section.startswith(b"--"):
            return parts
        head, separator, content = section.partition(b"\r\n\r\n")
        if not separator:
            break
        fields = HeaderParser().parsestr(head.lstrip(b" \t").removeprefix(b"\r\n").decode("utf-8", "replace"))
        name = fields.get_param("name", header="content-disposition")
        parts.append(
            _FormPart(
                name=None if name is None else collapse_rfc2231_value(name),
                filename=fields.get_filename(),
                content=content,
            )
        )
    raise BadRequest("Malformed multipart body", "invalid_upload")
