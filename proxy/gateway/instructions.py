"""Instruction mapping for structured output: a `json_schema` response_format, for a model that lacks
native support (its `capabilities` in TURBO_CONFIG leave out `json_schema`), becomes a system
instruction carrying the schema, and the response_format is taken out of the request.

Only Turbo's own calls (gateway.chat / chat_stream, which validate the reply afterwards) are mapped;
the /v1 passthrough sends requests as they came.
"""

import json
from typing import Any

SCHEMA_INSTRUCTIONS = (
    "Reply with only a JSON value, with no other text and no code fences, that is valid against this "
    "JSON Schema{name}:\n{schema}"
)


def json_schema_of(payload: Any) -> dict | None:
    """The `json_schema` object of a request's response_format, if it asks for one."""
    if not isinstance(payload, dict):
        return None
    response_format = payload.get("response_format")
    if not isinstance(response_format, dict) or response_format.get("type") != "json_schema":
        return None
    json_schema = response_format.get("json_schema")
    return json_schema if isinstance(json_schema, dict) else {}


def schema_instructions(json_schema: dict) -> str:
    """The instruction text that stands in for a json_schema response_format."""
    name = json_schema.get("name")
    described = (
        f" (named {name!r}" + (f": {json_schema['description']}" if json_schema.get("description") else "") + ")"
    )
    return SCHEMA_INSTRUCTIONS.format(
        name=described if name else "",
        schema=json.dumps(json_schema.get("schema") or {}, ensure_ascii=False, sort_keys=True),
    )


def schema_as_instructions(payload: dict) -> dict:
    """`payload` with its json_schema response_format turned into a system instruction (added to the
    first system message, or a new one at the start)."""
    json_schema = json_schema_of(payload)
    if json_schema is None:
        return payload
    text = schema_instructions(json_schema)
    body = {name: value for name, value in payload.items() if name != "response_format"}
    messages = list(body.get("messages") or [])
    for index, message in enumerate(messages):
        if isinstance(message, dict) and message.get("role") in ("system", "developer"):
            content = message.get("content")
            if isinstance(content, list):
                merged: Any = [*content, {"type": "text", "text": text}]
            else:
                merged = f"{content}\n\n{text}" if content else text
            messages[index] = {**message, "content": merged}
            break
    else:
        messages.insert(0, {"role": "system", "content": text})
    body["messages"] = messages
    return body
