"""Fixtures of the chat tests: server processes of their own, as in production."""

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from django.conf import settings
from django.db import connection

from conftest import PROJECT_ROOT, SERVER_KEY, SERVER_START_SECONDS


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Server:
    address: str
    process: subprocess.Popen
    log: Path

    def log_tail(self, lines: int = 40) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


@pytest.fixture
def two_servers(upstream, tmp_path):
    """Two uvicorn processes on the test database and Redis, as in production (DEBUG=0)."""
    db = connection.settings_dict
    env = {
        **os.environ,
        "DEBUG": "0",
        "DJANGO_SETTINGS_MODULE": "turbo_site.test_settings",
        "DB_ADDRESS": f"postgresql://{db['USER']}@{db['HOST']}:{db['PORT']}/{db['NAME']}",
        "REDIS_ADDRESS": settings.REDIS_ADDRESS or "",
        "OPENAI_API_URL": upstream.url + "/v1",
        "OPENAI_API_KEY": SERVER_KEY,
    }
    servers = []
    try:
        for index in range(2):
            port = free_port()
            log = tmp_path / f"server-{index}.log"
            with open(log, "wb") as output:
                process = subprocess.Popen(
                    [sys.executable, "-m", "uvicorn", "turbo_site.asgi:application", "--port", str(port)]
                    + ["--log-level", "warning", "--no-access-log", "--timeout-graceful-shutdown", "5"],
                    cwd=PROJECT_ROOT,
                    env=env,
                    stdout=output,
                    stderr=subprocess.STDOUT,
                )
            servers.append(Server(f"127.0.0.1:{port}", process, log))
        for server in servers:
            deadline = time.monotonic() + SERVER_START_SECONDS
            while True:
                assert server.process.poll() is None, f"a server process died:\n{server.log_tail()}"
                try:
                    httpx.get(f"http://{server.address}/health", timeout=1, trust_env=False)
                    break
                except httpx.HTTPError:
                    assert time.monotonic() < deadline, f"a server did not answer:\n{server.log_tail()}"
                    time.sleep(0.1)
        yield servers
    finally:
        for server in servers:
            server.process.terminate()
        for server in servers:
            try:
                server.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.process.kill()
                server.process.wait()
