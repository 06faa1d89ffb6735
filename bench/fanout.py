"""Fan-out: how long a streamed reply's deltas take to reach every member of a group chat over WebSocket.

    python -m bench.fanout [--subscribers 1,10,100] [--deltas 20] [--runs 3] [--layer memory|redis|both] [--quick]
    python -m bench.fanout --chats 10 --prompts 50 --subscribers 20 [--servers 2] [--db-address postgresql://...]

Starts the fake upstream (bench.fast_upstream: `--deltas` chunks `--chunk-gap-ms` apart, each carrying its
send time `t=<time.time_ns()>`) and, for each stream backend ("layer": in-memory, or Redis Streams with
REDIS_ADDRESS), Turbo under uvicorn as bench.proxy_overhead does, on one throwaway SQLite database (or
`--db-address`). For each subscriber count S
it makes a group of S users signed up through the API, creates a chat in that group, opens one WebSocket
per member on the chat's `/chat/stream` from a separate process (bench.fanout_subscribers), and has the
first member send streamed prompts through `/chat/prompt`. A delta's delay at a subscriber is its arrival
time there minus the upstream's send time (same machine, same clock). Reports p50/p99 per (layer, S),
the median across runs, and every delta missing or duplicated at any subscriber; prints a table and the
target, and writes bench/results/fanout-<timestamp>.json and bench/results/fanout-latest.json.

`--chats N` is the many-chats case instead (as chats/tests/test_stream_load.py, measured): N group chats
of `--subscribers` members each, every member subscribed to its chat from this process (members alternate
SSE and WebSocket, and pairs of them the Turbo process), Turbo in `--servers` processes sharing the
database and Redis (one process in-memory); then `--runs` rounds of `--prompts` streamed prompts sent all
at once, spread over the chats and the processes. Per round: delivery delay p50/p99 (as above), POST
/chat/prompt latency, every delta missing, duplicated or out of order, final events missing or repeated,
holes in each subscriber's seqs and any notice (stream.gap, stream.error), and the Turbo processes' CPU
(/proc utime+stime, first prompt to last final event) per delta delivered. Writes
bench/results/fanout-many-<timestamp>.json and fanout-many-latest.json.
This is a benchmark, not a test: it asserts nothing about wall-clock times.
"""

import argparse
import asyncio
import json
import os
import platform
import queue
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from datetime import UTC, datetime
from pathlib import Path

import httpx
from websockets.asyncio.client import connect as ws_connect

from bench.fast_upstream import fastest_server_parts
from bench.loadgen import distribution
from bench.proxy_overhead import (
    PROJECT,
    PYTHON,
    Processes,
    cpu_seconds,
    fmt,
    free_port,
    pair,
    report_write,
    signup,
    turbo_env,
    wait_until_answering,
)

LAYERS = ("memory", "redis")
QUICK = {"runs": 1, "prompts": 5, "warmup": 1}
DEFAULT_REDIS = "redis://127.0.0.1:6379/13"
# The issue's target: (layer, subscribers, percentile, limit in ms).
TARGET = ("redis", 100, "p99", 50.0)
TARGET_NAME = "fan-out to 100 subscribers: p99 delivery delay <= 50 ms (Redis layer)"
SENT_AT = re.compile(r"t=(\d+)")
MEMBERS_PER_CALL = 100  # /group/members/add takes at most 100 ids at once
# Per-subscriber checks: each counts deltas (or prompts, for the last four) over a cell's measured prompts.
ISSUES = ("missing", "duplicated", "unexpected", "out_of_order", "late", "no_final", "silent", "wrong_reply")
FIGURES = ("delay_ms", "spread_ms", "prompt_ms")

# As `make serve` runs it (uvloop, httptools, no per-message compression of WebSocket frames).
SERVE_FLAGS = ["--loop", "uvloop", "--http", "httptools", "--ws-per-message-deflate", "false"]


def turbo_start(processes: Processes, name: str, port: int, env: dict, *flags: str) -> subprocess.Popen:
    """Turbo under uvicorn as `make serve` runs it, on `port`, access log off, with `flags` added."""
    return processes.start(
        name,
        [PYTHON, "-m", "uvicorn", "turbo_site.asgi:application", "--port", str(port)]
        + ["--log-level", "warning", "--no-access-log", *flags]
        + SERVE_FLAGS,
        env,
    )


# --- the subscriber process -----------------------------------------------------------------------


class Subscribers:
    """bench.fanout_subscribers for one chat: S sockets, driven by JSON lines on its stdin and stdout."""

    def __init__(self, log_path: Path):
        self.log_path = log_path
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(
                [PYTHON, "-m", "bench.fanout_subscribers"],
                cwd=PROJECT,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                start_new_session=True,
            )
        self.lines: queue.Queue[bytes | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def _log_tail(self) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-30:])

    def send(self, data: dict) -> None:
        self.process.stdin.write((json.dumps(data) + "\n").encode())
        self.process.stdin.flush()

    def receive(self, timeout: float) -> dict:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise RuntimeError(
                f"the subscriber process did not answer within {timeout:g} s:\n{self._log_tail()}"
            ) from None
        if line is None:
            code = self.process.wait()
            raise RuntimeError(f"the subscriber process exited with {code}:\n{self._log_tail()}")
        return json.loads(line)

    def stop(self) -> None:
        if self.process.poll() is None:
            try:
                self.send({"cmd": "quit"})
                self.process.wait(timeout=20)
            except (OSError, subprocess.TimeoutExpired):
                self.process.terminate()
                try:
                    self.process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()


# --- Turbo's API ----------------------------------------------------------------------------------


def call(http: httpx.Client, path: str, token: str, **data) -> dict:
    response = http.post(path, json=data, headers={"Authorization": f"Bearer {token}"})
    if response.status_code != 200:
        raise RuntimeError(f"{path} answered {response.status_code}: {response.text[:500]}")
    return response.json()


def sign_up_members(turbo_url: str, count: int) -> list[dict]:
    """`count` fresh users: their token and id."""
    members = []
    with httpx.Client(base_url=turbo_url, timeout=30, trust_env=False) as http:
        for _ in range(count):
            token = signup(turbo_url)
            members.append({"token": token, "id": call(http, "/user/session", token)["user"]["id"]})
    return members


def make_group_chat(http: httpx.Client, members: list[dict], layer: str) -> str:
    """A group of these members (the first owns it) and a chat in it; the chat's id."""
    owner = members[0]["token"]
    group = call(http, "/group/create", owner, name=f"fan-out {layer} {len(members)}")
    others = [member["id"] for member in members[1:]]
    for start in range(0, len(others), MEMBERS_PER_CALL):
        call(http, "/group/members/add", owner, group_id=group["id"], user_ids=others[start : start + MEMBERS_PER_CALL])
    return call(http, "/chat/create", owner, name=f"fan-out {layer} {len(members)}", group_id=group["id"])["id"]


def stored_messages(http: httpx.Client, token: str, chat_id: str, count: int) -> dict[str, dict]:
    """The chat's newest `count` messages as saved, by id."""
    messages = call(http, "/chat/read", token, id=chat_id, limit=min(max(count, 1), 500))["messages"]
    return {message["id"]: message for message in messages}


# --- checks and figures ---------------------------------------------------------------------------


def check_prompt(collected: dict, stored: dict | None, deltas: int) -> dict:
    """One prompt's deliveries against the reply Turbo saved: delays, spreads and each socket's issues."""
    reply = (stored or {}).get("reply") or ""
    expected = {int(sent): index for index, sent in enumerate(SENT_AT.findall(reply))}
    delays: list[float] = []
    arrivals: dict[int, list[int]] = defaultdict(list)
    sockets = []
    for socket in collected["sockets"]:
        seen: set[int] = set()
        issues = Counter()
        highest = -1
        for _seq, delta, arrival in socket["deltas"]:
            for match in SENT_AT.findall(delta):
                sent = int(match)
                if sent in seen:
                    issues["duplicated"] += 1
                    continue
                seen.add(sent)
                delays.append((arrival - sent) / 1e6)
                arrivals[sent].append(arrival)
                if sent not in expected:
                    issues["unexpected"] += 1
                elif expected[sent] < highest:
                    issues["out_of_order"] += 1
                highest = max(highest, expected.get(sent, -1))
        issues["missing"] = len(expected.keys() - seen)
        issues["late"] = socket["late"]
        issues["no_final"] = int(not socket["final"])
        issues["silent"] = int(not socket["events"])
        issues["wrong_reply"] = int(socket["final"] and socket["final_reply"] != reply)
        sockets.append({"issues": {name: issues[name] for name in ISSUES}, "closed": socket["closed"]})
    return {
        "delays": delays,
        "spreads": [(max(times) - min(times)) / 1e6 for times in arrivals.values() if len(times) > 1],
        "sockets": sockets,
        # What Turbo saved: every delta the upstream sent, and the message complete?
        "saved_deltas": len(expected),
        "saved_status": (stored or {}).get("status", "not found"),
        "saved_complete": len(expected) == deltas and (stored or {}).get("status") == "complete",
    }


def summarise_run(checks: list[dict], prompt_ms: list[float], size: int) -> dict:
    per_subscriber = [Counter() for _ in range(size)]
    closed: dict[int, str] = {}
    for check in checks:
        for index, socket in enumerate(check["sockets"]):
            per_subscriber[index].update(socket["issues"])
            if socket["closed"]:
                closed[index] = socket["closed"]
    totals = sum(per_subscriber, Counter())
    return {
        "delay_ms": distribution([d for check in checks for d in check["delays"]]),
        "spread_ms": distribution([s for check in checks for s in check["spreads"]]),
        "prompt_ms": distribution(prompt_ms),
        "issues": {name: totals[name] for name in ISSUES},
        "subscribers_with_issues": {
            index: {name: count for name, count in counts.items() if count}
            for index, counts in enumerate(per_subscriber)
            if any(counts.values())
        },
        "closed": closed,
        "saved_incomplete": [
            {"deltas": check["saved_deltas"], "status": check["saved_status"]}
            for check in checks
            if not check["saved_complete"]
        ],
    }


def median_of_runs(runs: list[dict]) -> dict:
    """Each figure's median across runs; issue counts are summed, so none is hidden by a median."""
    merged: dict = {"runs": len(runs)}
    for figure in FIGURES:
        present = [run[figure] for run in runs if run.get(figure)]
        merged[figure] = (
            {stat: round(statistics.median(d[stat] for d in present), 3) for stat in ("p50", "p99", "mean", "max")}
            if present
            else None
        )
    for key in ("turbo_cpu_ms_per_prompt", "subscriber_cpu_share"):
        values = [run[key] for run in runs if run.get(key) is not None]
        merged[key] = round(statistics.median(values), 3) if values else None
    merged["issues"] = {name: sum(run["issues"][name] for run in runs) for name in ISSUES}
    with_issues: dict[int, Counter] = defaultdict(Counter)
    for run in runs:
        for index, counts in run["subscribers_with_issues"].items():
            with_issues[int(index)].update(counts)
    merged["subscribers_with_issues"] = {index: dict(counts) for index, counts in sorted(with_issues.items())}
    merged["closed"] = {index: reason for run in runs for index, reason in run["closed"].items()}
    merged["saved_incomplete"] = [item for run in runs for item in run["saved_incomplete"]]
    return merged


def judge_target(results: list[dict]) -> dict:
    layer, size, stat, limit = TARGET
    row = next((r for r in results if r["layer"] == layer and r["subscribers"] == size), None)
    value = row["delay_ms"][stat] if row and row["delay_ms"] else None
    complete = bool(row) and not any(row["issues"].values()) and not row["closed"]
    if value is None:
        verdict = "NOT MEASURED"
    elif not complete:
        verdict = "MISSED (incomplete delivery)"
    else:
        verdict = "MET" if value <= limit else "MISSED"
    return {
        "target": TARGET_NAME,
        "layer": layer,
        "subscribers": size,
        "percentile": stat,
        "limit_ms": limit,
        "value_ms": value,
        "p50_ms": row["delay_ms"]["p50"] if value is not None else None,
        "verdict": verdict,
    }


# --- the measurement ------------------------------------------------------------------------------


def one_prompt(http: httpx.Client, subscribers: Subscribers, *, token: str, chat_id: str, timeout: float):
    """Send one streamed prompt and wait for every socket to have it; (message id, deliveries, POST ms)."""
    started = time.perf_counter()
    body = call(http, "/chat/prompt", token, id=chat_id, prompt="Count for me.", stream=True, context=0)
    prompt_ms = (time.perf_counter() - started) * 1000
    message_id = body["message"]["id"]
    subscribers.send({"cmd": "collect", "message_id": message_id, "timeout": timeout})
    collected = subscribers.receive(timeout + 60)
    return message_id, collected, prompt_ms


def measure_cell(args, *, layer: str, turbo_url: str, turbo_pid: int, members: list[dict], work: Path) -> dict:
    """One (layer, S): its group chat, its subscriber process, warm-up, then `--runs` runs of `--prompts`."""
    size = len(members)
    token = members[0]["token"]
    ws_url = turbo_url.replace("http://", "ws://", 1)
    with httpx.Client(base_url=turbo_url, timeout=60, trust_env=False) as http:
        chat_id = make_group_chat(http, members, layer)
        subscribers = Subscribers(work / f"subscribers-{layer}-{size}.log")
        try:
            subscribers.send(
                {
                    "url": f"{ws_url}/chat/stream?id={chat_id}",
                    "origin": turbo_url,
                    "tokens": [member["token"] for member in members],
                }
            )
            ready = subscribers.receive(60 + size)
            if ready["connected"] != size:
                raise RuntimeError(f"only {ready['connected']} of {size} sockets connected: {ready['failed'][:5]}")
            warmup_checks = []
            for _ in range(args.warmup):
                message_id, collected, _ = one_prompt(
                    http, subscribers, token=token, chat_id=chat_id, timeout=args.timeout
                )
                stored = stored_messages(http, token, chat_id, 1).get(message_id)
                warmup_checks.append(check_prompt(collected, stored, args.deltas))
            runs = []
            for run in range(args.runs):
                sent: list[tuple[str, dict, float]] = []
                cpu_turbo, cpu_subscribers = cpu_seconds(turbo_pid), cpu_seconds(subscribers.process.pid)
                wall = time.monotonic()
                for _ in range(args.prompts):
                    sent.append(one_prompt(http, subscribers, token=token, chat_id=chat_id, timeout=args.timeout))
                wall = time.monotonic() - wall
                cpu_turbo_after = cpu_seconds(turbo_pid)
                cpu_subscribers_after = cpu_seconds(subscribers.process.pid)
                # Read back what Turbo saved only now, so that it is not part of the CPU figures.
                stored = stored_messages(http, token, chat_id, args.prompts)
                checks = [check_prompt(collected, stored.get(mid), args.deltas) for mid, collected, _ in sent]
                summary = summarise_run(checks, [ms for _, _, ms in sent], size)
                summary["turbo_cpu_ms_per_prompt"] = (
                    round((cpu_turbo_after - cpu_turbo) * 1000 / args.prompts, 3)
                    if cpu_turbo is not None and cpu_turbo_after is not None
                    else None
                )
                summary["subscriber_cpu_share"] = (
                    round((cpu_subscribers_after - cpu_subscribers) / wall, 3)
                    if cpu_subscribers is not None and cpu_subscribers_after is not None and wall > 0
                    else None
                )
                runs.append(summary)
                delay = summary["delay_ms"] or {}
                print(
                    f"  {layer} S={size} run {run + 1}/{args.runs}: delay p50 {delay.get('p50', '-')} ms, "
                    f"p99 {delay.get('p99', '-')} ms, missing {summary['issues']['missing']}, "
                    f"duplicated {summary['issues']['duplicated']}",
                    file=sys.stderr,
                    flush=True,
                )
        finally:
            subscribers.stop()
    warmup_issues = summarise_run(warmup_checks, [], size)["issues"] if warmup_checks else {}
    return {
        "layer": layer,
        "subscribers": size,
        "chat_id": chat_id,
        "compression": ready["compression"],
        **median_of_runs(runs),
        "warmup_issues": warmup_issues,
        "run_summaries": runs,
    }


def redis_check(url: str) -> None:
    import redis

    try:
        redis.Redis.from_url(url, socket_timeout=5).ping()
    except redis.RedisError as exc:
        raise SystemExit(f"Redis at {url} did not answer ({exc}); start it, or run with --layer memory") from None


def redis_forget(url: str, chat_ids: list[str]) -> None:
    """Delete the chats' streams and sequence counters (kept for days) from the Redis database we used."""
    import redis

    try:
        client = redis.Redis.from_url(url, socket_timeout=5)
        for chat_id in chat_ids:
            # turbo_site.core.streams: one counter and one Redis stream per chat, both tagged {chat.<id>}.
            client.delete(f"turbo:seq:{{chat.{chat_id}}}", f"turbo:stream:{{chat.{chat_id}}}")
    except redis.RedisError as exc:
        print(f"could not tidy Redis up: {exc}", file=sys.stderr)


def layer_env(args, layer: str, *, upstream_port: int, db_address: str) -> dict:
    """Turbo's environment for one stream backend (Redis when `layer` is redis)."""
    env = turbo_env(
        argparse.Namespace(redis=args.redis_url if layer == "redis" else "", limits=False),
        upstream_port=upstream_port,
        db_address=db_address,
    )
    if not args.production_hasher:
        env["DJANGO_SETTINGS_MODULE"] = "bench.settings"
    return env


def run_layer(
    args, layer: str, results: list[dict], *, work: Path, upstream_port: int, db_address: str, members: list[dict]
) -> list[str]:
    """Turbo with this layer, every subscriber count in turn; returns Turbo's notable log lines."""
    env = layer_env(args, layer, upstream_port=upstream_port, db_address=db_address)
    processes = Processes(work)
    name = f"turbo-{layer}"
    port = free_port()
    turbo_url = f"http://127.0.0.1:{port}"
    chat_ids = []
    try:
        turbo = turbo_start(processes, name, port, env)
        wait_until_answering(processes, name, turbo, f"{turbo_url}/health")
        if not members:
            started = time.monotonic()
            members.extend(sign_up_members(turbo_url, max(args.subscribers)))
            print(f"signed up {len(members)} users in {time.monotonic() - started:.1f} s", file=sys.stderr)
        for size in args.subscribers:
            row = measure_cell(
                args, layer=layer, turbo_url=turbo_url, turbo_pid=turbo.pid, members=members[:size], work=work
            )
            chat_ids.append(row["chat_id"])
            results.append(row)
    finally:
        processes.stop_all()
        if layer == "redis" and chat_ids:
            redis_forget(args.redis_url, chat_ids)
    # httpx logs every upstream request at INFO; anything else Turbo said is worth a look.
    return [line for line in processes.log_lines(name) if not line.startswith("HTTP Request:")]


# --- many chats at once ---------------------------------------------------------------------------

# Per subscriber, counted over a run's prompts (deltas for the first four, events or messages for the rest).
MANY_ISSUES = (
    "missing",
    "duplicated",
    "unexpected",
    "out_of_order",
    "no_final",
    "extra_final",
    "wrong_reply",
    "seq_holes",
    "notices",
    "late",
)
SIGNUPS_AT_ONCE = 16
HANDSHAKES_AT_ONCE = 20
FINAL_TYPES = ('"type":"message.completed"', '"type":"message.failed"')  # compact JSON, right after "seq"
SETTLE_SECONDS = 0.5  # after a run's last final event, for late duplicates to show up


class Stream:
    """One member's subscription to its chat, over SSE or WebSocket, in this process.

    Frames are kept as text with their arrival time (`time.time_ns()` as the bytes are handed over) and
    parsed only after a run, so that receiving adds as little as it can to the delays.
    """

    def __init__(self, index: int, *, kind: str, chat: int, chat_id: str, base: str, token: str):
        self.index, self.kind, self.chat, self.chat_id, self.base, self.token = index, kind, chat, chat_id, base, token
        self.frames: list[tuple[int, str]] = []  # (arrival_ns, SSE frame or WebSocket text)
        self.finals = 0
        self.finals_wanted = 0
        self.last_seq: int | None = None
        self.failure: str | None = None
        self.ready = asyncio.Event()
        self.done = asyncio.Event()
        self.task: asyncio.Task | None = None

    def _got(self, arrival: int, text: str) -> None:
        self.frames.append((arrival, text))
        if any(mark in text[:200] for mark in FINAL_TYPES):
            self.finals += 1
            if self.finals >= self.finals_wanted:
                self.done.set()

    def expect(self, finals: int) -> None:
        """The next `finals` final events end the round."""
        self.finals, self.finals_wanted = 0, finals
        self.done.clear()
        if self.failure is not None:
            self.done.set()

    async def run(self, sse: httpx.AsyncClient, gate: asyncio.Semaphore) -> None:
        try:
            if self.kind == "sse":
                await self._sse(sse, gate)
            else:
                await self._ws(gate)
            self.failure = self.failure or "the stream ended"
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # reported with the results, not raised
            self.failure = f"{type(exc).__name__}: {exc}"[:300]
        finally:
            self.ready.set()
            self.done.set()

    async def _sse(self, http: httpx.AsyncClient, gate: asyncio.Semaphore) -> None:
        await gate.acquire()
        held = True
        try:
            headers = {"Authorization": f"Bearer {self.token}"}
            async with http.stream("GET", f"{self.base}/chat/stream?id={self.chat_id}", headers=headers) as response:
                if response.status_code != 200:
                    self.failure = f"SSE answered {response.status_code}"
                    return
                buffer = b""
                async for chunk in response.aiter_raw():
                    arrival = time.time_ns()
                    buffer += chunk
                    *complete, buffer = buffer.split(b"\n\n")
                    for frame in complete:
                        if frame.startswith(b"retry:"):  # the first frame: subscribed
                            if held:
                                gate.release()
                                held = False
                            self.ready.set()
                        elif not frame.startswith(b":"):  # heartbeats are comments
                            self._got(arrival, frame.decode())
        finally:
            if held:
                gate.release()

    async def _ws(self, gate: asyncio.Semaphore) -> None:
        url = self.base.replace("http://", "ws://", 1) + f"/chat/stream?id={self.chat_id}&token={self.token}"
        async with gate:
            connection = await ws_connect(
                url, origin=self.base, proxy=None, ping_interval=None, open_timeout=60, max_size=None, max_queue=None
            )
        self.ready.set()  # the server subscribes before it accepts the handshake
        try:
            async for frame in connection:
                self._got(time.time_ns(), frame)
            self.failure = f"closed: code {connection.close_code} {connection.close_reason or ''}".strip()
        finally:
            await asyncio.wait_for(connection.close(), 5)

    def take(self) -> list[tuple[int, dict, int | None]]:
        """The frames so far as (arrival_ns, event, SSE id), emptied."""
        frames, self.frames = self.frames, []
        events = []
        for arrival, text in frames:
            sse_id = None
            if self.kind == "sse":
                data = []
                for line in text.split("\n"):
                    if line.startswith("id:"):
                        sse_id = int(line[3:].strip())
                    elif line.startswith("data:"):
                        data.append(line[5:].removeprefix(" "))
                text = "\n".join(data)
            events.append((arrival, json.loads(text), sse_id))
        return events


def check_stream(stream: Stream, events: list, stored: dict[str, dict], earlier: set[str]) -> tuple[Counter, list]:
    """One subscriber's round against the replies Turbo saved: its issues, and each delta's delay (ms)."""
    issues = Counter()
    delays = []
    by_message: dict[str, list[tuple[int, dict]]] = defaultdict(list)
    for arrival, event, sse_id in events:
        if "seq" not in event:
            issues["notices"] += 1  # stream.gap, stream.error, server.shutdown, stream.closed
            continue
        seq = event["seq"]
        if (stream.last_seq is not None and seq != stream.last_seq + 1) or (stream.kind == "sse" and sse_id != seq):
            issues["seq_holes"] += 1
        stream.last_seq = seq
        message_id = str((event.get("message") or {}).get("id"))
        if message_id in stored:
            by_message[message_id].append((arrival, event))
        elif message_id in earlier:
            issues["late"] += 1
        else:
            issues["unexpected"] += 1
    for message_id, message in stored.items():
        reply = message.get("reply") or ""
        position = {int(sent): index for index, sent in enumerate(SENT_AT.findall(reply))}
        seen: set[int] = set()
        highest = -1
        finals = []
        for arrival, event in by_message.get(message_id, []):
            if event["type"] in ("message.completed", "message.failed"):
                finals.append(event)
            for match in SENT_AT.findall(event.get("delta") or ""):
                sent = int(match)
                if sent in seen:
                    issues["duplicated"] += 1
                    continue
                seen.add(sent)
                delays.append((arrival - sent) / 1e6)
                if sent not in position:
                    issues["unexpected"] += 1
                elif position[sent] < highest:
                    issues["out_of_order"] += 1
                highest = max(highest, position.get(sent, -1))
        issues["missing"] += len(position.keys() - seen)
        issues["no_final"] += int(not finals)
        issues["extra_final"] += max(len(finals) - 1, 0)
        issues["wrong_reply"] += sum(final["message"].get("reply") != reply for final in finals)
    return issues, delays


async def many_signups(bases: list[str], count: int) -> list[dict]:
    gate = asyncio.Semaphore(SIGNUPS_AT_ONCE)
    limits = httpx.Limits(keepalive_expiry=1)  # see many_measure
    async with httpx.AsyncClient(timeout=60, limits=limits, trust_env=False) as http:

        async def one(index: int) -> dict:
            async with gate:
                response = await http.post(
                    f"{bases[index % len(bases)]}/user/signup",
                    data={"username": f"bench-{secrets.token_hex(5)}", "password": secrets.token_urlsafe(16)},
                )
            if response.status_code != 200:
                raise RuntimeError(f"signup failed: {response.status_code} {response.text[:500]}")
            body = response.json()
            return {"token": body["token"], "id": body["user"]["id"]}

        return list(await asyncio.gather(*(one(index) for index in range(count))))


async def acall(http: httpx.AsyncClient, url: str, token: str, **data) -> dict:
    try:
        response = await http.post(url, json=data, headers={"Authorization": f"Bearer {token}"})
    except httpx.TransportError as exc:
        raise RuntimeError(f"{url}: {type(exc).__name__} {exc}") from exc
    if response.status_code != 200:
        raise RuntimeError(f"{url} answered {response.status_code}: {response.text[:500]}")
    return response.json()


async def many_measure(args, *, layer: str, bases: list[str], pids: list[int], members: list[dict]) -> dict:
    """Chats of `--subscribers` members each, all subscribed; rounds of `--prompts` streamed prompts at once."""
    size, chats = args.subscribers[0], args.chats
    # Idle connections are dropped well before uvicorn's keep-alive timeout (5 s) closes them: reusing one
    # just as the server closes it fails the request (httpx's default expiry is that same 5 s).
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None, keepalive_expiry=1)
    timeout = httpx.Timeout(60, connect=10)
    async with (
        httpx.AsyncClient(timeout=timeout, limits=limits, trust_env=False) as http,
        httpx.AsyncClient(timeout=timeout, limits=limits, trust_env=False) as sse,
    ):
        groups = [members[chat * size : (chat + 1) * size] for chat in range(chats)]

        async def make_chat(chat: int) -> str:
            base, owner = bases[chat % len(bases)], groups[chat][0]["token"]
            name = f"many {layer} {chat}"
            group = await acall(http, f"{base}/group/create", owner, name=name)
            others = [member["id"] for member in groups[chat][1:]]
            for start in range(0, len(others), MEMBERS_PER_CALL):
                chunk = others[start : start + MEMBERS_PER_CALL]
                await acall(http, f"{base}/group/members/add", owner, group_id=group["id"], user_ids=chunk)
            return (await acall(http, f"{base}/chat/create", owner, name=name, group_id=group["id"]))["id"]

        chat_ids = list(await asyncio.gather(*(make_chat(chat) for chat in range(chats))))
        # In each chat members alternate SSE / WebSocket, and each pair of them the server process.
        streams = [
            Stream(
                chat * size + member,
                kind="sse" if member % 2 == 0 else "ws",
                chat=chat,
                chat_id=chat_ids[chat],
                base=bases[(chat + member // 2) % len(bases)],
                token=groups[chat][member]["token"],
            )
            for chat in range(chats)
            for member in range(size)
        ]
        gate = asyncio.Semaphore(HANDSHAKES_AT_ONCE)
        for stream in streams:
            stream.task = asyncio.create_task(stream.run(sse, gate))
        try:
            await asyncio.wait_for(asyncio.gather(*(s.ready.wait() for s in streams)), 60 + len(streams) / 2)
            failed = [f"#{s.index} ({s.kind}): {s.failure}" for s in streams if s.failure]
            if failed:
                raise RuntimeError(f"{len(failed)} of {len(streams)} subscribers failed to connect: {failed[:5]}")
            print(
                f"  {layer}: {len(streams)} subscribers on {chats} chats over {len(bases)} process(es) connected",
                file=sys.stderr,
                flush=True,
            )
            earlier: set[str] = set()

            async def round_of(count: int) -> dict:
                """`count` prompts at once, spread over the chats and the processes; waits for every final."""
                per_chat = Counter(index % chats for index in range(count))
                for stream in streams:
                    stream.expect(per_chat[stream.chat])

                async def prompt(index: int) -> tuple[int, str, float]:
                    chat = index % chats
                    author = groups[chat][(index // chats) % size]["token"]
                    started = time.perf_counter()
                    body = await acall(
                        http,
                        f"{bases[index % len(bases)]}/chat/prompt",
                        author,
                        id=chat_ids[chat],
                        prompt="Count for me.",
                        stream=True,
                        context=0,
                    )
                    return chat, body["message"]["id"], (time.perf_counter() - started) * 1000

                cpu_servers = [cpu_seconds(pid) for pid in pids]
                cpu_client = cpu_seconds(os.getpid())
                wall = time.monotonic()
                sent = await asyncio.gather(*(prompt(index) for index in range(count)))
                timed_out = False
                try:
                    await asyncio.wait_for(asyncio.gather(*(s.done.wait() for s in streams)), args.timeout)
                except TimeoutError:
                    timed_out = True
                wall = time.monotonic() - wall
                cpu_servers_after = [cpu_seconds(pid) for pid in pids]
                cpu_client_after = cpu_seconds(os.getpid())
                await asyncio.sleep(SETTLE_SECONDS)
                # What Turbo saved, read only now so that it is not part of the CPU figures.
                stored: dict[int, dict[str, dict]] = defaultdict(dict)
                wanted = defaultdict(set)
                for chat, message_id, _ in sent:
                    wanted[chat].add(message_id)
                for chat, ids in wanted.items():
                    read = await acall(
                        http, f"{bases[0]}/chat/read", groups[chat][0]["token"], id=chat_ids[chat], limit=len(ids) + 5
                    )
                    stored[chat] = {m["id"]: m for m in read["messages"] if m["id"] in ids}
                    for message_id in ids - stored[chat].keys():
                        stored[chat][message_id] = {"reply": "", "status": "not found"}
                issues = Counter()
                per_stream: dict[int, dict] = {}
                delays: list[float] = []
                for stream in streams:
                    found, stream_delays = check_stream(stream, stream.take(), stored[stream.chat], earlier)
                    issues.update(found)
                    delays += stream_delays
                    if any(found.values()) or stream.failure:
                        per_stream[stream.index] = {
                            "kind": stream.kind,
                            **{k: v for k, v in found.items() if v},
                            **({"failure": stream.failure} if stream.failure else {}),
                        }
                earlier.update(message_id for _, message_id, _ in sent)
                saved = [m for messages in stored.values() for m in messages.values()]
                if None in cpu_servers + cpu_servers_after:
                    server_cpu = None
                else:
                    server_cpu = sum(cpu_servers_after) - sum(cpu_servers)
                return {
                    "prompts": count,
                    "wall_s": round(wall, 3),
                    "timed_out": timed_out,
                    "delay_ms": distribution(delays),
                    "prompt_ms": distribution([ms for _, _, ms in sent]),
                    "deltas_delivered": len(delays),
                    "deltas_due": sum(
                        len(SENT_AT.findall(stored[s.chat][m].get("reply") or ""))
                        for s in streams
                        for m in stored[s.chat]
                    ),
                    "server_cpu_s": None if server_cpu is None else round(server_cpu, 3),
                    "server_cpu_us_per_delta": (
                        round(server_cpu * 1e6 / len(delays), 1) if server_cpu is not None and delays else None
                    ),
                    "server_cpu_ms_per_prompt": None if server_cpu is None else round(server_cpu * 1000 / count, 2),
                    "client_cpu_share": (
                        round((cpu_client_after - cpu_client) / wall, 3)
                        if cpu_client is not None and cpu_client_after is not None and wall > 0
                        else None
                    ),
                    "issues": {name: issues[name] for name in MANY_ISSUES},
                    "subscribers_with_issues": per_stream,
                    "saved_incomplete": sum(
                        m.get("status") != "complete" or len(SENT_AT.findall(m.get("reply") or "")) != args.deltas
                        for m in saved
                    ),
                }

            warmup = await round_of(args.warmup * chats) if args.warmup else None
            runs = []
            for run in range(args.runs):
                summary = await round_of(args.prompts)
                runs.append(summary)
                delay = summary["delay_ms"] or {}
                print(
                    f"  {layer} run {run + 1}/{args.runs}: delay p50 {delay.get('p50', '-')} ms, "
                    f"p99 {delay.get('p99', '-')} ms, {summary['server_cpu_us_per_delta']} us server CPU per delta, "
                    f"missing {summary['issues']['missing']}, duplicated {summary['issues']['duplicated']}",
                    file=sys.stderr,
                    flush=True,
                )
        finally:
            for stream in streams:
                stream.task.cancel()
            await asyncio.wait([s.task for s in streams], timeout=15)
    return {
        "layer": layer,
        "processes": len(bases),
        "chats": chats,
        "subscribers_per_chat": size,
        "transports": {"sse": sum(s.kind == "sse" for s in streams), "ws": sum(s.kind == "ws" for s in streams)},
        "chat_ids": chat_ids,
        **many_median(runs),
        "warmup_issues": {k: v for k, v in (warmup or {}).get("issues", {}).items() if v},
        "run_summaries": runs,
    }


def many_median(runs: list[dict]) -> dict:
    """Each figure's median across runs; issue counts are summed, so that no median hides one."""
    merged: dict = {"runs": len(runs)}
    for figure in ("delay_ms", "prompt_ms"):
        present = [run[figure] for run in runs if run.get(figure)]
        merged[figure] = (
            {stat: round(statistics.median(d[stat] for d in present), 3) for stat in ("p50", "p99", "mean", "max")}
            if present
            else None
        )
    for key in ("wall_s", "server_cpu_s", "server_cpu_us_per_delta", "server_cpu_ms_per_prompt", "client_cpu_share"):
        values = [run[key] for run in runs if run.get(key) is not None]
        merged[key] = round(statistics.median(values), 3) if values else None
    for key in ("deltas_delivered", "deltas_due", "saved_incomplete"):
        merged[key] = sum(run[key] for run in runs)
    merged["timed_out"] = sum(run["timed_out"] for run in runs)
    merged["issues"] = {name: sum(run["issues"][name] for run in runs) for name in MANY_ISSUES}
    with_issues: dict[int, dict] = {}
    for run in runs:
        for index, found in run["subscribers_with_issues"].items():
            with_issues.setdefault(index, {}).update(found)
    merged["subscribers_with_issues"] = with_issues
    return merged


def run_many_layer(
    args, layer: str, results: list[dict], *, work: Path, upstream_port: int, db_address: str, members: list[dict]
) -> list[str]:
    """Turbo with this stream backend in `--servers` processes (one for in-memory), the many-chats case."""
    env = layer_env(args, layer, upstream_port=upstream_port, db_address=db_address)
    processes = Processes(work)
    count = args.servers if layer == "redis" else 1
    names, bases, pids = [], [], []
    row = None
    try:
        for index in range(count):
            name, port = f"turbo-{layer}-{index}", free_port()
            process = turbo_start(processes, name, port, env, "--timeout-graceful-shutdown", "10")
            names.append(name)
            bases.append(f"http://127.0.0.1:{port}")
            pids.append(process.pid)
        for name, base, (_, process) in zip(names, bases, processes.started, strict=True):
            wait_until_answering(processes, name, process, f"{base}/health")
        needed = args.chats * args.subscribers[0]
        if len(members) < needed:
            started = time.monotonic()
            members.extend(asyncio.run(many_signups(bases, needed - len(members))))
            print(f"signed up {len(members)} users in {time.monotonic() - started:.1f} s", file=sys.stderr)
        row = asyncio.run(many_measure(args, layer=layer, bases=bases, pids=pids, members=members))
        results.append(row)
    finally:
        processes.stop_all()
        if layer == "redis" and row is not None:
            redis_forget(args.redis_url, row["chat_ids"])
    lines = []
    for name in names:
        lines += [f"[{name}] {line}" for line in processes.log_lines(name) if not line.startswith("HTTP Request:")]
    return lines


def render_many(report: dict) -> str:
    settings = report["settings"]
    first = report["results"][0] if report["results"] else {}
    transports = first.get("transports", {})
    lines = [
        f"Many chats at once: {settings['chats']} chats x {settings['subscribers'][0]} subscribers "
        f"({transports.get('sse', '?')} SSE + {transports.get('ws', '?')} WebSocket, spread over the processes), "
        f"{settings['prompts']} streamed prompts sent at once per run (+{settings['warmup']} per chat warm-up), "
        f"{settings['deltas']} deltas {settings['chunk_gap_ms']:g} ms apart; median of {settings['runs']} run(s)",
        "delay = arrival at a subscriber - the upstream's send time (ms); CPU = user+system of the Turbo "
        "process(es) from the first prompt to the last final event, per delta delivered",
        "",
        "layer  | procs | delay p50     p99     max | POST /chat/prompt p50 p99 | run s | server CPU s "
        "| us/delta | ms/prompt | client CPU | delivered / due | missing dup order final | holes notices",
    ]
    for row in report["results"]:
        delay, issues = row["delay_ms"] or {}, row["issues"]
        final_issues = issues["no_final"] + issues["extra_final"] + issues["wrong_reply"]
        lines.append(
            f"{row['layer']:<6} | {row['processes']:>5} | {fmt(delay.get('p50'), 9)} {fmt(delay.get('p99'))} "
            f"{fmt(delay.get('max'))} | {pair(row['prompt_ms'], 13)} | {fmt(row['wall_s'], 5)} | "
            f"{fmt(row['server_cpu_s'], 12)} | {fmt(row['server_cpu_us_per_delta'], 8, 1)} | "
            f"{fmt(row['server_cpu_ms_per_prompt'], 9)} | {fmt(row['client_cpu_share'], 10)} | "
            f"{row['deltas_delivered']:>7} / {row['deltas_due']:<6}| {issues['missing']:>7} {issues['duplicated']:>3} "
            f"{issues['out_of_order']:>5} {final_issues:>5} | {issues['seq_holes']:>5} {issues['notices']:>7}"
        )
    problems = []
    for row in report["results"]:
        found = {name: count for name, count in row["issues"].items() if count}
        if found or row["timed_out"] or row["saved_incomplete"] or row["warmup_issues"]:
            shown = list(row["subscribers_with_issues"].items())[:10]
            problems.append(
                f"  {row['layer']}: {found}, runs timed out {row['timed_out']}, saved incomplete "
                f"{row['saved_incomplete']}, warm-up {row['warmup_issues']}; by subscriber: {shown}"
            )
    if problems:
        lines += ["", "Delivery problems:", *problems]
    else:
        delivered = sum(row["deltas_delivered"] for row in report["results"])
        lines += [
            "",
            f"Delivery: every subscriber got each of the {delivered} deltas it was due exactly once, in order, "
            "with one final event each; seqs consecutive, no gap or error notice.",
        ]
    lines.append(
        f"{report['machine']['cpus']} CPU(s) shared by the upstream, Turbo, Redis, the database and the subscribers "
        f"(this process): the delays include waiting for a core. Took {report['duration_s']:.0f} s."
    )
    return "\n".join(lines)


# --- the table ------------------------------------------------------------------------------------


def subscriber_issues(row: dict) -> int:
    return len(set(row["subscribers_with_issues"]) | set(row["closed"]))


def render(report: dict) -> str:
    settings = report["settings"]
    lines = [
        f"Turbo fan-out over /chat/stream WebSockets: median of {settings['runs']} run(s) of {settings['prompts']} "
        f"streamed prompts per cell (+{settings['warmup']} warm-up), {settings['deltas']} deltas "
        f"{settings['chunk_gap_ms']:g} ms apart; all times in ms",
        "delay = arrival at a subscriber - the upstream's send time; spread = last - first subscriber to get a delta",
        "",
        "layer  |    S | delay p50     p99     max | spread p50   p99 | POST /chat/prompt p50 p99 "
        "| Turbo CPU ms/prompt | subs CPU | missing dup | subs w/ issues",
    ]
    for row in report["results"]:
        delay = row["delay_ms"] or {}
        lines.append(
            f"{row['layer']:<6} | {row['subscribers']:>4} | {fmt(delay.get('p50'), 9)} {fmt(delay.get('p99'))} "
            f"{fmt(delay.get('max'))} | {pair(row['spread_ms'], 6)} {'':3}| {pair(row['prompt_ms'], 13)} | "
            f"{fmt(row['turbo_cpu_ms_per_prompt'], 19)} | {fmt(row['subscriber_cpu_share'], 8)} | "
            f"{row['issues']['missing']:>7} {row['issues']['duplicated']:>3} | {subscriber_issues(row):>14}"
        )
    target = report["target"]
    value = "-" if target["value_ms"] is None else f"{target['value_ms']:.2f} ms"
    extra = f" (p50 {target['p50_ms']:.2f} ms)" if target["p50_ms"] is not None else ""
    lines += ["", "Target (from the issue):", f"  {target['target']:<70} {value:>10}{extra:<18} {target['verdict']}"]
    problems = []
    for row in report["results"]:
        found = {name: count for name, count in row["issues"].items() if count}
        cell = f"{row['layer']} S={row['subscribers']}"
        if found:
            by_subscriber = list(row["subscribers_with_issues"].items())
            shown = ", ".join(f"#{index}: {counts}" for index, counts in by_subscriber[:10])
            more = f" and {len(by_subscriber) - 10} more" if len(by_subscriber) > 10 else ""
            problems.append(f"  {cell}: {found}; by subscriber: {shown}{more}")
        if row["closed"]:
            problems.append(f"  {cell}: sockets closed: {row['closed']}")
        if row["saved_incomplete"]:
            problems.append(f"  {cell}: saved replies incomplete: {row['saved_incomplete']}")
        if any(row["warmup_issues"].values()):
            problems.append(f"  {cell}: warm-up prompts: {row['warmup_issues']}")
    checked = sum(
        row["runs"] * report["settings"]["prompts"] * row["subscribers"] * settings["deltas"]
        for row in report["results"]
    )
    if problems:
        lines += ["", "Delivery problems:", *problems]
    else:
        lines += [
            "",
            f"Delivery: every subscriber got each of the {checked} deltas it was due exactly once, in order, "
            "with the final event.",
        ]
    lines += [
        f"{report['machine']['cpus']} CPU(s) shared by the upstream, Turbo and the subscriber process: the delays "
        f"include waiting for a core. Took {report['duration_s']:.0f} s.",
    ]
    return "\n".join(lines)


# --- the run --------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--subscribers",
        default=None,
        help="comma-separated member counts (default 1,10,100); with --chats, one count: members per chat (default 20)",
    )
    parser.add_argument("--deltas", type=int, default=20, help="deltas per streamed reply (default 20)")
    parser.add_argument("--runs", type=int, default=3, help="runs per cell; the median is reported (default 3)")
    parser.add_argument(
        "--prompts",
        type=int,
        default=None,
        help="measured prompts per run (default 10); with --chats, sent all at once, spread over the chats "
        "(default 5 per chat)",
    )
    parser.add_argument(
        "--warmup", type=int, default=2, help="unmeasured prompts per cell first (default 2; with --chats: per chat)"
    )
    parser.add_argument("--layer", choices=("memory", "redis", "both"), default="both", help="stream backend(s)")
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 1 run of 5 prompts (with --chats: of --prompts), 1 warm-up"
    )
    parser.add_argument(
        "--chats",
        type=int,
        default=0,
        help="the many-chats case: this many group chats at once, their members half on SSE and half on "
        "WebSocket, all subscribed from this process (default 0: the one-chat cells)",
    )
    parser.add_argument(
        "--servers",
        type=int,
        default=2,
        help="with --chats: Turbo processes for the Redis backend, sharing the database (default 2; in-memory: 1)",
    )
    parser.add_argument(
        "--db-address",
        default="",
        help="DB_ADDRESS for Turbo (default: a throwaway SQLite file); with --chats and several processes, "
        "give a Postgres database (postgresql://user@host:port/name); it is migrated, and users are added to it",
    )
    parser.add_argument("--chunk-gap-ms", type=float, default=5.0, help="upstream pause between deltas (default 5)")
    parser.add_argument("--latency-ms", type=float, default=5.0, help="upstream wait before answering (default 5)")
    parser.add_argument(
        "--redis-url", default=DEFAULT_REDIS, help=f"REDIS_ADDRESS for the Redis layer (default {DEFAULT_REDIS})"
    )
    parser.add_argument(
        "--timeout", type=float, default=20.0, help="seconds to wait for every socket's final event (default 20)"
    )
    parser.add_argument(
        "--production-hasher",
        action="store_true",
        help="keep Django's slow password hasher for the signups (bench.settings swaps it for a cheap one)",
    )
    args = parser.parse_args()
    if args.chats < 0:
        parser.error("--chats must be at least 1 (or 0: the one-chat cells)")
    if args.prompts is None:
        args.prompts = 5 * args.chats if args.chats else (QUICK["prompts"] if args.quick else 10)
    if args.quick:
        args.runs, args.warmup = QUICK["runs"], QUICK["warmup"]
        if not args.chats:
            args.prompts = QUICK["prompts"]
    if args.subscribers is None:
        args.subscribers = "20" if args.chats else "1,10,100"
    try:
        args.subscribers = sorted({int(size) for size in args.subscribers.split(",") if size.strip()})
    except ValueError:
        parser.error("--subscribers takes comma-separated numbers")
    if not args.subscribers or min(args.subscribers) < 1:
        parser.error("every --subscribers count must be at least 1")
    if args.chats and len(args.subscribers) != 1:
        parser.error("with --chats, --subscribers takes one count (members per chat)")
    if args.servers < 1:
        parser.error("--servers must be at least 1")
    if args.deltas < 1 or args.runs < 1 or args.prompts < 1 or args.warmup < 0:
        parser.error("--deltas, --runs and --prompts must be at least 1, --warmup at least 0")
    args.layers = list(LAYERS) if args.layer == "both" else [args.layer]
    return args


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def build_report(args, results: list[dict], *, started_at: datetime, duration_s: float, partial: bool) -> dict:
    loop, http = fastest_server_parts()
    return {
        "started_at": started_at.isoformat(),
        "finished_at": datetime.now(UTC).isoformat(),
        "partial": partial,
        "settings": {
            "subscribers": args.subscribers,
            "layers": args.layers,
            "deltas": args.deltas,
            "runs": args.runs,
            "prompts": args.prompts,
            "warmup": args.warmup,
            "quick": args.quick,
            "chunk_gap_ms": args.chunk_gap_ms,
            "latency_ms": args.latency_ms,
            "database": "postgresql" if args.db_address.startswith("postgres") else "sqlite",
            **({"chats": args.chats, "redis_processes": args.servers} if args.chats else {}),
            "password_hasher": "production" if args.production_hasher else "md5 (bench.settings)",
        },
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "upstream_loop": loop,
            "upstream_http": http,
        },
        "duration_s": round(duration_s, 1),
        **({"case": "many_chats"} if args.chats else {"target": judge_target(results)}),
        "results": results,
    }


def main() -> None:
    args = parse_args()
    if "redis" in args.layers:
        redis_check(args.redis_url)
    # SIGTERM (e.g. from make or CI) unwinds like Ctrl-C, so the finally below stops the servers.
    signal.signal(signal.SIGTERM, _interrupt)
    started_at = datetime.now(UTC)
    stamp = started_at.strftime("%Y%m%d-%H%M%S")
    clock_started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="turbo-fanout-"))
    upstream_processes = Processes(work)
    db_address = args.db_address or f"sqlite:///{work / 'bench.db'}"
    run = run_many_layer if args.chats else run_layer
    show = render_many if args.chats else render
    prefix = "fanout-many" if args.chats else "fanout"
    results: list[dict] = []
    try:
        upstream_port = free_port()
        upstream = upstream_processes.start(
            "upstream",
            [PYTHON, "-m", "bench.fast_upstream", "--port", str(upstream_port), "--latency-ms", str(args.latency_ms)]
            + ["--chunks", str(args.deltas), "--chunk-gap-ms", str(args.chunk_gap_ms)],
            dict(os.environ),
        )
        wait_until_answering(upstream_processes, "upstream", upstream, f"http://127.0.0.1:{upstream_port}/v1/models")
        # One database for both layers: the users are signed up once, by the first Turbo.
        env = turbo_env(argparse.Namespace(redis="", limits=False), upstream_port=upstream_port, db_address=db_address)
        migrated = subprocess.run(
            [PYTHON, "manage.py", "migrate", "--noinput"], cwd=PROJECT, env=env, capture_output=True, text=True
        )
        if migrated.returncode != 0:
            raise RuntimeError(f"migrate failed:\n{migrated.stdout[-2000:]}{migrated.stderr[-3000:]}")
        members: list[dict] = []
        turbo_logs: dict[str, list[str]] = {}
        for layer in args.layers:
            print(f"{layer} layer:", file=sys.stderr, flush=True)
            turbo_logs[layer] = run(
                args, layer, results, work=work, upstream_port=upstream_port, db_address=db_address, members=members
            )
        upstream_processes.stop_all()
        report = build_report(
            args, results, started_at=started_at, duration_s=time.monotonic() - clock_started, partial=False
        )
        report["table"] = show(report)
        print(report["table"])
        for layer, lines in turbo_logs.items():
            if lines:
                tail = "\n".join(lines[-30:])
                print(
                    f"Turbo's log ({layer} layer), {len(lines)} lines besides httpx's; the last:\n{tail}",
                    file=sys.stderr,
                )
        report_write(report, [f"{prefix}-{stamp}.json", f"{prefix}-latest.json"])
    except KeyboardInterrupt:
        print("interrupted; stopping the servers", file=sys.stderr)
        upstream_processes.stop_all()
        if results:
            report = build_report(
                args, results, started_at=started_at, duration_s=time.monotonic() - clock_started, partial=True
            )
            report["table"] = show(report)
            print(f"{report['table']}\n(interrupted: only the cells above were completed)")
            report_write(report, [f"{prefix}-{stamp}-partial.json"])
        sys.exit(130)
    finally:
        upstream_processes.stop_all()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
