"""Structured output: a `response_format` of type `json_schema` (OpenAI's shape), checked, and the
model's reply validated against its schema, asked again with the validation errors when it fails.

    response_format = response_format_check(value)            # 400 invalid_response_format
    parsed, errors = Attempts(response_format).check(text)     # 502 invalid_structured_output at the end

Every front (chat prompts, /ws, GraphQL, gRPC, `proxy.ai`) goes through this module, by way of the
completion service (proxy.completion, which runs the retry loop): the check and the reply's
validation are written once. A deployment without native `json_schema`
support gets the schema as a system instruction (proxy.gateway.instructions); its reply is validated
the same way. The /v1 passthrough never comes here.
"""

import json
import re
from dataclasses import dataclass
from typing import Any

import jsonschema
import referencing.exceptions
from django.conf import settings
from jsonschema.validators import validator_for

from proxy.gateway import GatewayError
from proxy.gateway.instructions import json_schema_of
from turbo_site.core.errors import Invalid
from turbo_site.core.text import unstorable_text

MAX_SCHEMA_BYTES = 32 * 1024  # a response_format as JSON, at most
MAX_ERRORS = 8  # validation errors reported (to the model and the client), at most
MAX_ERROR_CHARS = 300
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
FORMAT_TYPES = ("text", "json_object", "json_schema")

# The start of the message that asks the model again (the test fake upstream looks for it).
RETRY_INSTRUCTION = "Your previous reply was not valid against the required JSON schema"


class ResponseFormatInvalid(Invalid):
    """A response_format Turbo cannot use: 400 `invalid_response_format`, naming the problem."""

    code = "invalid_response_format"


class StructuredOutputError(GatewayError):
    """The model's replies never matched the schema: 502 `invalid_structured_output`, with the errors
    of the last reply in `.errors` and in the message."""

    def __init__(self, errors: list[str], *, attempts: int = 1):
        self.errors = list(errors)
        tries = "once" if attempts == 1 else f"{attempts} times"
        super().__init__(
            f"the model's reply did not match the response_format's schema (asked {tries}): " + "; ".join(self.errors),
            status=502,
            code="invalid_structured_output",
            error_type="server_error",
        )
        self.extra = {"errors": self.errors}


class ReplyInvalid(Exception):
    """One reply failed its schema (the retry loop's signal; not an API error)."""

    def __init__(self, errors: list[str]):
        super().__init__("; ".join(errors))
        self.errors = errors


def _fail(message: str) -> ResponseFormatInvalid:
    return ResponseFormatInvalid(f"response_format: {message}")


def response_format_check(value: Any) -> dict | None:
    """A response_format as a request gave it (an object, or its JSON text), checked and normalised.

    None (or "") passes as None. `{"type": "text"}` and `{"type": "json_object"}` pass unchanged (sent
    to the model; not validated). `{"type": "json_schema", "json_schema": {"name", "schema", "strict"?,
    "description"?}}` must hold a valid JSON Schema (the draft its `$schema` names, 2020-12 otherwise),
    at most MAX_SCHEMA_BYTES as JSON. Raises ResponseFormatInvalid (400) naming the problem.
    """
    if value is None or value == "":
        return None
    if isinstance(value, str):
        if len(value) > MAX_SCHEMA_BYTES:
            raise _fail(f"may be at most {MAX_SCHEMA_BYTES} bytes as JSON")
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise _fail(f"is not valid JSON ({exc})") from None
        if value is None:  # a form's "null": no format, as a JSON body's null
            return None
    if not isinstance(value, dict):
        raise _fail("must be an object with a `type`")
    if problem := unstorable_text(value):  # kept with the chat or the message: Postgres's jsonb refuses NUL
        raise _fail(f"may not hold {problem}")
    try:
        size = len(json.dumps(value, ensure_ascii=False).encode())
    except (TypeError, ValueError, RecursionError):
        raise _fail("must be plain JSON") from None
    if size > MAX_SCHEMA_BYTES:
        raise _fail(f"may be at most {MAX_SCHEMA_BYTES} bytes as JSON (it has {size})")
    kind = value.get("type")
    if kind not in FORMAT_TYPES:
        raise _fail(f"type must be one of {', '.join(FORMAT_TYPES)}, not {kind!r}")
    extra = sorted(set(value) - {"type", "json_schema"})
    if extra:
        raise _fail(f"unknown field(s): {', '.join(extra)}")
    if kind != "json_schema":
        if "json_schema" in value:
            raise _fail(f"json_schema is only for type json_schema, not {kind}")
        return {"type": kind}
    json_schema = value.get("json_schema")
    if not isinstance(json_schema, dict):
        raise _fail("json_schema must be an object with `name` and `schema`")
    extra = sorted(set(json_schema) - {"name", "schema", "strict", "description"})
    if extra:
        raise _fail(f"json_schema: unknown field(s): {', '.join(extra)}")
    name = json_schema.get("name")
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise _fail("json_schema.name must be 1-64 letters, digits, underscores or dashes")
    if "strict" in json_schema and not isinstance(json_schema["strict"], bool) and json_schema["strict"] is not None:
        raise _fail("json_schema.strict must be true or false")
    if "description" in json_schema and not isinstance(json_schema["description"], str):
        raise _fail("json_schema.description must be text")
    schema = json_schema.get("schema")
    if not isinstance(schema, dict):
        raise _fail("json_schema.schema must be a JSON Schema object")
    _schema_check(schema)
    checked = {"name": name, "schema": schema}
    for optional in ("description", "strict"):
        if json_schema.get(optional) is not None:
            checked[optional] = json_schema[optional]
    return {"type": "json_schema", "json_schema": checked}


def _validator_class(schema: dict):
    return validator_for(schema, default=jsonschema.Draft202012Validator)


def _schema_check(schema: dict) -> None:
    if "$schema" in schema:
        unknown = object()
        known = isinstance(schema["$schema"], str) and validator_for(schema, default=unknown) is not unknown
        if not known:
            raise _fail(f"json_schema.schema.$schema: not a JSON Schema draft Turbo knows: {schema['$schema']!r}")
    cls = _validator_class(schema)
    try:
        cls.check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = exc.json_path.replace("$", "json_schema.schema", 1)
        raise _fail(f"{where} is not valid JSON Schema: {_short(exc.message)}") from None
    # References Turbo cannot resolve (it never fetches a remote schema) fail now, not on every reply.
    try:
        for _ in cls(schema).iter_errors(None):
            pass
    except referencing.exceptions.Unresolvable as exc:
        raise _fail(f"json_schema.schema has a reference Turbo cannot resolve: {_short(str(exc))}") from None


def _short(text: str) -> str:
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 1] + "…"


def _unfenced(text: str) -> str:
    """The reply without one surrounding Markdown code fence (models given instructions add them)."""
    stripped = text.strip()
    if stripped.startswith("```") and stripped.endswith("```") and len(stripped) >= 6:
        body = stripped[3:-3]
        first_line, _, rest = body.partition("\n")
        return (rest if first_line.strip().isalnum() or not first_line.strip() else body).strip()
    return stripped


def reply_parse(text: str, response_format: dict | None) -> Any:
    """The reply's JSON value, valid against the response_format's schema; None for a request without
    a json_schema. Raises ReplyInvalid with the problems (at most MAX_ERRORS)."""
    json_schema = json_schema_of({"response_format": response_format})
    if json_schema is None:
        return None
    try:
        value = json.loads(_unfenced(text))
    except ValueError as exc:
        raise ReplyInvalid([f"the reply is not valid JSON: {exc}"]) from None
    schema = json_schema.get("schema") or {}
    validator = _validator_class(schema)(schema)
    try:
        found = sorted(validator.iter_errors(value), key=lambda error: list(error.absolute_path))
    except referencing.exceptions.Unresolvable as exc:
        raise ReplyInvalid([f"the schema has a reference that cannot be resolved: {_short(str(exc))}"]) from None
    if found:
        raise ReplyInvalid([f"at {error.json_path}: {_short(error.message)}" for error in found[:MAX_ERRORS]])
    return value


def retry_messages(messages: list[dict], reply: str, errors: list[str]) -> list[dict]:
    """The conversation to ask again with: the failed reply, then what was wrong with it."""
    feedback = RETRY_INSTRUCTION + ":\n" + "\n".join(f"- {error}" for error in errors)
    feedback += "\nReply again with only the corrected JSON value."
    return [*messages, {"role": "assistant", "content": reply}, {"role": "user", "content": feedback}]


@dataclass
class Attempts:
    """The retry loop's bookkeeping (the loop itself is proxy.completion's)."""

    response_format: dict | None
    made: int = 0

    @property
    def wanted(self) -> bool:
        return json_schema_of({"response_format": self.response_format}) is not None

    def check(self, text: str) -> tuple[Any, list[str]]:
        """(parsed value, []) for a valid reply; (None, errors) for one to ask again about. Raises
        StructuredOutputError once STRUCTURED_RETRIES retries are used up."""
        self.made += 1
        try:
            return reply_parse(text, self.response_format), []
        except ReplyInvalid as invalid:
            if self.made > settings.STRUCTURED_RETRIES:
                raise StructuredOutputError(invalid.errors, attempts=self.made) from None
            return None, invalid.errors
