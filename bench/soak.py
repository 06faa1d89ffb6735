"""Soak: does Turbo's memory stay flat under a long stream of proxied requests?

    python -m bench.soak [--requests 20000] [--concurrency 16] [--step 1000] [--warmup 2000]
                         [--mode plain|stream|mixed] [--redis [URL]] [--quick]

Starts the fake upstream (bench.fast_upstream) and Turbo under uvicorn on a fresh SQLite database exactly
as bench.proxy_overhead does (its helpers are imported), signs up for a token, then sends `--requests`
proxied POST /v1/chat/completions through Turbo in steps of `--step` requests, each step one run of the
load generator (bench.loadgen) in its own process; `mixed` runs a plain and a streamed load generator side
by side. After each step, once the event writer has had time to flush, it samples the Turbo process's
resident memory (/proc/<pid>/status), its CPU time, open file descriptors and threads, and the proxy
events saved so far. Growth is judged against the sample taken after the first `--warmup` requests:
the target is RSS growth < 10 % from there to the end. At the end Turbo is stopped with SIGTERM (it saves
its queued events as it stops) and the event log must hold one proxy event per request sent.
Prints a table and writes bench/results/soak-<timestamp>.json and bench/results/soak-latest.json.
This is a benchmark, not a test: it asserts nothing about wall-clock times.
"""

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

from bench.fast_upstream import fastest_server_parts
from bench.proxy_overhead import (
    PROJECT,
    PYTHON,
    Processes,
    cpu_seconds,
    events_logged,
    free_port,
    report_write,
    signup,
    turbo_env,
    wait_until_answering,
)
from bench.servers import turbo_server

MODES = ("plain", "stream", "mixed")
QUICK = {"requests": 4000, "warmup": 1000, "step": 500}
TARGET_GROWTH = 0.10
TARGET_NAME = "RSS growth < 10 % over the soak after warm-up"
# After a step, wait this long before sampling: longer than EVENT_FLUSH_MS (500 ms by default), so the
# event writer has saved the step's events and every sample is taken with the event queue empty.
SETTLE_S = 0.8
MIB = 1024 * 1024


# --- the Turbo process ----------------------------------------------------------------------------


def memory_of(pid: int) -> dict | None:
    """The process's resident memory in bytes (VmRSS, RssAnon, RssFile, VmHWM) from /proc; None without it."""
    wanted = {"VmRSS": "rss", "RssAnon": "rss_anon", "RssFile": "rss_file", "VmHWM": "rss_peak", "Threads": "threads"}
    found: dict = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            name, _, value = line.partition(":")
            if name in wanted:
                number = int(value.split()[0])
                found[wanted[name]] = number if name == "Threads" else number * 1024
    except (OSError, ValueError, IndexError):
        return None
    return found if "rss" in found else None


def open_fds(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


# --- load -----------------------------------------------------------------------------------------


def run_step(args, *, url: str, token: str, requests: int, work: Path, index: int) -> dict:
    """One step: `requests` proxied requests at `--concurrency`, through one load generator (two for mixed,
    a plain and a streamed one at once, splitting requests and concurrency). Returns the step's figures."""
    if args.mode == "mixed":
        plain_requests = (requests + 1) // 2
        plain_concurrency = (args.concurrency + 1) // 2
        parts = [
            ("plain", plain_concurrency, plain_requests),
            ("stream", args.concurrency - plain_concurrency, requests - plain_requests),
        ]
    else:
        parts = [(args.mode, args.concurrency, requests)]
    parts = [part for part in parts if part[2] > 0]

    def one(part: tuple[str, int, int]) -> dict:
        mode, concurrency, count = part
        return loadgen(
            url=url,
            token=token,
            mode=mode,
            concurrency=concurrency,
            requests=count,
            out=work / f"step-{index}-{mode}.json",
        )

    started = time.perf_counter()
    if len(parts) == 1:
        summaries = [one(parts[0])]
    else:
        with ThreadPoolExecutor(max_workers=len(parts)) as pool:
            summaries = list(pool.map(one, parts))
    wall_s = time.perf_counter() - started
    ok = sum(summary["ok"] for summary in summaries)
    # The measured phase of each load generator (the step's wall time also has their start-ups in it).
    elapsed = max(summary["elapsed_s"] for summary in summaries)
    kinds: Counter = Counter()
    for summary in summaries:
        kinds.update(summary["error_kinds"])
    return {
        "sent": requests,
        "ok": ok,
        "errors": sum(summary["errors"] for summary in summaries),
        "error_kinds": dict(kinds),
        "error_sample": next((summary["error_sample"] for summary in summaries if summary["error_sample"]), ""),
        "rps": round(ok / elapsed, 1) if elapsed else None,
        "wall_s": round(wall_s, 2),
        "latency_p50_ms": {summary["mode"]: (summary["latency_ms"] or {}).get("p50") for summary in summaries},
        "latency_p99_ms": {summary["mode"]: (summary["latency_ms"] or {}).get("p99") for summary in summaries},
        "loadgen_cpu_share": {summary["mode"]: summary["loadgen_cpu_share"] for summary in summaries},
    }


def loadgen(*, url: str, token: str, mode: str, concurrency: int, requests: int, out: Path) -> dict:
    """One run of bench.loadgen, without warm-up (the soak has its own), like proxy_overhead's `loadgen`
    but passing `--token=<token>`: a token may start with "-", which argparse would take for an option."""
    command = [PYTHON, "-m", "bench.loadgen", "--url", url, f"--token={token}", "--mode", mode]
    command += ["--concurrency", str(concurrency), "--requests", str(requests), "--warmup", "0", "--out", str(out)]
    finished = subprocess.run(command, cwd=PROJECT, capture_output=True, text=True, timeout=120 + requests * 0.25)
    if finished.returncode != 0:
        raise RuntimeError(f"loadgen failed ({finished.returncode}):\n{finished.stderr[-3000:]}")
    return json.loads(out.read_text())


def step_ends(requests: int, step: int, warmup: int) -> list[int]:
    """Where the steps end: every `step` requests, plus the end of the warm-up (so it is sampled exactly)."""
    ends = set(range(step, requests, step)) | {requests}
    if 0 < warmup < requests:
        ends.add(warmup)
    return sorted(ends)


# --- figures --------------------------------------------------------------------------------------


def sample(pid: int, db_path: Path) -> dict:
    memory = memory_of(pid) or {}
    return {
        "rss": memory.get("rss"),
        "rss_anon": memory.get("rss_anon"),
        "rss_file": memory.get("rss_file"),
        "rss_peak": memory.get("rss_peak"),
        "threads": memory.get("threads"),
        "fds": open_fds(pid),
        "cpu_s": cpu_seconds(pid),
        # Read while Turbo runs (WAL: it does not block the writer); the exact check is after it stops.
        "events_saved": events_logged(db_path),
    }


def slope_per_1000(points: list[tuple[int, float]]) -> float | None:
    """Least-squares slope of RSS (bytes) against requests, in bytes per 1,000 requests."""
    if len(points) < 2:
        return None
    xs, ys = [x for x, _ in points], [y for _, y in points]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    spread = sum((x - mean_x) ** 2 for x in xs)
    if not spread:
        return None
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / spread * 1000


def judge(rows: list[dict], warmup: int, *, partial: bool = False) -> dict:
    """The target's verdict from the samples: growth from the warm-up's end to the last sample. An interrupted
    run shows its growth so far but is not judged."""
    after = [row for row in rows if row["requests"] >= warmup and row["rss"] is not None]
    if len(after) < 2 or after[0]["requests"] != warmup:
        return {"target": TARGET_NAME, "verdict": "NOT MEASURED", "growth": None, "slope_kib_per_1000": None}
    base, end = after[0], after[-1]
    growth = (end["rss"] - base["rss"]) / base["rss"]
    slope = slope_per_1000([(row["requests"], row["rss"]) for row in after])
    return {
        "target": TARGET_NAME,
        "verdict": "NOT JUDGED (interrupted)" if partial else "MET" if growth < TARGET_GROWTH else "MISSED",
        "growth": round(growth, 4),
        "rss_after_warmup_mib": round(base["rss"] / MIB, 2),
        "rss_end_mib": round(end["rss"] / MIB, 2),
        "peak_after_warmup_mib": round(max(row["rss"] for row in after) / MIB, 2),
        "slope_kib_per_1000": round(slope / 1024, 1) if slope is not None else None,
    }


def render(report: dict) -> str:
    settings, rows, verdict = report["settings"], report["rows"], report["target"]
    lines = [
        f"Turbo soak: {settings['requests']} proxied requests ({settings['mode']}), concurrency "
        f"{settings['concurrency']}, steps of {settings['step']}, warm-up {settings['warmup']}; Turbo under "
        f"uvicorn, SQLite" + (", Redis" if settings["redis"] else "") + "; upstream latency "
        f"{settings['latency_ms']:g} ms",
        "",
        " requests |  RSS MiB | growth |   rps | errors | CPU ms/req | events saved | fds | threads",
    ]
    base = next((row["rss"] for row in rows if row["requests"] == settings["warmup"]), None)
    for row in rows:
        growth = "-"
        if base and row["rss"] is not None and row["requests"] >= settings["warmup"]:
            growth = f"{(row['rss'] - base) / base * 100:+.1f}%"
        mark = "  <- warm-up done" if row["requests"] == settings["warmup"] else ""
        if not row["requests"]:
            mark = "  <- before any load" + (" (the base: no warm-up)" if mark else "")
        lines.append(
            f"{row['requests']:>9} | {mib(row['rss']):>8} | {growth:>6} | {num(row['rps'], 5, 0)} | "
            f"{num(row['errors'], 6, 0)} | {num(row['cpu_ms_per_request'], 10)} | {num(row['events_saved'], 12, 0)} | "
            f"{num(row['fds'], 3, 0)} | {num(row['threads'], 7, 0)}{mark}"
        )
    lines.append("")
    if verdict["growth"] is None:
        lines.append(f"{TARGET_NAME}: {verdict['verdict']} (no sample after the warm-up's)")
    else:
        lines.append(
            f"{TARGET_NAME}: {verdict['growth'] * 100:+.1f}% ({verdict['rss_after_warmup_mib']:.1f} -> "
            f"{verdict['rss_end_mib']:.1f} MiB; peak {verdict['peak_after_warmup_mib']:.1f} MiB; trend "
            f"{verdict['slope_kib_per_1000']:+.0f} KiB per 1000 requests) {verdict['verdict']}"
        )
    events = report["events"]
    if events["expected"] is None:
        lines.append("Event log: not checked (the run was interrupted).")
    elif events["logged"] is None:
        lines.append("Event log: could not be counted (no events table in the database).")
    else:
        same = "one per request: OK" if events["logged"] == events["expected"] else "MISMATCH"
        exit_code = events["turbo_exit_code"]
        # uvicorn shuts down gracefully on SIGTERM, then raises the signal again: -15 is its clean exit.
        stopped = "" if exit_code in (0, -signal.SIGTERM) else f"; Turbo did not stop cleanly (exit code {exit_code})"
        lines.append(
            f"Event log: {events['logged']} proxy events saved for {events['expected']} requests sent through "
            f"Turbo ({same}); Turbo's log had {events['other_log_lines']} lines besides httpx's{stopped}."
        )
    lines.append(
        f"{report['machine']['cpus']} CPU(s) shared by the upstream, Turbo and the load generator. "
        f"Took {report['duration_s']:.0f} s."
    )
    return "\n".join(lines)


def mib(value: int | None) -> str:
    return "-" if value is None else f"{value / MIB:.1f}"


def num(value, width: int, digits: int = 2) -> str:
    return "-".rjust(width) if value is None else f"{value:{width}.{digits}f}"


# --- the run --------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20000, help="proxied requests in all (default 20000)")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight (default 16)")
    parser.add_argument("--step", type=int, default=1000, help="requests between two samples (default 1000)")
    parser.add_argument(
        "--warmup", type=int, default=2000, help="growth is measured from the sample after this many (default 2000)"
    )
    parser.add_argument(
        "--mode", choices=MODES, default="plain", help="plain, stream, or mixed (half each, at once; default plain)"
    )
    parser.add_argument(
        "--redis", nargs="?", const="redis://127.0.0.1:6379/0", default="", help="run Turbo with this REDIS_ADDRESS"
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 4000 requests, warm-up 1000, step 500")
    parser.add_argument("--latency-ms", type=float, default=5.0, help="fake upstream latency (default 5)")
    parser.add_argument("--chunks", type=int, default=20, help="chunks per streamed answer (default 20)")
    parser.add_argument("--chunk-gap-ms", type=float, default=2.0, help="pause between chunks (default 2)")
    args = parser.parse_args()
    if args.quick:
        args.requests, args.warmup, args.step = QUICK["requests"], QUICK["warmup"], QUICK["step"]
    if args.requests < 1 or args.step < 1 or args.concurrency < 1 or args.warmup < 0:
        parser.error("--requests, --step and --concurrency must be at least 1, --warmup at least 0")
    if args.mode == "mixed" and args.concurrency < 2:
        parser.error("--mode mixed needs --concurrency 2 or more (half plain, half streamed)")
    if args.warmup >= args.requests:
        parser.error("--warmup must be below --requests: growth is measured after it")
    return args


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def build_report(args, *, started_at: datetime, duration_s: float, rows: list[dict], events: dict):
    loop, http = fastest_server_parts()
    report = {
        "started_at": started_at.isoformat(),
        "finished_at": datetime.now(UTC).isoformat(),
        "partial": events["expected"] is None,
        "settings": {
            "requests": args.requests,
            "concurrency": args.concurrency,
            "step": args.step,
            "warmup": args.warmup,
            "mode": args.mode,
            "quick": args.quick,
            "latency_ms": args.latency_ms,
            "chunks": args.chunks,
            "chunk_gap_ms": args.chunk_gap_ms,
            "settle_s": SETTLE_S,
            "database": "sqlite",
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
        "target": judge(rows, args.warmup, partial=events["expected"] is None),
        "events": events,
        "rows": rows,
    }
    report["table"] = render(report)
    return report


def main() -> None:
    args = parse_args()
    # SIGTERM (e.g. from make or CI) unwinds like Ctrl-C, so the finally below stops the servers.
    signal.signal(signal.SIGTERM, _interrupt)
    started_at = datetime.now(UTC)
    stamp = started_at.strftime("%Y%m%d-%H%M%S")
    clock_started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="turbo-soak-"))
    processes = Processes(work)
    rows: list[dict] = []

    def note(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

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

        db_path = work / "bench.db"
        env = turbo_env(args, upstream_port=upstream_port, db_address=f"sqlite:///{db_path}")
        migrated = subprocess.run(
            [PYTHON, "manage.py", "migrate", "--noinput"], cwd=PROJECT, env=env, capture_output=True, text=True
        )
        if migrated.returncode != 0:
            raise RuntimeError(f"migrate failed:\n{migrated.stdout[-2000:]}{migrated.stderr[-3000:]}")
        port = free_port()
        turbo = processes.start("turbo", turbo_server("uvicorn", port).command, env)
        turbo_url = f"http://127.0.0.1:{port}"
        wait_until_answering(processes, "turbo", turbo, f"{turbo_url}/v1/models")
        token = signup(turbo_url)

        time.sleep(SETTLE_S)
        # Row 0: before any load (after start-up and the signup), the base when --warmup is 0.
        rows.append({"requests": 0, "sent": 0, "ok": 0, "errors": None, "rps": None, **sample(turbo.pid, db_path)})
        rows[0]["cpu_ms_per_request"] = None
        ends = step_ends(args.requests, args.step, args.warmup)
        done, cpu_before = 0, rows[0]["cpu_s"]
        for index, end in enumerate(ends):
            step = run_step(args, url=f"{turbo_url}/v1", token=token, requests=end - done, work=work, index=index)
            if turbo.poll() is not None:
                raise RuntimeError(f"Turbo exited with {turbo.returncode}:\n{processes.log_tail('turbo')}")
            time.sleep(SETTLE_S)
            row = {"requests": end, **step, **sample(turbo.pid, db_path)}
            row["cpu_ms_per_request"] = (
                round((row["cpu_s"] - cpu_before) * 1000 / step["sent"], 3)
                if row["cpu_s"] is not None and cpu_before is not None
                else None
            )
            cpu_before, done = row["cpu_s"], end
            rows.append(row)
            note(
                f"[{index + 1}/{len(ends)}] {end} requests: RSS {mib(row['rss'])} MiB, {row['rps']} rps, "
                f"{row['errors']} errors"
                + (f" {row['error_kinds']} e.g. {row['error_sample']}" if row["errors"] else "")
            )

        processes.stop_all()  # SIGTERM: Turbo saves its queued events as it stops
        turbo_log = processes.log_lines("turbo")
        other_lines = [line for line in turbo_log if not line.startswith("HTTP Request:")]
        events = {
            "expected": args.requests,
            "logged": events_logged(db_path),
            "turbo_exit_code": turbo.returncode,
            "other_log_lines": len(other_lines),
        }
        report = build_report(
            args,
            started_at=started_at,
            duration_s=time.monotonic() - clock_started,
            rows=rows,
            events=events,
        )
        print(report["table"])
        if other_lines:
            note(f"Turbo's log, {len(other_lines)} lines besides httpx's; the last:\n" + "\n".join(other_lines[-30:]))
        report_write(report, [f"soak-{stamp}.json", "soak-latest.json"])
    except KeyboardInterrupt:
        note("interrupted; stopping the servers")
        processes.stop_all()
        if len(rows) > 1:
            events = {"expected": None, "logged": None, "turbo_exit_code": None, "other_log_lines": None}
            report = build_report(
                args,
                started_at=started_at,
                duration_s=time.monotonic() - clock_started,
                rows=rows,
                events=events,
            )
            print(f"{report['table']}\n(interrupted: only the steps above were completed)")
            report_write(report, [f"soak-{stamp}-partial.json"])
        sys.exit(130)
    finally:
        processes.stop_all()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
