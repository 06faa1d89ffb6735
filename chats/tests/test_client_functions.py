"""Client function calling in chats: a prompt brings the client's own functions; the model's call to one
ends the turn with the call returned; the client's tool_results resume the same message."""

import json

import pytest
from websockets.sync.client import connect

from chats.models import Message

pytestmark = pytest.mark.django_db

LOOKUP_STOCK = {
    "type": "function",
    "function": {
        "name": "lookup_stock",
        "description": "How many of an item are in the client's warehouse",
        "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}},
    },
}
ASK = "[scenario:tool_call][tool:lookup_stock] how many widgets?"


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def chat(client, signup):
    token, _, _ = signup()
    created = client.post("/chat/create", json={"name": "fn", "tools": ["calculator"]}, headers=bearer(token))
    assert created.status_code == 200, created.text
    return token, created.json()


def completions(upstream) -> list[dict]:
    return [json.loads(r.body) for r in upstream.requests if r.path == "/v1/chat/completions"]


def prompt(client, token, chat, **fields):
    return client.post("/chat/prompt", json={"id": chat["id"], **fields}, headers=bearer(token))


def test_a_client_function_call_ends_the_turn_and_its_result_resumes_it(client, chat, upstream):
    token, chat = chat
    response = prompt(client, token, chat, prompt=ASK, tools=[LOOKUP_STOCK])
    assert response.status_code == 200, response.text
    waiting = response.json()["message"]
    assert waiting["status"] == "tool_calls"
    assert waiting["tool_calls"] == [
        {
            "id": "call_1",
            "name": "lookup_stock",
            "arguments": '{"expression": "2+2"}',
            "result": None,
            "is_error": False,
            "client": True,
        }
    ]
    (first,) = completions(upstream)
    assert [t["function"]["name"] for t in first["tools"]] == ["calculator", "lookup_stock"]

    resumed = prompt(
        client, token, chat, tool_results=[{"tool_call_id": "call_1", "content": "42 in stock"}], tools=[LOOKUP_STOCK]
    )
    assert resumed.status_code == 200, resumed.text
    message = resumed.json()["message"]
    assert message["id"] == waiting["id"] and message["status"] == "complete"
    assert message["reply"] == "Tool said: 42 in stock"
    assert message["tool_calls"][0]["result"] == "42 in stock"
    _, second = completions(upstream)
    assert second["messages"][-3] == {"role": "user", "content": ASK}
    assert second["messages"][-2]["role"] == "assistant"
    assert second["messages"][-2]["tool_calls"][0]["function"]["name"] == "lookup_stock"
    assert second["messages"][-1] == {"role": "tool", "tool_call_id": "call_1", "content": "42 in stock"}
    read = client.get("/chat/read", params={"id": chat["id"]}, headers=bearer(token)).json()
    assert [m["id"] for m in read["messages"]] == [waiting["id"]]
    assert read["messages"][0]["status"] == "complete"


# Transactional: the reply is generated after the streamed prompt's response, and read as it comes from the
# live server's WebSocket.
@pytest.mark.django_db(transaction=True)
def test_members_see_the_turn_end_with_the_call_on_the_stream(client, turbo_server, chat, upstream):
    token, chat = chat
    with connect(f"ws://127.0.0.1:{turbo_server.port}/chat/stream?id={chat['id']}&token={token}") as ws:
        prompt(client, token, chat, prompt=ASK, tools=[LOOKUP_STOCK], stream=True)
        events = []
        while not events or events[-1]["partial"]:
            events.append(json.loads(ws.recv(timeout=15)))
    final = events[-1]
    assert final["type"] == "message.completed" and final["message"]["status"] == "tool_calls"
    assert final["message"]["tool_calls"][0]["client"] is True


def test_results_for_calls_nobody_waits_on_are_refused_changing_nothing(client, chat, upstream):
    token, chat = chat
    waiting = prompt(client, token, chat, prompt=ASK, tools=[LOOKUP_STOCK]).json()["message"]
    unknown = prompt(client, token, chat, tool_results=[{"tool_call_id": "call_404", "content": "x"}])
    assert unknown.status_code == 400
    assert unknown.json()["error"]["code"] == "unknown_tool_call" and "call_404" in unknown.json()["error"]["message"]
    both = prompt(client, token, chat, prompt="hi", tool_results=[{"tool_call_id": "call_1", "content": "x"}])
    assert both.status_code == 400 and "either a prompt or tool_results" in both.json()["error"]["message"]
    stored = Message.objects.get(pk=waiting["id"])
    assert stored.status == "tool_calls" and stored.tool_calls[0]["result"] is None
    assert len(completions(upstream)) == 1


def test_bad_function_definitions_are_refused_storing_nothing(client, chat, upstream):
    token, chat = chat
    shadowing = {"type": "function", "function": {"name": "calculator", "parameters": {"type": "object"}}}
    response = prompt(client, token, chat, prompt="hi", tools=[shadowing])
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "invalid_tools" and "tools[0].function.name" in error["message"]
    assert "server-side tool" in error["message"]

    too_many = [{"type": "function", "function": {"name": f"f{n}"}} for n in range(33)]
    response = prompt(client, token, chat, prompt="hi", tools=too_many)
    assert response.status_code == 400 and "at most 32" in response.json()["error"]["message"]

    huge = [
        {
            "type": "function",
            "function": {
                "name": "big",
                "description": "x" * 1000,
                "parameters": {
                    "type": "object",
                    "properties": {f"p{n}": {"type": "string", "description": "y" * 1000} for n in range(70)},
                },
            },
        }
    ]
    response = prompt(client, token, chat, prompt="hi", tools=huge)
    assert response.status_code == 400 and "at most 65536 bytes" in response.json()["error"]["message"]

    bad_schema = [{"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}]
    response = prompt(client, token, chat, prompt="hi", tools=bad_schema)
    assert response.status_code == 400
    assert "tools[0].function.parameters.type is not valid JSON Schema" in response.json()["error"]["message"]

    assert not Message.objects.filter(chat_id=chat["id"]).exists()
    assert completions(upstream) == []


def test_built_in_tools_still_run_on_the_server_beside_client_functions(client, chat, upstream):
    token, chat = chat
    # the fake calls `calculator`, a server-side tool of this chat: it runs here and the turn goes on
    message = prompt(client, token, chat, prompt="[scenario:tool_call] sum", tools=[LOOKUP_STOCK]).json()["message"]
    assert message["status"] == "complete" and message["reply"].startswith("Tool said:")
    (record,) = message["tool_calls"]
    assert record["name"] == "calculator" and "client" not in record


def test_only_the_prompts_author_or_the_chats_owner_may_answer(client, chat, signup, upstream):
    token, chat = chat
    other_token, other, _ = signup()
    added = client.post("/chat/user/add", json={"chat_id": chat["id"], "user_id": other["id"]}, headers=bearer(token))
    assert added.status_code == 200, added.text
    waiting = prompt(client, token, chat, prompt=ASK, tools=[LOOKUP_STOCK]).json()["message"]
    refused = prompt(client, other_token, chat, tool_results=[{"tool_call_id": "call_1", "content": "x"}])
    assert refused.status_code == 403, refused.text
    assert Message.objects.get(pk=waiting["id"]).status == "tool_calls"
