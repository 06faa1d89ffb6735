"""`pip install -r requirements.txt` alone serves everything in production, WebSockets included: a
virtualenv of the runtime requirements only (no test tools), uvicorn from it as `make serve` runs it,
and a real client opening /ws and a GraphQL subscription through it."""

import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from websockets.sync.client import connect

from conftest import PROJECT_ROOT
from turbo_site.tests.test_first_run import bare_env, zero_config

pytestmark = zero_config  # a virtualenv of its own, no settings: the same on both legs


@pytest.fixture(scope="module")
def runtime_python(tmp_path_factory) -> Path:
    venv = tmp_path_factory.mktemp("runtime") / "venv"
    uv = Path(sys.executable).parent / "uv"
    subprocess.run([str(uv), "venv", "--quiet", "--python", sys.executable, str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    installed = subprocess.run(
        [str(uv), "pip", "install", "--quiet", "--python", str(python), "-r", "requirements.txt"],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert installed.returncode == 0, installed.stderr
    return python


def pins() -> dict[str, str]:
    """name -> version of every requirement line, runtime and dev."""
    found = {}
    for name in ("requirements.txt", "requirements-dev.txt"):
        for line in (PROJECT_ROOT / name).read_text().splitlines():
            line = line.split("#")[0].strip()
            if line and not line.startswith("-r "):
                pinned = re.fullmatch(r"([A-Za-z0-9_.-]+)(?:\[[\w,]+\])?==([\w.]+)", line)
                assert pinned, f"{name}: {line!r} is not pinned to one version"
                found[pinned[1].lower()] = pinned[2]
    return found


def test_every_requirement_is_pinned_and_related_pins_agree():
    found = pins()
    for family in ("grpcio", "opentelemetry-"):  # released together: one version for the whole family
        versions = {name: version for name, version in found.items() if name.startswith(family)}
        assert len(versions) >= 3 and len(set(versions.values())) == 1, versions
    runtime = (PROJECT_ROOT / "requirements.txt").read_text()
    for test_tool in ("pytest", "httpx", "openai", "selenium", "schemathesis", "ruff", "mkdocs"):
        assert not re.search(rf"^{test_tool}[=\[]", runtime, re.MULTILINE), f"{test_tool} is not a runtime need"


def test_runtime_requirements_hold_no_test_tools(runtime_python):
    for module in ("pytest", "openai", "selenium", "schemathesis"):
        found = subprocess.run([str(runtime_python), "-c", f"import {module}"], capture_output=True, timeout=60)
        assert found.returncode != 0, f"{module} is a test tool but the runtime install has it"


def test_a_runtime_only_server_serves_ws_and_graphql_subscriptions(runtime_python, tmp_path):
    env = bare_env(tmp_path, DEBUG="0", SECRET_KEY="runtime-install-test-key-" + "x" * 30)
    env.pop("PYTHONPATH", None)
    migrated = subprocess.run(
        [str(runtime_python), "manage.py", "migrate", "--noinput", "-v0"],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert migrated.returncode == 0, migrated.stderr
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [str(runtime_python), "-m", "uvicorn", "turbo_site.asgi:application", "--host", "127.0.0.1"]
        + ["--port", str(port), "--loop", "uvloop", "--http", "httptools", "--lifespan", "on"],
        cwd=PROJECT_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        signed = httpx.post(base + "/user/signup", data={"username": "runtime-user", "password": "correct-horse"})
        assert signed.status_code == 200, signed.text
        token = signed.json()["token"]

        with connect(f"ws://127.0.0.1:{port}/ws?token={token}", open_timeout=10) as rpc:
            rpc.send(json.dumps({"type": "ping", "request_id": "r1", "payload": {}}))
            assert json.loads(rpc.recv(timeout=10)) == {"type": "pong", "request_id": "r1", "data": {}}

        chat = httpx.post(base + "/chat/create", headers={"Authorization": f"Bearer {token}"}, json={"name": "c"})
        assert chat.status_code == 200, chat.text
        chat_id = chat.json()["id"]
        with connect(f"ws://127.0.0.1:{port}/graphql", subprotocols=["graphql-transport-ws"], open_timeout=10) as gql:
            gql.send(json.dumps({"type": "connection_init", "payload": {"authorization": f"Bearer {token}"}}))
            assert json.loads(gql.recv(timeout=10))["type"] == "connection_ack"
            query = "subscription($id: ID!) { chatEvents(chatId: $id, after: 0) { __typename } }"
            gql.send(
                json.dumps({"id": "s1", "type": "subscribe", "payload": {"query": query, "variables": {"id": chat_id}}})
            )
            deleted = httpx.post(
                base + "/chat/delete", headers={"Authorization": f"Bearer {token}"}, json={"id": chat_id}
            )
            assert deleted.status_code == 200, deleted.text
            messages = []
            while not messages or messages[-1]["type"] not in ("complete", "error"):
                messages.append(json.loads(gql.recv(timeout=10)))
            assert messages[-1]["type"] == "complete", messages  # the subscription ran and ended with its chat
    finally:
        server.terminate()
        output = server.communicate(timeout=30)[0]
    assert "Traceback" not in output, output
