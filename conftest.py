"""Shared fixtures: a real ASGI server on a loopback socket, and real HTTP clients against it."""

import asyncio
import os
import socket
import subprocess
import sys
import threading
import uuid
from http.cookiejar import CookieJar, DefaultCookiePolicy
from pathlib import Path

import httpx
import pytest
import uvicorn
from django.core.cache import cache

# Test helpers and fixture modules (testing/) get pytest's assertion messages too.
pytest.register_assert_rewrite("testing")

# The files that take longest on one leg or the other (--durations, 2026-12-07, after the in-process
# move), slowest first. Under
# `make test`'s --dist loadfile a file runs on one worker, and the workers take files in collection
# order (the Makefile turns off xdist's own order, by number of tests, which put the one-test files
# such as the schemathesis shards last): a long file taken last is the leg's tail, so they go first.
# A stale entry costs nothing but its place; a file missing from here is taken after them, larger first.
SLOWEST_FILES = (
    "turbo_site/tests/test_schemathesis_",  # its shards, leg 1 only
    "chats/tests/test_sigterm_loop.py",
    "proxy/tests/test_poison.py",
    "chats/tests/test_stream_faults.py",
    "proxy/tests/test_shutdown.py",
    "turbo_site/tests/test_metrics.py",
    "chats/tests/test_db_pool.py",
    "chats/tests/test_two_processes.py",
    "turbo_site/tests/test_settings.py",
    "chats/tests/test_reply_lifecycle.py",
    "proxy/tests/test_budgets_e2e.py",
    "chats/tests/test_chat_stop.py",
    "turbo_site/tests/test_servers.py",
    "chats/tests/test_web_browser.py",
    "chats/tests/test_tool_calling.py",
    "chats/tests/test_stream_listeners.py",
    "turbo_site/tests/test_tls.py",
    "turbo_site/tests/test_health.py",
    "turbo_site/tests/test_grpc_server.py",
    "chats/tests/test_programs_processes.py",
    "chats/tests/test_stream_load.py",
    "proxy/tests/test_secrets.py",
    "proxy/tests/test_rate_limits.py",
    "groups/tests/test_web_browser.py",
    "turbo_site/tests/test_runtime_install.py",
    "turbo_site/tests/test_docs_examples.py",
    "turbo_site/tests/test_startup.py",
    "turbo_site/tests/test_first_run.py",
    "proxy/tests/test_token_counts.py",
)


def pytest_collection_modifyitems(config, items):
    """Under xdist (`make test`): files in SLOWEST_FILES' order, then the others by number of tests, most
    first. A file's tests stay together and in their order. In one process the order is left alone."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    files: dict[str, list[int]] = {}  # path -> [tests, position of its first]
    for position, item in enumerate(items):
        files.setdefault(item.nodeid.split("::")[0], [0, position])[0] += 1

    def rank(path: str) -> tuple[int, int, int]:
        tests, first = files[path]
        for index, prefix in enumerate(SLOWEST_FILES):
            if path.startswith(prefix):
                return index, 0, first
        return len(SLOWEST_FILES), -tests, first

    items.sort(key=lambda item: rank(item.nodeid.split("::")[0]))  # stable: within a file, the same order


@pytest.fixture(autouse=True)
def _clean_cache(request):
    """Rate-limit counters, cached sessions and queued events must not leak from one test into the next."""
    from proxy.events import events_flush, events_writer_pause, events_writer_resume

    cache.clear()
    database = request.node.get_closest_marker("django_db")
    # A test inside one transaction (django_db without transaction=True) holds the database's write lock:
    # the event writer's own connection would wait for it (SQLite's 20 s busy timeout, twice as it splits
    # the batch) at its next tick. Its events are saved at the end from the test's connection instead.
    one_transaction = in_one_transaction(request)
    if one_transaction:
        events_writer_pause()
        # The app's async code, called by the test through async_to_sync or served in process, runs its
        # ORM calls on the test's thread: Channels' close_old_connections must not close its connection.
        from testing.inprocess import connection_kept

        with connection_kept():
            yield
    else:
        yield
    if database:
        events_flush()
    if one_transaction:
        events_writer_resume()


class LiveServer:
    """uvicorn serving turbo_site.asgi in a background thread, on a port the OS picks."""

    def __init__(self):
        from turbo_site.asgi import application

        # IPPROTO_TCP: asyncio turns Nagle off only on sockets that say they are TCP (testing/
        # fake_upstream.py); with the default 0, each response waits ~40 ms for the client's delayed ACK.
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind(("127.0.0.1", 0))
        self.port = self.socket.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        # A stream a test left open would hold the shutdown at the session's end until stop()'s join gives
        # up (10 s, more on a loaded machine, at the tail of each worker): 2 s, then it is cut.
        config = uvicorn.Config(
            application,
            log_level="warning",
            lifespan="off",
            ws="websockets-sansio",
            proxy_headers=False,
            timeout_graceful_shutdown=2,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        async def serve():
            from turbo_site.core.loops import loop_clients_close

            await self.server.serve(sockets=[self.socket])
            await loop_clients_close()

        asyncio.run(serve())

    def start(self):
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the test server failed to start")
            threading.Event().wait(0.01)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="session")
def turbo_server(django_db_setup, django_db_blocker):
    server = LiveServer()
    server.start()
    yield server
    server.stop()
    from django.db import connections

    from proxy.events import events_flush, events_shutdown

    with django_db_blocker.unblock():
        events_flush()
        events_shutdown(flush=False)  # nothing may be written once the test database is gone
        connections.close_all()


@pytest.fixture(scope="session")
def grpc_server(django_db_setup, django_db_blocker):
    """Turbo's gRPC server (turbo_site/grpc.py) on a loopback port, in a thread sharing the test database."""
    from testing.grpc import GrpcServer

    server = GrpcServer().start()
    yield server
    server.stop()


def in_one_transaction(request) -> bool:
    """Whether the test runs inside one database transaction (`django_db` without `transaction=True`)."""
    database = request.node.get_closest_marker("django_db")
    if database is None:
        return False
    return not database.kwargs.get("transaction", bool(database.args and database.args[0]))


@pytest.fixture
def client(request):
    """An HTTP client for Turbo, like curl would be: it keeps no cookies between calls.

    In a test that runs in one transaction (`django_db`), the whole ASGI app in process, on the test's
    own database connection (testing/inprocess.py); in a transactional one (`transaction=True`: a test
    that needs committed data, work that outlives the request, or a stream read as it comes), the live
    server over its socket, as `live_client`."""
    jar = CookieJar(policy=DefaultCookiePolicy(allowed_domains=[]))
    if in_one_transaction(request):
        from testing.inprocess import in_process_client

        with in_process_client(cookies=jar) as http:
            yield http
        return
    server = request.getfixturevalue("turbo_server")
    with httpx.Client(base_url=server.url, timeout=30, cookies=jar) as http:
        yield http


@pytest.fixture
def new_client(request):
    """Makes more clients like `client` (in process or over the live server's socket, by the same rule),
    with httpx.Client's options: `new_client(cookies={"sess": token})` is a browser that has signed in.
    Each has `base_url`, which is also Turbo's own origin for an Origin header."""
    opened: list[httpx.Client] = []

    def make(**options) -> httpx.Client:
        options.setdefault("timeout", 30)
        if in_one_transaction(request):
            from testing.inprocess import in_process_client

            http = in_process_client(**options)
        else:
            http = httpx.Client(base_url=request.getfixturevalue("turbo_server").url, **options)
        opened.append(http)
        return http

    yield make
    for http in opened:
        http.close()


@pytest.fixture
def live_client(turbo_server):
    """An HTTP client for the live server over its socket, whatever the test's database marker."""
    jar = CookieJar(policy=DefaultCookiePolicy(allowed_domains=[]))
    with httpx.Client(base_url=turbo_server.url, timeout=30, cookies=jar) as http:
        yield http


def unique_name(prefix: str = "user") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def signup(client):
    """Sign a new user up over HTTP; returns (token, user JSON, password)."""

    def _signup(username: str | None = None, password: str = "correct-horse", **extra):
        username = username or unique_name()
        response = client.post("/user/signup", data={"username": username, "password": password, **extra})
        assert response.status_code == 200, response.text
        body = response.json()
        return body["token"], body["user"], password

    return _signup


@pytest.fixture
def paused_event_writer(request):
    """The event writer stopped: whatever is recorded stays queued until events_flush().

    A test in one transaction has it stopped already (_clean_cache), until its events are saved from the
    test's connection at the end: resuming it here, before that, would set the writer's own connection
    waiting on the test's write lock (SQLite's busy timeout, 20 s) for what is queued."""
    from proxy.events import events_writer_pause, events_writer_resume

    if in_one_transaction(request):
        yield
        return
    events_writer_pause()
    yield
    events_writer_resume()


# --- operator commands, run as an operator would: `manage.py ...` in a subprocess ----------------

PROJECT_ROOT = Path(__file__).resolve().parent


@pytest.fixture(scope="session")
def cli_env(tmp_path_factory):
    """Environment for `manage.py` subprocesses: DEBUG and a migrated SQLite database of their own."""
    database = tmp_path_factory.mktemp("cli") / "t.db"
    env = {
        **os.environ,
        "DEBUG": "1",
        "DB_ADDRESS": f"sqlite:///{database}",
        "DJANGO_SETTINGS_MODULE": "turbo_site.test_settings",
    }
    env.pop("REDIS_ADDRESS", None)
    migrate = subprocess.run(
        [sys.executable, "manage.py", "migrate", "--noinput", "-v0"], cwd=PROJECT_ROOT, env=env, capture_output=True
    )
    assert migrate.returncode == 0, migrate.stderr
    return env


def run_manage(env, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "manage.py", *args], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=120
    )


def run_python(env, code: str, *args: str) -> str:
    """Run Django code against the subprocess database; returns its stdout."""
    script = "import django; django.setup()\n" + code
    done = subprocess.run(
        [sys.executable, "-c", script, *args], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


# --- the fake OpenAI-compatible upstream -----------------------------------------------------------

SERVER_KEY = "sk-server-side-key"
FAKE_HEADERS = ["x-fake-scenario", "x-fake-delay", "x-fake-chunk-delay", "x-fake-tool", "x-fake-tool-args"]


@pytest.fixture(scope="session")
def fake_upstream():
    from testing.fake_upstream import FakeUpstream

    fake = FakeUpstream()
    fake.start()
    yield fake
    fake.stop()


@pytest.fixture
def upstream(fake_upstream, settings):
    """Turbo pointed at a fresh fake upstream, with a server-side key."""
    fake_upstream.reset()
    settings.OPENAI_API_URL = fake_upstream.url + "/v1"
    settings.OPENAI_API_KEY = SERVER_KEY
    settings.PROXY_FORWARD_HEADERS = FAKE_HEADERS
    yield fake_upstream
    fake_upstream.release()  # never leave a gated response hanging


# --- server processes of a test's own (chats/tests/processes.py) --------------------------------------------------

# How long a server process a test starts may take to answer, at most (a deadline, not a wait): with the
# suite's workers (make test) starting servers at once on a busy machine, importing Django and the app
# can take well over 30s.
SERVER_START_SECONDS = 120


@pytest.fixture
def processes():
    """Servers and Redis processes started by the test, stopped (servers first) at its end."""
    from chats.tests.processes import Server as ServerProcess

    started: list = []
    yield started
    for item in reversed(started):
        if isinstance(item, ServerProcess):
            item.stop()
    for item in started:
        if isinstance(item, subprocess.Popen) and item.poll() is None:
            item.kill()
            item.wait(timeout=10)


@pytest.fixture
def start_server(upstream, processes, tmp_path, request):
    """start_server(**env) -> a running ServerProcess on the test database, with the fake upstream.

    Its output goes to a file in tmp_path, or under $STREAM_FAULT_LOGS if set (kept for reading);
    uvicorn's own lines from `log_level` up (start_server(log_level="info", ...)).
    """
    from django.db import connection

    from chats.tests.processes import Server as ServerProcess

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

    def start(*, log_level: str = "warning", **env: str) -> ServerProcess:
        merged = {**base, **{name: str(value) for name, value in env.items() if value is not None}}
        server = ServerProcess(merged, logs / f"server-{len(processes)}.log", log_level=log_level)
        processes.append(server)
        return server.wait_ready()

    return start
