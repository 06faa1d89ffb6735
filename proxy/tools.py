"""Server-side tools the model may call: a registry that app code extends, and three built-ins.

    from proxy.tools import tool

    @tool(
        name="lookup_order",
        description="Find an order by its number",
        parameters={"type": "object", "properties": {"number": {"type": "integer"}}, "required": ["number"]},
    )
    async def lookup_order(arguments: dict) -> str:
        return f"order {arguments['number']} has shipped"

Arguments are validated against the JSON Schema before a tool runs; any failure comes back as
`{"tool_call_id", "content", "is_error": true}`, never as an exception.
"""

import ast
import asyncio
import json
import logging
import math
import operator
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import jsonschema

from turbo_site.core.parsers import client_json_loads

logger = logging.getLogger("turbo.tools")

TOOL_TIMEOUT_SECONDS = 10
MAX_RESULT_CHARS = 16_000


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict
    execute: Callable[[dict], Awaitable[Any]]

    def definition(self) -> dict:
        return {"name": self.name, "description": self.description, "parameters": self.parameters}

    def openai_definition(self) -> dict:
        return {"type": "function", "function": self.definition()}


_registry: dict[str, Tool] = {}


def register(new_tool: Tool) -> Tool:
    """Add a tool (its schema is checked now, so a broken one fails at import, not at call time)."""
    jsonschema.Draft202012Validator.check_schema(new_tool.parameters)
    _registry[new_tool.name] = new_tool
    return new_tool


def tool(*, name: str, description: str, parameters: dict):
    """Decorator form of register() for an async function taking the arguments dict."""

    def decorate(function: Callable[[dict], Awaitable[Any]]):
        register(Tool(name=name, description=description, parameters=parameters, execute=function))
        return function

    return decorate


def tools_list() -> list[dict]:
    return [registered.definition() for registered in _registry.values()]


def tool_names() -> set[str]:
    return set(_registry)


def openai_tools(names: list[str]) -> list[dict]:
    """The `tools` request field for these registered tools."""
    return [_registry[name].openai_definition() for name in names if name in _registry]


def tool_to_openai(definition: dict) -> dict:
    """A client-supplied tool in OpenAI's shape: the /ws RPC's flat `{name, description, parameters}` becomes
    `{"type": "function", "function": {...}}`; a tool already in OpenAI's shape (it has `type`) is kept."""
    if "type" in definition or "function" in definition or "name" not in definition:
        return definition
    return {"type": "function", "function": dict(definition)}


def _result(call_id: str, content: Any, *, is_error: bool = False) -> dict:
    if not isinstance(content, str):
        content = json.dumps(content, ensure_ascii=False, default=str)
    if len(content) > MAX_RESULT_CHARS:
        content = content[:MAX_RESULT_CHARS] + "…[truncated]"
    result = {"tool_call_id": call_id, "content": content}
    if is_error:
        result["is_error"] = True
    return result


async def tool_execute(tool_call: dict) -> dict:
    """Run one OpenAI-shaped tool call `{id, type: "function", function: {name, arguments}}`."""
    call_id = str(tool_call.get("id") or "")
    function = tool_call.get("function") if isinstance(tool_call.get("function"), dict) else {}
    name = function.get("name")
    found = _registry.get(name) if isinstance(name, str) else None
    if found is None:
        return _result(call_id, f"unknown tool {name!r}", is_error=True)
    raw = function.get("arguments") or "{}"
    try:
        arguments = client_json_loads(raw) if isinstance(raw, str) else raw
    except ValueError:
        return _result(call_id, "arguments are not valid JSON", is_error=True)
    if not isinstance(arguments, dict):
        return _result(call_id, "arguments must be a JSON object", is_error=True)
    try:
        jsonschema.validate(arguments, found.parameters, cls=jsonschema.Draft202012Validator)
    except jsonschema.ValidationError as exc:
        where = "/".join(str(part) for part in exc.absolute_path) or "arguments"
        return _result(call_id, f"invalid arguments: {where}: {exc.message}", is_error=True)
    try:
        content = await asyncio.wait_for(found.execute(arguments), TOOL_TIMEOUT_SECONDS)
    except TimeoutError:
        return _result(call_id, f"tool {name} timed out", is_error=True)
    except ToolError as exc:
        return _result(call_id, str(exc), is_error=True)
    except Exception:
        logger.exception("tool %s failed", name)
        return _result(call_id, f"tool {name} failed", is_error=True)
    return _result(call_id, content)


class ToolError(Exception):
    """Raised by a tool for a failure the model should read (bad input it could fix)."""


# --- built-in tools -------------------------------------------------------------------------------


@tool(
    name="get_current_time",
    description="The current date and time, in an IANA time zone (default UTC).",
    parameters={
        "type": "object",
        "properties": {"timezone": {"type": "string", "description": "e.g. Europe/Madrid", "maxLength": 64}},
        "additionalProperties": False,
    },
)
async def get_current_time(arguments: dict) -> dict:
    zone_name = arguments.get("timezone") or "UTC"
    try:
        zone = ZoneInfo(zone_name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ToolError(f"unknown time zone {zone_name!r}") from exc
    now = datetime.now(UTC).astimezone(zone)
    return {"timezone": zone_name, "iso": now.isoformat(), "weekday": now.strftime("%A")}


_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
MAX_EXPRESSION_CHARS = 200
MAX_MAGNITUDE = 1e100


def calculate(expression: str) -> float | int:
    """Arithmetic on numbers with + - * / // % ** and parentheses, by walking the syntax tree (no eval)."""
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ToolError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expression, mode="eval")
    except SyntaxError as exc:
        raise ToolError("not an arithmetic expression") from exc

    def walk(node: ast.AST) -> float | int:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _UNARY[type(node.op)](walk(node.operand))
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            left, right = walk(node.left), walk(node.right)
            if isinstance(node.op, ast.Pow) and (abs(right) > 100 or abs(left) > 1e6):
                raise ToolError("exponent too large")
            try:
                value = _BINARY[type(node.op)](left, right)
            except ZeroDivisionError as exc:
                raise ToolError("division by zero") from exc
            if isinstance(value, complex) or (isinstance(value, float) and not math.isfinite(value)):
                raise ToolError("the result is not a real number")
            if abs(value) > MAX_MAGNITUDE:
                raise ToolError("the result is too large")
            return value
        raise ToolError(f"unsupported element: {type(node).__name__}")

    return walk(tree)


@tool(
    name="calculator",
    description="Evaluate an arithmetic expression: numbers, + - * / // % ** and parentheses.",
    parameters={
        "type": "object",
        "properties": {"expression": {"type": "string", "minLength": 1, "maxLength": MAX_EXPRESSION_CHARS}},
        "required": ["expression"],
        "additionalProperties": False,
    },
)
async def calculator(arguments: dict) -> dict:
    return {"expression": arguments["expression"], "result": calculate(arguments["expression"])}


@tool(
    name="get_weather",
    description="MOCK weather for a place: made-up but repeatable figures, for demos and tests only.",
    parameters={
        "type": "object",
        "properties": {
            "location": {"type": "string", "minLength": 1, "maxLength": 100},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        },
        "required": ["location"],
        "additionalProperties": False,
    },
)
async def get_weather(arguments: dict) -> dict:
    seed = sum(ord(ch) for ch in arguments["location"].lower())
    celsius = seed % 35 - 5
    unit = arguments.get("unit", "celsius")
    temperature = celsius if unit == "celsius" else round(celsius * 9 / 5 + 32)
    conditions = ["sunny", "cloudy", "rainy", "windy", "snowy"][seed % 5]
    return {
        "location": arguments["location"],
        "temperature": temperature,
        "unit": unit,
        "conditions": conditions,
        "mock": True,
    }
