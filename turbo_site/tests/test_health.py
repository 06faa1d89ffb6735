"""/health and /info: real requests, in process; the failure cases against a Turbo process whose Redis or database
is down."""

import shutil
import socket
import subprocess
import sys
import time

import httpx
import pytest

from conftest import PROJECT_ROOT

pytestmark = pytest.mark.django_db


def test_health_is_ok_without_auth(client, upstream):
    response = client.get("/health")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok"
    assert all(body["checks"][part]["ok"] for part in ("database", "cache", "channel_layer"))
    assert body["checks"]["upstream"] == {"configured": True}
    assert isinstance(body["websocket_clients"], int)


def test_health_counts_websocket_clients(client, signup):
    from channels.testing import WebsocketCommunicator

    from testing.inprocess import ORIGIN, run_in_process
    from turbo_site.asgi import application

    token, _, _ = signup()
    before = client.get("/health").json()["websocket_clients"]

    async def counted_while_connected() -> int:
        socket = WebsocketCommunicator(application, f"/ws?token={token}")
        connected, close_code = await socket.connect(timeout=10)
        assert connected, close_code
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=application), base_url=ORIGIN) as http:
                return (await http.get("/health")).json()["websocket_clients"]
        finally:
            await socket.disconnect()

    assert run_in_process(counted_while_connected) == before + 1


def test_info_tells_configuration_but_no_secret(client, upstream, settings):
    settings.OPENAI_API_URL = "https://user:hunter2@upstream.example/v1"
    body = client.get("/info").json()
    assert body["version"] and body["default_model"] == settings.DEFAULT_MODEL
    assert body["upstream"]["url"] == "https://upstream.example/v1"
    assert {"calculator", "get_current_time", "get_weather"} <= set(body["tools"])
    text = client.get("/info").text
    for secret in ("hunter2", settings.OPENAI_API_KEY, settings.SECRET_KEY):
        assert secret not in text


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_turbo(env: dict) -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "turbo_site.asgi:application", "--port", str(port), "--log-level", "error"],
        cwd=PROJECT_ROOT,
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    wait_for(url, process)
    return process, url


def wait_for(url: str, process: subprocess.Popen) -> None:
    """Until the Turbo process at `url` answers (whatever its health)."""
    for _ in range(300):
        try:
            httpx.get(url + "/info", timeout=1)
            return
        except httpx.HTTPError:
            assert process.poll() is None, "turbo did not start"
            time.sleep(0.1)
    raise AssertionError("turbo did not answer")


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs the redis-server binary")
def test_health_is_503_when_redis_stops(cli_env):
    redis_port = free_port()
    redis = subprocess.Popen(
        ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    turbo = None
    try:
        for _ in range(100):
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", redis_port)) == 0:
                    break
            time.sleep(0.05)
        turbo, url = start_turbo({**cli_env, "REDIS_ADDRESS": f"redis://127.0.0.1:{redis_port}/0"})
        healthy = httpx.get(url + "/health", timeout=10)
        assert healthy.status_code == 200, healthy.text
        redis.terminate()
        redis.wait(timeout=10)
        down = httpx.get(url + "/health", timeout=20)
        assert down.status_code == 503
        checks = down.json()["checks"]
        assert not checks["cache"]["ok"] and not checks["channel_layer"]["ok"]
        assert checks["database"]["ok"]
        assert str(redis_port) not in down.text  # no addresses in the answer
    finally:
        if turbo is not None:
            turbo.terminate()
            turbo.wait(timeout=20)
        redis.kill()


def test_health_is_503_when_the_database_is_unreachable(cli_env):
    env = {**cli_env, "DB_ADDRESS": "postgresql://turbo:secret@127.0.0.1:1/nowhere"}
    env.pop("REDIS_ADDRESS", None)
    turbo, url = start_turbo(env)
    try:
        down = httpx.get(url + "/health", timeout=20)
        assert down.status_code == 503
        assert down.json()["checks"]["database"]["ok"] is False
        assert "secret" not in down.text
    finally:
        turbo.terminate()
        turbo.wait(timeout=20)
