"""The production servers Turbo can run under in the proxy-overhead benchmark, and a /ws check for each.

`uvicorn` is the command the benchmark has always used: uvicorn picks uvloop and httptools itself when
they are installed. `uvicorn-fast` forces them (as `make serve` does) and is measured only when both are
installed; `uvicorn-asyncio` forces the pure-Python pair (asyncio, h11), to show what they buy. `daphne` is
Channels' server (Twisted). `gunicorn` runs GUNICORN_WORKERS uvicorn workers (the `uvicorn-worker`
package's class; uvicorn's own `uvicorn.workers` is deprecated).
"""

import importlib.util
import json
import sys
import time
from dataclasses import dataclass

from bench.fast_upstream import fastest_server_parts

PYTHON = sys.executable
APP = "turbo_site.asgi:application"
SERVERS = ("uvicorn", "uvicorn-fast", "uvicorn-asyncio", "daphne", "gunicorn")
GUNICORN_WORKERS = 2


@dataclass
class Server:
    name: str
    command: list[str]
    processes: int = 1
    loop: str = ""
    http: str = ""

    def describe(self) -> dict:
        return {
            "server": self.name,
            # The interpreter's path is this machine's; what follows it is the part worth reading.
            "command": " ".join(["python", *self.command[1:]]),
            "processes": self.processes,
            "loop": self.loop,
            "http": self.http,
        }


def unavailable(name: str) -> str | None:
    """Why `name` cannot run here, or None when it can."""
    if name == "uvicorn-fast":
        missing = [module for module in ("uvloop", "httptools") if not importlib.util.find_spec(module)]
        if missing:
            return f"{' and '.join(missing)} not installed"
    if name == "gunicorn" and not importlib.util.find_spec("gunicorn"):
        return "gunicorn not installed (make install)"
    if name == "daphne" and not importlib.util.find_spec("daphne"):
        return "daphne not installed"
    return None


def turbo_server(name: str, port: int) -> Server:
    """The command that serves Turbo on 127.0.0.1:`port` under `name`, with access logs off."""
    loop, http = fastest_server_parts()
    if name == "uvicorn":
        # Exactly the command the benchmark used before servers were selectable.
        command = [PYTHON, "-m", "uvicorn", APP, "--port", str(port), "--log-level", "warning", "--no-access-log"]
        return Server(name, command, loop=loop, http=http)
    if name == "uvicorn-fast":
        command = [PYTHON, "-m", "uvicorn", APP, "--port", str(port), "--log-level", "warning", "--no-access-log"]
        command += ["--loop", "uvloop", "--http", "httptools"]
        return Server(name, command, loop="uvloop", http="httptools")
    if name == "uvicorn-asyncio":
        command = [PYTHON, "-m", "uvicorn", APP, "--port", str(port), "--log-level", "warning", "--no-access-log"]
        command += ["--loop", "asyncio", "--http", "h11"]
        return Server(name, command, loop="asyncio", http="h11")
    if name == "daphne":
        # -v 0: no access log (verbosity 1 writes one to stdout).
        command = [PYTHON, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), "-v", "0", APP]
        return Server(name, command, loop="asyncio (Twisted's asyncio reactor)", http="Twisted")
    if name == "gunicorn":
        worker = (
            "uvicorn_worker.UvicornWorker"
            if importlib.util.find_spec("uvicorn_worker")
            else "uvicorn.workers.UvicornWorker"
        )
        command = [PYTHON, "-m", "gunicorn", "-k", worker, "-w", str(GUNICORN_WORKERS)]
        command += ["-b", f"127.0.0.1:{port}", "--log-level", "warning", APP]
        return Server(name, command, processes=GUNICORN_WORKERS + 1, loop=loop, http=http)
    raise ValueError(f"unknown server {name!r}; one of {', '.join(SERVERS)}")


def websocket_ping(base_url: str, token: str, timeout: float = 15.0) -> dict:
    """Opens /ws with the token and the server's own Origin, sends a ping, expects the pong.

    Returns {"ok": bool, "detail": str, "ms": connect-to-pong time or None}.
    """
    try:
        from websockets.sync.client import connect
    except ImportError:
        return {"ok": False, "detail": "the websockets package is not installed (make install)", "ms": None}
    ws_url = base_url.replace("http://", "ws://", 1) + f"/ws?token={token}"
    started = time.perf_counter()
    try:
        with connect(ws_url, origin=base_url, open_timeout=timeout, close_timeout=5) as socket:
            socket.send(json.dumps({"type": "ping", "request_id": "bench-ping", "payload": {}}))
            answer = json.loads(socket.recv(timeout=timeout))
    except Exception as exc:  # any failure means "does not serve WebSockets here": report it, do not stop
        return {"ok": False, "detail": f"{type(exc).__name__}: {exc}"[:300], "ms": None}
    elapsed_ms = round((time.perf_counter() - started) * 1000, 1)
    if answer.get("type") == "pong" and answer.get("request_id") == "bench-ping":
        return {"ok": True, "detail": "pong", "ms": elapsed_ms}
    return {"ok": False, "detail": f"unexpected answer {json.dumps(answer)[:200]}", "ms": elapsed_ms}
