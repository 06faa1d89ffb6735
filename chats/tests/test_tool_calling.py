"""Tool calling in chats: the model asks for a tool, Turbo runs it, feeds the result back, stores it all."""

import json
import signal

import httpx
import pytest
from websockets.sync.client import connect

from chats.models import Message
from chats.tests.processes import wait_for
from conftest import SERVER_KEY, run_python

pytestmark = pytest.mark.django_db


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def tool_chat(client, signup):
    token, _, _ = signup()
    chat = client.post(
        "/chat/create", json={"name": "tools", "tools": ["calculator", "get_weather"]}, headers=bearer(token)
    )
    assert chat.status_code == 200, chat.text
    assert chat.json()["tools"] == ["calculator", "get_weather"]
    return token, chat.json()


def test_tool_round_trip_ends_in_a_stored_answer(client, tool_chat, upstream):
    token, chat = tool_chat
    response = client.post(
        "/chat/prompt", data={"id": chat["id"], "prompt": "[scenario:tool_call] what is 2+2?"}, headers=bearer(token)
    )
    assert response.status_code == 200, response.text
    message = response.json()["message"]
    (record,) = message["tool_calls"]
    assert (record["name"], record["id"], record["is_error"]) == ("calculator", "call_1", False)
    assert json.loads(record["result"])["result"] == 4
    assert message["reply"].startswith("Tool said:") and '"result": 4' in message["reply"]
    first, second = [json.loads(r.body) for r in upstream.requests if r.path == "/v1/chat/completions"]
    assert {t["function"]["name"] for t in first["tools"]} == {"calculator", "get_weather"}
    assert second["messages"][-2]["tool_calls"][0]["id"] == "call_1"
    assert second["messages"][-1] == {"role": "tool", "tool_call_id": "call_1", "content": record["result"]}
    read = client.get("/chat/read", params={"id": chat["id"]}, headers=bearer(token)).json()
    assert read["messages"][0]["tool_calls"] == message["tool_calls"]


@pytest.mark.django_db(transaction=True)  # a WebSocket member reads the streamed reply
def test_streamed_tool_round_trip_shows_the_calls_on_the_stream(client, turbo_server, tool_chat, upstream):
    token, chat = tool_chat
    with connect(f"ws://127.0.0.1:{turbo_server.port}/chat/stream?id={chat['id']}&token={token}") as ws:
        client.post(
            "/chat/prompt",
            data={"id": chat["id"], "prompt": "[scenario:tool_call] compute", "stream": "true"},
            headers=bearer(token),
        )
        events = []
        while not events or events[-1]["partial"]:
            events.append(json.loads(ws.recv(timeout=15)))
    with_calls = [e for e in events if e["message"]["tool_calls"]]
    assert with_calls and with_calls[0]["message"]["tool_calls"][0]["name"] == "calculator"
    final = events[-1]["message"]
    assert final["status"] == "complete" and final["reply"].startswith("Tool said:")
    assert Message.objects.get(pk=final["id"]).tool_calls[0]["name"] == "calculator"


def test_a_tool_not_enabled_for_the_chat_is_refused_and_reported_to_the_model(client, signup, upstream):
    token, _, _ = signup()
    chat = client.post("/chat/create", json={"name": "w", "tools": ["get_weather"]}, headers=bearer(token)).json()
    # the fake model asks for `calculator`, which this chat did not enable
    message = client.post(
        "/chat/prompt", data={"id": chat["id"], "prompt": "[scenario:tool_call] sum"}, headers=bearer(token)
    ).json()["message"]
    (record,) = message["tool_calls"]
    assert record["is_error"] is True and "not enabled" in record["result"]
    assert message["status"] == "complete"
    assert "not enabled" in message["reply"]  # the model was told, and answered


def test_unknown_tool_names_are_a_400(client, signup):
    token, _, _ = signup()
    response = client.post("/chat/create", json={"name": "x", "tools": ["calculator", "rm_rf"]}, headers=bearer(token))
    assert response.status_code == 400
    assert "rm_rf" in response.json()["error"]["message"]
    chat = client.post("/chat/create", data={"name": "y", "tools": "calculator,get_weather"}, headers=bearer(token))
    assert chat.json()["tools"] == ["calculator", "get_weather"]


def test_shutdown_saves_a_running_generation_as_interrupted(cli_env, upstream):
    """SIGTERM: the generation gets SHUTDOWN_GRACE_SECONDS, then it is stopped and saved as interrupted."""
    from turbo_site.tests.test_health import start_turbo

    env = {
        **cli_env,
        "OPENAI_API_URL": upstream.url + "/v1",
        "OPENAI_API_KEY": SERVER_KEY,
        "SHUTDOWN_GRACE_SECONDS": "1",
    }
    turbo, url = start_turbo(env)
    try:
        with httpx.Client(base_url=url, timeout=20) as http:
            token = http.post("/user/signup", data={"username": "grace", "password": "correct-horse"}).json()["token"]
            chat = http.post("/chat/create", data={"name": "g"}, headers=bearer(token)).json()
            started = http.post(
                "/chat/prompt",
                data={"id": chat["id"], "prompt": "[scenario:stall] echo: never finishes", "stream": "true"},
                headers=bearer(token),
            ).json()["message"]
        # The generation is running once its model call reached the upstream (which stalls it there).
        wait_for(lambda: upstream.requests, 30, "the model call to reach the upstream")
    finally:
        turbo.send_signal(signal.SIGTERM)
        turbo.wait(timeout=30)
    saved = run_python(
        env,
        "import sys; from chats.models import Message; m = Message.objects.get(pk=sys.argv[1]); "
        "print(m.status, m.error)",
        started["id"],
    )
    assert saved.startswith("error interrupted")
