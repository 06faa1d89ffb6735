"""How much time Turbo's /v1 proxy adds: the same load against a fast fake upstream, directly and through Turbo.

    python -m bench.proxy_overhead [--concurrency 1,4,16,64] [--requests 2000] [--runs 3] [--quick]

Starts three kinds of process, so none competes for another's GIL: the fake upstream
(bench.fast_upstream), Turbo under uvicorn on a fresh SQLite database, and, for every measurement, a
load generator (bench.loadgen). For each concurrency and mode (plain, stream) it measures the upstream
directly and through Turbo, `--runs` times each, and reports the median of each figure across runs.
Prints a table and writes bench/results/proxy_overhead-<timestamp>.json and bench/results/latest.json.
This is a benchmark, not a test: it asserts nothing about wall-clock times.
"""

import argparse
import contextlib
import json
import os
import platform
import secrets
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import httpx

from bench.fast_upstream import fastest_server_parts

PROJECT = Path(__file__).resolve().parent.parent
RESULTS = PROJECT / "bench" / "results"
PYTHON = sys.executable
MODES = ("plain", "stream")
QUICK = {"concurrency": [1, 16], "requests": 300, "runs": 1}
# The targets, in ms: (mode, figure, percentile, concurrency, limit).
TARGETS = [
    ("plain", "latency_ms", "p99", 1, 3.0),
    ("plain", "latency_ms", "p99", 16, 25.0),
    ("stream", "ttft_ms", "p99", 1, 3.0),
]
FIGURES = ("latency_ms", "ttft_ms", "chunk_gap_ms", "chunk_delay_ms", "turbo_overhead_ms")


# --- processes ------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Processes:
    """The servers this run started; `stop_all` ends each of them (and only them)."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.started: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, command: list[str], env: dict[str, str]) -> subprocess.Popen:
        # Its own session, so Ctrl-C reaches only us and we stop the servers in order.
        with open(self.log_dir / f"{name}.log", "wb") as log:
            process = subprocess.Popen(
                command, cwd=PROJECT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.started.append((name, process))
        return process

    def log_lines(self, name: str) -> list[str]:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace").splitlines() if path.exists() else []

    def log_tail(self, name: str, lines: int = 30) -> str:
        return "\n".join(self.log_lines(name)[-lines:])

    def stop_all(self) -> None:
        for _, process in reversed(self.started):
            if process.poll() is None:
                process.terminate()
        for _, process in reversed(self.started):
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.started.clear()


def wait_until_answering(processes: Processes, name: str, process: subprocess.Popen, url: str) -> None:
    """Polls `url` until the server answers anything at all; raises with its log if it exits first."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode}:\n{processes.log_tail(name)}")
        try:
            httpx.get(url, timeout=1, trust_env=False)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError(f"{name} did not answer at {url} within 60 s:\n{processes.log_tail(name)}")


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process so far (Linux /proc); None where that is not available."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def turbo_env(args, *, upstream_port: int, db_address: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DB_ADDRESS", "REDIS_ADDRESS", "DJANGO_SETTINGS_MODULE")}
    env.update(
        DEBUG="0",
        SECRET_KEY=secrets.token_urlsafe(50),
        DB_ADDRESS=db_address,
        OPENAI_API_URL=f"http://127.0.0.1:{upstream_port}/v1",
        OPENAI_API_KEY="sk-bench",
        ALLOWED_HOSTS="127.0.0.1,localhost",
        LOGIN_FAILURES_PER_IP="100000",
    )
    if args.redis:
        env["REDIS_ADDRESS"] = args.redis
    return env


def signup(turbo_url: str) -> str:
    """A fresh user's token."""
    username = f"bench-{secrets.token_hex(4)}"
    response = httpx.post(
        f"{turbo_url}/user/signup",
        data={"username": username, "password": secrets.token_urlsafe(16)},
        timeout=30,
        trust_env=False,
    )
    if response.status_code != 200:
        raise RuntimeError(f"signup failed: {response.status_code} {response.text[:500]}")
    return response.json()["token"]


def loadgen(
    *, url: str, token: str, mode: str, concurrency: int, requests: int, warmup: int, pool: str, out: Path
) -> dict:
    command = [PYTHON, "-m", "bench.loadgen", "--url", url, "--token", token, "--mode", mode]
    command += ["--concurrency", str(concurrency), "--requests", str(requests), "--warmup", str(warmup)]
    command += ["--pool", pool, "--out", str(out)]
    finished = subprocess.run(
        command, cwd=PROJECT, capture_output=True, text=True, timeout=120 + (requests + warmup) * 0.25
    )
    if finished.returncode != 0:
        raise RuntimeError(f"loadgen failed ({finished.returncode}):\n{finished.stderr[-3000:]}")
    return json.loads(out.read_text())


# --- figures --------------------------------------------------------------------------------------


def median_of_runs(runs: list[dict]) -> dict:
    """Each figure's median across runs; errors are summed, so none is hidden by a median."""
    merged: dict = {
        "runs": len(runs),
        "errors": sum(run["errors"] for run in runs),
        "error_kinds": dict(sum((Counter(run["error_kinds"]) for run in runs), Counter())),
        "error_sample": next((run["error_sample"] for run in runs if run["error_sample"]), ""),
    }
    for key in ("rps", "loadgen_cpu_share", "server_cpu_ms_per_request"):
        values = [run[key] for run in runs if run.get(key) is not None]
        merged[key] = round(statistics.median(values), 3) if values else None
    for figure in FIGURES:
        present = [run[figure] for run in runs if run.get(figure)]
        merged[figure] = (
            {stat: round(statistics.median(d[stat] for d in present), 3) for stat in ("p50", "p99", "mean", "max")}
            if present
            else None
        )
    return merged


def added(via: dict, direct: dict, figure: str) -> dict | None:
    """via − direct for p50 and p99 (a difference of percentiles, not a percentile of differences)."""
    if not via.get(figure) or not direct.get(figure):
        return None
    return {stat: round(via[figure][stat] - direct[figure][stat], 3) for stat in ("p50", "p99")}


def judge_targets(results: list[dict]) -> list[dict]:
    verdicts = []
    for mode, figure, stat, concurrency, limit in TARGETS:
        row = next((r for r in results if r["mode"] == mode and r["concurrency"] == concurrency), None)
        value = row["added"][figure][stat] if row and row["added"].get(figure) else None
        verdict = "NOT MEASURED" if value is None else ("MET" if value <= limit else "MISSED")
        name = "added latency, non-streamed" if mode == "plain" else "added TTFT, streamed"
        verdicts.append(
            {
                "target": f"{name} {stat} at c={concurrency} <= {limit:g} ms",
                "mode": mode,
                "figure": figure,
                "percentile": stat,
                "concurrency": concurrency,
                "limit_ms": limit,
                "value_ms": value,
                "p50_ms": row["added"][figure]["p50"] if value is not None else None,
                "verdict": verdict,
            }
        )
    return verdicts


# --- table ----------------------------------------------------------------------------------------


def fmt(value, width: int = 7, digits: int = 2) -> str:
    if value is None:
        return "-".rjust(width)
    return f"{value:{width}.{digits}f}"


def pair(figures: dict | None, width: int = 7) -> str:
    if not figures:
        return fmt(None, width) + " " + fmt(None, width)
    return fmt(figures["p50"], width) + " " + fmt(figures["p99"], width)


def render(report: dict) -> str:
    settings = report["settings"]
    results = report["results"]
    lines = [
        f"Turbo /v1 proxy overhead: median of {settings['runs']} run(s) of {settings['requests']} requests "
        f"(+{settings['warmup']} warm-up) per cell; upstream latency {settings['latency_ms']:g} ms, "
        f"{settings['chunks']} chunks {settings['chunk_gap_ms']:g} ms apart; all times in ms",
        "",
        "Non-streamed POST /v1/chat/completions",
        "    c |  direct p50     p99 |     via p50     p99 |   added p50     p99 | rps direct     via "
        "| X-Turbo-Overhead p50 p99 | Turbo CPU ms/req | errors d/v",
    ]
    for row in (r for r in results if r["mode"] == "plain"):
        direct, via = row["direct"], row["via_turbo"]
        lines.append(
            f"{row['concurrency']:>5} | {pair(direct['latency_ms'])} | {pair(via['latency_ms'])} | "
            f"{pair(row['added']['latency_ms'])} | {fmt(direct['rps'], 10, 0)} {fmt(via['rps'], 7, 0)} | "
            f"{pair(via['turbo_overhead_ms'], 12)} | {fmt(via['server_cpu_ms_per_request'], 16)} | "
            f"{direct['errors']}/{via['errors']}"
        )
    lines += [
        "",
        "Streamed POST /v1/chat/completions (TTFT = until the first content chunk)",
        "    c |    TTFT direct p50 p99 |    TTFT via p50 p99 | TTFT added p50 p99 | via chunk gap p50 p99 "
        "| chunk delay direct p50 p99 |    via p50     p99 | rps direct     via | errors d/v",
    ]
    for row in (r for r in results if r["mode"] == "stream"):
        direct, via = row["direct"], row["via_turbo"]
        lines.append(
            f"{row['concurrency']:>5} | {pair(direct['ttft_ms'], 11)} | {pair(via['ttft_ms'], 9)} | "
            f"{pair(row['added']['ttft_ms'], 9)} | {pair(via['chunk_gap_ms'], 10)} | "
            f"{pair(direct['chunk_delay_ms'], 13)} | {pair(via['chunk_delay_ms'])} | "
            f"{fmt(direct['rps'], 10, 0)} {fmt(via['rps'], 7, 0)} | {direct['errors']}/{via['errors']}"
        )
    lines += ["", "Targets (from the issue):"]
    for verdict in report["targets"]:
        value = "-" if verdict["value_ms"] is None else f"{verdict['value_ms']:.2f} ms"
        extra = f" (p50 {verdict['p50_ms']:.2f} ms)" if verdict["p50_ms"] is not None else ""
        lines.append(f"  {verdict['target']:<48} {value:>10}{extra:<18} {verdict['verdict']}")
    cpus = report["machine"]["cpus"]
    events = report["events"]
    if events["expected"] is None:
        event_line = "Event log: not checked (the run was interrupted)."
    else:
        logged = "not counted (not SQLite)" if events["logged"] is None else str(events["logged"])
        event_line = (
            f"Event log: {logged} proxy events saved for {events['expected']} requests sent through Turbo; "
            f"Turbo's log had {events['httpx_info_lines']} httpx 'HTTP Request:' INFO lines."
        )
    lines += [
        "",
        event_line,
        f"{cpus} CPU(s) shared by the upstream, Turbo and the load generator: at high concurrency the numbers "
        f"include waiting for a core. Took {report['duration_s']:.0f} s.",
    ]
    return "\n".join(lines)


def print_errors(results: list[dict]) -> None:
    for row in results:
        for side in ("direct", "via_turbo"):
            figures = row[side]
            if figures["errors"]:
                print(
                    f"ERRORS c={row['concurrency']} {row['mode']} {side}: {figures['errors']} "
                    f"{figures['error_kinds']} e.g. {figures['error_sample']}",
                    file=sys.stderr,
                )


def events_logged(db_path: Path) -> int | None:
    """Proxy events saved in the bench database (read after Turbo has stopped and flushed)."""
    try:
        with contextlib.closing(sqlite3.connect(db_path)) as db:
            return db.execute("SELECT COUNT(*) FROM events WHERE type = 'proxy'").fetchone()[0]
    except sqlite3.Error:
        return None


# --- the run --------------------------------------------------------------------------------------


def measure(
    args, results: list[dict], *, upstream_url: str, turbo_url: str, token: str, pids: dict, work: Path
) -> None:
    """Runs every cell, appending each to `results` as it completes (so an interrupted run keeps them)."""
    total = len(args.concurrency) * len(MODES) * args.runs
    done = 0
    for concurrency in args.concurrency:
        for mode in MODES:
            runs: dict[str, list[dict]] = {"direct": [], "via_turbo": []}
            for run in range(args.runs):
                for side, url, side_token in (
                    ("direct", upstream_url, "bench"),
                    ("via_turbo", turbo_url + "/v1", token),
                ):
                    server_pid = pids["upstream"] if side == "direct" else pids["turbo"]
                    cpu_before = cpu_seconds(server_pid)
                    summary = loadgen(
                        url=url,
                        token=side_token,
                        mode=mode,
                        concurrency=concurrency,
                        requests=args.requests,
                        warmup=args.warmup,
                        pool=args.pool,
                        out=work / f"{side}-{mode}-{concurrency}-{run}.json",
                    )
                    cpu_after = cpu_seconds(server_pid)
                    # Whole-process CPU over warm-up and measurement: Turbo's cost per request (for
                    # via_turbo this excludes the upstream's share, which runs in its own process).
                    summary["server_cpu_ms_per_request"] = (
                        round((cpu_after - cpu_before) * 1000 / (args.requests + args.warmup), 3)
                        if cpu_before is not None and cpu_after is not None
                        else None
                    )
                    runs[side].append(summary)
                done += 1
                direct, via = runs["direct"][-1], runs["via_turbo"][-1]
                print(
                    f"[{done}/{total}] c={concurrency} {mode} run {run + 1}: "
                    f"p50 direct {direct['latency_ms']['p50'] if direct['latency_ms'] else '-'} ms, "
                    f"via Turbo {via['latency_ms']['p50'] if via['latency_ms'] else '-'} ms, "
                    f"errors {direct['errors']}/{via['errors']}",
                    file=sys.stderr,
                    flush=True,
                )
            direct, via = median_of_runs(runs["direct"]), median_of_runs(runs["via_turbo"])
            results.append(
                {
                    "concurrency": concurrency,
                    "mode": mode,
                    "direct": direct,
                    "via_turbo": via,
                    "added": {figure: added(via, direct, figure) for figure in ("latency_ms", "ttft_ms")},
                    "runs": runs,
                }
            )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", default="1,4,16,64", help="comma-separated levels (default 1,4,16,64)")
    parser.add_argument("--requests", type=int, default=2000, help="measured requests per run (default 2000)")
    parser.add_argument("--warmup", type=int, default=100, help="unmeasured requests before each run (default 100)")
    parser.add_argument("--runs", type=int, default=3, help="runs per cell; the median is reported (default 3)")
    parser.add_argument("--quick", action="store_true", help="smoke run: concurrency 1,16, 300 requests, 1 run")
    parser.add_argument(
        "--pool",
        choices=("per-worker", "shared"),
        default="per-worker",
        help="load generator's connections: one client each (default) or one shared httpx pool",
    )
    parser.add_argument("--latency-ms", type=float, default=5.0, help="fake upstream latency (default 5)")
    parser.add_argument("--chunks", type=int, default=20, help="chunks per streamed answer (default 20)")
    parser.add_argument("--chunk-gap-ms", type=float, default=2.0, help="pause between chunks (default 2)")
    parser.add_argument(
        "--redis", nargs="?", const="redis://127.0.0.1:6379/0", default="", help="run Turbo with this REDIS_ADDRESS"
    )
    parser.add_argument("--postgres", default="", metavar="URL", help="run Turbo on this database instead of SQLite")
    args = parser.parse_args()
    if args.quick:
        args.concurrency, args.requests, args.runs = QUICK["concurrency"], QUICK["requests"], QUICK["runs"]
    else:
        args.concurrency = [int(level) for level in args.concurrency.split(",") if level.strip()]
    if args.requests < 1 or args.runs < 1 or args.warmup < 0 or not args.concurrency or min(args.concurrency) < 1:
        parser.error("--requests, --runs and every --concurrency level must be at least 1")
    if args.postgres and not args.postgres.startswith(("postgres://", "postgresql://")):
        parser.error("--postgres takes a postgresql:// URL")
    return args


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def build_report(args, results: list[dict], *, started_at: datetime, duration_s: float, events: dict) -> dict:
    loop, http = fastest_server_parts()
    return {
        "started_at": started_at.isoformat(),
        "finished_at": datetime.now(UTC).isoformat(),
        "partial": events["expected"] is None,
        "settings": {
            "concurrency": args.concurrency,
            "requests": args.requests,
            "warmup": args.warmup,
            "runs": args.runs,
            "quick": args.quick,
            "latency_ms": args.latency_ms,
            "chunks": args.chunks,
            "chunk_gap_ms": args.chunk_gap_ms,
            "loadgen_pool": args.pool,
            "database": "postgres" if args.postgres else "sqlite",
            "redis": bool(args.redis),
        },
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "server_loop": loop,
            "server_http": http,
        },
        "duration_s": round(duration_s, 1),
        "events": events,
        "targets": judge_targets(results),
        "results": results,
    }


def report_write(report: dict, names: list[str]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    paths = [RESULTS / name for name in names]
    for path in paths:
        path.write_text(json.dumps(report, indent=2))
    print("\nwrote " + " and ".join(str(path) for path in paths))


def main() -> None:
    args = parse_args()
    # SIGTERM (e.g. from make or CI) unwinds like Ctrl-C, so the finally below stops the servers.
    signal.signal(signal.SIGTERM, _interrupt)
    started_at = datetime.now(UTC)
    stamp = started_at.strftime("%Y%m%d-%H%M%S")
    clock_started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="turbo-bench-"))
    processes = Processes(work)
    db_path = work / "bench.db"
    db_address = args.postgres or f"sqlite:///{db_path}"
    results: list[dict] = []
    try:
        upstream_port, turbo_port = free_port(), free_port()
        upstream = processes.start(
            "upstream",
            [PYTHON, "-m", "bench.fast_upstream", "--port", str(upstream_port), "--latency-ms", str(args.latency_ms)]
            + ["--chunks", str(args.chunks), "--chunk-gap-ms", str(args.chunk_gap_ms)],
            dict(os.environ),
        )
        upstream_url = f"http://127.0.0.1:{upstream_port}/v1"
        wait_until_answering(processes, "upstream", upstream, f"{upstream_url}/models")

        env = turbo_env(args, upstream_port=upstream_port, db_address=db_address)
        migrated = subprocess.run(
            [PYTHON, "manage.py", "migrate", "--noinput"], cwd=PROJECT, env=env, capture_output=True, text=True
        )
        if migrated.returncode != 0:
            raise RuntimeError(f"migrate failed:\n{migrated.stdout[-2000:]}{migrated.stderr[-3000:]}")
        turbo = processes.start(
            "turbo",
            [PYTHON, "-m", "uvicorn", "turbo_site.asgi:application", "--port", str(turbo_port)]
            + ["--log-level", "warning", "--no-access-log"],
            env,
        )
        turbo_url = f"http://127.0.0.1:{turbo_port}"
        wait_until_answering(processes, "turbo", turbo, f"{turbo_url}/v1/models")
        token = signup(turbo_url)

        measure(
            args,
            results,
            upstream_url=upstream_url,
            turbo_url=turbo_url,
            token=token,
            pids={"upstream": upstream.pid, "turbo": turbo.pid},
            work=work,
        )
        processes.stop_all()  # Turbo saves its queued events as it stops
        turbo_log = processes.log_lines("turbo")
        # httpx logs every upstream request at INFO; count those, show anything else Turbo said.
        httpx_lines = sum(1 for line in turbo_log if line.startswith("HTTP Request:"))
        other_lines = [line for line in turbo_log if not line.startswith("HTTP Request:")]
        events = {
            "expected": sum((args.requests + args.warmup) * args.runs for _ in args.concurrency for _ in MODES),
            "logged": None if args.postgres else events_logged(db_path),
            "httpx_info_lines": httpx_lines,
        }
        report = build_report(
            args, results, started_at=started_at, duration_s=time.monotonic() - clock_started, events=events
        )
        report["table"] = render(report)
        print(report["table"])
        print_errors(results)
        if events["logged"] is not None and events["logged"] != events["expected"]:
            print(f"event log: {events['logged']} proxy events saved, {events['expected']} expected", file=sys.stderr)
        if other_lines:
            tail = "\n".join(other_lines[-30:])
            print(f"Turbo's log, {len(other_lines)} lines besides httpx's; the last:\n{tail}", file=sys.stderr)
        report_write(report, [f"proxy_overhead-{stamp}.json", "latest.json"])
    except KeyboardInterrupt:
        print("interrupted; stopping the servers", file=sys.stderr)
        processes.stop_all()
        if results:
            events = {"expected": None, "logged": None, "httpx_info_lines": None}
            report = build_report(
                args, results, started_at=started_at, duration_s=time.monotonic() - clock_started, events=events
            )
            report["table"] = render(report)
            print(f"{report['table']}\n(interrupted: only the cells above were completed)")
            report_write(report, [f"proxy_overhead-{stamp}-partial.json"])
        sys.exit(130)
    finally:
        processes.stop_all()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
