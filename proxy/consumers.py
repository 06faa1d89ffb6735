"""`/ws`: many RPC requests multiplexed on one authenticated WebSocket (its own request envelope).

Request:  {"type": <method>, "request_id": <string>, "payload": {...}}
Response: {"type": <method>, "request_id": ..., "data": {...}}
          or {"type": "error", "request_id": ..., "error": {"code", "message"}}

Methods: chat_completion, chat_completion_stream (chat_completion_chunk frames, then chat_completion_done),
embedding, ping (-> pong), tools_list, tool_execute, and cancel (stops one in-flight request).
A chat completion goes through proxy.completion: a json_schema `response_format` is validated
(chat_completion_retry frames when a streamed reply is asked for again; the parsed value as `parsed`).
Requests run concurrently and are answered as they finish; a bad frame gets an error frame and the
socket stays open.
"""

import asyncio
import json
import time
from contextlib import aclosing
from typing import Any

from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings
from rest_framework import serializers

from accounts.auth import AuthRefused, aauthenticate, scope_credentials
from accounts.live import session_watch
from accounts.services import asession_refresh
from proxy import completion, gateway, structured, tools
from proxy.events import event_record
from proxy.requests import chat_request_read, embedding_request_read
from proxy.usage.caller import Caller
from turbo_site.core import tracing
from turbo_site.core.errors import CODES, Invalid, Outcome, TurboError, outcome_of, refusal
from turbo_site.core.parsers import client_json_loads
from turbo_site.core.streams import StreamUnavailable

# Connected /ws clients in this process (reported by /health).
connected_clients = 0


class RpcError(TurboError):
    """A request this socket refuses; its status is its code's (turbo_site.core.errors.CODES)."""

    def __init__(self, code: str, message: str):
        super().__init__(message, code=code)
        self.status_code = CODES[code].status if code in CODES else 400


class ToolExecutePayload(serializers.Serializer):
    tool_call = serializers.DictField()


def _validated(serializer_class, payload) -> dict:
    parsed = serializer_class(data=payload)
    if not parsed.is_valid():
        field, problems = next(iter(parsed.errors.items()))
        problem = problems[0] if isinstance(problems, list) else problems
        if isinstance(problem, dict):  # nested (e.g. messages[n].role)
            inner_field, inner = next(iter(problem.items())) if problem else ("", ["invalid"])
            problem = f"{inner_field}: {inner[0] if isinstance(inner, list) else inner}"
        raise RpcError("invalid_payload", f"payload.{field}: {problem}")
    data = dict(parsed.validated_data)
    if "messages" in data:
        data["messages"] = [{k: v for k, v in dict(m).items()} for m in data["messages"]]
    return data


def _chat_request(payload: dict) -> dict:
    try:
        return chat_request_read(payload, prefix="payload.", default_model=settings.DEFAULT_MODEL)
    except structured.ResponseFormatInvalid as exc:
        raise RpcError(exc.code, exc.message) from None
    except Invalid as exc:
        raise RpcError("invalid_payload", exc.message) from None


class RpcConsumer(AsyncWebsocketConsumer):
    """One client's socket: each request runs as its own task, matched by request_id."""

    # No channel layer: nothing is sent to this consumer through it, and a Redis outage must not kill it.
    channel_layer_alias = "turbo-no-channel-layer"

    user_id = None
    watch = None

    async def connect(self):
        global connected_clients
        try:
            session = await aauthenticate("rpc.socket", scope_credentials(self.scope))
        except AuthRefused as refused:
            await self.close(code=refused.close_code)  # before accept: the handshake is refused (HTTP 403)
            return
        # The socket lives as long as its session: revoked or expired, it is closed (in any process).
        watch = session_watch(session.session_id, session.expires_at, self._session_ended)
        try:
            await watch.__aenter__()
        except StreamUnavailable as exc:
            await self.accept()
            await self.send_outcome(None, outcome_of(exc))
            await self.close(code=1013)
            return
        self.watch = watch
        self.user_id = session.user.pk
        self.session = session
        self.allowed_models = session.allowed_models
        self.caller = Caller.of(session)
        self.tasks: dict[str, asyncio.Task] = {}
        self.attempts: dict[str, tuple] = {}  # the gateway's attempts per request, for the log
        connected_clients += 1
        await self.accept()

    async def disconnect(self, code):
        global connected_clients
        watch, self.watch = self.watch, None
        if watch is not None:
            await watch.__aexit__(None, None, None)
        if self.user_id is None:
            return
        self.user_id = None
        connected_clients -= 1
        for task in list(getattr(self, "tasks", {}).values()):
            task.cancel()

    def _session_ended(self, reason: str) -> None:
        for task in list(getattr(self, "tasks", {}).values()):
            task.cancel()
        asyncio.get_running_loop().create_task(self._close_for(reason))

    async def _close_for(self, reason: str) -> None:
        try:
            await self.send_error(None, "session_ended", reason)
            await self.close(code=4401)
        except Exception:
            pass  # the socket is already gone

    async def send_frame(self, frame: dict) -> None:
        await self.send(text_data=json.dumps(frame, separators=(",", ":"), default=str))

    async def send_error(self, request_id: Any, code: str, message: str) -> None:
        await self.send_outcome(request_id, refusal(code, message))

    async def send_outcome(self, request_id: Any, outcome: Outcome) -> None:
        """The error frame: `{"type": "error", "request_id", "error": {code, message, ...}}`."""
        await self.send_frame({"type": "error", "request_id": request_id, "error": outcome.error()})

    async def receive(self, text_data=None, bytes_data=None):
        raw = text_data if text_data is not None else bytes_data
        if len(raw) > settings.WS_MAX_FRAME_BYTES:
            await self.send_error(None, "frame_too_large", f"frames may be at most {settings.WS_MAX_FRAME_BYTES} bytes")
            return
        try:
            frame = client_json_loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            await self.send_error(None, "invalid_json", f"the frame is not valid JSON: {exc}")
            return
        if not isinstance(frame, dict):
            await self.send_error(None, "invalid_frame", "the frame must be a JSON object")
            return
        request_id = frame.get("request_id")
        if not isinstance(request_id, str) or not request_id or len(request_id) > 200:
            await self.send_error(
                request_id if isinstance(request_id, str) else None,
                "missing_request_id",
                "request_id must be a non-empty string of at most 200 characters",
            )
            return
        kind = frame.get("type")
        payload = frame.get("payload", {})
        if not isinstance(kind, str) or (kind not in HANDLERS and kind != "cancel"):
            await self.send_error(
                request_id, "unknown_type", f"unknown type {kind!r}; one of {sorted([*HANDLERS, 'cancel'])}"
            )
            return
        if not isinstance(payload, dict):
            await self.send_error(request_id, "invalid_payload", "payload must be a JSON object")
            return
        if kind == "cancel":
            await self.cancel(request_id)
            return
        if request_id in self.tasks:
            await self.send_error(request_id, "duplicate_request_id", "a request with this request_id is in flight")
            return
        if len(self.tasks) >= settings.WS_MAX_IN_FLIGHT:
            await self.send_error(
                request_id,
                "too_many_requests",
                f"at most {settings.WS_MAX_IN_FLIGHT} requests may be in flight on one socket",
            )
            return
        task = asyncio.ensure_future(self.run(kind, request_id, payload))
        self.tasks[request_id] = task
        task.add_done_callback(lambda _: self.tasks.pop(request_id, None))

    async def cancel(self, request_id: str) -> None:
        task = self.tasks.get(request_id)
        if task is None:
            await self.send_error(request_id, "not_found", "no request in flight with this request_id")
            return
        task.cancel()
        await self.send_frame({"type": "cancelled", "request_id": request_id, "data": {}})

    async def run(self, kind: str, request_id: str, payload: dict) -> None:
        started = time.perf_counter()
        status = 200
        attempts = ()
        try:
            if kind in MODEL_CALLS:  # the user's model limit as it is now, not as it was at connect
                session = await asession_refresh(self.session)
                if session is None:
                    raise RpcError("session_ended", "the session has ended")
                self.allowed_models = session.allowed_models
            with tracing.request_span(f"ws {kind}", {"rpc.system": "turbo-ws", "rpc.method": kind}):
                await HANDLERS[kind](self, request_id, payload)
        except asyncio.CancelledError:
            status = 499
        except Exception as exc:  # an unexpected one is logged by outcome_of, with its traceback
            outcome = outcome_of(exc)
            status = outcome.status
            attempts = getattr(exc, "attempts", ())  # a model call's, for the log
            await self.send_outcome(request_id, outcome)
        finally:
            recorded = self.attempts.pop(request_id, ())
            attempts = attempts or recorded
            event_record(
                type="request",
                user_id=self.user_id,
                method=kind[:10],
                path="/ws",
                query=f"type={kind}",
                status=status,
                duration_ms=(time.perf_counter() - started) * 1000,
                client_ip=(self.scope.get("client") or [None])[0],
                model=str(payload.get("model") or "") if kind.startswith(("chat", "embedding")) else "",
                attempts=attempts,
            )

    # --- methods ---

    async def do_ping(self, request_id, payload):
        await self.send_frame({"type": "pong", "request_id": request_id, "data": {}})

    async def do_chat_completion(self, request_id, payload):
        """With a json_schema response_format, the reply is validated (and asked for again) by
        proxy.completion; its parsed value is the message's `parsed`, as OpenAI's SDK `parse()` has it."""
        done = await completion.complete_collect(
            _chat_request(payload), allowed_models=self.allowed_models, caller=self.caller
        )
        self.attempts[request_id] = done.completion.attempts
        data = done.completion.data
        if done.parsed is not None:
            choices = data.get("choices") or [{}]
            message = {**(choices[0].get("message") or {}), "parsed": done.parsed}
            data = {**data, "choices": [{**choices[0], "message": message}, *choices[1:]]}
        await self.send_frame({"type": "chat_completion", "request_id": request_id, "data": data})

    async def do_chat_completion_stream(self, request_id, payload):
        """The upstream's chunks as they come. A json_schema reply is validated once it has streamed; a
        failed one gets a `chat_completion_retry` frame ({attempt, errors}: drop what streamed) and
        streams again. The done frame has the model's `tool_calls` when it called the client's tools."""
        request = {**_chat_request(payload), "stream_options": {"include_usage": True}}
        async with aclosing(
            completion.complete(request, allowed_models=self.allowed_models, caller=self.caller)
        ) as items:
            async for item in items:
                if isinstance(item, completion.Delta):
                    await self.send_frame(
                        {"type": "chat_completion_chunk", "request_id": request_id, "data": item.chunk}
                    )
                elif isinstance(item, completion.Usage):
                    self.attempts[request_id] = item.attempts
                elif isinstance(item, completion.Retry):
                    retry = {"attempt": item.attempt, "errors": item.errors}
                    await self.send_frame({"type": "chat_completion_retry", "request_id": request_id, "data": retry})
                elif isinstance(item, completion.Done):
                    reply = item.completion
                    done = {"content": reply.text, "model": reply.model, "usage": reply.usage or None}
                    if item.parsed is not None:
                        done["parsed"] = item.parsed
                    if item.client_calls:
                        done["tool_calls"] = item.client_calls
                    await self.send_frame({"type": "chat_completion_done", "request_id": request_id, "data": done})

    async def do_embedding(self, request_id, payload):
        try:
            data = embedding_request_read(payload, prefix="payload.")
        except Invalid as exc:
            raise RpcError("invalid_payload", exc.message) from None
        result = await gateway.embeddings(data, allowed_models=self.allowed_models, caller=self.caller)
        await self.send_frame({"type": "embedding", "request_id": request_id, "data": result})

    async def do_tools_list(self, request_id, payload):
        await self.send_frame({"type": "tools_list", "request_id": request_id, "data": {"tools": tools.tools_list()}})

    async def do_tool_execute(self, request_id, payload):
        data = _validated(ToolExecutePayload, payload)
        result = await tools.tool_execute(data["tool_call"])
        await self.send_frame({"type": "tool_execute", "request_id": request_id, "data": result})


MODEL_CALLS = {"chat_completion", "chat_completion_stream", "embedding"}
HANDLERS = {
    "ping": RpcConsumer.do_ping,
    "chat_completion": RpcConsumer.do_chat_completion,
    "chat_completion_stream": RpcConsumer.do_chat_completion_stream,
    "embedding": RpcConsumer.do_embedding,
    "tools_list": RpcConsumer.do_tools_list,
    "tool_execute": RpcConsumer.do_tool_execute,
}
