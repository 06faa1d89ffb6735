"""What a prompt and a read cost as a chat's history grows: database queries and latency.

    python -m bench.prompt_cost [--history 10,1000,100000] [--runs 3] [--repeats 40] [--quick] [--postgres URL]

For each history length it creates a chat holding that many exchanges (bulk-inserted), then measures,
one request at a time, `--repeats` times per run:

* `prompt cold`: POST /chat/prompt with the chat's cached context (`chat-context:<id>`) dropped first,
  so the context is rebuilt from the database;
* `prompt warm`: POST /chat/prompt right after, with the context cached;
* `read`: GET /chat/read, the newest page (the default limit, 100);
* `read before`: GET /chat/read with `before` a message in the middle of the history (limit 100).

Turbo runs in this process (Django's AsyncClient through the ASGI handler and all middleware, on one
event loop as under uvicorn) on a throwaway migrated SQLite database in a temporary folder, or with
`--postgres URL` on a database of its own created on that server and dropped afterwards. Prompts go to
bench.fast_upstream, started as a subprocess. Queries are counted per request by an execute wrapper on
every connection, for the code running on the request's behalf (the event log's writer thread is not
counted). Prints a table and whether the query counts are constant in history length, and writes
bench/results/prompt_cost-<timestamp>.json and bench/results/prompt_cost-latest.json.
This is a benchmark, not a test: it asserts nothing about wall-clock times.
"""

import argparse
import asyncio
import contextvars
import json
import os
import platform
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

import httpx

PROJECT = Path(__file__).resolve().parent.parent
RESULTS = PROJECT / "bench" / "results"
PYTHON = sys.executable
DEFAULTS = {"history": [10, 1_000, 100_000], "runs": 3, "repeats": 40, "warmup": 5}
QUICK = {"history": [10, 1_000, 10_000], "runs": 1, "repeats": 10, "warmup": 2}
OPERATIONS = ("prompt cold", "prompt warm", "read", "read before")
SEED_BATCH = 5_000
# Seeded exchanges: about the size of a short question and a paragraph of answer.
SEED_PROMPT = "question {n}: " + "what about this? " * 6
SEED_REPLY = "answer {n}: " + "here is a sentence of the model's reply. " * 10


class Captured:
    """What the request being measured did to the database: its SQL, and the connections it opened."""

    def __init__(self):
        self.queries: list[str] = []
        self.connects = 0


# Set while a request is measured; copied into the threads that run its sync code, unset elsewhere.
_captured: contextvars.ContextVar[Captured | None] = contextvars.ContextVar("prompt_cost_captured", default=None)


# --- the fake upstream ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def upstream_start(work: Path, latency_ms: float) -> tuple[subprocess.Popen, str]:
    """bench.fast_upstream under uvicorn in its own process; returns it and its /v1 URL once it answers."""
    port = free_port()
    with open(work / "upstream.log", "wb") as log:
        process = subprocess.Popen(
            [PYTHON, "-m", "bench.fast_upstream", "--port", str(port), "--latency-ms", str(latency_ms)],
            cwd=PROJECT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches only us; we stop it ourselves
        )
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the upstream exited with {process.returncode}:\n{(work / 'upstream.log').read_text()}")
        try:
            httpx.get(f"{url}/models", timeout=1, trust_env=False)
            return process, url
        except httpx.HTTPError:
            time.sleep(0.1)
    process.terminate()
    raise RuntimeError("the upstream did not answer within 60 s")


def upstream_stop(process: subprocess.Popen | None) -> None:
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# --- the database ---------------------------------------------------------------------------------


def postgres_create(url: str) -> tuple[str, str]:
    """A new database `turbo_bench_<hex>` on the server of `url`; returns (its name, its URL).

    Only the server and credentials of `url` are used: the bench connects to the maintenance database
    `postgres` to create (and later drop) its own, and never touches the database `url` names.
    """
    import psycopg
    from psycopg import sql

    name = f"turbo_bench_{secrets.token_hex(4)}"
    parts = urlsplit(url)
    with psycopg.connect(parts._replace(path="/postgres").geturl(), autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return name, parts._replace(path=f"/{name}").geturl()


def postgres_drop(url: str, name: str) -> None:
    import psycopg
    from psycopg import sql

    with psycopg.connect(urlsplit(url)._replace(path="/postgres").geturl(), autocommit=True) as admin:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def django_setup(*, db_address: str, upstream_url: str) -> None:
    """Production settings (DEBUG off) on the bench's database and upstream; then migrate."""
    for name in ("REDIS_ADDRESS", "DJANGO_SETTINGS_MODULE"):
        os.environ.pop(name, None)
    os.environ.update(
        DJANGO_SETTINGS_MODULE="turbo_site.settings",
        DEBUG="0",
        SECRET_KEY=secrets.token_urlsafe(50),
        DB_ADDRESS=db_address,
        OPENAI_API_URL=upstream_url,
        OPENAI_API_KEY="sk-bench",
        ALLOWED_HOSTS="testserver",  # the host name Django's test clients send
        SESSION_CACHE_SECONDS="86400",  # a steady state: the token's session stays cached
        LOG_LEVEL="WARNING",
    )
    import django

    django.setup()
    from django.core.management import call_command
    from django.db.backends.signals import connection_created

    connection_created.connect(_install_counter)
    call_command("migrate", interactive=False, verbosity=0)


def _count_query(execute, sql, params, many, context):
    captured = _captured.get()
    if captured is not None:
        captured.queries.append(sql)
    return execute(sql, params, many, context)


def _install_counter(sender, connection, **kwargs) -> None:
    captured = _captured.get()
    if captured is not None:
        captured.connects += 1
    if _count_query not in connection.execute_wrappers:
        connection.execute_wrappers.append(_count_query)


def seed(*, chat_id: str, author_id: str, size: int) -> float:
    """Bulk-insert `size` complete exchanges into the chat, then ANALYZE; returns the seconds it took."""
    from django.db import connection, transaction

    from chats.models import Message

    started = time.perf_counter()
    for first in range(0, size, SEED_BATCH):
        with transaction.atomic():
            Message.objects.bulk_create(
                [
                    Message(
                        chat_id=chat_id,
                        author_id=author_id,
                        prompt=SEED_PROMPT.format(n=n),
                        reply=SEED_REPLY.format(n=n),
                        model="bench-model",
                    )
                    for n in range(first, min(first + SEED_BATCH, size))
                ],
                batch_size=1_000,
            )
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE")  # fresh planner statistics, as autovacuum keeps them on a live server
    return time.perf_counter() - started


def middle_message_id(chat_id: str) -> str:
    from chats.models import Message

    messages = Message.objects.filter(chat_id=chat_id).order_by("created_at", "id")
    return str(messages.values_list("pk", flat=True)[messages.count() // 2])


# --- measuring ------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100), interpolated between the nearest ranks."""
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


class Target:
    """One chat with its history, and how to run each operation against it."""

    def __init__(self, client, *, size: int, chat_id: str, before_id: str):
        self.client = client
        self.size = size
        self.chat_id = chat_id
        self.before_id = before_id

    async def prompt(self, *, cold: bool):
        from django.core.cache import cache

        from chats.context import CONTEXT_CACHE_PREFIX

        if cold:
            await cache.adelete(f"{CONTEXT_CACHE_PREFIX}{self.chat_id}")
        body = {"id": self.chat_id, "prompt": "how long is this history?"}
        return await self.timed(
            lambda: self.client.post("/chat/prompt", body, content_type="application/json"), "message"
        )

    async def read(self, *, before: bool):
        query = {"id": self.chat_id, "limit": "100", **({"before": self.before_id} if before else {})}
        return await self.timed(lambda: self.client.get("/chat/read", query), "messages")

    async def timed(self, send, expect: str) -> tuple[float, Captured]:
        """(milliseconds, what it did to the database) of one request, which must succeed."""
        from asgiref.sync import sync_to_async
        from django.db import close_old_connections

        captured = Captured()
        token = _captured.set(captured)
        try:
            started = time.perf_counter()
            response = await send()
            elapsed = (time.perf_counter() - started) * 1000
        finally:
            _captured.reset(token)
        # What the ASGI handler does once a response is sent (Django's test clients leave it out): with
        # CONN_MAX_AGE 0 the connection closes, and the next request opens its own, as in production.
        await sync_to_async(close_old_connections)()
        if response.status_code != 200 or expect not in response.json():
            raise RuntimeError(f"{response.status_code} from Turbo: {response.content[:500]!r}")
        return elapsed, captured

    async def run(self, operation: str) -> tuple[float, Captured]:
        if operation == "prompt cold":
            return await self.prompt(cold=True)
        if operation == "prompt warm":
            return await self.prompt(cold=False)
        return await self.read(before=operation == "read before")


async def prepare(client, sizes: list[int]) -> list[Target]:
    """Sign a user up, then one chat per history length, seeded."""
    from asgiref.sync import sync_to_async

    signed = await client.post(
        "/user/signup",
        {"username": f"bench-{secrets.token_hex(4)}", "password": secrets.token_urlsafe(16)},
        content_type="application/json",
    )
    if signed.status_code != 200:
        raise RuntimeError(f"signup failed: {signed.status_code} {signed.content[:500]!r}")
    client.defaults["HTTP_AUTHORIZATION"] = f"Bearer {signed.json()['token']}"
    targets = []
    for size in sizes:
        made = await client.post("/chat/create", {"name": f"history {size}"}, content_type="application/json")
        chat = made.json()
        seconds = await sync_to_async(seed)(chat_id=chat["id"], author_id=chat["owner_id"], size=size)
        print(f"seeded {size:>7} messages in {seconds:.1f} s", file=sys.stderr)
        before_id = await sync_to_async(middle_message_id)(chat["id"])
        targets.append(Target(client, size=size, chat_id=chat["id"], before_id=before_id))
    return targets


async def measure(args) -> list[dict]:
    """Every history length, every operation, `--runs` runs of `--repeats` requests each, interleaved."""
    from django.test import AsyncClient

    from turbo_site.core.loops import loop_clients_close

    client = AsyncClient()
    targets = await prepare(client, args.history)
    samples = {(t.size, op): [[] for _ in range(args.runs)] for t in targets for op in OPERATIONS}
    counts = {(t.size, op): [] for t in targets for op in OPERATIONS}
    connects = {(t.size, op): [] for t in targets for op in OPERATIONS}
    last_sql: dict[tuple[int, str], list[str]] = {}
    for target in targets:
        for _ in range(args.warmup):
            for operation in OPERATIONS:
                await target.run(operation)
    for run in range(args.runs):
        for target in targets:
            for _ in range(args.repeats):
                for operation in OPERATIONS:
                    elapsed, captured = await target.run(operation)
                    samples[target.size, operation][run].append(elapsed)
                    counts[target.size, operation].append(len(captured.queries))
                    connects[target.size, operation].append(captured.connects)
                    last_sql[target.size, operation] = captured.queries
        print(f"run {run + 1}/{args.runs} done", file=sys.stderr)
    await loop_clients_close()  # before the loop ends, so no connection is left dangling
    results = []
    for target in targets:
        for operation in OPERATIONS:
            key = (target.size, operation)
            per_run = [
                {"p50_ms": percentile(values, 50), "p99_ms": percentile(values, 99), "requests": len(values)}
                for values in samples[key]
            ]
            results.append(
                {
                    "history": target.size,
                    "operation": operation,
                    "queries": sorted(set(counts[key])),
                    "connections_opened": statistics.mean(connects[key]),
                    "p50_ms": statistics.median(run["p50_ms"] for run in per_run),
                    "p99_ms": statistics.median(run["p99_ms"] for run in per_run),
                    "runs": per_run,
                    "samples_ms": samples[key],
                    "sql": last_sql[key],
                }
            )
    return results


# --- the report -----------------------------------------------------------------------------------


def judge(results: list[dict]) -> dict:
    """Constant: every request of an operation made the same number of queries, at every history length."""
    verdict = {}
    for operation in OPERATIONS:
        seen = {count for row in results if row["operation"] == operation for count in row["queries"]}
        verdict[operation] = {"queries": sorted(seen), "constant": len(seen) == 1}
    verdict["met"] = all(verdict[operation]["constant"] for operation in OPERATIONS)
    return verdict


def render(report: dict) -> str:
    settings = report["settings"]
    lines = [
        f"Turbo prompt and read cost by history length: {settings['database']}, median of {settings['runs']} "
        f"run(s) of {settings['repeats']} requests per cell (+{settings['warmup']} warm-up); "
        f"upstream latency {settings['upstream_latency_ms']:g} ms; one request at a time; times in ms",
        "",
        "  history | operation   | queries | connects |     p50 |     p99",
    ]
    for row in report["results"]:
        queries = ",".join(str(count) for count in row["queries"])
        lines.append(
            f"{row['history']:>9} | {row['operation']:<11} | {queries:>7} | {row['connections_opened']:>8.1f} | "
            f"{row['p50_ms']:>7.2f} | "
            f"{row['p99_ms']:>7.2f}"
        )
    verdict = report["verdict"]
    details = "; ".join(
        f"{operation} {','.join(str(count) for count in verdict[operation]['queries'])}" for operation in OPERATIONS
    )
    lines += [
        "",
        f"queries per prompt and per read constant in history length: {'MET' if verdict['met'] else 'MISSED'}"
        f" ({details})",
    ]
    return "\n".join(lines)


def report_write(report: dict, names: list[str]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    paths = [RESULTS / name for name in names]
    for path in paths:
        path.write_text(json.dumps(report, indent=2))
    print("\nwrote " + " and ".join(str(path.relative_to(PROJECT)) for path in paths))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--history",
        type=lambda text: [int(part) for part in text.split(",") if part.strip()],
        help="history lengths in messages, comma-separated (default 10,1000,100000)",
    )
    parser.add_argument("--runs", type=int, help="runs; each figure is the median across runs (default 3)")
    parser.add_argument("--repeats", type=int, help="requests per operation, history length and run (default 40)")
    parser.add_argument("--warmup", type=int, help="unmeasured rounds per history length first (default 5)")
    parser.add_argument("--quick", action="store_true", help="history 10,1000,10000; 10 repeats; 1 run")
    parser.add_argument(
        "--upstream-latency-ms", type=float, default=0.0, help="the fake upstream's wait before answering (default 0)"
    )
    parser.add_argument(
        "--postgres",
        metavar="URL",
        help="run on Postgres: a database of the bench's own is created on this server and dropped afterwards",
    )
    args = parser.parse_args()
    chosen = QUICK if args.quick else DEFAULTS
    for name, value in chosen.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if not args.history or min(args.history) < 1 or args.runs < 1 or args.repeats < 1 or args.warmup < 0:
        parser.error("--history lengths, --runs and --repeats must be at least 1")
    if args.postgres and not args.postgres.startswith(("postgres://", "postgresql://")):
        parser.error("--postgres takes a postgresql:// URL")
    args.history = sorted(set(args.history))
    return args


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main() -> None:
    args = parse_args()
    signal.signal(signal.SIGTERM, _interrupt)  # unwinds like Ctrl-C: the finally below cleans up
    started_at = datetime.now(UTC)
    clock = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="turbo-prompt-cost-"))
    upstream = None
    database = None
    django_ready = False
    try:
        upstream, upstream_url = upstream_start(work, args.upstream_latency_ms)
        if args.postgres:
            database, db_address = postgres_create(args.postgres)
        else:
            db_address = f"sqlite:///{work / 'bench.db'}"
        django_setup(db_address=db_address, upstream_url=upstream_url)
        django_ready = True
        results = asyncio.run(measure(args))
        report = {
            "started_at": started_at.isoformat(),
            "finished_at": datetime.now(UTC).isoformat(),
            "duration_s": round(time.monotonic() - clock, 1),
            "settings": {
                "history": args.history,
                "runs": args.runs,
                "repeats": args.repeats,
                "warmup": args.warmup,
                "quick": args.quick,
                "upstream_latency_ms": args.upstream_latency_ms,
                "database": "postgres" if args.postgres else "sqlite",
            },
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
            "verdict": judge(results),
            "results": results,
        }
        report["table"] = render(report)
        print(report["table"])
        stamp = started_at.strftime("%Y%m%d-%H%M%S")
        report_write(report, [f"prompt_cost-{stamp}.json", "prompt_cost-latest.json"])
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    finally:
        if django_ready:
            from django.db import connections

            from proxy.events import events_shutdown

            events_shutdown(flush=False)  # the database is about to go
            connections.close_all()
        upstream_stop(upstream)
        if database:
            postgres_drop(args.postgres, database)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
