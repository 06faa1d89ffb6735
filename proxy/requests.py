"""What a model call asks for, read once: which paths call a model, and the model a `/v1` body names.

The `/v1` passthrough forwards a client's bytes untouched, but its policy (the models a key or group may
use, rate limits, budgets) must know the model first. So a POST to a path that calls a model is read
here whatever its Content-Type says: any JSON-looking or unlabelled body as JSON (up to the proxy's body
limit), a `multipart/form-data` body (audio transcriptions, image edits) by its `model` field. A call
whose model cannot be read is refused (`RequestUnreadable`), never forwarded unchecked; where OpenAI's
API has a default model (moderations, images) a body without one is governed as that default.
"""

import json
import re
from dataclasses import dataclass
from email.message import Message
from email.utils import collapse_rfc2231_value

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
MODEL_NAME_MAX_CHARS = 200
# A multipart form's text fields that policy and pricing read (the files are left alone).
FORM_FIELDS = ("model", "n", "size", "quality")
_PART_END = re.compile(rb"\r?\n\r?\n")


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


def _media_type(content_type: str) -> tuple[str, Message]:
    header = Message()
    header["content-type"] = content_type or "application/octet-stream"
    return header.get_content_type(), header


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


def form_fields(body: bytes, content_type: str) -> dict[str, str] | None:
    """The text fields `FORM_FIELDS` of a `multipart/form-data` body (None: not a form one can read).
    A field given twice makes the form unreadable: policy and upstream might each take another."""
    _, header = _media_type(content_type)
    boundary = header.get_param("boundary")
    if not isinstance(boundary, str) or not boundary or len(boundary) > 200:
        return None
    # A delimiter starts a line (RFC 2046 5.1.1); text inside a file that merely contains it does not count.
    parts = re.split(rb"\r?\n--" + re.escape(boundary.encode("latin-1")), b"\r\n" + body)
    if len(parts) < 3:
        return None
    fields: dict[str, str] = {}
    for part in parts[1:-1]:
        split = _PART_END.search(part)
        if split is None:
            return None
        head = Message()
        for line in part[: split.start()].decode("latin-1").splitlines():
            name, colon, value = line.partition(":")
            if colon:
                head[name.strip()] = value.strip()
        name = head.get_param("name", header="content-disposition")
        if name is None:
            continue
        name = collapse_rfc2231_value(name).lower()
        if name not in FORM_FIELDS:
            continue
        if name in fields:
            return None
        try:
            fields[name] = part[split.end() :].decode("utf-8").strip()
        except UnicodeDecodeError:
            return None
    return fields


def v1_request_read(path: str, method: str, body: bytes, content_type: str) -> ModelRequest:
    """What a `/v1` request asks for. A model call (`model_path`) must name a model policy can read,
    whatever its Content-Type, or it raises RequestUnreadable; any other request is read as JSON when
    it says it is JSON, for the log. Raises JSONTooDeep for JSON nested too deep to parse."""
    called = model_path(path, method)
    media_type, _ = _media_type(content_type)
    if called is None:
        payload = _json_object(body) if body and _is_json_type(media_type) else None
        model = payload.get("model") if payload is not None else None
        return ModelRequest(payload, model if isinstance(model, str) else "")
    if media_type == "multipart/form-data":
        form = form_fields(body, content_type)
        if form is None:
            raise RequestUnreadable(
                "the multipart form could not be read (or names a field twice)", code="invalid_request_body"
            )
        return ModelRequest(None, _model_named(form.get("model"), called), form)
    payload = _json_object(body) if body else None
    if payload is None:
        raise RequestUnreadable(f"/v1/{called} takes a JSON object body", code="invalid_json")
    if _has_duplicate_model(body):
        raise RequestUnreadable("the body names `model` more than once", code="invalid_model")
    return ModelRequest(payload, _model_named(payload.get("model"), called))


def _model_named(value: object, called: str) -> str:
    if value is None or value == "":
        if called in DEFAULT_MODELS:
            return DEFAULT_MODELS[called]
        raise RequestUnreadable(f"/v1/{called} needs a `model`", code="model_required")
    if not isinstance(value, str) or len(value) > MODEL_NAME_MAX_CHARS:
        raise RequestUnreadable(
            f"`model` must be a model name of at most {MODEL_NAME_MAX_CHARS} characters", code="invalid_model"
        )
    return value
