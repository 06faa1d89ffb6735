"""The tool registry and the built-in tools (plain async calls: no server needed)."""

import asyncio
import json

import pytest

from proxy import tools


def run(call: dict) -> dict:
    return asyncio.run(tools.tool_execute(call))


def call(name: str, arguments) -> dict:
    raw = arguments if isinstance(arguments, str) else json.dumps(arguments)
    return {"id": "call_1", "type": "function", "function": {"name": name, "arguments": raw}}


@pytest.mark.parametrize(
    "expression, result",
    [("2+2", 4), ("(1 + 2) * 3 - 4 / 2", 7.0), ("-3 ** 2", -9), ("7 // 2 + 7 % 2", 4), ("2 ** 10", 1024)],
)
def test_calculator_does_arithmetic(expression, result):
    answer = run(call("calculator", {"expression": expression}))
    assert "is_error" not in answer
    assert json.loads(answer["content"])["result"] == result


@pytest.mark.parametrize(
    "expression",
    ["__import__('os').system('true')", "open('/etc/passwd')", "a + 1", "2 ** 10000", "1 / 0", "[1, 2]", "9" * 300],
)
def test_calculator_refuses_anything_but_arithmetic(expression):
    answer = run(call("calculator", {"expression": expression}))
    assert answer["is_error"] is True
    assert answer["tool_call_id"] == "call_1"


def test_current_time_in_a_zone_and_a_bad_zone():
    madrid = json.loads(run(call("get_current_time", {"timezone": "Europe/Madrid"}))["content"])
    assert madrid["timezone"] == "Europe/Madrid" and madrid["iso"][-6:] in ("+01:00", "+02:00")
    assert json.loads(run(call("get_current_time", {}))["content"])["iso"].endswith("+00:00")
    assert run(call("get_current_time", {"timezone": "Mars/Olympus"}))["is_error"] is True


def test_weather_is_a_labelled_deterministic_mock():
    first = json.loads(run(call("get_weather", {"location": "Madrid"}))["content"])
    again = json.loads(run(call("get_weather", {"location": "Madrid"}))["content"])
    assert first == again and first["mock"] is True
    assert "MOCK" in next(t for t in tools.tools_list() if t["name"] == "get_weather")["description"]


@pytest.mark.parametrize(
    "bad_call, fragment",
    [
        (call("calculator", "{not json"), "not valid JSON"),
        (call("calculator", {}), "expression"),
        (call("calculator", {"expression": 5}), "expression"),
        (call("get_weather", {"location": "x", "unit": "kelvin"}), "unit"),
        (call("no_such_tool", {}), "unknown tool"),
        (call("calculator", "[1]"), "JSON object"),
    ],
)
def test_bad_calls_come_back_as_errors_not_exceptions(bad_call, fragment):
    answer = run(bad_call)
    assert answer["is_error"] is True
    assert fragment in answer["content"]


def test_app_code_registers_a_tool_in_a_few_lines():
    @tools.tool(
        name="shout",
        description="Upper-cases text",
        parameters={"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]},
    )
    async def shout(arguments: dict) -> str:
        return arguments["text"].upper()

    try:
        assert "shout" in tools.tool_names()
        assert run(call("shout", {"text": "hi"}))["content"] == "HI"
        assert tools.openai_tools(["shout"])[0]["function"]["name"] == "shout"
    finally:
        tools._registry.pop("shout")


def test_a_broken_schema_is_refused_at_registration():
    import jsonschema

    with pytest.raises(jsonschema.SchemaError):
        tools.register(tools.Tool("broken", "x", {"type": "nonsense"}, execute=None))
