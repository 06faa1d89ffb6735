"""/v1/* through Turbo (served in process; the live server for a stream read as it comes) to a real fake
upstream, with httpx and the openai SDK."""

import json

import httpx
import openai
import pytest

from proxy.events import events_flush
from proxy.models import Event
from testing.inprocess import ORIGIN, in_process_client

pytestmark = pytest.mark.django_db

SERVER_KEY = "sk-server-side-key"


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def account(signup):
    token, user, _ = signup()
    return token, user


@pytest.fixture
def token(account):
    return account[0]


def proxy_events(account):
    events_flush()
    return Event.objects.filter(type="proxy", user_id=account[1]["id"])


@pytest.fixture
def sdk(token):
    return openai.OpenAI(base_url=ORIGIN + "/v1", api_key=token, max_retries=0, http_client=in_process_client())


def test_models_list_with_the_sdk_and_the_server_key_only(sdk, upstream, token):
    models = sdk.models.list()
    assert [m.id for m in models.data] == ["gpt-4o-mini", "gpt-4o"]
    seen = upstream.requests[-1]
    assert (seen.method, seen.path) == ("GET", "/v1/models")
    assert seen.headers["authorization"] == f"Bearer {SERVER_KEY}"
    assert token not in json.dumps(seen.headers)


def test_client_credentials_and_cookies_never_reach_upstream(client, upstream, token):
    response = client.get(
        "/v1/models",
        headers={**bearer(token), "Cookie": f"sess={token}; other=1", "X-Forwarded-For": "1.2.3.4"},
    )
    assert response.status_code == 200
    headers = upstream.requests[-1].headers
    assert headers["authorization"] == f"Bearer {SERVER_KEY}"
    assert "cookie" not in headers and "x-forwarded-for" not in headers
    assert token not in json.dumps(headers)


def test_openai_headers_are_forwarded_and_upstream_headers_returned(client, upstream, token):
    response = client.get(
        "/v1/models",
        headers={
            **bearer(token),
            "OpenAI-Beta": "assistants=v2",
            "Idempotency-Key": "k1",
        },
    )
    seen = upstream.requests[-1].headers
    assert (seen["openai-beta"], seen["idempotency-key"]) == ("assistants=v2", "k1")
    assert response.headers["x-request-id"].startswith("req_")
    assert response.headers["x-ratelimit-remaining-requests"] == "99"
    assert response.headers["openai-processing-ms"] == "1"
    assert float(response.headers["x-turbo-overhead-ms"]) >= 0


def test_query_string_is_kept_and_no_double_v1(client, upstream, token, settings):
    for base in (upstream.url + "/v1", upstream.url + "/v1/", upstream.url):
        settings.OPENAI_API_URL = base
        client.get("/v1/models?limit=2&order=desc", headers=bearer(token))
        seen = upstream.requests[-1]
        assert seen.path == "/v1/models"
        assert seen.query == "limit=2&order=desc"


def test_chat_completion_with_the_sdk_and_usage_in_the_log(sdk, upstream, account):
    completion = sdk.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "echo: hi there"}]
    )
    assert completion.choices[0].message.content == "hi there"
    body = json.loads(upstream.requests[-1].body)
    assert body["messages"][0]["content"] == "echo: hi there"
    event = proxy_events(account).get(path="/v1/chat/completions")
    assert event.model == "gpt-4o-mini"
    assert event.status == 200
    assert event.total_tokens == completion.usage.total_tokens
    assert event.prompt_tokens == completion.usage.prompt_tokens


def test_streamed_chat_with_the_sdk_and_usage_from_the_final_chunk(sdk, upstream, account):
    chunks = sdk.chat.completions.create(
        model="gpt-4o",
        messages=[{"role": "user", "content": "echo: one two three four"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "one two three four"
    event = proxy_events(account).get(path="/v1/chat/completions")
    assert event.model == "gpt-4o"
    assert event.completion_tokens == 4


@pytest.mark.django_db(transaction=True)  # read as it comes: over the live server's socket
def test_stream_chunks_arrive_before_the_upstream_finishes(client, upstream, token):
    body = {"model": "gpt-4o", "stream": True, "messages": [{"role": "user", "content": "echo: first second third"}]}
    with client.stream(
        "POST", "/v1/chat/completions", json=body, headers={**bearer(token), "x-fake-scenario": "gated"}
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = response.iter_lines()
        received = []
        for line in lines:
            if line.startswith("data:") and "first" in line:
                received.append(line)
                break
        # The upstream holds the rest back until release(): what we have came through unbuffered.
        assert received
        upstream.release()
        rest = [line for line in lines if line.startswith("data:")]
    assert rest[-1] == "data: [DONE]"
    assert any("third" in line for line in rest)


def test_embeddings_with_the_sdk(sdk, upstream):
    result = sdk.embeddings.create(model="text-embedding-3-small", input=["a", "b"])
    assert len(result.data) == 2
    assert len(result.data[0].embedding) == 8
    assert upstream.requests[-1].path == "/v1/embeddings"


def test_multipart_upload_passes_through_unchanged(client, upstream, token, settings):
    settings.PROXY_ALLOWED_PATHS = ["files"]
    payload = bytes(range(256)) * 40
    response = client.post(
        "/v1/files", headers=bearer(token), data={"purpose": "fine-tune"}, files={"file": ("data.jsonl", payload)}
    )
    assert response.status_code == 200, response.text
    assert response.json()["bytes"] == len(payload)
    assert response.json()["filename"] == "data.jsonl"
    seen = upstream.requests[-1]
    assert seen.headers["content-type"].startswith("multipart/form-data; boundary=")
    assert payload in seen.body


@pytest.mark.parametrize("scenario, status", [("error_400", 400), ("error_429", 429), ("error_500", 500)])
def test_upstream_errors_pass_through_with_status_body_and_headers(client, upstream, account, scenario, status):
    token = account[0]
    response = client.get("/v1/models", headers={**bearer(token), "x-fake-scenario": scenario})
    assert response.status_code == status
    assert response.json()["error"]["message"]
    if status == 429:
        assert response.headers["retry-after"] == "7"
    assert proxy_events(account).get().status == status


def test_sdk_raises_the_upstream_error(sdk, upstream):
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "x"}], metadata={"scenario": "error_400"}
        )
    assert caught.value.status_code == 400


def test_upstream_down_is_502(client, token, settings):
    settings.OPENAI_API_URL = "http://127.0.0.1:9/v1"
    response = client.get("/v1/models", headers=bearer(token))
    assert response.status_code == 502
    error = response.json()["error"]
    assert error["code"] == "upstream_unreachable" and error["type"] == "server_error"


def test_upstream_slow_is_504(client, upstream, token, settings):
    settings.PROXY_READ_TIMEOUT = 1
    response = client.get("/v1/models", headers={**bearer(token), "x-fake-scenario": "slow", "x-fake-delay": "3"})
    assert response.status_code == 504
    assert response.json()["error"]["code"] == "upstream_timeout"


def test_no_upstream_configured_is_503_naming_the_variable(client, token, settings):
    settings.OPENAI_API_URL = ""
    response = client.get("/v1/models", headers=bearer(token))
    assert response.status_code == 503
    assert "OPENAI_API_URL" in response.json()["error"]["message"]
    settings.OPENAI_API_URL = "https://api.openai.com/v1"
    settings.OPENAI_API_KEY = ""
    response = client.get("/v1/models", headers=bearer(token))
    assert response.status_code == 503
    assert "OPENAI_API_KEY" in response.json()["error"]["message"]


@pytest.mark.django_db(transaction=True)  # a hang-up mid-stream: over the live server's socket
def test_client_disconnect_cancels_the_upstream_request(turbo_server, upstream, token):
    body = {"model": "gpt-4o", "stream": True, "messages": [{"role": "user", "content": "echo: a b c"}]}
    with httpx.Client(base_url=turbo_server.url, timeout=10) as http:
        with http.stream(
            "POST", "/v1/chat/completions", json=body, headers={**bearer(token), "x-fake-scenario": "stall"}
        ) as response:
            next(response.iter_raw())  # the first chunk arrived; now hang up
    assert upstream.wait_for_abort(timeout=10)


def test_fault_mid_stream_ends_with_an_sse_error_event(client, upstream, account):
    token = account[0]
    body = {"model": "gpt-4o", "stream": True, "messages": [{"role": "user", "content": "echo: a b c d e"}]}
    with client.stream(
        "POST", "/v1/chat/completions", json=body, headers={**bearer(token), "x-fake-scenario": "die_mid_stream"}
    ) as response:
        text = response.read().decode()
    assert "event: error" in text
    last = [line for line in text.splitlines() if line.startswith("data:")][-1]
    assert json.loads(last[5:])["error"]["code"] == "upstream_stream_error"
    assert proxy_events(account).get().status == 502


def test_missing_or_bad_token_is_401_in_openai_shape(client, upstream):
    for headers in ({}, bearer("nope")):
        response = client.get("/v1/models", headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["type"] == "invalid_request_error"
    assert upstream.requests == []


def test_body_over_the_proxy_limit_is_413(client, upstream, token, settings):
    settings.PROXY_MAX_BODY_BYTES = 1000
    response = client.post("/v1/chat/completions", headers=bearer(token), content=b"x" * 2000)
    assert response.status_code == 413
    assert upstream.requests == []


def test_proxy_limit_is_larger_than_the_api_limit(client, upstream, token, settings):
    settings.MAX_BODY_BYTES = 1000
    settings.PROXY_ALLOWED_PATHS = ["files"]
    response = client.post(
        "/v1/files", headers=bearer(token), files={"file": ("a.bin", b"y" * 5000)}, data={"purpose": "x"}
    )
    assert response.status_code == 200


def test_dot_segments_are_refused(client, upstream, token):
    response = client.get("/v1/%2e%2e/admin", headers=bearer(token))
    assert response.status_code == 400
    assert upstream.requests == []


def test_azure_gets_an_api_key_header_others_a_bearer(settings):
    from proxy.gateway import gateway_config

    settings.OPENAI_API_KEY = SERVER_KEY
    settings.OPENAI_API_URL = "https://example.openai.azure.com/openai/v1"
    assert gateway_config().upstreams[0].auth_headers() == {"api-key": SERVER_KEY}
    settings.OPENAI_API_URL = "https://api.openai.com/v1"
    assert gateway_config().upstreams[0].auth_headers() == {"Authorization": f"Bearer {SERVER_KEY}"}


def test_the_response_is_not_delayed_by_logging(client, upstream, account, paused_event_writer):
    client.get("/v1/models", headers=bearer(account[0]))
    assert not Event.objects.filter(type="proxy", user_id=account[1]["id"]).exists()  # queued, not yet written
    assert proxy_events(account).count() == 1
