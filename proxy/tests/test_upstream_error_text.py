"""/ws error frames carry an upstream's error text with keys taken out."""

import json

import pytest
from websockets.sync.client import connect

from conftest import SERVER_KEY

pytestmark = pytest.mark.django_db(transaction=True)


def test_a_key_the_upstream_quotes_is_redacted_from_the_ws_error_frame(turbo_server, signup, upstream):
    token, _, _ = signup()
    with connect(f"ws://127.0.0.1:{turbo_server.port}/ws?token={token}", open_timeout=10) as ws:
        payload = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "[scenario:error_401_echo] hi"}]}
        ws.send(json.dumps({"type": "chat_completion", "request_id": "k1", "payload": payload}))
        frame = json.loads(ws.recv(timeout=15))
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
