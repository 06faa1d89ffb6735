"""What bench.graphql_stream and bench.grpc_stream share: time to first token through one of Turbo's other
fronts beside `/v1` streaming, on the same Turbo.

A `Front` says what is particular to one of them: its side's name (the key of its figures in every row,
and `<side>_added_over_v1` for what it adds over `/v1`'s TTFT), its label in the tables, its load
generator (a coroutine its script runs in its own `--client` mode, one process per measurement, like
bench.loadgen) and the name of that generator's address argument, and how its server is started.
`run_benchmark(front)` does the rest: the command line, the fast fake upstream and Turbo under uvicorn on
a fresh SQLite database with one user, the runs (direct, `/v1` and the front, in turn), each figure's
median over them, the target's verdict, the table and bench/results/<name>-<timestamp>.json. The load
generators take their requests from a `Schedule`, time each with `StreamTimes` and report with
`Schedule.summary()`.
"""

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

from bench.loadgen import Samples, distribution
from bench.proxy_overhead import (
    PYTHON,
    RESULTS,
    Processes,
    free_port,
    loadgen,
    median_of_runs,
    signup,
    turbo_env,
    wait_until_answering,
)
from bench.servers import turbo_server

PROJECT = Path(__file__).resolve().parent.parent
QUICK = {"requests": 300, "runs": 1, "warmup": 50}
TARGET_CONCURRENCY, TARGET_ADDED_P99_MS = 1, 2.0  # the front's TTFT p99 over /v1's, at c=1
SENT_AT = re.compile(r"^t=(\d+)$")


@dataclass(frozen=True)
class Front:
    """One front measured beside `/v1` streaming, and what the shared run needs to know of it."""

    name: str  # its script's module in bench/, the report's "benchmark" and its file's prefix
    side: str  # the key of its figures in every row (beside "direct" and "v1")
    label: str  # how the tables name it
    description: str  # its script's docstring: the --help text
    # Its load generator: load(<address_arg>=..., token=, concurrency=, requests=, warmup=) -> summary,
    # run in the script's --client mode, where the address comes as --<address_arg>.
    load: Callable[..., Awaitable[dict]]
    address_arg: str
    # Given the run's processes, Turbo's environment and HTTP port (Turbo started, maybe not answering
    # yet): starts what else the front needs, waits until it answers, returns the load generator's address.
    serve: Callable[[Processes, dict[str, str], int], str]
    server: str  # the report's description of the server the front runs in
    env: dict[str, str] = field(default_factory=dict)  # added to Turbo's and the load generator's environment

    @property
    def sides(self) -> tuple[str, ...]:
        return ("direct", "v1", self.side)

    @property
    def added_key(self) -> str:
        """The row's key for the front's TTFT minus `/v1`'s."""
        return f"{self.side}_added_over_v1"


# --- for the load generators --------------------------------------------------------------------------


class StreamTimes:
    """One streamed request's figures (ms) as its content arrives: the time to the first content, the gaps
    between contents and each content's delay since the fake upstream wrote its send time into it
    (`t=<time.time_ns()>`, as bench.loadgen reads it). The clock starts when this is made."""

    def __init__(self) -> None:
        self.began = time.perf_counter()
        self.first: float | None = None
        self.last = 0.0
        self.gaps: list[float] = []
        self.delays: list[float] = []

    def content(self, text: str, arrived: float, arrived_ns: int) -> None:
        """A piece of content `text` arrived at perf_counter() `arrived`, time_ns() `arrived_ns`."""
        if self.first is None:
            self.first = (arrived - self.began) * 1000
        else:
            self.gaps.append((arrived - self.last) * 1000)
        self.last = arrived
        sent_at = SENT_AT.match(text)
        if sent_at:
            self.delays.append((arrived_ns - int(sent_at.group(1))) / 1e6)

    def record(self, record: Samples | None, *, finished: bool, last: str) -> None:
        """The stream has ended (`finished`: with its `last` piece, "delta" or "chunk"): into `record`, unless
        None (a warm-up request)."""
        if record is None:
            return
        if self.first is None or not finished:
            record.error(f"stream ended without content or a last {last}")
            return
        record.latency.append((time.perf_counter() - self.began) * 1000)
        record.ttft.append(self.first)
        record.chunk_gap.extend(self.gaps)
        record.chunk_delay.extend(self.delays)


class Schedule:
    """The requests of one load generator, handed to its workers in turn (iterate it from each): `warmup`
    unrecorded ones, then `requests` recorded in `samples`, each as (its index, where to record it: None
    while warming up). The clocks start when the first recorded one is handed out; `summary()` reports them
    in bench.loadgen's shape for streams."""

    def __init__(self, *, url: str, concurrency: int, requests: int, warmup: int) -> None:
        self.url, self.concurrency, self.requests, self.warmup = url, concurrency, requests, warmup
        self.samples = Samples()
        self.next_index = 0
        self.started = self.cpu_started = 0.0

    def __iter__(self) -> "Schedule":
        return self

    def __next__(self) -> tuple[int, Samples | None]:
        if self.next_index >= self.warmup + self.requests:
            raise StopIteration
        index = self.next_index
        self.next_index += 1
        if index == self.warmup:
            self.started, self.cpu_started = time.perf_counter(), time.process_time()
        return index, self.samples if index >= self.warmup else None

    def summary(self) -> dict:
        """The recorded requests' figures, once every worker is done."""
        elapsed = time.perf_counter() - self.started
        samples = self.samples
        ok = len(samples.latency)
        return {
            "url": self.url,
            "mode": "stream",
            "concurrency": self.concurrency,
            "requests": self.requests,
            "warmup": self.warmup,
            "ok": ok,
            "errors": sum(samples.errors.values()),
            "error_kinds": dict(samples.errors),
            "error_sample": samples.error_sample,
            "elapsed_s": round(elapsed, 3),
            "rps": round(ok / elapsed, 1) if elapsed else None,
            "loadgen_cpu_share": round((time.process_time() - self.cpu_started) / elapsed, 3) if elapsed else None,
            "latency_ms": distribution(samples.latency),
            "ttft_ms": distribution(samples.ttft),
            "chunk_gap_ms": distribution(samples.chunk_gap),
            "chunk_delay_ms": distribution(samples.chunk_delay),
            "turbo_overhead_ms": None,
        }


def front_loadgen(
    front: Front, *, address: str, token: str, concurrency: int, requests: int, warmup: int, out: Path
) -> dict:
    """Runs the front's load generator (its script's --client mode) in a process of its own; its summary."""
    command = [PYTHON, "-m", f"bench.{front.name}", "--client", f"--{front.address_arg}", address, f"--token={token}"]
    command += ["--concurrency", str(concurrency), "--requests", str(requests), "--warmup", str(warmup)]
    command += ["--out", str(out)]
    finished = subprocess.run(
        command,
        cwd=PROJECT,
        env={**os.environ, **front.env},
        capture_output=True,
        text=True,
        timeout=120 + (requests + warmup) * 0.25,
    )
    if finished.returncode != 0:
        raise RuntimeError(
            f"the {front.label} load generator failed ({finished.returncode}):\n{finished.stderr[-3000:]}"
        )
    return json.loads(out.read_text())


# --- the run ------------------------------------------------------------------------------------------


def fmt(value, width: int = 8) -> str:
    return f"{value:>{width}.2f}" if isinstance(value, int | float) else f"{'-':>{width}}"


def render(front: Front, report: dict) -> str:
    width = max(len(side) for side in front.sides)
    lines = [
        f"Streamed chat completion, TTFT (ms; median of {report['runs']} runs of {report['requests']} requests)",
        f"    c | {'side':<{width}} |  TTFT p50      p99 | latency p50     p99 | chunk delay p50  p99 |    rps |"
        " errors",
    ]
    for row in report["results"]:
        for side in front.sides:
            figures = row[side]
            ttft, latency, delay = (
                figures["ttft_ms"] or {},
                figures["latency_ms"] or {},
                figures["chunk_delay_ms"] or {},
            )
            lines.append(
                f"{row['concurrency']:>5} | {side:<{width}} | {fmt(ttft.get('p50'))} {fmt(ttft.get('p99'))} |"
                f" {fmt(latency.get('p50'), 7)} {fmt(latency.get('p99'), 7)} |"
                f" {fmt(delay.get('p50'), 8)} {fmt(delay.get('p99'), 8)} | {fmt(figures['rps'], 6)} |"
                f" {figures['errors']}"
            )
        added = row[front.added_key]
        lines.append(
            f"{row['concurrency']:>5} | {front.label} TTFT over /v1: p50 {fmt(added['p50'], 5)}"
            f"  p99 {fmt(added['p99'], 5)}"
        )
    verdict = report["target"]
    lines += [
        "",
        f"Target: {front.label} TTFT p99 at c={TARGET_CONCURRENCY} at most {TARGET_ADDED_P99_MS:g} ms over /v1's: "
        f"{fmt(verdict['added_p99_ms'], 0)} ms: {verdict['verdict']}",
    ]
    return "\n".join(lines)


def parse_args(front: Front) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=front.description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--concurrency", default="1", help="comma-separated levels (default 1)")
    parser.add_argument("--requests", type=int, default=1000, help="measured requests per run (default 1000)")
    parser.add_argument("--warmup", type=int, default=100, help="unmeasured requests before each run (default 100)")
    parser.add_argument("--runs", type=int, default=3, help="runs per side; the median is reported (default 3)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 300 requests, 1 run")
    parser.add_argument("--latency-ms", type=float, default=5.0, help="fake upstream latency (default 5)")
    parser.add_argument("--chunks", type=int, default=20, help="chunks per streamed answer (default 20)")
    parser.add_argument("--chunk-gap-ms", type=float, default=2.0, help="pause between chunks (default 2)")
    # The front's load generator's own mode (one process per measurement, like bench.loadgen).
    parser.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(f"--{front.address_arg}", help=argparse.SUPPRESS)
    parser.add_argument("--token", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.requests, args.runs, args.warmup = QUICK["requests"], QUICK["runs"], QUICK["warmup"]
    args.concurrency = [int(level) for level in str(args.concurrency).split(",") if level.strip()]
    if args.requests < 1 or args.runs < 1 or args.warmup < 0 or not args.concurrency or min(args.concurrency) < 1:
        parser.error("--requests, --runs and every --concurrency level must be at least 1")
    return args


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def client(front: Front, args: argparse.Namespace) -> None:
    """The --client mode: one measurement with the front's load generator, its summary to --out."""
    summary = asyncio.run(
        front.load(
            **{front.address_arg: getattr(args, front.address_arg)},
            token=args.token,
            concurrency=args.concurrency[0],
            requests=args.requests,
            warmup=args.warmup,
        )
    )
    Path(args.out).write_text(json.dumps(summary, indent=2))
    if summary["errors"]:
        print(f"{front.side} loadgen: {summary['errors']} errors: {summary['error_sample']}", file=sys.stderr)


def run_benchmark(front: Front) -> None:
    """The script's main(): its --client mode, or the whole benchmark."""
    args = parse_args(front)
    if args.client:
        client(front, args)
        return

    signal.signal(signal.SIGTERM, _interrupt)
    started_at = datetime.now(UTC)
    work = Path(tempfile.mkdtemp(prefix=f"turbo-bench-{front.side}-"))
    processes = Processes(work)
    sides = front.sides
    try:
        upstream_port = free_port()
        upstream = processes.start(
            "upstream",
            [PYTHON, "-m", "bench.fast_upstream", "--port", str(upstream_port), "--latency-ms", str(args.latency_ms)]
            + ["--chunks", str(args.chunks), "--chunk-gap-ms", str(args.chunk_gap_ms)],
            dict(os.environ),
        )
        upstream_url = f"http://127.0.0.1:{upstream_port}/v1"
        wait_until_answering(processes, "upstream", upstream, f"{upstream_url}/models")

        env = turbo_env(
            SimpleNamespace(redis="", limits=False), upstream_port=upstream_port, db_address=f"sqlite:///{work}/b.db"
        )
        env.update(front.env)
        migrated = subprocess.run(
            [PYTHON, "manage.py", "migrate", "--noinput"], cwd=PROJECT, env=env, capture_output=True, text=True
        )
        if migrated.returncode != 0:
            raise RuntimeError(f"migrate failed:\n{migrated.stdout[-2000:]}{migrated.stderr[-3000:]}")
        http_port = free_port()
        server = turbo_server("uvicorn", http_port)
        turbo = processes.start("turbo", server.command, env)
        front_address = front.serve(processes, env, http_port)
        turbo_url = f"http://127.0.0.1:{http_port}"
        wait_until_answering(processes, "turbo", turbo, f"{turbo_url}/health")
        token = signup(turbo_url)

        results = []
        for concurrency in args.concurrency:
            runs: dict[str, list[dict]] = {side: [] for side in sides}
            for run in range(args.runs):
                common = {"concurrency": concurrency, "requests": args.requests, "warmup": args.warmup}
                print(f"c={concurrency} run {run + 1}/{args.runs}", file=sys.stderr, flush=True)
                stream = {"mode": "stream", "pool": "per-worker", **common}
                runs["direct"].append(loadgen(url=upstream_url, token="bench", out=work / "direct.json", **stream))
                runs["v1"].append(loadgen(url=f"{turbo_url}/v1", token=token, out=work / "v1.json", **stream))
                runs[front.side].append(
                    front_loadgen(front, address=front_address, token=token, out=work / f"{front.side}.json", **common)
                )
            row = {"concurrency": concurrency, **{side: median_of_runs(runs[side]) for side in sides}}
            row["runs"] = runs
            v1, front_side = row["v1"]["ttft_ms"] or {}, row[front.side]["ttft_ms"] or {}
            row[front.added_key] = {
                stat: round(front_side[stat] - v1[stat], 3) if stat in front_side and stat in v1 else None
                for stat in ("p50", "p99")
            }
            results.append(row)
    finally:
        processes.stop_all()

    at_target = next((row for row in results if row["concurrency"] == TARGET_CONCURRENCY), None)
    added_p99 = at_target[front.added_key]["p99"] if at_target else None
    errors = sum(row[side]["errors"] for row in results for side in sides)
    report = {
        "benchmark": front.name,
        "started_at": started_at.isoformat(),
        "requests": args.requests,
        "warmup": args.warmup,
        "runs": args.runs,
        "upstream": {"latency_ms": args.latency_ms, "chunks": args.chunks, "chunk_gap_ms": args.chunk_gap_ms},
        "servers": {"v1": server.describe(), front.side: front.server},
        "results": results,
        "target": {
            "added_p99_ms": added_p99,
            "limit_ms": TARGET_ADDED_P99_MS,
            "verdict": "not measured"
            if added_p99 is None
            else ("MET" if added_p99 <= TARGET_ADDED_P99_MS and not errors else "MISSED"),
        },
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{front.name}-{started_at.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(report, indent=2))
    print(render(front, report))
    print(f"\nwritten to {path.relative_to(PROJECT)}")
