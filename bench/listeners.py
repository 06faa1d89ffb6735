"""Listeners at scale: many idle subscribers over many chats, a few chats streaming, and a burst of subscribes.

    python -m bench.listeners [--subscribers 10000] [--chats 1000] [--streaming 100] [--servers 2]
                              [--burst 1000] [--deltas 20] [--db-address postgresql://...] [--redis-url ...]

Starts the fake upstream (bench.fast_upstream: each delta carries its send time `t=<time.time_ns()>`) and
`--servers` Turbo processes as `make serve` runs them (uvicorn, uvloop, httptools), sharing the database
(a throwaway SQLite file, or `--db-address`) and Redis (`--redis-url`). Signs up one user per 50 chats,
creates `--chats` chats, and opens `--subscribers` subscriptions spread evenly over the chats and the
processes, alternating SSE and WebSocket (each chat's subscribers are its owner's "tabs": a member's
cost to the server is the same). All subscribers live in this process, on one event loop, with a
minimal SSE client (a raw socket) and websockets' client, on uvloop as the servers are.

Reports: subscriptions refused; each process's resident memory before and after (per idle subscriber)
and its Redis connections (CLIENT LIST, by the process's sockets) while idle and while streaming
(sampled once a second by a process of its own: not on this event loop); then `--streaming` chats get one streamed
prompt each, all at once: every subscriber of those chats must get every delta once and the final
event (missing, duplicated and no-final are counted), with the delivery delay (arrival minus upstream
send time) p50/p99, split at the append (the time Turbo stored with each event in Redis), the CPU
seconds each process, this one and the sampler spent meanwhile, and how long each was runnable but
waiting for a CPU (Linux schedstat: a process starved by the machine's other work, not one waiting on
I/O), with the load average; then a burst of `--burst` SSE subscribes to one
process, spread over one second: how many were refused and when the last was accepted. Each process
answers one streamed prompt before any of this (its first loads the tokenizer, once in its life).
Writes bench/results/listeners-<timestamp>.json and listeners-latest.json. A benchmark, not a test.
"""

import argparse
import asyncio
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import httpx
import redis.asyncio
import uvloop
from websockets.asyncio.client import connect as ws_connect

from bench.fanout import turbo_start
from bench.proxy_overhead import (
    PROJECT,
    PYTHON,
    Processes,
    cpu_seconds,
    free_port,
    report_write,
    turbo_env,
    wait_until_answering,
)
from bench.redis_clients import redis_clients_of, redis_connections_of

EVENT_TYPE = re.compile(rb'^\{"seq":\d+,"type":"([a-z._]+)"')
DELTA_SENT_AT = re.compile(rb'"delta":"t=(\d+)"')  # the upstream's send time, in the delta's text
CHATS_PER_USER = 50
OPEN_AT_ONCE = 200  # subscribes in flight while the idle subscribers are opened
FINAL_MARK = b'"partial":false'


class Listener:
    """One subscription's frames of interest: message events, by message id."""

    __slots__ = ("chat_id", "kind", "status", "seqs", "deltas", "finals", "delays", "arrivals", "closed")

    def __init__(self, chat_id: str, kind: str):
        self.chat_id = chat_id
        self.kind = kind
        self.status: int | str | None = None
        self.seqs: list[int] = []
        self.deltas = 0
        self.finals = 0
        self.delays: list[float] = []
        self.arrivals: list[tuple[int, int]] = []  # (seq, arrival time_ns) of each delta: the delay's split
        self.closed: str | None = None

    def frame(self, data: bytes) -> None:
        if not data.startswith(b'{"seq":'):
            return
        arrived = time.time_ns()
        # Only the fields counted, found in place: this process reads every frame of every subscriber, and
        # parsing each whole event (the reply so far included) was most of its CPU per frame.
        seq = int(data[7 : data.index(b",", 7)])
        self.seqs.append(seq)
        kind = EVENT_TYPE.search(data)
        kind = kind.group(1) if kind else b""
        if kind == b"message.delta":
            self.deltas += 1
            sent = DELTA_SENT_AT.search(data)
            if sent:
                self.delays.append((arrived - int(sent.group(1))) / 1e6)
                self.arrivals.append((seq, arrived))
        elif kind in (b"message.completed", b"message.failed"):
            self.finals += 1


async def sse_listen(listener: Listener, host: str, port: int, token: str, opened: asyncio.Future) -> None:
    """A minimal SSE client: one GET on a raw socket, frames read line by line (one chunk per frame)."""
    try:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(
            f"GET /chat/stream?id={listener.chat_id} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Authorization: Bearer {token}\r\nAccept: text/event-stream\r\n\r\n".encode()
        )
        status_line = await reader.readline()
        listener.status = int(status_line.split()[1]) if status_line else "closed"
    except (OSError, ValueError, IndexError) as exc:
        listener.status = type(exc).__name__
        opened.set_result(None)
        return
    opened.set_result(None)
    if listener.status != 200:
        writer.close()
        return
    try:
        while True:
            # One read per frame (a frame is its lines up to a blank one), not one per line.
            frame = await reader.readuntil(b"\n\n")
            at = frame.find(b"data: ")
            if at >= 0:
                listener.frame(frame[at + 6 : frame.index(b"\n", at)])
    except asyncio.IncompleteReadError:
        pass  # the server ended the response (as an empty read ended the line loop before)
    except (OSError, asyncio.LimitOverrunError) as exc:
        listener.closed = type(exc).__name__
    finally:
        writer.close()


async def ws_listen(listener: Listener, host: str, port: int, token: str, opened: asyncio.Future) -> None:
    url = f"ws://{host}:{port}/chat/stream?id={listener.chat_id}&token={token}"
    try:
        connection = await ws_connect(url, origin=f"http://{host}:{port}", open_timeout=60, compression=None)
    except Exception as exc:  # a refused handshake, in whatever form: counted, not raised
        listener.status = getattr(getattr(exc, "response", None), "status_code", None) or type(exc).__name__
        opened.set_result(None)
        return
    listener.status = 200
    opened.set_result(None)
    try:
        async for frame in connection:
            listener.frame(frame.encode() if isinstance(frame, str) else frame)
    except Exception as exc:
        listener.closed = type(exc).__name__
    finally:
        await connection.close()


async def appended_at(redis_url: str, chat_ids: list[str]) -> dict[tuple[str, int], int]:
    """(chat id, seq) -> when Turbo appended the event (time_ns), from the `a` field kept with it in Redis."""
    client = redis.asyncio.Redis.from_url(redis_url)
    found = {}
    try:
        for chat_id in chat_ids:
            for stream_id, fields in await client.xrange(f"turbo:stream:{{chat.{chat_id}}}"):
                seq = int(stream_id.split(b"-", 1)[0])
                found[(chat_id, seq)] = int(float(fields[b"a"]) * 1e9)
    finally:
        await client.aclose()
    return found


def run_queue_wait_seconds(pid: int) -> float | None:
    """Time the process's threads have spent runnable but waiting for a CPU (Linux schedstat), so far:
    what tells a process starved of CPU by the machine's other work from one waiting on I/O."""
    try:
        waited = 0
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                waited += int((task / "schedstat").read_text().split()[1])
            except (OSError, IndexError, ValueError):
                continue  # a thread that ended meanwhile
        return waited / 1e9
    except OSError:
        return None


def load_average() -> list[float]:
    return [round(value, 2) for value in os.getloadavg()]


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def percentile(values: list[float], share: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(share * len(ordered)))], 1)


async def open_listeners(plan, ports, tokens, tasks, *, at_once: int | None, spread_seconds: float = 0) -> list:
    """Open one listener per (chat_id, owner, server index, kind) of `plan`; returns them once all answered."""
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(at_once) if at_once else None
    listeners = []

    async def one(index: int, chat_id: str, owner: int, server: int, kind: str) -> None:
        if spread_seconds:
            await asyncio.sleep(spread_seconds * index / len(plan))
        listener = Listener(chat_id, kind)
        listeners.append(listener)
        opened = loop.create_future()
        listen = sse_listen if kind == "sse" else ws_listen
        if gate:
            await gate.acquire()
        tasks.append(asyncio.create_task(listen(listener, "127.0.0.1", ports[server], tokens[owner], opened)))
        try:
            await opened
        finally:
            if gate:
                gate.release()

    await asyncio.gather(*(one(index, *item) for index, item in enumerate(plan)))
    return listeners


async def measure(args, ports: list[int], pids: list[int]) -> dict:
    bases = [f"http://127.0.0.1:{port}" for port in ports]
    # Idle connections dropped before uvicorn's 5 s keep-alive timeout would: at the same 5 s (httpx's
    # default) a request could go out on a connection the server was closing (a ReadError in setup).
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=200, keepalive_expiry=2)
    async with httpx.AsyncClient(timeout=120, limits=limits, trust_env=False) as http:
        users = -(-args.chats // CHATS_PER_USER)
        tokens = []
        for index in range(users):
            signed = await http.post(
                f"{bases[index % len(bases)]}/user/signup",
                data={"username": f"bench-{secrets.token_hex(5)}", "password": secrets.token_urlsafe(16)},
            )
            signed.raise_for_status()
            tokens.append(signed.json()["token"])

        async def chat_create(number: int) -> str:
            owner = number % users
            for attempt in range(3):
                try:
                    created = await http.post(
                        f"{bases[number % len(bases)]}/chat/create",
                        data={"name": f"listeners {number}"},
                        headers={"Authorization": f"Bearer {tokens[owner]}"},
                    )
                    break
                except httpx.TransportError as exc:  # setup, not measured: a connection lost is tried again
                    print(f"chat create: {type(exc).__name__}, trying again", file=sys.stderr, flush=True)
                    if attempt == 2:
                        raise
            created.raise_for_status()
            return created.json()["id"]

        chat_ids = []
        for start in range(0, args.chats, 100):
            chat_ids += await asyncio.gather(*(chat_create(n) for n in range(start, min(start + 100, args.chats))))
        print(f"{users} users, {len(chat_ids)} chats", file=sys.stderr, flush=True)

        tasks: list[asyncio.Task] = []
        # One subscriber per process first, so that memory is measured with the code paths warm.
        warm = [(chat_ids[0], 0, server, "sse") for server in range(len(ports))]
        await open_listeners(warm, ports, tokens, tasks, at_once=None)
        # And one streamed prompt per process, in a chat nobody here follows: a process's first reply loads
        # the tokenizer (about a second of CPU, on its event loop), once in its life; the figures below are
        # for a process that has answered before, not for its first prompt.
        for server in range(len(ports)):
            number = args.chats - 1 - server
            warmed = await http.post(
                f"{bases[server]}/chat/prompt",
                data={"id": chat_ids[number], "prompt": "warm up", "stream": "true"},
                headers={"Authorization": f"Bearer {tokens[number % users]}"},
            )
            warmed.raise_for_status()
        await asyncio.sleep(2)
        rss_before = [rss_kib(pid) for pid in pids]
        plan = [
            (chat_ids[n % args.chats], (n % args.chats) % users, n % len(ports), "sse" if (n // 2) % 2 else "ws")
            for n in range(args.subscribers)
        ]
        started = time.monotonic()
        listeners = await open_listeners(plan, ports, tokens, tasks, at_once=OPEN_AT_ONCE)
        open_seconds = time.monotonic() - started
        await asyncio.sleep(3)
        rss_after = [rss_kib(pid) for pid in pids]
        idle_clients = [redis_clients_of(pid, args.redis_url) for pid in pids]
        redis_idle = [len(clients) for clients in idle_clients]
        # By last command: what each connection is for (xread: the stream reader; evalsha/get: pools).
        redis_idle_by_command = [dict(Counter(client["cmd"] for client in clients)) for clients in idle_clients]
        refused = [listener.status for listener in listeners if listener.status != 200]
        print(
            f"{len(listeners) - len(refused)} subscribers open in {open_seconds:.1f} s, {len(refused)} refused",
            file=sys.stderr,
            flush=True,
        )
        per_process = [args.subscribers / len(ports)] * len(ports)
        memory = [
            round((after - before) / count, 1)
            for before, after, count in zip(rss_before, rss_after, per_process, strict=True)
        ]

        # Streaming: one prompt in each of the first --streaming chats, all at once.
        streaming = chat_ids[: args.streaming]
        watched = [listener for listener in listeners if listener.chat_id in set(streaming) and listener.status == 200]
        # Sampled by a process of its own: on this event loop each look held up every frame.
        sampler = await asyncio.create_subprocess_exec(
            PYTHON,
            "-m",
            "bench.redis_clients",
            args.redis_url,
            *map(str, pids),
            cwd=PROJECT,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )

        async def prompt(number: int) -> int:
            answered = await http.post(
                f"{bases[number % len(bases)]}/chat/prompt",
                data={"id": streaming[number], "prompt": "count", "stream": "true"},
                headers={"Authorization": f"Bearer {tokens[number % users]}"},
            )
            return answered.status_code

        started = time.monotonic()
        cpu_started = [cpu_seconds(pid) for pid in pids], time.process_time()
        waits_started = [run_queue_wait_seconds(pid) for pid in [*pids, os.getpid(), sampler.pid]]
        load_streaming = load_average()
        statuses = await asyncio.gather(*(prompt(n) for n in range(len(streaming))))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(listener.finals < 1 for listener in watched):
            await asyncio.sleep(0.1)
        stream_seconds = time.monotonic() - started
        cpu_streaming = [round(cpu_seconds(pid) - before, 2) for pid, before in zip(pids, cpu_started[0], strict=True)]
        cpu_streaming_loadgen = round(time.process_time() - cpu_started[1], 2)
        waits = [run_queue_wait_seconds(pid) for pid in [*pids, os.getpid(), sampler.pid]]
        # Runnable but not running: the CPU the machine's other work (and this benchmark) did not leave them.
        run_queue_wait = [
            round(after - before, 2) if after is not None and before is not None else None
            for before, after in zip(waits_started, waits, strict=True)
        ]
        sampler_cpu = cpu_seconds(sampler.pid)
        await asyncio.sleep(1)  # time for a duplicate to show up
        sampled, _ = await sampler.communicate(b"")
        redis_streaming = json.loads(sampled)
        delays = [delay for listener in watched for delay in listener.delays]
        # The split: upstream send -> append (the `a` Turbo stored with each event in Redis), append -> arrival.
        appended = await appended_at(args.redis_url, streaming)
        after_append = [
            (arrived - appended[(listener.chat_id, seq)]) / 1e6
            for listener in watched
            for seq, arrived in listener.arrivals
            if (listener.chat_id, seq) in appended
        ]
        before_append = [
            delay - (arrived - appended[(listener.chat_id, seq)]) / 1e6
            for listener in watched
            for delay, (seq, arrived) in zip(listener.delays, listener.arrivals, strict=True)
            if (listener.chat_id, seq) in appended
        ]
        lost = {
            "prompts_not_200": sum(status != 200 for status in statuses),
            "subscribers_missing_deltas": sum(listener.deltas < args.deltas for listener in watched),
            "subscribers_with_duplicates": sum(len(set(listener.seqs)) != len(listener.seqs) for listener in watched),
            "subscribers_without_final": sum(listener.finals != 1 for listener in watched),
            "subscribers_closed": sum(listener.closed is not None for listener in listeners),
        }
        print(f"streaming: {json.dumps(lost)}", file=sys.stderr, flush=True)

        # The burst: fresh SSE subscribes to process 0, spread over one second.
        burst_plan = [(chat_ids[n % args.chats], (n % args.chats) % users, 0, "sse") for n in range(args.burst)]
        started = time.monotonic()
        burst = await open_listeners(burst_plan, ports, tokens, tasks, at_once=None, spread_seconds=1.0)
        burst_seconds = time.monotonic() - started
        burst_refused = [listener.status for listener in burst if listener.status != 200]
        redis_burst = redis_connections_of(pids[0], args.redis_url)

        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    return {
        "subscribers": args.subscribers,
        "chats": args.chats,
        "servers": len(ports),
        "open_seconds": round(open_seconds, 1),
        "refused": len(refused),
        "refused_examples": [str(status) for status in refused[:5]],
        "rss_kib_before": rss_before,
        "rss_kib_after": rss_after,
        "kib_per_idle_subscriber": memory,
        "redis_connections_idle": redis_idle,
        "redis_connections_idle_by_command": redis_idle_by_command,
        "redis_connections_streaming_max": redis_streaming,
        "streaming_chats": len(streaming),
        "streaming_subscribers": len(watched),
        "deltas_per_reply": args.deltas,
        "stream_seconds": round(stream_seconds, 1),
        "delay_ms_p50": percentile(delays, 0.5),
        "delay_ms_p99": percentile(delays, 0.99),
        "delay_ms_max": percentile(delays, 1.0),
        "delays_measured": len(delays),
        "delay_ms_upstream_to_append_p50": percentile(before_append, 0.5),
        "delay_ms_upstream_to_append_p99": percentile(before_append, 0.99),
        "delay_ms_append_to_arrival_p50": percentile(after_append, 0.5),
        "delay_ms_append_to_arrival_p99": percentile(after_append, 0.99),
        "cpu_seconds_streaming": cpu_streaming,
        "cpu_seconds_streaming_loadgen": cpu_streaming_loadgen,
        "cpu_seconds_streaming_sampler": sampler_cpu,
        "run_queue_wait_seconds_streaming": run_queue_wait[: len(pids)],
        "run_queue_wait_seconds_streaming_loadgen": run_queue_wait[len(pids)],
        "run_queue_wait_seconds_streaming_sampler": run_queue_wait[len(pids) + 1],
        "load_average_streaming": load_streaming,
        **lost,
        "burst": args.burst,
        "burst_seconds": round(burst_seconds, 2),
        "burst_refused": len(burst_refused),
        "burst_refused_examples": [str(status) for status in burst_refused[:5]],
        "redis_connections_after_burst": redis_burst,
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subscribers", type=int, default=10000)
    parser.add_argument("--chats", type=int, default=1000)
    parser.add_argument("--streaming", type=int, default=100, help="chats that get a streamed prompt at once")
    parser.add_argument("--servers", type=int, default=2)
    parser.add_argument("--burst", type=int, default=1000, help="SSE subscribes to one process within one second")
    parser.add_argument("--deltas", type=int, default=20, help="deltas per streamed reply")
    parser.add_argument("--chunk-gap-ms", type=float, default=10.0)
    parser.add_argument("--db-address", default="", help="a Postgres database (migrated here); default SQLite")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/13")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    started_at = datetime.now(UTC)
    work = Path(tempfile.mkdtemp(prefix="turbo-listeners-"))
    processes = Processes(work)
    db_address = args.db_address or f"sqlite:///{work / 'bench.db'}"
    try:
        upstream_port = free_port()
        upstream = processes.start(
            "upstream",
            [PYTHON, "-m", "bench.fast_upstream", "--port", str(upstream_port), "--latency-ms", "5"]
            + ["--chunks", str(args.deltas), "--chunk-gap-ms", str(args.chunk_gap_ms)],
            dict(os.environ),
        )
        wait_until_answering(processes, "upstream", upstream, f"http://127.0.0.1:{upstream_port}/v1/models")
        env = turbo_env(
            argparse.Namespace(redis=args.redis_url, limits=False), upstream_port=upstream_port, db_address=db_address
        )
        env["DJANGO_SETTINGS_MODULE"] = "bench.settings"
        migrated = subprocess.run(
            [PYTHON, "manage.py", "migrate", "--noinput"], cwd=PROJECT, env=env, capture_output=True, text=True
        )
        if migrated.returncode != 0:
            raise RuntimeError(f"migrate failed:\n{migrated.stdout[-2000:]}{migrated.stderr[-3000:]}")
        ports, pids = [], []
        for index in range(args.servers):
            port = free_port()
            name = f"turbo-{index}"
            turbo = turbo_start(processes, name, port, env, "--backlog", "4096")
            wait_until_answering(processes, name, turbo, f"http://127.0.0.1:{port}/health")
            ports.append(port)
            pids.append(turbo.pid)
        try:
            # uvloop, as the servers run: this one process reads every frame of every subscriber.
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                result = runner.run(measure(args, ports, pids))
        except Exception:
            for index in range(args.servers):
                print(f"turbo-{index} said:\n{processes.log_tail(f'turbo-{index}')}", file=sys.stderr)
            raise
        report = {
            "benchmark": "listeners",
            "started_at": started_at.isoformat(),
            "command": " ".join(sys.argv),
            **result,
        }
        print(json.dumps(report, indent=2))
        stamp = started_at.strftime("%Y%m%d-%H%M%S")
        report_write(report, [f"listeners-{stamp}.json", "listeners-latest.json"])
        for index in range(args.servers):
            lines = [line for line in processes.log_lines(f"turbo-{index}") if not line.startswith("HTTP Request:")]
            if lines:
                print(f"turbo-{index} said ({len(lines)} lines), the last:\n" + "\n".join(lines[-10:]), file=sys.stderr)
    finally:
        processes.stop_all()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
