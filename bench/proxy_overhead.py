"""How much time Turbo's /v1 proxy adds: the same load against a fast fake upstream, directly and through Turbo.

    python -m bench.proxy_overhead [--concurrency 1,4,16,64] [--requests 2000] [--runs 3] [--quick]

Starts three kinds of process, so none competes for another's GIL: the fake upstream
(bench.fast_upstream), Turbo under uvicorn on a fresh SQLite database, and, for every measurement, a
load generator (bench.loadgen). For each concurrency and mode (plain, stream) it measures the upstream
directly and through Turbo, `--runs` times each, and reports the median of each figure across runs.
Prints a table and writes bench/results/proxy_overhead-<timestamp>.json and bench/results/latest.json.
This is a benchmark, not a test: it asserts nothing about wall-clock times.

`--servers uvicorn,daphne,gunicorn` runs Turbo under each of those servers (all at once, each on its own
database), and `--peers litellm` puts LiteLLM's proxy (in its own virtualenv, bench/.venv-litellm) in front
of the same upstream; each is measured like Turbo and is one more "via" row. See bench/README.peers.md.

`--gateway three` runs Turbo with a TURBO_CONFIG file (written into the run's temporary folder) in which
the model the load generator asks for has three weighted deployments over three upstreams (three names
for the one fake upstream) and a fallback; `--gateway off,three` measures zero config and that side by
side and judges the growth of Turbo's CPU per request. The default, `off`, is zero config
(OPENAI_API_URL only). See bench/README.md, "proxy_overhead with the model gateway".

`--production` is the issue's production setup in one flag: `--limits` and `--gateway three` on the
Postgres database `--postgres` names (required) and the Redis of `--redis`.

`--limits` runs Turbo on Redis (`--redis`, default db 8) with everything a paying caller goes through: the
load uses an API key (POST /user/keys/create with a large `rpm` and `tpm`) instead of the session token,
the key and its user have a large monthly budget (`manage.py budgets set`), the user has large default rate
limits (RATE_LIMIT_USER_RPM / _TPM), and every request asks for LIMITS_MODEL, which the shipped price
table prices, so each call reserves and settles against both budgets and takes from both rate limits.
The limits never refuse during the run. After it, the bench checks that usage was recorded for every
request, that both budgets were charged, and that nothing was refused. See bench/README.md,
"proxy_overhead with a key, a budget and rate limits".
"""

import argparse
import contextlib
import json
import os
import platform
import re
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

from bench.charts import charts_write
from bench.fast_upstream import fastest_server_parts
from bench.loadgen import MODEL, RATELIMIT_HEADER
from bench.peers import PEERS, litellm_peer
from bench.servers import SERVERS, turbo_server, unavailable, websocket_ping

PROJECT = Path(__file__).resolve().parent.parent
RESULTS = PROJECT / "bench" / "results"
PYTHON = sys.executable
MODES = ("plain", "stream")
QUICK = {"concurrency": [1, 16], "requests": 300, "runs": 1}
# The targets (#30, the proxy's tail), in ms: (mode, figure, percentile, concurrency, limit).
TARGETS = [
    ("plain", "latency_ms", "p99", 1, 1.5),
    ("plain", "latency_ms", "p99", 16, 10.0),
    ("stream", "ttft_ms", "p99", 1, 1.5),
]
# And what one Turbo process must sustain, non-streamed: (figure, concurrency, at least / at most, limit).
CAPACITY_TARGETS = [
    ("rps", 16, "min", 2000.0),
    ("server_cpu_ms_per_request", 1, "max", 1.0),
    ("server_cpu_ms_per_request", 16, "max", 1.0),
]
# Against LiteLLM: Turbo's throughput at this concurrency should be at least this many times LiteLLM's.
THROUGHPUT_CONCURRENCY, THROUGHPUT_RATIO = 16, 25.0
PROBLEM_WORDS = re.compile(r"error|exception|traceback|warning", re.IGNORECASE)
FIGURES = ("latency_ms", "ttft_ms", "chunk_gap_ms", "chunk_delay_ms", "turbo_overhead_ms")
# Gateway modes: "off" is zero config (OPENAI_API_URL only); "three" is a TURBO_CONFIG file giving MODEL
# three weighted deployments, one per upstream name (all three names point at the one fake upstream).
GATEWAYS = ("off", "three")
THREE_DEPLOYMENTS = (("a", 3), ("b", 1), ("c", 1))  # (upstream name, weight)
# The target for the gateway: Turbo's CPU per request grows by at most this much over zero config.
CPU_GROWTH_LIMIT_PCT = 10.0
# --limits: the model asked for (priced by the shipped table, so budgets count it), the Redis used when
# --redis is not given, the key's and the user's rpm and tpm, and the budget of each (USD per month).
# The limits are far above what two cores can send (~40,000 requests a minute), so they never refuse.
LIMITS_MODEL = "gpt-4o-mini"
LIMITS_REDIS = "redis://127.0.0.1:6379/8"
METRICS_TOKEN = "bench-metrics-token"  # --metrics: the scrape's Bearer token
LIMITS_RPM = LIMITS_TPM = 1_000_000_000
LIMITS_BUDGET_USD, LIMITS_BUDGET_PERIOD = "1000", "month"


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

    def start(self, name: str, command: list[str], env: dict[str, str], cwd: Path = PROJECT) -> subprocess.Popen:
        # Its own session, so Ctrl-C reaches only us and we stop the servers in order.
        with open(self.log_dir / f"{name}.log", "wb") as log:
            process = subprocess.Popen(
                command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.started.append((name, process))
        return process

    def stop(self, name: str) -> None:
        """Ends one server (one that failed its start-up checks) and forgets it."""
        for entry in [entry for entry in self.started if entry[0] == name]:
            process = entry[1]
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            self.started.remove(entry)

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


def wait_until_answering(
    processes: Processes, name: str, process: subprocess.Popen, url: str, timeout: float = 60
) -> None:
    """Polls `url` until the server answers anything at all; raises with its log if it exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode}:\n{processes.log_tail(name)}")
        try:
            httpx.get(url, timeout=1, trust_env=False)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError(f"{name} did not answer at {url} within {timeout:g} s:\n{processes.log_tail(name)}")


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process so far (Linux /proc); None where that is not available."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def tree_cpu_seconds(pid: int) -> float | None:
    """CPU time of a process and of its live descendants (gunicorn's workers); None without /proc."""
    own = cpu_seconds(pid)
    if own is None:
        return None
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        parents.setdefault(parent, []).append(int(entry.name))
    total, pending = own, list(parents.get(pid, []))
    while pending:
        child = pending.pop()
        total += cpu_seconds(child) or 0.0
        pending += parents.get(child, [])
    return total


def gateway_yaml(mode: str, upstream_url: str, model: str = MODEL) -> str | None:
    """The TURBO_CONFIG file for a gateway mode; None for "off" (zero config). `model` is the public name
    (and each deployment's model): MODEL, or LIMITS_MODEL with --limits."""
    if mode == "off":
        return None
    lines = [
        f"# bench.proxy_overhead --gateway {mode}: {model} has three weighted deployments over three",
        "# upstreams (three names for the one fake upstream), and a fallback model that is never needed.",
        "upstreams:",
        *(f'  - {{name: {name}, base_url: "{upstream_url}"}}' for name, _ in THREE_DEPLOYMENTS),
        "models:",
        f"  - name: {model}",
        "    strategy: weighted",
        "    deployments:",
        *(f"      - {{upstream: {name}, model: {model}, weight: {weight}}}" for name, weight in THREE_DEPLOYMENTS),
        "    fallbacks: [bench-fallback]",
        "  - name: bench-fallback",
        f"    deployments: [{{name: fallback, upstream: {THREE_DEPLOYMENTS[0][0]}, model: {model}}}]",
    ]
    return "\n".join(lines) + "\n"


def describe_gateway(mode: str) -> str:
    if mode == "off":
        return "zero config (OPENAI_API_URL only)"
    weights = ":".join(f"{weight:g}" for _, weight in THREE_DEPLOYMENTS)
    return (
        f"TURBO_CONFIG: {MODEL} on {len(THREE_DEPLOYMENTS)} deployments "
        f"({', '.join(f'{name}/{MODEL}' for name, _ in THREE_DEPLOYMENTS)}), weighted {weights}, one fallback"
    )


def turbo_env(args, *, upstream_port: int, db_address: str, turbo_config: Path | None = None) -> dict[str, str]:
    dropped = ("DB_ADDRESS", "REDIS_ADDRESS", "DJANGO_SETTINGS_MODULE", "TURBO_CONFIG")
    env = {k: v for k, v in os.environ.items() if k not in dropped}
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
    if args.limits:
        # The user's own limits (the key has its own, set when it is made): checked on every request too.
        env.update(RATE_LIMIT_USER_RPM=str(LIMITS_RPM), RATE_LIMIT_USER_TPM=str(LIMITS_TPM))
    if turbo_config is not None:
        env["TURBO_CONFIG"] = str(turbo_config)
    if getattr(args, "tracing_endpoint", ""):  # --tracing: OpenTelemetry on, spans to the loopback sink
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = args.tracing_endpoint
    if getattr(args, "metrics", False):  # --metrics: /metrics on, in multiprocess mode (files in a fresh folder)
        env.update(METRICS_TOKEN=METRICS_TOKEN, METRICS_MULTIPROC_DIR=tempfile.mkdtemp(prefix="turbo-bench-metrics-"))
    return env


def signup(turbo_url: str) -> str:
    """A fresh user's token."""
    return signup_user(turbo_url)[1]


def signup_user(turbo_url: str) -> tuple[str, str]:
    """A fresh user's name and token."""
    username = f"bench-{secrets.token_hex(4)}"
    response = httpx.post(
        f"{turbo_url}/user/signup",
        data={"username": username, "password": secrets.token_urlsafe(16)},
        timeout=30,
        trust_env=False,
    )
    if response.status_code != 200:
        raise RuntimeError(f"signup failed: {response.status_code} {response.text[:500]}")
    return username, response.json()["token"]


def manage(env: dict[str, str], *arguments: str, timeout: float = 120) -> str:
    """`manage.py ARGUMENTS` with a Turbo server's environment (its database and Redis); its output."""
    finished = subprocess.run(
        [PYTHON, "manage.py", *arguments], cwd=PROJECT, env=env, capture_output=True, text=True, timeout=timeout
    )
    if finished.returncode != 0:
        raise RuntimeError(
            f"manage.py {' '.join(arguments[:2])} failed:\n{finished.stdout[-2000:]}{finished.stderr[-3000:]}"
        )
    return finished.stdout


def limits_setup(turbo_url: str, env: dict[str, str], username: str, token: str, model: str) -> dict:
    """--limits: an API key for the bench user with large rpm/tpm, a large budget on it and on the user.

    Returns {"key", "prefix", "key_id", "username", "budgets"}; the load then uses the key. One request
    with the key is sent before the run: it must answer 200 with the rate-limit headers.
    """
    response = httpx.post(
        f"{turbo_url}/user/keys/create",
        data={"name": "bench-limits", "rpm": str(LIMITS_RPM), "tpm": str(LIMITS_TPM)},
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
        trust_env=False,
    )
    if response.status_code != 200:
        raise RuntimeError(f"making an API key failed: {response.status_code} {response.text[:500]}")
    made = response.json()
    budgets = []
    for target in (("--key", made["prefix"]), ("--user", username)):
        budgets.append(
            manage(env, "budgets", "set", *target, "--usd", LIMITS_BUDGET_USD, "--period", LIMITS_BUDGET_PERIOD).strip()
        )
    probe = httpx.post(
        f"{turbo_url}/v1/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": "Say hello."}]},
        headers={"Authorization": f"Bearer {made['key']}"},
        timeout=60,
        trust_env=False,
    )
    if probe.status_code != 200 or RATELIMIT_HEADER not in probe.headers:
        raise RuntimeError(
            f"a test completion with the key answered {probe.status_code} "
            f"({RATELIMIT_HEADER} {'present' if RATELIMIT_HEADER in probe.headers else 'missing'}): "
            f"{probe.text[:500]}"
        )
    return {
        "key": made["key"],
        "prefix": made["prefix"],
        "key_id": made["id"],
        "username": username,
        "budgets": budgets,
    }


# Run with `manage.py shell -c` after the run (Turbo stopped, so its rollups are written): the key's usage
# over the last day, and what each budget has spent in its period, from the rollups in the database.
LIMITS_QUERY = """
import json
from datetime import timedelta
from django.utils import timezone
from proxy.models import Budget
from proxy.usage.budgets import budget_spent
from proxy.usage.selectors import usage_report, usage_rollups
now = timezone.now()
report = usage_report(rows=usage_rollups(since=now - timedelta(days=1), until=now), by="key")
budgets = []
for budget in Budget.objects.all():
    spent, _ = budget_spent(budget)
    budgets.append({"scope": budget.scope, "limit_usd": str(budget.limit_usd), "spent_usd": str(spent),
                    "period": budget.period, "key_id": str(budget.key_id or ""), "user_id": str(budget.user_id or ""),
                    "username": budget.user.username if budget.user_id else ""})
print(json.dumps({"usage": report, "budgets": budgets}, default=str))
"""


def limits_check(turbo: dict, results: list[dict], sent: int) -> dict:
    """After the run: usage recorded for every request sent with the key, both budgets charged, nothing refused.

    `sent` is the requests the load generator sent through this Turbo with the key (warm-up included); the
    probe of limits_setup is one more.
    """
    limits, key = turbo["limits"], turbo["key"]
    table = manage(turbo["env"], "usage", "--since", "1d", "--by", "key")
    found = json.loads(manage(turbo["env"], "shell", "-c", LIMITS_QUERY).strip().splitlines()[-1])
    rows = [row for row in found["usage"]["rows"] if str(row.get("key_id")) == str(limits["key_id"])]
    recorded = sum(int(row["requests"]) for row in rows)
    cost = sum(float(row["cost_usd"]) for row in rows)
    summaries = [summary for row in results for summary in row["runs"].get(key, [])]
    errors = sum(summary["errors"] for summary in summaries)
    refused = sum(
        count for summary in summaries for kind, count in summary["error_kinds"].items() if kind == "status 429"
    )
    answered = sum(summary["ok"] for summary in summaries)
    with_headers = sum(summary.get("ratelimit_headers", 0) for summary in summaries)
    expected = sent + 1
    # This run's two budgets (a database used before holds others): the key's and its user's, each charged
    # exactly what the recorded usage cost (budgets count in nano-dollars: one of rounding per request).
    budgets = [
        budget
        for budget in found["budgets"]
        if budget["key_id"] == str(limits["key_id"]) or budget["username"] == limits["username"]
    ]
    charged = [budget for budget in budgets if float(budget["spent_usd"]) > 0]
    exact = all(abs(float(budget["spent_usd"]) - cost) <= 1e-9 * max(recorded, 1) for budget in budgets)
    ok = (
        recorded == expected and not errors and with_headers == answered and len(charged) == len(budgets) == 2 and exact
    )
    return {
        "key_prefix": limits["prefix"],
        "usage_requests": recorded,
        "usage_expected": expected,
        "usage_cost_usd": round(cost, 6),
        "errors": errors,
        "refused_429": refused,
        "recorded_answers": answered,
        "recorded_with_ratelimit_headers": with_headers,
        "budgets": budgets,
        "budgets_charged_exactly": exact,
        "budgets_set": limits["budgets"],
        "usage_table": table.rstrip("\n").splitlines(),
        "verdict": "OK" if ok else "PROBLEM",
    }


def loadgen(
    *,
    url: str,
    token: str,
    mode: str,
    concurrency: int,
    requests: int,
    warmup: int,
    pool: str,
    out: Path,
    model: str = MODEL,
) -> dict:
    command = [PYTHON, "-m", "bench.loadgen", "--url", url, f"--token={token}", "--mode", mode]
    if model != MODEL:
        command += ["--model", model]
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
        # Summed like the errors: which deployments served the recorded requests (X-Turbo-Upstream).
        "turbo_upstreams": dict(sum((Counter(run.get("turbo_upstreams") or {}) for run in runs), Counter())),
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


def added_of(row: dict, side: str = "via_turbo") -> dict:
    """A result row's added figures for one via side ("via_turbo", the first server, unless told)."""
    return row["added"] if side == "via_turbo" else row["added_by_side"][side]


def judge_targets(results: list[dict], side: str = "via_turbo") -> list[dict]:
    verdicts = []
    for mode, figure, stat, concurrency, limit in TARGETS:
        row = next((r for r in results if r["mode"] == mode and r["concurrency"] == concurrency), None)
        value = added_of(row, side)[figure][stat] if row and added_of(row, side).get(figure) else None
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
                "p50_ms": added_of(row, side)[figure]["p50"] if value is not None else None,
                "verdict": verdict,
            }
        )
    return verdicts


def judge_capacity(results: list[dict], side: str = "via_turbo") -> list[dict]:
    """CAPACITY_TARGETS on one Turbo side: its requests per second and its CPU per request, non-streamed."""
    verdicts = []
    for figure, concurrency, bound, limit in CAPACITY_TARGETS:
        row = next((r for r in results if r["mode"] == "plain" and r["concurrency"] == concurrency), None)
        value = row[side].get(figure) if row and side in row else None
        if value is None:
            verdict = "NOT MEASURED"
        else:
            verdict = "MET" if (value >= limit if bound == "min" else value <= limit) else "MISSED"
        name = "requests/s" if figure == "rps" else "Turbo CPU ms per request"
        verdicts.append(
            {
                "target": f"{name}, non-streamed, at c={concurrency} {'>=' if bound == 'min' else '<='} {limit:g}",
                "figure": figure,
                "concurrency": concurrency,
                "bound": bound,
                "limit": limit,
                "value": value,
                "verdict": verdict,
            }
        )
    return verdicts


def capacity_lines(verdicts: list[dict]) -> list[str]:
    lines = []
    for verdict in verdicts:
        value = "-" if verdict["value"] is None else f"{verdict['value']:.2f}"
        lines.append(f"  {verdict['target']:<48} {value:>10}{'':<18} {verdict['verdict']}")
    return lines


def judge_throughput(results: list[dict], turbo: dict, peer: dict) -> dict:
    """Turbo's throughput at THROUGHPUT_CONCURRENCY against a peer's: met when it is THROUGHPUT_RATIO times or more.

    Judged on non-streamed requests; the streamed ratio is given alongside.
    """
    ratios = {}
    for mode in MODES:
        row = next((r for r in results if r["mode"] == mode and r["concurrency"] == THROUGHPUT_CONCURRENCY), None)
        turbo_rps = row[turbo["key"]]["rps"] if row else None
        peer_rps = row[peer["key"]]["rps"] if row else None
        ratio = round(turbo_rps / peer_rps, 2) if turbo_rps and peer_rps else None
        ratios[mode] = {"turbo_rps": turbo_rps, "peer_rps": peer_rps, "ratio": ratio}
    ratio = ratios["plain"]["ratio"]
    return {
        "target": f"throughput through {turbo['label']} at c={THROUGHPUT_CONCURRENCY} >= "
        f"{THROUGHPUT_RATIO:g}x {peer['label']}'s (non-streamed)",
        "turbo": turbo["key"],
        "peer": peer["key"],
        "concurrency": THROUGHPUT_CONCURRENCY,
        "min_ratio": THROUGHPUT_RATIO,
        "plain": ratios["plain"],
        "stream": ratios["stream"],
        "verdict": "NOT MEASURED" if ratio is None else ("MET" if ratio >= THROUGHPUT_RATIO else "MISSED"),
    }


def judge_cpu(results: list[dict], base: dict, gateway: dict) -> dict:
    """Turbo's CPU per request with the gateway `gateway` against zero config `base`, cell by cell.

    `base` and `gateway` are described sides (same server); met when no cell grows by more than
    CPU_GROWTH_LIMIT_PCT. Cells without a figure on either side are left out of the verdict.
    """
    cells = []
    for row in results:
        before = (row.get(base["key"]) or {}).get("server_cpu_ms_per_request")
        after = (row.get(gateway["key"]) or {}).get("server_cpu_ms_per_request")
        growth = round((after / before - 1) * 100, 1) if before and after is not None else None
        cells.append(
            {
                "mode": row["mode"],
                "concurrency": row["concurrency"],
                "zero_config_ms": before,
                "gateway_ms": after,
                "growth_pct": growth,
                "verdict": "NOT MEASURED"
                if growth is None
                else ("MET" if growth <= CPU_GROWTH_LIMIT_PCT else "MISSED"),
            }
        )
    measured = [cell for cell in cells if cell["growth_pct"] is not None]
    verdict = (
        "NOT MEASURED" if not measured else ("MET" if all(cell["verdict"] == "MET" for cell in measured) else "MISSED")
    )
    return {
        "target": f"Turbo CPU per request, {gateway['label']} against {base['label']}: growth <= "
        f"{CPU_GROWTH_LIMIT_PCT:g} % in every cell",
        "zero_config": base["key"],
        "gateway": gateway["key"],
        "limit_pct": CPU_GROWTH_LIMIT_PCT,
        "cells": cells,
        "verdict": verdict,
    }


def served_by(results: list[dict], key: str) -> dict[str, int]:
    """Which deployments served a side's recorded requests, over every cell and run (X-Turbo-Upstream)."""
    total: Counter = Counter()
    for row in results:
        total.update((row.get(key) or {}).get("turbo_upstreams") or {})
    return dict(total.most_common())


# --- table ----------------------------------------------------------------------------------------


def fmt(value, width: int = 7, digits: int = 2) -> str:
    if value is None:
        return "-".rjust(width)
    return f"{value:{width}.{digits}f}"


def pair(figures: dict | None, width: int = 7) -> str:
    if not figures:
        return fmt(None, width) + " " + fmt(None, width)
    return fmt(figures["p50"], width) + " " + fmt(figures["p99"], width)


def event_line(events: dict, name: str = "Event log", server: str = "Turbo") -> str:
    if events["expected"] is None:
        return f"{name}: not checked (the run was interrupted)."
    logged = "not counted (not SQLite)" if events["logged"] is None else str(events["logged"])
    return (
        f"{name}: {logged} proxy events saved for {events['expected']} requests sent through Turbo; "
        f"{server}'s log had {events['httpx_info_lines']} httpx 'HTTP Request:' INFO lines."
    )


def cpu_lines(target: dict) -> list[str]:
    lines = [f"{target['target']}: {target['verdict']}"]
    for cell in target["cells"]:
        mode = "non-streamed" if cell["mode"] == "plain" else "streamed"
        growth = "-" if cell["growth_pct"] is None else f"{cell['growth_pct']:+.1f} %"
        lines.append(
            f"  {mode:<12} c={cell['concurrency']:<4} {fmt(cell['zero_config_ms'], 6)} -> "
            f"{fmt(cell['gateway_ms'], 6)} ms/req ({growth}) {cell['verdict']}"
        )
    return lines


def served_line(label: str, counts: dict[str, int]) -> str:
    total = sum(counts.values())
    if not total:
        return f"  {label}: no X-Turbo-Upstream header seen"
    shares = ", ".join(f"{name} {count} ({count * 100 / total:.1f} %)" for name, count in counts.items())
    return f"  {label}: {shares}"


def target_lines(verdicts: list[dict]) -> list[str]:
    lines = []
    for verdict in verdicts:
        value = "-" if verdict["value_ms"] is None else f"{verdict['value_ms']:.2f} ms"
        extra = f" (p50 {verdict['p50_ms']:.2f} ms)" if verdict["p50_ms"] is not None else ""
        lines.append(f"  {verdict['target']:<48} {value:>10}{extra:<18} {verdict['verdict']}")
    return lines


def side_by_side_tables(report: dict) -> list[str]:
    """The two tables with one row per via side under each concurrency (Turbo's servers, then peers)."""
    sides = report["sides"]
    results = report["results"]
    width = max(18, *(len(side["label"]) for side in sides.values()))
    lines = [
        "Non-streamed POST /v1/chat/completions",
        f"    c | {'via':<{width}} |  direct p50     p99 |     via p50     p99 |   added p50     p99 "
        "| rps direct     via | X-Turbo-Overhead p50 p99 | server CPU ms/req | errors d/v",
    ]
    for row in (r for r in results if r["mode"] == "plain"):
        direct = row["direct"]
        for key, side in sides.items():
            via, extra = row.get(key), added_of(row, key)
            if via is None:
                continue
            lines.append(
                f"{row['concurrency']:>5} | {side['label']:<{width}} | {pair(direct['latency_ms'])} | "
                f"{pair(via['latency_ms'])} | {pair(extra['latency_ms'])} | "
                f"{fmt(direct['rps'], 10, 0)} {fmt(via['rps'], 7, 0)} | {pair(via['turbo_overhead_ms'], 12)} | "
                f"{fmt(via['server_cpu_ms_per_request'], 17)} | {direct['errors']}/{via['errors']}"
            )
    lines += [
        "",
        "Streamed POST /v1/chat/completions (TTFT = until the first content chunk)",
        f"    c | {'via':<{width}} |    TTFT direct p50 p99 |    TTFT via p50 p99 | TTFT added p50 p99 "
        "| via chunk gap p50 p99 | chunk delay direct p50 p99 |    via p50     p99 | rps direct     via "
        "| server CPU ms/req | errors d/v",
    ]
    for row in (r for r in results if r["mode"] == "stream"):
        direct = row["direct"]
        for key, side in sides.items():
            via, extra = row.get(key), added_of(row, key)
            if via is None:
                continue
            lines.append(
                f"{row['concurrency']:>5} | {side['label']:<{width}} | {pair(direct['ttft_ms'], 11)} | "
                f"{pair(via['ttft_ms'], 9)} | {pair(extra['ttft_ms'], 9)} | {pair(via['chunk_gap_ms'], 10)} | "
                f"{pair(direct['chunk_delay_ms'], 13)} | {pair(via['chunk_delay_ms'])} | "
                f"{fmt(direct['rps'], 10, 0)} {fmt(via['rps'], 7, 0)} | "
                f"{fmt(via['server_cpu_ms_per_request'], 17)} | {direct['errors']}/{via['errors']}"
            )
    return lines


def describe_side(side: dict) -> str:
    if side["kind"] == "peer":
        facts = [side.get("requirement", side["label"])]
        facts.append(f"under uvicorn {side['uvicorn']}" if side.get("uvicorn") else "")
        facts.append(f"{side['workers']} worker" + ("s" if side.get("workers", 1) != 1 else ""))
        facts.append(f"loop {side['loop']}, HTTP {side['http']}" if side.get("loop") else "")
        facts.append("no database")
    else:
        processes = side["processes"]
        shape = "1 process" if processes == 1 else f"{processes - 1} workers + master"
        facts = [shape, f"loop {side['loop']}, HTTP {side['http']}"]
        if side.get("gateway", "off") != "off":
            facts.append(f"gateway {side['gateway']} ({describe_gateway(side['gateway'])})")
    facts.append(f"answering {side['ready_after_s']:g} s after its start" if side.get("ready_after_s") else "")
    command = f": {side['command']}" if side["kind"] == "turbo" else ""
    return f"  {side['label']}: " + ", ".join(fact for fact in facts if fact) + command


def render(report: dict) -> str:
    settings = report["settings"]
    results = report["results"]
    # Present when the run was given --servers or --peers; a plain run prints exactly what it always has.
    sides = report.get("sides")
    lines = [
        f"Turbo /v1 proxy overhead: median of {settings['runs']} run(s) of {settings['requests']} requests "
        f"(+{settings['warmup']} warm-up) per cell; upstream latency {settings['latency_ms']:g} ms, "
        f"{settings['chunks']} chunks {settings['chunk_gap_ms']:g} ms apart; all times in ms",
    ]
    if settings.get("gateway", "off") != "off" and not sides:
        lines.append(f"Turbo's gateway: {settings['gateway']}, {describe_gateway(settings['gateway'])}")
    lines.append("")
    if sides and len(sides) > 1:
        lines += side_by_side_tables(report)
    else:
        lines += [
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
            "| chunk delay direct p50 p99 |    via p50     p99 | rps direct     via | Turbo CPU ms/req | errors d/v",
        ]
        for row in (r for r in results if r["mode"] == "stream"):
            direct, via = row["direct"], row["via_turbo"]
            lines.append(
                f"{row['concurrency']:>5} | {pair(direct['ttft_ms'], 11)} | {pair(via['ttft_ms'], 9)} | "
                f"{pair(row['added']['ttft_ms'], 9)} | {pair(via['chunk_gap_ms'], 10)} | "
                f"{pair(direct['chunk_delay_ms'], 13)} | {pair(via['chunk_delay_ms'])} | "
                f"{fmt(direct['rps'], 10, 0)} {fmt(via['rps'], 7, 0)} | "
                f"{fmt(via['server_cpu_ms_per_request'], 16)} | {direct['errors']}/{via['errors']}"
            )
    if sides:
        lines += ["", "Targets (from the issue), " + sides["via_turbo"]["label"] + ":"]
    else:
        lines += ["", "Targets (from the issue):"]
    lines += target_lines(report["targets"])
    lines += capacity_lines(report.get("capacity_targets", []))
    for key, verdicts in report.get("targets_by_side", {}).items():
        lines += [f"Targets (from the issue), {sides[key]['label']}:", *target_lines(verdicts)]
    if report.get("throughput_targets"):
        lines.append(
            f"Throughput against peers at c={THROUGHPUT_CONCURRENCY} (judged on non-streamed rps; streamed shown "
            "alongside):"
        )
    for target in report.get("throughput_targets", []):
        plain, stream = target["plain"], target["stream"]
        figures = (
            f"{plain['turbo_rps']:.0f} vs {plain['peer_rps']:.0f} rps = {plain['ratio']:.2f}x"
            if plain["ratio"] is not None
            else "-"
        )
        if stream["ratio"] is not None:
            figures += (
                f" (streamed: {stream['turbo_rps']:.0f} vs {stream['peer_rps']:.0f} rps = {stream['ratio']:.2f}x)"
            )
        lines.append(f"  {target['target']}: {figures} {target['verdict']}")
    for target in report.get("cpu_targets", []):
        lines += ["", *cpu_lines(target)]
    if report.get("served_by"):
        labels = {key: side["label"] for key, side in (sides or {}).items()}
        lines += ["", "Served by (X-Turbo-Upstream of the measured requests, all cells):"]
        lines += [served_line(labels.get(key, "Turbo"), counts) for key, counts in report["served_by"].items()]
    if settings.get("limits"):
        lines += ["", *limits_lines(report)]
    cpus = report["machine"]["cpus"]
    lines += ["", event_line(report["events"])]
    if sides:
        for key, events in report["events"].get("by_side", {}).items():
            if key != "via_turbo":
                label = sides[key]["label"]
                lines.append(event_line(events, f"Event log, {label}", label))
        websockets = report.get("websockets", {})
        if websockets:
            answers = [
                f"{sides[key]['label']} " + (f"yes ({check['ms']:.0f} ms)" if check["ok"] else f"NO: {check['detail']}")
                for key, check in websockets.items()
            ]
            lines.append(
                "WebSockets (/ws with a token and the server's own Origin, ping -> pong): " + "; ".join(answers)
            )
        lines += ["Via:", *(describe_side(side) for side in sides.values())]
        for name, reason in report.get("not_measured", {}).items():
            lines.append(f"Not measured: {name}: {reason}")
        lines.append(
            f"{cpus} CPU(s) shared by the upstream, every server measured (all running at once, idle but one) "
            f"and the load generator: at high concurrency the numbers include waiting for a core. "
            f"Took {report['duration_s']:.0f} s."
        )
    else:
        lines.append(
            f"{cpus} CPU(s) shared by the upstream, Turbo and the load generator: at high concurrency the numbers "
            f"include waiting for a core. Took {report['duration_s']:.0f} s."
        )
    return "\n".join(lines)


def limits_lines(report: dict) -> list[str]:
    """--limits: what each Turbo ran with, and the check made after the run."""
    sides = report.get("sides") or {}
    lines = [
        f"Key, budget and rate limits (--limits): every request through Turbo sent with an API key (rpm and tpm "
        f"{LIMITS_RPM:,}), asking for {report['settings']['model']}; budgets ${LIMITS_BUDGET_USD} per "
        f"{LIMITS_BUDGET_PERIOD} on the key and on its user; the user's rpm and tpm {LIMITS_RPM:,}; Redis."
    ]
    for key, check in report.get("limits", {}).items():
        label = sides[key]["label"] if key in sides else "Turbo"
        if check["verdict"] == "NOT CHECKED":
            lines.append(f"  {label}: NOT CHECKED: {first_line(RuntimeError(check['detail']))}")
            continue
        spent = "; ".join(
            f"{budget['scope']} ${float(budget['spent_usd']):.6f} of ${float(budget['limit_usd']):g}"
            for budget in check["budgets"]
        )
        lines += [
            f"  {label}: usage recorded for {check['usage_requests']} requests, {check['usage_expected']} sent with "
            f"key {check['key_prefix']} (${check['usage_cost_usd']:.6f}); budgets spent: {spent}"
            + ("" if check.get("budgets_charged_exactly", True) else " (NOT the recorded cost)"),
            f"  {label}: refused (429) {check['refused_429']}, errors {check['errors']}; rate-limit headers "
            f"({RATELIMIT_HEADER}) on {check['recorded_with_ratelimit_headers']} of {check['recorded_answers']} "
            f"recorded answers: {check['verdict']}",
            *(f"    {line}" for line in check["usage_table"]),
        ]
    if any(side["kind"] == "peer" for side in sides.values()):
        lines.append(
            "  Peers ran with their master key: no virtual keys or budgets (LiteLLM needs its Postgres database "
            "and Prisma's engines for them; see bench/README.md)."
        )
    return lines


def print_errors(results: list[dict]) -> None:
    for row in results:
        for side in [key for key in row if key == "direct" or key.startswith("via_")]:
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


def measure(args, results: list[dict], *, upstream_url: str, upstream_pid: int, sides: list[dict], work: Path) -> None:
    """Runs every cell, appending each to `results` as it completes (so an interrupted run keeps them).

    `sides` are the servers measured besides the upstream, each {"key", "label", "url" (ending in /v1),
    "token", "pid"}; the first is Turbo under the first of --servers, "via_turbo".
    """
    extended = len(sides) > 1
    targets = [{"key": "direct", "url": upstream_url, "token": "bench", "pid": upstream_pid}, *sides]
    total = len(args.concurrency) * len(MODES) * args.runs
    done = 0
    for concurrency in args.concurrency:
        for mode in MODES:
            runs: dict[str, list[dict]] = {target["key"]: [] for target in targets}
            for run in range(args.runs):
                for target in targets:
                    side = target["key"]
                    cpu_before = tree_cpu_seconds(target["pid"])
                    summary = loadgen(
                        url=target["url"],
                        token=target["token"],
                        mode=mode,
                        concurrency=concurrency,
                        requests=args.requests,
                        warmup=args.warmup,
                        pool=args.pool,
                        out=work / f"{side}-{mode}-{concurrency}-{run}.json",
                        model=args.model,
                    )
                    cpu_after = tree_cpu_seconds(target["pid"])
                    # Whole-process CPU over warm-up and measurement: the server's cost per request (for a
                    # proxy this excludes the upstream's share, which runs in its own process).
                    summary["server_cpu_ms_per_request"] = (
                        round((cpu_after - cpu_before) * 1000 / (args.requests + args.warmup), 3)
                        if cpu_before is not None and cpu_after is not None
                        else None
                    )
                    runs[side].append(summary)
                done += 1
                last = {side: summaries[-1] for side, summaries in runs.items()}

                def p50(summary: dict):
                    return summary["latency_ms"]["p50"] if summary["latency_ms"] else "-"

                if extended:
                    vias = ", ".join(f"via {side['label']} {p50(last[side['key']])} ms" for side in sides)
                    errors = "/".join(str(summary["errors"]) for summary in last.values())
                    progress = f"p50 direct {p50(last['direct'])} ms, {vias}, errors {errors}"
                else:
                    direct, via = last["direct"], last["via_turbo"]
                    progress = (
                        f"p50 direct {p50(direct)} ms, via Turbo {p50(via)} ms, "
                        f"errors {direct['errors']}/{via['errors']}"
                    )
                print(f"[{done}/{total}] c={concurrency} {mode} run {run + 1}: {progress}", file=sys.stderr, flush=True)
            medians = {side: median_of_runs(summaries) for side, summaries in runs.items()}
            direct, via = medians["direct"], medians["via_turbo"]
            row = {
                "concurrency": concurrency,
                "mode": mode,
                "direct": direct,
                "via_turbo": via,
                "added": {figure: added(via, direct, figure) for figure in ("latency_ms", "ttft_ms")},
                "runs": runs,
            }
            if extended:
                for side in sides[1:]:
                    row[side["key"]] = medians[side["key"]]
                row["added_by_side"] = {
                    side["key"]: {
                        figure: added(medians[side["key"]], direct, figure) for figure in ("latency_ms", "ttft_ms")
                    }
                    for side in sides
                }
            results.append(row)


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
    parser.add_argument(
        "--limits",
        action="store_true",
        help=f"Turbo on Redis (--redis, default {LIMITS_REDIS}), the load sent with an API key that has large "
        f"rpm/tpm and a large budget (its user too), asking for {LIMITS_MODEL} (priced); usage checked after",
    )
    parser.add_argument(
        "--production",
        action="store_true",
        help="the production setup of the issue's targets: --limits and --gateway three, on the database given "
        "by --postgres (required) and the Redis of --redis (default " + LIMITS_REDIS + ")",
    )
    parser.add_argument(
        "--metrics",
        action="store_true",
        help="Turbo with Prometheus metrics on (METRICS_TOKEN), in multiprocess mode; /metrics scraped after the runs",
    )
    parser.add_argument(
        "--tracing",
        action="store_true",
        help="Turbo with OpenTelemetry traces on, exported over OTLP/HTTP to a sink on loopback (bench.otlp_sink)",
    )
    parser.add_argument(
        "--peers",
        default="",
        metavar="LIST",
        help=f"other proxies to measure with the same load, comma-separated: {', '.join(PEERS)} (default none)",
    )
    parser.add_argument(
        "--servers",
        default=None,
        metavar="LIST",
        help=f"servers to run Turbo under, comma-separated: {', '.join(SERVERS)} (default uvicorn); the first "
        "is the main one (via_turbo in the JSON)",
    )
    parser.add_argument(
        "--gateway",
        default="off",
        metavar="MODES",
        help="Turbo's model gateway, comma-separated modes: off (zero config: OPENAI_API_URL only, the default) or "
        f"three ({MODEL} on three weighted deployments, from a TURBO_CONFIG file); off,three measures both side "
        "by side and judges the growth of Turbo's CPU per request",
    )
    args = parser.parse_args()
    args.peers_given, args.servers_given = bool(args.peers), args.servers is not None
    if args.production:
        if not args.postgres:
            parser.error("--production runs Turbo on Postgres: give --postgres postgresql://... (its own database)")
        if args.gateway not in ("off", "three"):
            parser.error("--production is the gateway mode three; leave --gateway out")
        args.limits, args.gateway = True, "three"
    args.gateway = list(dict.fromkeys(mode.strip().lower() for mode in args.gateway.split(",") if mode.strip()))
    if unknown := [mode for mode in args.gateway if mode not in GATEWAYS]:
        parser.error(f"unknown gateway mode(s) {', '.join(unknown)}; --gateway takes {', '.join(GATEWAYS)}")
    if not args.gateway:
        parser.error("--gateway needs at least one mode")
    args.peers = list(dict.fromkeys(name.strip().lower() for name in args.peers.split(",") if name.strip()))
    args.servers = list(
        dict.fromkeys(name.strip().lower() for name in (args.servers or "uvicorn").split(",") if name.strip())
    )
    if unknown := [name for name in args.peers if name not in PEERS]:
        parser.error(f"unknown peer(s) {', '.join(unknown)}; --peers takes {', '.join(PEERS)}")
    if unknown := [name for name in args.servers if name not in SERVERS]:
        parser.error(f"unknown server(s) {', '.join(unknown)}; --servers takes {', '.join(SERVERS)}")
    if not args.servers:
        parser.error("--servers needs at least one server")
    if reason := unavailable(args.servers[0]):
        parser.error(f"cannot run Turbo under {args.servers[0]}: {reason}")
    if args.quick:
        args.concurrency, args.requests, args.runs = QUICK["concurrency"], QUICK["requests"], QUICK["runs"]
    else:
        args.concurrency = [int(level) for level in args.concurrency.split(",") if level.strip()]
    if args.requests < 1 or args.runs < 1 or args.warmup < 0 or not args.concurrency or min(args.concurrency) < 1:
        parser.error("--requests, --runs and every --concurrency level must be at least 1")
    if args.postgres and not args.postgres.startswith(("postgres://", "postgresql://")):
        parser.error("--postgres takes a postgresql:// URL")
    if args.limits and not args.redis:
        args.redis = LIMITS_REDIS
    args.model = LIMITS_MODEL if args.limits else MODEL
    return args


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def build_report(
    args,
    results: list[dict],
    *,
    started_at: datetime,
    duration_s: float,
    events: dict,
    setup: dict | None = None,
    gateway_configs: dict[str, str] | None = None,
    limits: dict[str, dict] | None = None,
) -> dict:
    """The JSON report. `setup` ({"sides", "websockets", "not_measured"}) is given when the run had --servers,
    --peers or more than one --gateway mode; without it the report has the keys it always had, plus
    `settings.gateway`. `gateway_configs` are the TURBO_CONFIG files used ({mode: text}), when any."""
    loop, http = fastest_server_parts()
    report = {
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
            # The main Turbo's gateway mode: "off" (zero config) or "three" (TURBO_CONFIG, three deployments).
            "gateway": args.gateway[0],
            # --production: Postgres, Redis, the gateway's three deployments and --limits (the second setup).
            "production": args.production,
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
        "capacity_targets": judge_capacity(results),
    }
    if setup is not None:
        sides = setup["sides"]
        turbos = [side for side in sides.values() if side["kind"] == "turbo"]
        peers = [side for side in sides.values() if side["kind"] == "peer"]
        report["settings"].update(servers=args.servers, peers=args.peers)
        report["sides"] = sides
        report["targets_by_side"] = {
            side["key"]: judge_targets(results, side["key"]) for side in turbos if side["key"] != "via_turbo"
        }
        report["throughput_targets"] = [judge_throughput(results, turbo, peer) for turbo in turbos for peer in peers]
        report["websockets"] = setup["websockets"]
        report["not_measured"] = setup["not_measured"]
    if setup is not None and len(args.gateway) > 1:
        report["settings"]["gateways"] = args.gateway
        report["cpu_targets"] = [
            judge_cpu(results, base, side)
            for base in turbos
            if base.get("gateway") == "off"
            for side in turbos
            if side.get("gateway", "off") != "off" and side.get("server") == base.get("server")
        ]
    if any(mode != "off" for mode in args.gateway):
        keys = [key for key, side in setup["sides"].items() if side["kind"] == "turbo"] if setup else ["via_turbo"]
        report["served_by"] = {key: served_by(results, key) for key in keys}
        report["gateway_configs"] = gateway_configs or {}
    if args.limits:
        report["settings"].update(limits=True, model=args.model)
        report["limits"] = limits or {}
    report["results"] = results
    return report


def report_write(report: dict, names: list[str]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    paths = [RESULTS / name for name in names]
    for path in paths:
        path.write_text(json.dumps(report, indent=2))
    print("\nwrote " + " and ".join(str(path) for path in paths))
    # Beside the JSON, its charts (bench/charts.py: `python -m bench.charts` copies the latest to bench/charts/).
    charts = charts_write(report, paths)
    if charts:
        print(f"and {len(charts)} charts: " + ", ".join(path.name for path in charts))


def metrics_scrape(turbo_url: str) -> dict:
    """--metrics: /v1 requests and proxy overheads counted, and the scrape's size and time."""
    from prometheus_client.parser import text_string_to_metric_families

    began = time.perf_counter()
    response = httpx.get(f"{turbo_url}/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}, timeout=30)
    took_ms = round((time.perf_counter() - began) * 1000, 1)
    response.raise_for_status()
    samples = [sample for family in text_string_to_metric_families(response.text) for sample in family.samples]

    def total(name: str, **labels) -> float:
        return sum(s.value for s in samples if s.name == name and labels.items() <= s.labels.items())

    return {
        "v1_requests": int(total("turbo_http_requests_total", route="v1")),
        "overheads_observed": int(total("turbo_proxy_overhead_seconds_count")),
        "overhead_sum_ms": round(total("turbo_proxy_overhead_seconds_sum") * 1000, 1),
        "scrape_bytes": len(response.content),
        "scrape_ms": took_ms,
    }


def probe_chat(url: str, token: str, model: str = MODEL) -> None:
    """One non-streamed completion through a peer before it is measured; raises unless it answers 200."""
    response = httpx.post(
        f"{url}/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": "Say hello."}]},
        headers={"Authorization": f"Bearer {token}"},
        timeout=120,
        trust_env=False,
    )
    if response.status_code != 200 or b'"choices"' not in response.content:
        raise RuntimeError(f"a test completion answered {response.status_code}: {response.text[:500]}")


def first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0].rstrip(":") if str(exc).strip() else type(exc).__name__


def main() -> None:
    args = parse_args()
    extended = args.servers_given or args.peers_given or len(args.gateway) > 1
    # SIGTERM (e.g. from make or CI) unwinds like Ctrl-C, so the finally below stops the servers.
    signal.signal(signal.SIGTERM, _interrupt)
    started_at = datetime.now(UTC)
    stamp = started_at.strftime("%Y%m%d-%H%M%S")
    clock_started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="turbo-bench-"))
    processes = Processes(work)
    results: list[dict] = []
    # Each Turbo server: {key, label, server, process_name, process, url, db_path}; the first is "via_turbo".
    turbos: list[dict] = []
    peers: list[dict] = []
    sides: list[dict] = []  # what is measured besides the upstream, in table order
    described: dict[str, dict] = {}
    websockets: dict[str, dict] = {}
    not_measured: dict[str, str] = {}
    gateway_configs: dict[str, str] = {}  # mode -> the TURBO_CONFIG text it ran with
    config_paths: dict[str, Path | None] = {}

    def note(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    def skip(label: str, reason: str, process_name: str | None = None) -> None:
        not_measured[label] = reason
        note(f"{label} will not be measured: {reason}")
        if process_name:
            processes.stop(process_name)

    def setup() -> dict | None:
        if not extended:
            return None
        return {"sides": described, "websockets": websockets, "not_measured": not_measured}

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
        if args.tracing:
            sink_port, sink_counts = free_port(), work / "otlp-sink.json"
            sink = processes.start(
                "otlp-sink",
                [PYTHON, "-m", "bench.otlp_sink", "--port", str(sink_port), "--out", str(sink_counts)],
                dict(os.environ),
            )
            args.tracing_endpoint = f"http://127.0.0.1:{sink_port}"
            wait_until_answering(processes, "otlp-sink", sink, f"{args.tracing_endpoint}/count")

        for mode in args.gateway:
            text = gateway_yaml(mode, upstream_url, args.model)
            config_paths[mode] = None
            if text is not None:
                gateway_configs[mode] = text
                config_paths[mode] = work / f"turbo-gateway-{mode}.yaml"
                config_paths[mode].write_text(text)

        # Every server is started first and waited for afterwards: their start-ups overlap. Each server runs
        # once per gateway mode; the first server in the first mode is the main one ("via_turbo").
        variants = [(name, mode) for name in args.servers for mode in args.gateway]
        for index, (name, mode) in enumerate(variants):
            suffix = "" if mode == "off" else f"-gateway-{mode}"
            label = (
                f"Turbo {name}"
                + ("" if mode == "off" else f", gateway {mode}")
                + (", limits" if args.limits else "")
                + (", tracing" if args.tracing else "")
                + (", metrics" if args.metrics else "")
            )
            if index and (reason := unavailable(name)):
                skip(label, reason)
                continue
            db_path = work / ("bench.db" if index == 0 else f"bench-{name}{suffix}.db")
            env = turbo_env(
                args,
                upstream_port=upstream_port,
                db_address=args.postgres or f"sqlite:///{db_path}",
                turbo_config=config_paths[mode],
            )
            migrated = subprocess.run(
                [PYTHON, "manage.py", "migrate", "--noinput"], cwd=PROJECT, env=env, capture_output=True, text=True
            )
            if migrated.returncode != 0:
                raise RuntimeError(f"migrate failed:\n{migrated.stdout[-2000:]}{migrated.stderr[-3000:]}")
            port = free_port()
            server = turbo_server(name, port)
            process_name = "turbo" if index == 0 else f"turbo-{name}{suffix}"
            turbos.append(
                {
                    "key": "via_turbo" if index == 0 else "via_turbo_" + f"{name}{suffix}".replace("-", "_"),
                    "label": label,
                    "gateway": mode,
                    "server": server,
                    "process_name": process_name,
                    "process": processes.start(process_name, server.command, env),
                    "started": time.monotonic(),
                    "url": f"http://127.0.0.1:{port}",
                    "db_path": db_path,
                    "env": env,
                }
            )
        for name in args.peers:  # only LiteLLM so far
            try:
                peer = litellm_peer(
                    work=work, port=(port := free_port()), upstream_url=upstream_url, model=args.model, log=note
                )
            except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
                skip("LiteLLM", first_line(exc))
                note(str(exc))
                continue
            process = processes.start(name, peer.command, peer.env, cwd=work / name)
            peers.append(
                {"peer": peer, "process": process, "url": f"http://127.0.0.1:{port}", "started": time.monotonic()}
            )

        for index, turbo in enumerate(turbos):
            try:
                wait_until_answering(processes, turbo["process_name"], turbo["process"], f"{turbo['url']}/v1/models")
                ready_after_s = round(time.monotonic() - turbo["started"], 1)
                username, token = signup_user(turbo["url"])
                if args.limits:
                    turbo["limits"] = limits_setup(turbo["url"], turbo["env"], username, token, args.model)
                    note(
                        f"{turbo['label']}: API key {turbo['limits']['prefix']}...; "
                        + "; ".join(turbo["limits"]["budgets"])
                    )
            except RuntimeError as exc:
                if index == 0:
                    raise
                skip(turbo["label"], first_line(exc), turbo["process_name"])
                note(str(exc))
                turbo["skipped"] = True
                continue
            if extended:
                websockets[turbo["key"]] = check = websocket_ping(turbo["url"], token)
                note(f"{turbo['label']}: WebSocket /ws ping " + ("answered pong" if check["ok"] else check["detail"]))
            sides.append(
                {
                    "key": turbo["key"],
                    "label": turbo["label"],
                    "url": turbo["url"] + "/v1",
                    # With --limits the load goes with the API key; the session token still opened /ws above.
                    "token": turbo["limits"]["key"] if args.limits else token,
                    "pid": turbo["process"].pid,
                }
            )
            described[turbo["key"]] = {"key": turbo["key"], "kind": "turbo", "label": turbo["label"]}
            described[turbo["key"]].update(
                turbo["server"].describe(), gateway=turbo["gateway"], ready_after_s=ready_after_s
            )
        turbos = [turbo for turbo in turbos if not turbo.get("skipped")]
        for entry in peers:
            peer = entry["peer"]
            try:
                url = entry["url"]
                wait_until_answering(processes, peer.name, entry["process"], url + peer.health_path, peer.startup_s)
                ready_after_s = round(time.monotonic() - entry["started"], 1)
                probe_chat(url + "/v1", peer.token, args.model)
            except (RuntimeError, httpx.HTTPError) as exc:
                skip(peer.label, first_line(exc), peer.name)
                note(str(exc))
                continue
            key = f"via_{peer.name}"
            sides.append(
                {"key": key, "label": peer.label, "url": url + "/v1", "token": peer.token, "pid": entry["process"].pid}
            )
            described[key] = {"key": key, "kind": "peer", "label": peer.label, "command": " ".join(peer.command)}
            described[key].update(peer.info, ready_after_s=ready_after_s)

        measure(args, results, upstream_url=upstream_url, upstream_pid=upstream.pid, sides=sides, work=work)
        scraped = {turbo["key"]: metrics_scrape(turbo["url"]) for turbo in turbos} if args.metrics else {}
        for key, seen in scraped.items():
            note(f"{described[key]['label']}: /metrics {seen}")
        if args.tracing:  # Turbo first, so that the spans it sends as it stops still reach the sink
            for turbo in turbos:
                processes.stop(turbo["process_name"])
        processes.stop_all()  # Turbo saves its queued events as it stops
        expected = sum((args.requests + args.warmup) * args.runs for _ in args.concurrency for _ in MODES)
        by_side, other_logs = {}, {}
        for turbo in turbos:
            turbo_log = processes.log_lines(turbo["process_name"])
            # httpx logs every upstream request at INFO; count those, show anything else Turbo said.
            other_logs[turbo["label"]] = [line for line in turbo_log if not line.startswith("HTTP Request:")]
            by_side[turbo["key"]] = {
                # With --limits, limits_setup's test request went through Turbo too.
                "expected": expected + (1 if turbo.get("limits") else 0),
                "logged": None if args.postgres else events_logged(turbo["db_path"]),
                "httpx_info_lines": sum(1 for line in turbo_log if line.startswith("HTTP Request:")),
            }
        events = dict(by_side["via_turbo"])
        if extended:
            events["by_side"] = by_side
        limits = {}
        if args.limits:
            for turbo in turbos:
                try:
                    limits[turbo["key"]] = limits_check(turbo, results, expected)
                except (RuntimeError, ValueError, KeyError, subprocess.SubprocessError) as exc:
                    limits[turbo["key"]] = {"verdict": "NOT CHECKED", "detail": str(exc)[-2000:]}
        report = build_report(
            args,
            results,
            started_at=started_at,
            duration_s=time.monotonic() - clock_started,
            events=events,
            setup=setup(),
            gateway_configs=gateway_configs,
            limits=limits,
        )
        if scraped:  # --metrics: what the counters saw, to set beside the requests sent
            report["metrics"] = scraped
        if args.tracing:  # what the sink received, Turbo's last batch (sent as it stopped) included
            report["tracing"] = json.loads(sink_counts.read_text()) if sink_counts.exists() else {}
            note(f"OTLP sink: {report['tracing']}")
        report["table"] = render(report)
        print(report["table"])
        print_errors(results)
        for turbo in turbos:
            counted = by_side[turbo["key"]]
            whose = "" if turbo["key"] == "via_turbo" else f" ({turbo['label']})"
            if counted["logged"] is not None and counted["logged"] != counted["expected"]:
                note(f"event log{whose}: {counted['logged']} proxy events saved, {counted['expected']} expected")
            if other_lines := other_logs[turbo["label"]]:
                tail = "\n".join(other_lines[-30:])
                whose = "Turbo's" if turbo["key"] == "via_turbo" else f"{turbo['label']}'s"
                note(f"{whose} log, {len(other_lines)} lines besides httpx's; the last:\n{tail}")
        for entry in peers:
            name = entry["peer"].name
            problems = [line for line in processes.log_lines(name) if PROBLEM_WORDS.search(line)]
            if problems:
                tail = "\n".join(problems[-20:])
                note(f"{entry['peer'].label}'s log has {len(problems)} error or warning lines; the last:\n{tail}")
        report_write(report, [f"proxy_overhead-{stamp}.json", "latest.json"])
    except KeyboardInterrupt:
        print("interrupted; stopping the servers", file=sys.stderr)
        processes.stop_all()
        if results:
            events = {"expected": None, "logged": None, "httpx_info_lines": None}
            report = build_report(
                args,
                results,
                started_at=started_at,
                duration_s=time.monotonic() - clock_started,
                events=events,
                setup=setup(),
                gateway_configs=gateway_configs,
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
