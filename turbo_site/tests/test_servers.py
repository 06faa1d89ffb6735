"""The servers `make run` (runserver, daphne) and `make serve` (uvicorn) start, run as subprocesses.

What they print and how they treat a /ws client must be what the docs say, whichever one runs.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from conftest import PROJECT_ROOT, unique_name


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def runserver_command(port: int) -> list[str]:
    """`make run`: Django's runserver, which is daphne (first in INSTALLED_APPS), with its reloader."""
    return [sys.executable, "manage.py", "runserver", f"127.0.0.1:{port}"]


def uvicorn_command(port: int) -> list[str]:
    """`make serve`: uvicorn with the Makefile's options."""
    return [
        *(sys.executable, "-m", "uvicorn", "turbo_site.asgi:application", "--host", "127.0.0.1"),
        *("--port", str(port), "--loop", "uvloop", "--http", "httptools", "--ws-per-message-deflate", "false"),
        *("--lifespan", "on", "--no-proxy-headers", "--no-access-log", "--timeout-graceful-shutdown", "5"),
    ]


SERVERS = {"runserver": runserver_command, "uvicorn": uvicorn_command}


class ServerProcess:
    """One server in its own process group (runserver's reloader starts a child), its output in a file."""

    def __init__(self, command, env: dict, log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self._log_file = open(log, "wb")  # noqa: SIM115 (closed in stop())
        self.process = subprocess.Popen(
            command(self.port),
            cwd=PROJECT_ROOT,
            env={**env, "PYTHONUNBUFFERED": "1"},
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_ready(self) -> "ServerProcess":
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"the server died at start:\n{self.output()}"
            try:
                if httpx.get(self.url + "/info", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"the server did not answer /info:\n{self.output()}")

    def output(self) -> str:
        self._log_file.flush()
        return self.log.read_text(errors="replace")

    def stop(self) -> str:
        """Stop the server (and its reloader's child); returns all it printed."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        self._log_file.close()
        return self.log.read_text(errors="replace")


@pytest.fixture
def start_server(cli_env, tmp_path):
    started = []

    def _start(name: str, **env) -> ServerProcess:
        server = ServerProcess(SERVERS[name], {**cli_env, "LOG_LEVEL": "INFO", **env}, tmp_path / f"{name}.log")
        started.append(server)
        return server.wait_ready()

    yield _start
    for server in started:
        server.stop()


def signup_token(server: ServerProcess) -> str:
    response = httpx.post(server.url + "/user/signup", data={"username": unique_name(), "password": "correct-horse"})
    assert response.status_code == 200, response.text
    return response.json()["token"]


def ws_connect(server: ServerProcess, token: str):
    # No compression: the frame on the wire is as large as the message.
    return connect(
        f"ws://127.0.0.1:{server.port}/ws?token={token}",
        open_timeout=10,
        compression=None,
        origin=f"http://127.0.0.1:{server.port}",
    )


# --- B: live tokens never reach the log ---------------------------------------------------------------


@pytest.mark.parametrize("name", ["uvicorn", "runserver"])
def test_a_ws_token_in_the_url_is_redacted_from_the_server_log(start_server, name):
    server = start_server(name)
    token = signup_token(server)
    with ws_connect(server, token) as ws:
        ws.send(json.dumps({"type": "ping", "request_id": "p1", "payload": {}}))
        assert json.loads(ws.recv(timeout=15))["type"] == "pong"
    output = server.stop()
    assert "/ws" in output  # the handshake was logged...
    assert token not in output  # ...without the token
    if name == "uvicorn":
        assert "/ws?token=[redacted]" in output


# --- E: frames over 1 MiB, and one line per log record ---------------------------------------------------


@pytest.mark.parametrize("name", ["uvicorn", "runserver"])
def test_a_frame_over_one_mib_gets_frame_too_large_and_the_socket_stays_open(start_server, name):
    server = start_server(name)
    token = signup_token(server)
    with ws_connect(server, token) as ws:
        ws.send(json.dumps({"type": "ping", "request_id": "big", "payload": {"pad": "x" * 1_100_000}}))
        error = json.loads(ws.recv(timeout=15))
        assert error["type"] == "error" and error["error"]["code"] == "frame_too_large"
        ws.send(json.dumps({"type": "ping", "request_id": "after", "payload": {}}))
        assert json.loads(ws.recv(timeout=15)) == {"type": "pong", "request_id": "after", "data": {}}


@pytest.mark.parametrize("name", ["uvicorn", "runserver"])
def test_each_log_line_appears_once(start_server, name):
    """runserver logs each request, uvicorn each WebSocket handshake: every such line is printed once."""
    server = start_server(name, DEBUG="1")
    marker = unique_name("once")
    assert httpx.get(f"{server.url}/no/such/{marker}").status_code == 404
    with pytest.raises(InvalidStatus):  # no token: refused, and logged with its query string
        connect(f"ws://127.0.0.1:{server.port}/ws?probe={marker}", open_timeout=10).close()
    output = server.stop()
    lines = [line for line in output.splitlines() if marker in line]
    assert lines, output[-3000:]
    assert len(lines) == len(set(lines)), "\n".join(lines)
