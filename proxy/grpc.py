"""The gRPC Completions service (protos/turbo/v1/turbo.proto): chat completions, plain and streamed, and
embeddings, over the model gateway, like /v1 and /ws.

A thin adapter: authenticate (a session token or an API key), parse the request into the gateway's
body, call `gateway.chat` / `chat_stream` / `embeddings` (or `structured.structured_complete` with a
schema) for the caller, so usage, budgets and rate limits apply, and shape the answer. Errors are
raised as they are and become gRPC statuses in one place (turbo_site.core.grpc, through the server's
interceptor). A client that cancels a call cancels its handler, and with it the upstream call.
"""

import math

from django.conf import settings

from accounts.auth import aauthenticate, metadata_credentials
from protos.turbo.v1 import turbo_pb2, turbo_pb2_grpc
from proxy import gateway, structured
from proxy.requests import chat_request_read, embedding_request_read
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


def chat_body(request: turbo_pb2.CompleteRequest) -> dict:
    """The gateway's request body for a CompleteRequest, read by the one request model (proxy.requests):
    400 naming the field that is wrong."""
    fields: dict = {
        "messages": [{"role": message.role, "content": message.content} for message in request.messages],
        "model": request.model,
        "response_format": response_format_of(request.response_format_json_schema),
    }
    if request.HasField("temperature"):
        if math.isnan(request.temperature):
            raise Invalid("temperature: must be a number from 0 to 2")
        fields["temperature"] = request.temperature
    if request.HasField("max_tokens"):
        fields["max_tokens"] = request.max_tokens
    return chat_request_read(fields, default_model=settings.DEFAULT_MODEL)


def usage_message(usage: dict | None) -> turbo_pb2.Usage:
    usage = usage or {}
    return turbo_pb2.Usage(
        input_tokens=usage.get("prompt_tokens") or 0, output_tokens=usage.get("completion_tokens") or 0
    )


class CompletionsServicer(turbo_pb2_grpc.CompletionsServicer):
    """turbo.v1.Completions: every call is the caller's (a session token or an API key)."""

    async def Complete(self, request, context):
        session = await aauthenticate("grpc.completions", metadata_credentials(context.invocation_metadata()))
        body = chat_body(request)
        completion, _ = await structured.structured_complete(
            body, caller=Caller.of(session), allowed_models=session.allowed_models
        )
        return turbo_pb2.CompleteResponse(
            content=completion.text,
            model=completion.model,
            finish_reason=completion.finish_reason or "",
            usage=usage_message(completion.usage),
        )

    async def CompleteStream(self, request, context):
        session = await aauthenticate("grpc.completions", metadata_credentials(context.invocation_metadata()))
        body = chat_body(request)
        caller = Caller.of(session)
        if "response_format" in body:
            # A reply that must match a schema is sent once it has been validated (and asked again if
            # it did not match): as one delta, then the last chunk.
            completion, _ = await structured.structured_complete(
                body, caller=caller, allowed_models=session.allowed_models
            )
            if completion.text:
                yield turbo_pb2.CompleteChunk(delta=completion.text)
            yield turbo_pb2.CompleteChunk(
                finish_reason=completion.finish_reason or "stop", usage=usage_message(completion.usage)
            )
            return
        stream = gateway.chat_stream(
            {**body, "stream_options": {"include_usage": True}},
            allowed_models=session.allowed_models,
            caller=caller,
        )
        async for delta in stream:
            if delta.text:
                yield turbo_pb2.CompleteChunk(delta=delta.text)
        yield turbo_pb2.CompleteChunk(finish_reason=stream.finish_reason or "stop", usage=usage_message(stream.usage))

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
