"""/ws error frames carry an upstream's error text with keys taken out."""

import pytest
from asgiref.sync import async_to_sync
from channels.testing import WebsocketCommunicator

from conftest import SERVER_KEY

pytestmark = pytest.mark.django_db


def test_a_key_the_upstream_quotes_is_redacted_from_the_ws_error_frame(signup, upstream):
    from turbo_site.asgi import application

    token, _, _ = signup()

    async def over_ws() -> dict:  # Channels' communicator: the app in process, on this test's connection
        ws = WebsocketCommunicator(application, f"/ws?token={token}")
        connected, _ = await ws.connect(timeout=10)
        assert connected
        payload = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "[scenario:error_401_echo] hi"}]}
        await ws.send_json_to({"type": "chat_completion", "request_id": "k1", "payload": payload})
        frame = await ws.receive_json_from(timeout=15)
        await ws.disconnect()
        return frame

    frame = async_to_sync(over_ws)()
    assert frame["type"] == "error" and frame["error"]["code"] == "upstream_error"
    assert upstream.requests[-1].headers["authorization"] == f"Bearer {SERVER_KEY}"
    assert "Incorrect API key provided: [redacted]" in frame["error"]["message"]
    assert "sk-" not in frame["error"]["message"]


@pytest.mark.parametrize("origin", [None, "http://127.0.0.1"], ids=["fast_path", "django"])
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_a_key_the_upstream_quotes_is_redacted_from_the_v1_error_body(client, signup, upstream, origin, stream):
    token, _, _ = signup()
    headers = {"Authorization": f"Bearer {token}", "x-fake-scenario": "error_401_echo"}
    if origin:
        headers["Origin"] = f"{client.base_url}".rstrip("/")
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    response = client.post("/v1/chat/completions", json=body, headers=headers)
    assert response.status_code == 401
    assert upstream.requests[-1].headers["authorization"] == f"Bearer {SERVER_KEY}"  # the upstream saw the key
    error = response.json()["error"]
    assert "Incorrect API key provided: [redacted]" in error["message"]
    assert SERVER_KEY not in response.text and "sk-" not in response.text
