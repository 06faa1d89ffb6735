"""The live stream under faults, against real server processes and real clients.

Each test starts uvicorn subprocesses on the test database (Postgres: the server and the test share
it) and follows a chat with an SSE client (httpx) and a WebSocket client (websockets), each read on
its own thread. Faults: the Redis under the stream is killed and restarted mid-reply; the database
connections are cut (or the database refuses connections) at the final save; SIGTERM arrives while
a reply streams. Every wait is bounded; no test asserts how long something took.
"""

import contextlib
import json
import os
import queue
import signal
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
from django.conf import settings
from django.db import connection, transaction
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from chats.models import Message
from conftest import PROJECT_ROOT, SERVER_KEY

pytestmark = [
    pytest.mark.django_db(transaction=True),
]
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

    def __init__(self, env: dict, log: Path):
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
                "warning",
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

        wait_for(answers, 30, "the server to answer /info", interval=0.1)
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


@pytest.fixture
def processes():
    """Servers and Redis processes started by the test, stopped (servers first) at its end."""
    started: list = []
    yield started
    for item in reversed(started):
        if isinstance(item, Server):
            item.stop()
    for item in started:
        if isinstance(item, subprocess.Popen) and item.poll() is None:
            item.kill()
            item.wait(timeout=10)


@pytest.fixture
def start_server(upstream, processes, tmp_path, request):
    """start_server(**env) -> a running Server on the test database, with the fake upstream.

    Its output goes to a file in tmp_path, or under $STREAM_FAULT_LOGS if set (kept for reading).
    """
    logs = tmp_path
    if os.environ.get("STREAM_FAULT_LOGS"):
        logs = Path(os.environ["STREAM_FAULT_LOGS"]) / request.node.name
        logs.mkdir(parents=True, exist_ok=True)
    db = connection.settings_dict
    password = f":{db['PASSWORD']}" if db.get("PASSWORD") else ""
    if connection.vendor == "postgresql":
        db_address = f"postgresql://{db['USER']}{password}@{db['HOST']}:{db['PORT']}/{db['NAME']}"
    else:  # the test database is a file (turbo_site/test_settings.py), which the server opens too
        db_address = f"sqlite:///{db['NAME']}"
    base = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "turbo_site.test_settings",
        "DEBUG": "0",
        "DB_ADDRESS": db_address,
        "OPENAI_API_URL": upstream.url + "/v1",
        "OPENAI_API_KEY": SERVER_KEY,
        "STREAM_HEARTBEAT_SECONDS": "2",
        "LOG_LEVEL": "INFO",
    }
    base.pop("REDIS_ADDRESS", None)

    def start(**env: str) -> Server:
        merged = {**base, **{name: str(value) for name, value in env.items() if value is not None}}
        server = Server(merged, logs / f"server-{len(processes)}.log")
        processes.append(server)
        return server.wait_ready()

    return start


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


# --- 1. Redis killed and restarted mid-stream -------------------------------------------------------------------


def test_redis_killed_mid_stream_then_restarted(start_server, processes):
    redis_port = free_port()
    redis_process = redis_start(redis_port)
    processes.append(redis_process)
    server = start_server(REDIS_ADDRESS=f"redis://127.0.0.1:{redis_port}/0", FINAL_SAVE_RETRY_SECONDS=60)
    api, chat_id, sse, ws = followed_chat(server, "redis-fault")

    reply = words(30)
    message = api.prompt(chat_id, "[chunk_delay:0.2] echo: " + reply)
    for follower in (sse, ws):
        follower.deltas(3)

    redis_process.kill()
    redis_process.wait(timeout=10)

    # Both subscribers are told, and their streams end (the WebSocket closes: 1013, try again later).
    for follower in (sse, ws):
        rest = follower.rest(timeout=30)
        assert rest, f"{follower.name}: the stream ended without a notice"
        assert rest[-1]["type"] == "stream.error", rest
        assert all(event["type"] == "message.delta" for event in rest[:-1]), rest
    assert sse.ended_cleanly and sse.failure is None, sse.failure
    assert ws.close_code == 1013, (ws.close_code, ws.failure)
    assert_sse_ids(sse.seen)
    seen_before = max(sse.last_seq, ws.last_seq)
    resume_from = sse.last_seq

    # While Redis is away, signed-in requests answer 503 `unavailable` with Retry-After, never 500.
    for method, path, params in (
        ("POST", "/chat/index", None),
        ("GET", "/chat/read", {"id": chat_id}),
        ("GET", "/chat/stream", {"id": chat_id}),
        ("GET", "/v1/models", None),  # the proxy's fast path
    ):
        answer = api.http.request(method, path, params=params, headers=api.headers)
        assert answer.status_code == 503, (path, answer.status_code, answer.text, server.stderr()[-3000:])
        assert answer.json()["error"]["code"] == "unavailable", answer.text
        assert answer.headers.get("Retry-After"), answer.headers

    # Redis comes back (empty) on the same port; the same server recovers on its own.
    redis_process = redis_start(redis_port)
    processes.append(redis_process)

    def answers_200():
        answer = api.http.post("/chat/index", headers=api.headers)
        assert answer.status_code in (200, 503), (answer.status_code, answer.text)
        return answer.status_code == 200

    wait_for(answers_200, 30, "requests to answer 200 again after Redis restarted", interval=0.2)

    # Resuming from the last seq seen: the restarted Redis has nothing after it, so a gap notice,
    # then the reply's final event (sent once Redis answered again) with the whole reply.
    # (A 503 here is allowed and retried: see sse_when_back.)
    resumed, refused = sse_when_back(server.url, api.token, chat_id, last_event_id=resume_from)
    print(f"SSE resumes refused (503) after Redis was back: {refused}")
    events = resumed.until(lambda event: event.get("type") in FINAL_TYPES, timeout=90)
    assert events[0]["type"] == "stream.gap", events
    assert events[0]["after"] == resume_from, events[0]
    final = events[-1]
    assert final["type"] == "message.completed", (final, server.stderr()[-3000:])
    assert final["message"]["id"] == message["id"]
    assert final["message"]["status"] == "complete" and final["message"]["reply"] == reply, final
    assert_sse_ids(events)
    after_restart = [event["seq"] for event in numbered(events)]
    assert after_restart == sorted(set(after_restart)), after_restart
    assert all(seq > seen_before for seq in after_restart), (seen_before, after_restart)
    row = stored(message["id"])
    assert (row.status, row.reply, row.error) == ("complete", reply, "")

    # A new prompt streams normally to a new WebSocket subscriber, numbered above everything before.
    fresh = WSFollower(server.url, api.token, chat_id)
    second = api.prompt(chat_id, "echo: streamed after the restart")
    events = fresh.until(
        lambda event: event.get("type") in FINAL_TYPES and event["message"]["id"] == second["id"], timeout=30
    )
    assert_whole_reply(events, second["id"], "streamed after the restart")
    assert all(event["seq"] > max(seen_before, *after_restart) for event in numbered(events))
    assert stored(second["id"]).status == "complete"
    fresh.close()
    api.close()


def test_redis_still_away_when_the_reply_ends(start_server, processes):
    """The reply ends while Redis is down: it is saved, its final event waits for Redis and then goes out."""
    redis_port = free_port()
    redis_process = redis_start(redis_port)
    processes.append(redis_process)
    server = start_server(REDIS_ADDRESS=f"redis://127.0.0.1:{redis_port}/0", FINAL_SAVE_RETRY_SECONDS=60)
    api = Api(server.url, "redis-away-at-end")
    chat_id = api.chat()
    ws = WSFollower(server.url, api.token, chat_id)
    reply = words(10)
    message = api.prompt(chat_id, "[chunk_delay:0.2] echo: " + reply)
    ws.deltas(2)
    redis_process.kill()
    redis_process.wait(timeout=10)
    assert ws.rest(timeout=30)[-1]["type"] == "stream.error"
    assert ws.close_code == 1013, (ws.close_code, ws.failure)

    # The reply ends while Redis is still down: it is saved (the row leaves `streaming`) ...
    wait_for(lambda: stored(message["id"]).status != "streaming", 60, "the reply to be saved")
    row = stored(message["id"])
    assert (row.status, row.reply) == ("complete", reply)
    answer = api.http.post("/chat/read", data={"id": chat_id}, headers=api.headers)
    assert answer.status_code == 503 and answer.json()["error"]["code"] == "unavailable", answer.text

    redis_process = redis_start(redis_port)
    processes.append(redis_process)
    resumed, refused = sse_when_back(server.url, api.token, chat_id, last_event_id=ws.last_seq)
    print(f"SSE resumes refused (503) after Redis was back: {refused}")
    # ... and its final event, retried while Redis was away, goes out once it is back.
    try:
        events = resumed.until(lambda event: event.get("type") in FINAL_TYPES, timeout=30)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nthe server wrote:\n{server.stderr()[-5000:]}") from None
    assert events[0]["type"] == "stream.gap", events
    assert events[-1]["type"] == "message.completed", (events, server.stderr()[-3000:])
    assert events[-1]["message"]["id"] == message["id"]
    assert events[-1]["message"]["reply"] == reply
    assert events[-1]["seq"] > ws.last_seq
    api.close()


# --- 2. the database connections cut at the final save ----------------------------------------------------------


def _terminate_server_connections() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_stat_clear_snapshot()")  # inside a transaction the view is a snapshot
        cursor.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        return len(cursor.fetchall())


def _allow_connections(allow: bool) -> None:
    """Let the test database accept new connections or not (set from another database: Postgres
    refuses it for the current one; the test's own open connection is not affected)."""
    db = connection.settings_dict
    with psycopg.connect(
        host=db["HOST"], port=db["PORT"], user=db["USER"], password=db.get("PASSWORD") or None, dbname="postgres"
    ) as admin:
        admin.autocommit = True
        name = connection.ops.quote_name(db["NAME"])
        admin.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS {'true' if allow else 'false'}")


def _last_delta(reply: str):
    return lambda event: event.get("type") == "message.delta" and event["message"]["reply"] == reply


def _waiting_on_a_lock() -> list[int]:
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_stat_clear_snapshot()")
        cursor.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid() AND wait_event_type = 'Lock'"
        )
        return [pid for (pid,) in cursor.fetchall()]


@needs_postgres
def test_database_connection_cut_in_the_middle_of_the_final_save(start_server):
    """The final save's own connection is terminated while the save runs.

    The test holds the message's row lock, so the server's save waits in its UPDATE with its
    connection open; that connection is then terminated, and the lock released once the save has
    failed and is being retried.
    """
    server = start_server(REDIS_ADDRESS=settings.REDIS_ADDRESS or None, FINAL_SAVE_RETRY_SECONDS=60)
    api = Api(server.url, "db-cut-save")
    chat_id = api.chat()
    ws = WSFollower(server.url, api.token, chat_id)
    reply = words(8)
    message = api.prompt(chat_id, "[chunk_delay:0.2] echo: " + reply)
    with transaction.atomic():
        Message.objects.select_for_update().get(pk=message["id"])
        ws.until(_last_delta(reply))
        wait_for(_waiting_on_a_lock, 30, "the final save to wait on the row lock")
        assert _terminate_server_connections() >= 1
        server.wait_log("could not save the reply, retrying")
        wait_for(_waiting_on_a_lock, 30, "the retried save to wait on the row lock again")
        # Saved first, announced after: nothing final may have gone out while the save is failing.
        assert not [event for event in ws.seen if event.get("type") in FINAL_TYPES], ws.seen
    events = ws.until(lambda event: event.get("type") in FINAL_TYPES, timeout=60)
    assert events[-1]["type"] == "message.completed", (events[-1], server.stderr()[-3000:])
    assert_whole_reply(ws.seen, message["id"], reply)
    row = stored(message["id"])
    assert (row.status, row.reply) == ("complete", reply)
    ws.close()
    api.close()


@needs_postgres
def test_database_away_during_the_final_save(start_server):
    """Harder: the connections are cut and the database refuses new ones until the save has failed."""
    server = start_server(REDIS_ADDRESS=settings.REDIS_ADDRESS or None, FINAL_SAVE_RETRY_SECONDS=60)
    api = Api(server.url, "db-away")
    chat_id = api.chat()
    ws = WSFollower(server.url, api.token, chat_id)
    reply = words(8)
    message = api.prompt(chat_id, "[chunk_delay:0.3] echo: " + reply)
    ws.until(_last_delta(reply))
    connection.ensure_connection()  # the test's own connection, open before the database closes its doors
    _allow_connections(False)
    try:
        _terminate_server_connections()
        server.wait_log("could not save the reply, retrying")
        # Saved first, announced after: nothing final may have gone out while the save is failing.
        assert not [event for event in ws.seen if event.get("type") in FINAL_TYPES], ws.seen
        assert stored(message["id"]).status == "streaming"
    finally:
        _allow_connections(True)
    events = ws.until(lambda event: event.get("type") in FINAL_TYPES, timeout=90)
    assert events[-1]["type"] == "message.completed", (events[-1], server.stderr()[-3000:])
    assert_whole_reply(ws.seen, message["id"], reply)
    row = stored(message["id"])
    assert (row.status, row.reply) == ("complete", reply)
    ws.close()
    api.close()


# --- 3. SIGTERM with SSE and WebSocket subscribers connected --------------------------------------------------


def _transport_env(transport: str, processes: list) -> str | None:
    """The server's REDIS_ADDRESS: a Redis of the test's own, or none (the in-memory backend)."""
    if transport != "redis":
        return None
    port = free_port()
    processes.append(redis_start(port))
    return f"redis://127.0.0.1:{port}/0"


def _shutdown_tail(follower: Follower) -> list[dict]:
    """The follower's events to the end, checked to close with the server.shutdown notice."""
    follower.rest(timeout=45)
    events = follower.seen
    assert events and events[-1]["type"] == "server.shutdown", (follower.name, events)
    notices = [event for event in events if "seq" not in event]
    assert len(notices) == 1, notices
    return events


def assert_streams_ended_and_server_exited(server, sse, ws) -> None:
    """After SIGTERM: the SSE response ended cleanly, the WebSocket closed with 1012, the process exited."""
    assert_sse_ids(sse.seen)
    assert sse.ended_cleanly and sse.failure is None, sse.failure
    assert ws.close_code == 1012, (ws.close_code, ws.failure)
    try:
        code = server.process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the server did not exit:\n{server.stderr()[-3000:]}") from None
    # uvicorn re-raises the SIGTERM it handled once it has shut down, hence -SIGTERM (or 0).
    assert code in (0, -signal.SIGTERM), (code, server.stderr()[-3000:])


@pytest.mark.parametrize("transport", ["memory", "redis"])
def test_sigterm_lets_the_running_reply_finish_then_ends_streams(start_server, processes, transport):
    server = start_server(REDIS_ADDRESS=_transport_env(transport, processes), SHUTDOWN_GRACE_SECONDS=10)
    api, chat_id, sse, ws = followed_chat(server, f"sigterm-{transport}")
    reply = words(20)
    message = api.prompt(chat_id, "[chunk_delay:0.1] echo: " + reply)
    for follower in (sse, ws):
        follower.deltas(3)
    api.close()

    server.process.send_signal(signal.SIGTERM)

    for follower in (sse, ws):
        events = _shutdown_tail(follower)
        assert_whole_reply(events[:-1], message["id"], reply)
    assert_streams_ended_and_server_exited(server, sse, ws)
    row = stored(message["id"])
    assert (row.status, row.reply) == ("complete", reply)


@pytest.mark.parametrize("transport", ["memory", "redis"])
def test_sigterm_saves_a_stalled_reply_as_interrupted(start_server, processes, transport):
    server = start_server(REDIS_ADDRESS=_transport_env(transport, processes), SHUTDOWN_GRACE_SECONDS=1)
    api, chat_id, sse, ws = followed_chat(server, f"stall-{transport}")
    message = api.prompt(chat_id, "[scenario:stall] echo: never finishes")
    for follower in (sse, ws):
        follower.until(lambda event: event.get("type") == "message.created")
    api.close()

    server.process.send_signal(signal.SIGTERM)

    for follower in (sse, ws):
        events = _shutdown_tail(follower)
        mine = of_message(events, message["id"])
        assert [event["type"] for event in mine] == ["message.created", "message.failed"], events
        failed = mine[-1]
        assert failed["partial"] is False
        assert failed["message"]["status"] == "error"
        assert failed["message"]["error"].startswith("interrupted"), failed
        assert mine[1]["seq"] == mine[0]["seq"] + 1
    assert_streams_ended_and_server_exited(server, sse, ws)
    row = stored(message["id"])
    assert row.status == "error" and row.error.startswith("interrupted"), (row.status, row.error)
