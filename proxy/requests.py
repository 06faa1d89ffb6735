"""What a model call asks for, read once, whichever front it came through.

- `/v1` (`v1_request_read`): the passthrough forwards a client's bytes untouched, but its policy (the
  models a key or group may use, rate limits, budgets) must know the model first. So a POST to a path
  that calls a model (`MODEL_PATHS`) is read here whatever its Content-Type says: any JSON-looking or
  unlabelled body as JSON (up to the proxy's body limit), a `multipart/form-data` body (audio
  transcriptions, image edits) by its `model` field. A call whose model cannot be read is refused
  (`RequestUnreadable`), never forwarded unchecked; where OpenAI's API has a default model
  (moderations, images) a body without one is governed as that default.
- `/ws`, GraphQL and gRPC (`chat_request_read`, `embedding_request_read`): the gateway's body for a
  chat completion or an embedding, with one set of limits (messages, roles, model name, max_tokens,
  temperature, tools, response_format); each front only names where its fields sit.
- Chat prompts on every front: how many earlier exchanges go along (`context_size`).
"""

import json
from dataclasses import dataclass

from proxy.forms import FORM_FIELDS, form_fields, media_type_of  # noqa: F401 (FORM_FIELDS: named here too)
from turbo_site.core.errors import Invalid
from turbo_site.core.parsers import JSONTooDeep, client_json_loads

# The /v1 paths (after /v1/, POST) that call a model, and so cost money.
MODEL_PATHS = frozenset(
    {
        "chat/completions",
        "completions",
        "responses",
        "embeddings",
        "images/generations",
        "images/edits",
        "images/variations",
        "audio/speech",
        "audio/transcriptions",
        "audio/translations",
        "moderations",
    }
)
# The model OpenAI's API uses when a body names none; a path not listed here requires `model`.
DEFAULT_MODELS = {
    "moderations": "omni-moderation-latest",
    "images/generations": "dall-e-2",
    "images/edits": "dall-e-2",
    "images/variations": "dall-e-2",
}
# A model's name, on any front (names an upstream serves, such as a repository path, can be long).
MODEL_MAX_CHARS = 200


class RequestUnreadable(Invalid):
    """A model call whose body policy cannot read: 400, refused before the upstream."""


@dataclass(slots=True)
class ModelRequest:
    """A `/v1` request as policy reads it: the body as a JSON object (None: not JSON, or not read) and
    the public model it asks for ("" for a path that calls no model); `form`: a multipart body's text
    fields (`FORM_FIELDS`)."""

    payload: dict | None
    model: str
    form: dict[str, str] | None = None


def model_path(path: str, method: str) -> str | None:
    """The model-calling path `path` (after /v1/) stands for, or None if this call is not one."""
    path = path.strip("/")
    return path if method == "POST" and path in MODEL_PATHS else None


def _is_json_type(media_type: str) -> bool:
    return media_type == "application/json" or media_type.endswith("+json")


def _json_object(body: bytes) -> dict | None:
    """`body` as a JSON object, or None; JSONTooDeep goes on (refused: no upstream wants it either)."""
    try:
        data = client_json_loads(body)
    except JSONTooDeep:
        raise
    except (ValueError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _has_duplicate_model(body: bytes) -> bool:
    """Does the top-level object name `model` twice? Parsers disagree on which one counts (Python's
    takes the last, others the first), so such a body could pass policy as one model and be served as
    another. Only a body that could hide a second `model` is parsed again."""
    if body.count(b'"model"') < 2 and b"\\u" not in body:
        return False
    repeated = []

    def pairs(items):
        keys = [key for key, _ in items]
        repeated.append(keys.count("model") > 1)
        return dict(items)

    try:
        json.loads(body, object_pairs_hook=pairs)
    except (ValueError, UnicodeDecodeError):
        return False
    return bool(repeated) and repeated[-1]  # the outermost object closes last


def v1_request_read(path: str, method: str, body: bytes, content_type: str) -> ModelRequest:
    """What a `/v1` request asks for. A model call (`model_path`) must name a model policy can read,
    whatever its Content-Type, or it raises RequestUnreadable; any other request is read as JSON when
    it says it is JSON, for the log. Raises JSONTooDeep for JSON nested too deep to parse."""
    called = model_path(path, method)
    media_type, _ = media_type_of(content_type)
    if called is None:
        payload = _json_object(body) if body and _is_json_type(media_type) else None
        model = payload.get("model") if payload is not None else None
        return ModelRequest(payload, model if isinstance(model, str) else "")
    if media_type == "multipart/form-data":
        form = form_fields(body, content_type)
        if form is None:
            raise RequestUnreadable(
                "the multipart form could not be read (or names a field twice)", code="malformed_body"
            )
        return ModelRequest(None, _model_named(form.get("model"), called), form)
    payload = _json_object(body) if body else None
    if payload is None:
        raise RequestUnreadable(f"/v1/{called} takes a JSON object body", code="invalid_json")
    if _has_duplicate_model(body):
        raise RequestUnreadable("the body names `model` more than once", code="invalid")
    return ModelRequest(payload, _model_named(payload.get("model"), called))


def _model_named(value: object, called: str) -> str:
    try:
        name = model_name_read(value, "`model`")
    except Invalid as exc:
        raise RequestUnreadable(exc.message, code="invalid") from None
    if name is None:
        if called in DEFAULT_MODELS:
            return DEFAULT_MODELS[called]
        raise RequestUnreadable(f"/v1/{called} needs a `model`", code="invalid")
    return name


# --- a chat completion or an embedding, as /ws, GraphQL and gRPC take one ------------------------------

# The limits of a model call's fields, the same on every front (a front may offer fewer fields).
ROLES = ("system", "user", "assistant", "tool", "developer")
MESSAGES_MAX = 1000
MESSAGE_NAME_MAX_CHARS = 64
TOOL_CALL_ID_MAX_CHARS = 200
TOOLS_MAX = 128
DEFAULT_EMBEDDING_MODEL = "text-embedding-3-small"
TEMPERATURE_RANGE = (0.0, 2.0)
MAX_TOKENS_MIN = 1
MAX_TOKENS_MAX = 1_000_000


def _whole_number(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _message_read(message: object, where: str) -> dict:
    if not isinstance(message, dict):
        raise Invalid(f"{where}: must be an object with a role and content")
    role = message.get("role")
    if role not in ROLES:
        raise Invalid(f"{where}.role: one of {', '.join(ROLES)}, not {str(role)[:40]!r}")
    entry = {"role": role, "content": message.get("content")}
    name = message.get("name")
    if name is not None:
        if not isinstance(name, str) or not 0 < len(name) <= MESSAGE_NAME_MAX_CHARS:
            raise Invalid(f"{where}.name: 1 to {MESSAGE_NAME_MAX_CHARS} characters")
        entry["name"] = name
    tool_calls = message.get("tool_calls")
    if tool_calls is not None:
        if not isinstance(tool_calls, list) or not all(isinstance(call, dict) for call in tool_calls):
            raise Invalid(f"{where}.tool_calls: must be a list of objects")
        entry["tool_calls"] = tool_calls
    tool_call_id = message.get("tool_call_id")
    if tool_call_id is not None:
        if not isinstance(tool_call_id, str) or not 0 < len(tool_call_id) <= TOOL_CALL_ID_MAX_CHARS:
            raise Invalid(f"{where}.tool_call_id: 1 to {TOOL_CALL_ID_MAX_CHARS} characters")
        entry["tool_call_id"] = tool_call_id
    elif role == "tool":
        raise Invalid(f"{where}.tool_call_id: a tool message answers a tool call: name its id")
    return entry


def model_name_read(value: object, where: str = "model") -> str | None:
    """A model name a request gives (None or "": the front's default)."""
    if value is None or value == "":
        return None
    if not isinstance(value, str) or len(value) > MODEL_MAX_CHARS:
        raise Invalid(f"{where}: a model name of at most {MODEL_MAX_CHARS} characters")
    return value


def chat_request_read(fields: dict, *, prefix: str = "", default_model: str) -> dict:
    """The gateway's chat completion body for a front's request `fields` (messages, model, max_tokens,
    temperature, tools, tool_choice, response_format; the rest are not taken). Raises Invalid naming the
    field (after `prefix`, the front's name for where the fields sit), or ResponseFormatInvalid."""
    from proxy.structured import response_format_check
    from proxy.tools import tool_to_openai

    messages = fields.get("messages")
    if not isinstance(messages, list) or not 0 < len(messages) <= MESSAGES_MAX:
        raise Invalid(f"{prefix}messages: a list of 1 to {MESSAGES_MAX} messages")
    request: dict = {
        "messages": [_message_read(message, f"{prefix}messages[{index}]") for index, message in enumerate(messages)],
        "model": model_name_read(fields.get("model"), f"{prefix}model") or default_model,
    }
    max_tokens = fields.get("max_tokens")
    if max_tokens is not None:
        if not _whole_number(max_tokens) or not MAX_TOKENS_MIN <= max_tokens <= MAX_TOKENS_MAX:
            raise Invalid(f"{prefix}max_tokens: a whole number from {MAX_TOKENS_MIN} to {MAX_TOKENS_MAX}")
        request["max_tokens"] = max_tokens
    temperature = fields.get("temperature")
    if temperature is not None:
        low, high = TEMPERATURE_RANGE
        if not isinstance(temperature, int | float) or isinstance(temperature, bool) or not low <= temperature <= high:
            raise Invalid(f"{prefix}temperature: a number from {low:g} to {high:g}")
        request["temperature"] = temperature
    tools = fields.get("tools")
    if tools is not None:
        if not isinstance(tools, list) or len(tools) > TOOLS_MAX or not all(isinstance(tool, dict) for tool in tools):
            raise Invalid(f"{prefix}tools: a list of at most {TOOLS_MAX} tool objects")
        request["tools"] = [tool_to_openai(tool) for tool in tools]
    if fields.get("tool_choice") is not None:
        request["tool_choice"] = fields["tool_choice"]
    response_format = response_format_check(fields.get("response_format"))
    if response_format is not None:
        request["response_format"] = response_format
    return request


def embedding_request_read(fields: dict, *, prefix: str = "", default_model: str = DEFAULT_EMBEDDING_MODEL) -> dict:
    """The gateway's embeddings body for a front's request `fields` (input, model). Raises Invalid."""
    texts = fields.get("input")
    if not (isinstance(texts, str) or (isinstance(texts, list) and texts and all(isinstance(t, str) for t in texts))):
        raise Invalid(f"{prefix}input: a string or a non-empty list of strings")
    return {"model": model_name_read(fields.get("model"), f"{prefix}model") or default_model, "input": texts}


def context_size(asked: int | None) -> int:
    """How many earlier exchanges a chat prompt sends: `asked` (None: DEFAULT_CONTEXT), within 0 to
    MAX_CONTEXT. Every front's `context` goes through here."""
    from django.conf import settings

    size = settings.DEFAULT_CONTEXT if asked is None else asked
    return max(0, min(size, settings.MAX_CONTEXT))
