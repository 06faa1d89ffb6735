"""Real server processes and real stream clients for the chat tests that need them (faults, shutdown,
a reply's whole life): uvicorn subprocesses on the test database, followers that read a chat's stream
over SSE (httpx) and WebSocket (websockets) on threads of their own, and the database switches that
cut or refuse the servers' Postgres connections. The fixtures over them are in chats/tests/conftest.py.
"""

import contextlib
import json
import queue
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psycopg
import pytest
import redis
from django.db import connection
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from chats.models import Message
from conftest import PROJECT_ROOT, SERVER_START_SECONDS

# Cutting the server's database connections, or refusing new ones, is Postgres's to do.
needs_postgres = pytest.mark.skipif(
    connection.vendor != "postgresql", reason="cuts the server's Postgres connections: needs DB_ADDRESS=postgresql://"
)

FINAL_TYPES = ("message.completed", "message.failed")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(condition, timeout: float, what: str, interval: float = 0.05):
    """Poll `condition` until it returns something truthy (returned), or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


# --- processes ----------------------------------------------------------------------------------------------------


class Server:
    """One uvicorn process serving turbo_site on the test database; its stderr kept in a file."""

    def __init__(self, env: dict, log: Path, *, log_level: str = "warning"):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self._log_file = open(log, "wb")  # noqa: SIM115 (closed in stop())
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "turbo_site.asgi:application",
                "--port",
                str(self.port),
                "--lifespan",
                "on",
                "--timeout-graceful-shutdown",
                "5",
                "--log-level",
                log_level,
            ],
            cwd=PROJECT_ROOT,
            env=env,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self) -> "Server":
        def answers():
            assert self.process.poll() is None, f"the server died at start:\n{self.stderr()}"
            try:
                return httpx.get(self.url + "/info", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        # It ends as soon as the server answers (or dies); the bound is for a 2-core machine under load.
        wait_for(answers, SERVER_START_SECONDS, "the server to answer /info", interval=0.1)
        return self

    def stderr(self) -> str:
        self._log_file.flush()
        return self.log.read_text(errors="replace")

    def wait_log(self, text: str, timeout: float = 30) -> None:
        """Wait until the server's output contains `text`."""
        try:
            wait_for(lambda: text in self.stderr(), timeout, f"{text!r} in the server's output")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; the server wrote:\n{self.stderr()[-3000:]}") from None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self._log_file.close()


def redis_start(port: int) -> subprocess.Popen:
    """A Redis of this test's own: nothing on disk, so a restart comes back empty."""
    process = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    probe = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=1, socket_timeout=1)

    def pongs():
        assert process.poll() is None, "redis-server exited at start"
        try:
            return probe.ping()
        except redis.exceptions.ConnectionError:
            return False

    try:
        wait_for(pongs, 15, f"redis-server on port {port}")
    finally:
        probe.close()
    return process


# --- clients ------------------------------------------------------------------------------------------------------

_END = object()


class Follower(threading.Thread):
    """A subscriber read on its own thread: events (dicts) queue up until the stream ends."""

    def __init__(self, name: str):
        super().__init__(name=name, daemon=True)
        self.items: queue.Queue = queue.Queue()
        self.seen: list[dict] = []
        self.failure: BaseException | None = None
        self.finished = threading.Event()

    def _push(self, event: dict) -> None:
        self.seen.append(event)
        self.items.put(event)

    def _finish(self) -> None:
        self.finished.set()
        self.items.put(_END)

    def next(self, timeout: float) -> dict | None:
        """The next event; None once the stream has ended."""
        try:
            item = self.items.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"{self.name}: nothing within {timeout}s; received so far: {self.seen}") from None
        if item is _END:
            self.items.put(_END)  # ended for good
            return None
        return item

    def until(self, predicate, timeout: float = 30) -> list[dict]:
        """Events up to and including the first one `predicate` accepts; fails if the stream ends first."""
        deadline = time.monotonic() + timeout
        got = []
        while True:
            event = self.next(max(deadline - time.monotonic(), 0.01))
            if event is None:
                raise AssertionError(f"{self.name} ended ({self.failure!r}) before the awaited event: {got}")
            got.append(event)
            if predicate(event):
                return got

    def rest(self, timeout: float = 30) -> list[dict]:
        """Every event until the stream ends."""
        deadline = time.monotonic() + timeout
        got = []
        while (event := self.next(max(deadline - time.monotonic(), 0.01))) is not None:
            got.append(event)
        return got

    def deltas(self, count: int, timeout: float = 30) -> list[dict]:
        seen = 0

        def enough(event):
            nonlocal seen
            seen += event.get("type") == "message.delta"
            return seen >= count

        return self.until(enough, timeout)

    @property
    def last_seq(self) -> int | None:
        numbered = [event["seq"] for event in self.seen if "seq" in event]
        return max(numbered) if numbered else None


class SSEFollower(Follower):
    """GET /chat/stream with httpx, parsing `id:` / `data:` frames."""

    def __init__(self, url: str, token: str, chat_id: str, last_event_id: int | None = None, *, check: bool = True):
        super().__init__(f"sse({'resume ' + str(last_event_id) if last_event_id else 'live'})")
        self.url, self.token, self.chat_id = url, token, chat_id
        self.headers = bearer(token)
        if last_event_id is not None:
            self.headers["Last-Event-ID"] = str(last_event_id)
        self.connected = threading.Event()
        self.status: int | None = None
        self.body = b""
        self.ended_cleanly = False
        self.start()
        assert self.connected.wait(20), "the SSE request got no response headers"
        if check:
            assert self.status == 200, f"SSE answered {self.status}: {self.body!r}"

    def run(self) -> None:
        try:
            with httpx.Client(base_url=self.url, timeout=httpx.Timeout(10, read=30)) as http:
                with http.stream("GET", "/chat/stream", params={"id": self.chat_id}, headers=self.headers) as response:
                    self.status = response.status_code
                    if response.status_code != 200:
                        self.body = response.read()
                        return
                    self.connected.set()
                    frame: dict[str, str] = {}
                    for line in response.iter_lines():
                        if line == "":
                            if "data" in frame:
                                event = json.loads(frame["data"])
                                event["_sse_id"] = frame.get("id")
                                self._push(event)
                            frame = {}
                        elif not line.startswith(":"):
                            field, _, value = line.partition(":")
                            frame[field] = value.removeprefix(" ")
                    self.ended_cleanly = True
        except BaseException as exc:  # noqa: BLE001 (reported by the test)
            self.failure = exc
        finally:
            self.connected.set()
            self._finish()


class WSFollower(Follower):
    """/chat/stream over a WebSocket (websockets' sync client): JSON text frames, then the close code."""

    def __init__(self, url: str, token: str, chat_id: str, after: int | None = None):
        super().__init__("ws")
        address = url.replace("http://", "ws://") + f"/chat/stream?id={chat_id}&token={token}"
        if after is not None:
            address += f"&after={after}"
        self._exit = contextlib.ExitStack()
        self.ws = self._exit.enter_context(connect(address, open_timeout=10, close_timeout=5))
        self.close_code: int | None = None
        self.start()

    def run(self) -> None:
        try:
            while True:
                self._push(json.loads(self.ws.recv(timeout=60)))
        except ConnectionClosed as exc:
            self.close_code = exc.rcvd.code if exc.rcvd is not None else None
        except BaseException as exc:  # noqa: BLE001 (reported by the test)
            self.failure = exc
        finally:
            self._finish()

    def close(self) -> None:
        self._exit.close()


class Api:
    """A signed-in user of one server."""

    def __init__(self, url: str, username: str):
        self.http = httpx.Client(base_url=url, timeout=20)
        signed = self.http.post("/user/signup", data={"username": username, "password": "correct-horse"})
        assert signed.status_code == 200, signed.text
        self.token = signed.json()["token"]
        self.headers = bearer(self.token)

    def chat(self, name: str = "faults") -> str:
        created = self.http.post("/chat/create", data={"name": name}, headers=self.headers)
        assert created.status_code == 200, created.text
        return created.json()["id"]

    def prompt(self, chat_id: str, prompt: str) -> dict:
        sent = self.http.post(
            "/chat/prompt", data={"id": chat_id, "prompt": prompt, "stream": "true"}, headers=self.headers
        )
        assert sent.status_code == 200, sent.text
        return sent.json()["message"]

    def close(self) -> None:
        self.http.close()


def followed_chat(server, name: str) -> tuple["Api", str, "SSEFollower", "WSFollower"]:
    """A new user's chat on `server`, followed by an SSE and a WebSocket subscriber."""
    api = Api(server.url, name)
    chat_id = api.chat()
    return api, chat_id, SSEFollower(server.url, api.token, chat_id), WSFollower(server.url, api.token, chat_id)


def sse_when_back(url: str, token: str, chat_id: str, last_event_id: int) -> tuple[SSEFollower, list[str]]:
    """Open an SSE stream, retrying while it answers 503 `unavailable` (Retry-After), for 30 s at most.

    Returns the stream and the 503 bodies seen first: a client is told to retry on 503, so a refusal
    just after a restart is within the contract (the report lists them).
    """
    refused: list[str] = []
    deadline = time.monotonic() + 30
    while True:
        follower = SSEFollower(url, token, chat_id, last_event_id=last_event_id, check=False)
        if follower.status == 200:
            return follower, refused
        assert follower.status == 503, (follower.status, follower.body)
        assert json.loads(follower.body)["error"]["code"] == "unavailable", follower.body
        refused.append(follower.body.decode())
        assert time.monotonic() < deadline, f"SSE still refused after 30 s: {refused}"
        time.sleep(0.2)


def of_message(events: list[dict], message_id: str) -> list[dict]:
    return [event for event in events if "seq" in event and (event.get("message") or {}).get("id") == message_id]


def numbered(events: list[dict]) -> list[dict]:
    return [event for event in events if "seq" in event]


def assert_sse_ids(events: list[dict]) -> None:
    """SSE frames carry their seq as `id:`; notices have none."""
    for event in events:
        if "seq" in event:
            assert event["_sse_id"] == str(event["seq"]), event
        else:
            assert event["_sse_id"] is None, event


def assert_whole_reply(events: list[dict], message_id: str, reply: str) -> None:
    """created, then every delta in order (consecutive seqs), then message.completed with the reply."""
    mine = of_message(events, message_id)
    types = [event["type"] for event in mine]
    assert types[0] == "message.created" and types[-1] == "message.completed", types
    assert set(types[1:-1]) == {"message.delta"}, types
    assert "".join(event["delta"] for event in mine) == reply
    seqs = [event["seq"] for event in mine]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), f"events missing or out of order: {seqs}"
    final = mine[-1]
    assert final["partial"] is False
    assert final["message"]["status"] == "complete" and final["message"]["reply"] == reply


def stored(message_id: str) -> Message:
    return Message.objects.get(pk=message_id)


def words(count: int, prefix: str = "w") -> str:
    return " ".join(f"{prefix}{index}" for index in range(1, count + 1))


# --- the database under the servers ------------------------------------------------------------------------------


def terminate_server_connections() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_stat_clear_snapshot()")  # inside a transaction the view is a snapshot
        cursor.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        return len(cursor.fetchall())


def allow_connections(allow: bool) -> None:
    """Let the test database accept new connections or not (set from another database: Postgres
    refuses it for the current one; the test's own open connection is not affected)."""
    db = connection.settings_dict
    with psycopg.connect(
        host=db["HOST"], port=db["PORT"], user=db["USER"], password=db.get("PASSWORD") or None, dbname="postgres"
    ) as admin:
        admin.autocommit = True
        name = connection.ops.quote_name(db["NAME"])
        admin.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS {'true' if allow else 'false'}")


def last_delta(reply: str):
    return lambda event: event.get("type") == "message.delta" and event["message"]["reply"] == reply


def waiting_on_a_lock() -> list[int]:
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_stat_clear_snapshot()")
        cursor.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid() AND wait_event_type = 'Lock'"
        )
        return [pid for (pid,) in cursor.fetchall()]


@contextlib.contextmanager
def database_closed():
    """The test database refuses new connections, and the servers' open ones are cut, until the block ends
    (the test's own connection is opened first, so it stays)."""
    connection.ensure_connection()
    allow_connections(False)
    try:
        terminate_server_connections()
        yield
    finally:
        allow_connections(True)


def reply_about_to_be_saved(server, username: str) -> tuple[Api, WSFollower, dict, str]:
    """A new user's prompt on `server`, followed over a WebSocket until its last delta: its save is next."""
    api = Api(server.url, username)
    chat_id = api.chat()
    ws = WSFollower(server.url, api.token, chat_id)
    reply = words(8)
    message = api.prompt(chat_id, "[chunk_delay:0.3] echo: " + reply)
    ws.until(last_delta(reply))
    return api, ws, message, reply
