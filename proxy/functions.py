"""Client function calling: function definitions a client sends with a request (OpenAI's `tools` shape),
and the results it sends back.

Server-side tools (proxy.tools) run inside Turbo; a client's functions run in the client. A model's call
to one of them ends the turn with the call returned to the client (as OpenAI does), whose next request
carries `tool_results: [{"tool_call_id", "content"}]`. The checks here are shared by every front.
"""

import json
import re
from typing import Any

import jsonschema

from turbo_site.core.errors import Invalid
from turbo_site.core.text import unstorable_text

MAX_FUNCTIONS = 32  # client functions on one request, at most
MAX_FUNCTIONS_BYTES = 64 * 1024  # all their definitions as JSON, at most
MAX_DESCRIPTION_CHARS = 1024
MAX_TOOL_RESULTS = 64
MAX_TOOL_RESULT_CHARS = 16_000
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def _fail(where: str, message: str, code: str = "invalid_tools") -> Invalid:
    return Invalid(f"{where}: {message}", code=code)


def _json_value(value: Any, where: str, code: str) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError as exc:
            raise _fail(where, f"is not valid JSON ({exc})", code) from None
    return value


def client_functions_check(value: Any, *, reserved: set[str] | frozenset[str] = frozenset()) -> list[dict]:
    """A client's function definitions (a list, or its JSON text), as OpenAI `tools` entries
    `{"type": "function", "function": {"name", "description"?, "parameters"?, "strict"?}}`; the /ws RPC's flat
    `{name, description, parameters}` is accepted too. A name in `reserved` (the server's own tools), a
    duplicate, an invalid `parameters` schema, or more than MAX_FUNCTIONS / MAX_FUNCTIONS_BYTES is a 400
    `invalid_tools` naming the problem."""
    if value is None or value == "" or value == []:
        return []
    value = _json_value(value, "tools", "invalid_tools")
    if not isinstance(value, list):
        raise _fail("tools", "must be a list of function definitions")
    if problem := unstorable_text(value):
        raise _fail("tools", f"may not hold {problem}")
    if len(value) > MAX_FUNCTIONS:
        raise _fail("tools", f"at most {MAX_FUNCTIONS} functions")
    try:
        size = len(json.dumps(value, ensure_ascii=False).encode())
    except (TypeError, ValueError, RecursionError):
        raise _fail("tools", "must be plain JSON") from None
    if size > MAX_FUNCTIONS_BYTES:
        raise _fail("tools", f"the definitions may be at most {MAX_FUNCTIONS_BYTES} bytes as JSON (they have {size})")
    checked: list[dict] = []
    seen: set[str] = set()
    for index, definition in enumerate(value):
        where = f"tools[{index}]"
        if not isinstance(definition, dict):
            raise _fail(where, "must be an object")
        if "function" in definition or "type" in definition:
            if definition.get("type") != "function":
                raise _fail(f"{where}.type", "must be 'function'")
            function = definition.get("function")
            where = f"{where}.function"
            if not isinstance(function, dict):
                raise _fail(where, "must be an object with a name")
        else:
            function = definition
        extra = sorted(set(function) - {"name", "description", "parameters", "strict"})
        if extra:
            raise _fail(where, f"unknown field(s): {', '.join(extra)}")
        name = function.get("name")
        if not isinstance(name, str) or not NAME_PATTERN.match(name):
            raise _fail(f"{where}.name", "must be 1-64 letters, digits, underscores or dashes")
        if name in reserved:
            raise _fail(f"{where}.name", f"{name!r} is the name of a server-side tool; name your function otherwise")
        if name in seen:
            raise _fail(f"{where}.name", f"{name!r} is defined twice")
        seen.add(name)
        entry: dict[str, Any] = {"name": name}
        description = function.get("description")
        if description is not None:
            if not isinstance(description, str) or len(description) > MAX_DESCRIPTION_CHARS:
                raise _fail(f"{where}.description", f"must be text of at most {MAX_DESCRIPTION_CHARS} characters")
            entry["description"] = description
        parameters = function.get("parameters")
        if parameters is not None:
            if not isinstance(parameters, dict):
                raise _fail(f"{where}.parameters", "must be a JSON Schema object")
            try:
                jsonschema.validators.validator_for(parameters, default=jsonschema.Draft202012Validator).check_schema(
                    parameters
                )
            except jsonschema.SchemaError as exc:
                at = exc.json_path.replace("$", f"{where}.parameters", 1)
                raise Invalid(f"{at} is not valid JSON Schema: {exc.message[:300]}", code="invalid_tools") from None
            entry["parameters"] = parameters
        if function.get("strict") is not None:
            if not isinstance(function["strict"], bool):
                raise _fail(f"{where}.strict", "must be true or false")
            entry["strict"] = function["strict"]
        checked.append({"type": "function", "function": entry})
    return checked


def function_names(definitions: list[dict]) -> frozenset[str]:
    """The names of checked client function definitions."""
    return frozenset(definition["function"]["name"] for definition in definitions)


def tool_results_check(value: Any) -> list[dict]:
    """The results a client sends for its functions' calls: `[{"tool_call_id", "content"}]` (content:
    text, or any JSON value, sent to the model as its JSON text). 400 `invalid_tool_results` otherwise."""
    code = "invalid_tool_results"
    value = _json_value(value, "tool_results", code)
    if not isinstance(value, list) or not value:
        raise _fail("tool_results", "must be a non-empty list of {tool_call_id, content}", code)
    if problem := unstorable_text(value):  # kept as the tool messages' text
        raise _fail("tool_results", f"may not hold {problem}", code)
    if len(value) > MAX_TOOL_RESULTS:
        raise _fail("tool_results", f"at most {MAX_TOOL_RESULTS} results", code)
    checked: list[dict] = []
    seen: set[str] = set()
    for index, result in enumerate(value):
        where = f"tool_results[{index}]"
        if not isinstance(result, dict):
            raise _fail(where, "must be an object with tool_call_id and content", code)
        extra = sorted(set(result) - {"tool_call_id", "content", "is_error"})
        if extra:
            raise _fail(where, f"unknown field(s): {', '.join(extra)}", code)
        call_id = result.get("tool_call_id")
        if not isinstance(call_id, str) or not 1 <= len(call_id) <= 200:
            raise _fail(f"{where}.tool_call_id", "must be the id of the tool call (1-200 characters)", code)
        if call_id in seen:
            raise _fail(f"{where}.tool_call_id", f"{call_id!r} is answered twice", code)
        seen.add(call_id)
        if "content" not in result:
            raise _fail(f"{where}.content", "this field is required", code)
        content = result["content"]
        if not isinstance(content, str):
            content = json.dumps(content, ensure_ascii=False)
        if len(content) > MAX_TOOL_RESULT_CHARS:
            raise _fail(f"{where}.content", f"may be at most {MAX_TOOL_RESULT_CHARS} characters", code)
        is_error = result.get("is_error", False)
        if not isinstance(is_error, bool):
            raise _fail(f"{where}.is_error", "must be true or false", code)
        checked.append({"tool_call_id": call_id, "content": content, "is_error": is_error})
    return checked
