"""The gRPC Completions service (protos/turbo/v1/turbo.proto): chat completions, plain and streamed, and
embeddings, over the model gateway, like /v1 and /ws.

A thin adapter: authenticate (a session token or an API key), read the request, run a completion
through the completion service (proxy.completion: your functions as tools, structured output with
its retries, streamed or not) or `gateway.embeddings` for the caller, so usage, budgets and rate
limits apply, and shape the answer. Errors are
raised as they are and become gRPC statuses in one place (turbo_site.core.grpc, through the server's
interceptor). A client that cancels a call cancels its handler, and with it the upstream call.
"""

import json
import math
from contextlib import aclosing

from accounts.auth import aauthenticate, metadata_credentials
from protos.turbo.v1 import turbo_pb2, turbo_pb2_grpc
from proxy import completion, gateway, structured
from proxy.requests import embedding_request_read
from proxy.usage.caller import Caller
from turbo_site.core.errors import Invalid
from turbo_site.core.parsers import client_json_loads

SCHEMA_NAME = "response"  # the json_schema's name when the request gives the bare schema


def response_format_of(text: str, *, field: str = "response_format_json_schema") -> dict | None:
    """The response_format for a request's JSON Schema text: the schema itself, or OpenAI's
    `{"name", "schema", "strict"?, "description"?}`; None for "". Checked by proxy.structured (400)."""
    if not text.strip():
        return None
    if len(text) > structured.MAX_SCHEMA_BYTES:
        raise structured.ResponseFormatInvalid(f"{field}: may be at most {structured.MAX_SCHEMA_BYTES} bytes")
    try:
        value = client_json_loads(text)
    except ValueError as exc:
        raise structured.ResponseFormatInvalid(f"{field}: is not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise structured.ResponseFormatInvalid(f"{field}: must be a JSON object (a JSON Schema)")
    json_schema = value if isinstance(value.get("schema"), dict) else {"name": SCHEMA_NAME, "schema": value}
    return structured.response_format_check({"type": "json_schema", "json_schema": json_schema})


def _json_field(text: str, field: str) -> object:
    """A request's JSON text field, parsed (None for ""): 400 naming the field when it is not JSON."""
    if not text.strip():
        return None
    try:
        return client_json_loads(text)
    except ValueError as exc:
        raise Invalid(f"{field}: is not valid JSON ({exc})") from None


def chat_body(request: turbo_pb2.CompleteRequest) -> dict:
    """The completion request for a CompleteRequest, read by the one request model (proxy.completion):
    400 naming the field that is wrong."""
    fields: dict = {
        "messages": [
            {
                "role": message.role,
                "content": message.content,
                "name": message.name or None,
                "tool_calls": _json_field(message.tool_calls_json, f"messages[{index}].tool_calls_json"),
                "tool_call_id": message.tool_call_id or None,
            }
            for index, message in enumerate(request.messages)
        ],
        "model": request.model,
        "response_format": response_format_of(request.response_format_json_schema),
        "tools": _json_field(request.tools_json, "tools_json"),
        "tool_choice": _json_field(request.tool_choice_json, "tool_choice_json"),
    }
    if request.HasField("temperature"):
        if math.isnan(request.temperature):
            raise Invalid("temperature: must be a number from 0 to 2")
        fields["temperature"] = request.temperature
    if request.HasField("max_tokens"):
        fields["max_tokens"] = request.max_tokens
    return completion.request_read(fields)


def usage_message(usage: dict | None) -> turbo_pb2.Usage:
    usage = usage or {}
    return turbo_pb2.Usage(
        input_tokens=usage.get("prompt_tokens") or 0, output_tokens=usage.get("completion_tokens") or 0
    )


def _calls_json(calls: list[dict]) -> str:
    return json.dumps(calls, separators=(",", ":")) if calls else ""


class CompletionsServicer(turbo_pb2_grpc.CompletionsServicer):
    """turbo.v1.Completions: every call is the caller's (a session token or an API key)."""

    async def Complete(self, request, context):
        session = await aauthenticate("grpc.completions", metadata_credentials(context.invocation_metadata()))
        done = await completion.complete_collect(
            chat_body(request), caller=Caller.of(session), allowed_models=session.allowed_models
        )
        reply = done.completion
        return turbo_pb2.CompleteResponse(
            content=reply.text,
            model=reply.model,
            finish_reason=reply.finish_reason or "",
            usage=usage_message(reply.usage),
            tool_calls_json=_calls_json(done.client_calls),
        )

    async def CompleteStream(self, request, context):
        """The reply's deltas as they come; a structured reply that fails its schema gets a chunk with
        `retry` (drop what streamed) and streams again; the last chunk ends it."""
        session = await aauthenticate("grpc.completions", metadata_credentials(context.invocation_metadata()))
        async with aclosing(
            completion.complete(chat_body(request), caller=Caller.of(session), allowed_models=session.allowed_models)
        ) as items:
            async for item in items:
                if isinstance(item, completion.Delta):
                    if item.text:
                        yield turbo_pb2.CompleteChunk(delta=item.text)
                elif isinstance(item, completion.Retry):
                    yield turbo_pb2.CompleteChunk(retry=turbo_pb2.Retry(attempt=item.attempt, errors=item.errors))
                elif isinstance(item, completion.Done):
                    reply = item.completion
                    yield turbo_pb2.CompleteChunk(
                        finish_reason=reply.finish_reason or "stop",
                        usage=usage_message(reply.usage),
                        tool_calls_json=_calls_json(item.client_calls),
                    )

    async def Embed(self, request, context):
        session = await aauthenticate("grpc.completions", metadata_credentials(context.invocation_metadata()))
        body = embedding_request_read({"model": request.model, "input": list(request.input)})
        data = await gateway.embeddings(body, allowed_models=session.allowed_models, caller=Caller.of(session))
        items = sorted((item for item in data.get("data") or [] if isinstance(item, dict)), key=_index)
        embeddings = []
        for item in items:
            vector = item.get("embedding")
            if not isinstance(vector, list):
                raise gateway.GatewayError("the upstream's embedding was not a list of numbers", status=502)
            embeddings.append(turbo_pb2.Embedding(values=vector))
        return turbo_pb2.EmbedResponse(
            model=str(data.get("model") or body["model"]), embeddings=embeddings, usage=usage_message(data.get("usage"))
        )


def _index(item: dict) -> int:
    index = item.get("index")
    return index if isinstance(index, int) else 0
