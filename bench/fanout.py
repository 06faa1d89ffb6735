"""Fan-out: how long a streamed reply's deltas take to reach every member of a group chat over WebSocket.

    python -m bench.fanout [--subscribers 1,10,100] [--deltas 20] [--runs 3] [--layer memory|redis|both] [--quick]

Starts the fake upstream (bench.fast_upstream: `--deltas` chunks `--chunk-gap-ms` apart, each carrying its
send time `t=<time.time_ns()>`) and, for each channel layer, Turbo under uvicorn as bench.proxy_overhead
does, on one throwaway SQLite database (the Redis layer: with REDIS_ADDRESS). For each subscriber count S
it makes a group of S users signed up through the API, creates a chat in that group, opens one WebSocket
per member on the chat's `/chat/stream` from a separate process (bench.fanout_subscribers), and has the
first member send streamed prompts through `/chat/prompt`. A delta's delay at a subscriber is its arrival
time there minus the upstream's send time (same machine, same clock). Reports p50/p99 per (layer, S),
the median across runs, and every delta missing or duplicated at any subscriber; prints a table and the
target, and writes bench/results/fanout-<timestamp>.json and bench/results/fanout-latest.json.
This is a benchmark, not a test: it asserts nothing about wall-clock times.
"""

import argparse
import json
import os
import platform
import queue
import re
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
    """Delete the chats' sequence counters (kept without expiry) from the Redis database we used."""
    import redis

    try:
        client = redis.Redis.from_url(url, socket_timeout=5)
        for chat_id in chat_ids:
            keys = list(client.scan_iter(match=f"*chat-seq:{chat_id}"))
            if keys:
                client.delete(*keys)
    except redis.RedisError as exc:
        print(f"could not tidy Redis up: {exc}", file=sys.stderr)


def run_layer(
    args, layer: str, results: list[dict], *, work: Path, upstream_port: int, db_address: str, members: list[dict]
) -> list[str]:
    """Turbo with this layer, every subscriber count in turn; returns Turbo's notable log lines."""
    env = turbo_env(
        argparse.Namespace(redis=args.redis_url if layer == "redis" else ""),
        upstream_port=upstream_port,
        db_address=db_address,
    )
    if not args.production_hasher:
        env["DJANGO_SETTINGS_MODULE"] = "bench.settings"
    processes = Processes(work)
    name = f"turbo-{layer}"
    port = free_port()
    turbo_url = f"http://127.0.0.1:{port}"
    chat_ids = []
    try:
        turbo = processes.start(
            name,
            [PYTHON, "-m", "uvicorn", "turbo_site.asgi:application", "--port", str(port)]
            + ["--log-level", "warning", "--no-access-log"]
            + SERVE_FLAGS,
            env,
        )
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
    parser.add_argument("--subscribers", default="1,10,100", help="comma-separated member counts (default 1,10,100)")
    parser.add_argument("--deltas", type=int, default=20, help="deltas per streamed reply (default 20)")
    parser.add_argument("--runs", type=int, default=3, help="runs per cell; the median is reported (default 3)")
    parser.add_argument("--prompts", type=int, default=10, help="measured prompts per run (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured prompts per cell first (default 2)")
    parser.add_argument("--layer", choices=("memory", "redis", "both"), default="both", help="channel layer(s)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 run of 5 prompts, 1 warm-up prompt")
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
    if args.quick:
        args.runs, args.prompts, args.warmup = QUICK["runs"], QUICK["prompts"], QUICK["warmup"]
    try:
        args.subscribers = sorted({int(size) for size in args.subscribers.split(",") if size.strip()})
    except ValueError:
        parser.error("--subscribers takes comma-separated numbers")
    if not args.subscribers or min(args.subscribers) < 1:
        parser.error("every --subscribers count must be at least 1")
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
            "database": "sqlite",
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
        "target": judge_target(results),
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
    db_address = f"sqlite:///{work / 'bench.db'}"
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
        env = turbo_env(argparse.Namespace(redis=""), upstream_port=upstream_port, db_address=db_address)
        migrated = subprocess.run(
            [PYTHON, "manage.py", "migrate", "--noinput"], cwd=PROJECT, env=env, capture_output=True, text=True
        )
        if migrated.returncode != 0:
            raise RuntimeError(f"migrate failed:\n{migrated.stdout[-2000:]}{migrated.stderr[-3000:]}")
        members: list[dict] = []
        turbo_logs: dict[str, list[str]] = {}
        for layer in args.layers:
            print(f"{layer} layer:", file=sys.stderr, flush=True)
            turbo_logs[layer] = run_layer(
                args, layer, results, work=work, upstream_port=upstream_port, db_address=db_address, members=members
            )
        upstream_processes.stop_all()
        report = build_report(
            args, results, started_at=started_at, duration_s=time.monotonic() - clock_started, partial=False
        )
        report["table"] = render(report)
        print(report["table"])
        for layer, lines in turbo_logs.items():
            if lines:
                tail = "\n".join(lines[-30:])
                print(
                    f"Turbo's log ({layer} layer), {len(lines)} lines besides httpx's; the last:\n{tail}",
                    file=sys.stderr,
                )
        report_write(report, [f"fanout-{stamp}.json", "fanout-latest.json"])
    except KeyboardInterrupt:
        print("interrupted; stopping the servers", file=sys.stderr)
        upstream_processes.stop_all()
        if results:
            report = build_report(
                args, results, started_at=started_at, duration_s=time.monotonic() - clock_started, partial=True
            )
            report["table"] = render(report)
            print(f"{report['table']}\n(interrupted: only the cells above were completed)")
            report_write(report, [f"fanout-{stamp}-partial.json"])
        sys.exit(130)
    finally:
        upstream_processes.stop_all()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
