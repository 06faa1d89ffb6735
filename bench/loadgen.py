"""A load generator for OpenAI-style chat completions, run as its own process.

    python -m bench.loadgen --url http://127.0.0.1:9100/v1 --token T --mode plain \
        --concurrency 16 --requests 2000 --warmup 100 --out run.json

Keeps `concurrency` requests in flight over as many keep-alive connections (an httpx.AsyncClient with
one connection per in-flight slot; `--pool shared` uses one client whose pool holds them all): first
`warmup` requests unrecorded, then `requests` recorded ones. For each it records the latency; for streams also
the time to first token, the gaps between content chunks as they arrive, and each chunk's delay: the
receive time minus the send time the fake upstream wrote into the chunk (`t=<time.time_ns()>`; this
works because every process runs on one machine and one clock). The X-Turbo-Overhead-Ms header is
collected when the answer carries it, and X-Turbo-Upstream (the gateway deployment that served it) is
counted, and so are answers carrying OpenAI's rate-limit headers (x-ratelimit-limit-requests: Turbo sets
them for a caller with limits). `--model` is the model every request asks for (default bench-model). The
summary (milliseconds) goes to `--out` as JSON.
"""

import argparse
import asyncio
import contextlib
import json
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx

SENT_AT = re.compile(rb'"content":"t=(\d+)"')
HAS_CONTENT = re.compile(rb'"content":"[^"]')
OVERHEAD_HEADER = "x-turbo-overhead-ms"
UPSTREAM_HEADER = "x-turbo-upstream"  # the gateway deployment that served the request
RATELIMIT_HEADER = "x-ratelimit-limit-requests"  # set by Turbo on the answers of a caller with rate limits
MODEL = "bench-model"  # the model every request asks for (bench.proxy_overhead's gateway config serves it)
ERROR_SAMPLE_CHARS = 300


@dataclass
class Samples:
    """Raw figures of the recorded requests, in milliseconds."""

    latency: list[float] = field(default_factory=list)
    ttft: list[float] = field(default_factory=list)
    chunk_gap: list[float] = field(default_factory=list)
    chunk_delay: list[float] = field(default_factory=list)
    turbo_overhead: list[float] = field(default_factory=list)
    upstreams: Counter = field(default_factory=Counter)
    ratelimit_headers: int = 0  # recorded answers that carried RATELIMIT_HEADER
    errors: Counter = field(default_factory=Counter)
    error_sample: str = ""

    def error(self, kind: str, detail: str = "") -> None:
        self.errors[kind] += 1
        if not self.error_sample:
            self.error_sample = f"{kind}: {detail}"[:ERROR_SAMPLE_CHARS]


def percentile(values: list[float], fraction: float) -> float | None:
    """The `fraction` quantile by linear interpolation between the closest ranks; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * fraction
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def distribution(values: list[float]) -> dict | None:
    if not values:
        return None
    return {
        "p50": round(percentile(values, 0.50), 3),
        "p99": round(percentile(values, 0.99), 3),
        "mean": round(sum(values) / len(values), 3),
        "max": round(max(values), 3),
        "count": len(values),
    }


def request_body(*, stream: bool, model: str = MODEL) -> bytes:
    body = {"model": model, "messages": [{"role": "user", "content": "Say hello."}], "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    return json.dumps(body).encode()


def _overhead_of(response: httpx.Response, samples: Samples | None) -> None:
    """Turbo's own headers: its overhead, and which deployment served the request."""
    if samples is None:
        return
    upstream = response.headers.get(UPSTREAM_HEADER)
    if upstream is not None:
        samples.upstreams[upstream] += 1
    if RATELIMIT_HEADER in response.headers:
        samples.ratelimit_headers += 1
    value = response.headers.get(OVERHEAD_HEADER)
    if value is not None:
        try:
            samples.turbo_overhead.append(float(value))
        except ValueError:
            pass


async def plain_request(http: httpx.AsyncClient, url: str, body: bytes, samples: Samples | None) -> None:
    started = time.perf_counter()
    response = await http.post(url, content=body)
    elapsed_ms = (time.perf_counter() - started) * 1000
    if samples is None:
        return
    if response.status_code != 200:
        samples.error(f"status {response.status_code}", response.text)
        return
    if b'"choices"' not in response.content:
        samples.error("no choices in the answer", response.text)
        return
    samples.latency.append(elapsed_ms)
    _overhead_of(response, samples)


async def stream_request(http: httpx.AsyncClient, url: str, body: bytes, samples: Samples | None) -> None:
    started = time.perf_counter()
    first_token_ms = None
    last_arrival = None
    gaps: list[float] = []
    delays: list[float] = []
    is_done = False
    pending = b""
    async with http.stream("POST", url, content=body) as response:
        if response.status_code != 200:
            text = (await response.aread()).decode("utf-8", "replace")
            if samples is not None:
                samples.error(f"status {response.status_code}", text)
            return
        async for data in response.aiter_raw():
            arrived = time.perf_counter()
            arrived_ns = time.time_ns()
            pending += data
            *lines, pending = pending.split(b"\n")
            for line in lines:
                if not line.startswith(b"data:"):
                    continue
                if line.startswith(b"data: [DONE]"):
                    is_done = True
                    continue
                if not HAS_CONTENT.search(line):
                    continue
                if first_token_ms is None:
                    first_token_ms = (arrived - started) * 1000
                else:
                    gaps.append((arrived - last_arrival) * 1000)
                last_arrival = arrived
                sent_at = SENT_AT.search(line)
                if sent_at:
                    delays.append((arrived_ns - int(sent_at.group(1))) / 1e6)
    elapsed_ms = (time.perf_counter() - started) * 1000
    if samples is None:
        return
    if not is_done or first_token_ms is None:
        samples.error("stream ended without content or [DONE]", pending.decode("utf-8", "replace"))
        return
    samples.latency.append(elapsed_ms)
    samples.ttft.append(first_token_ms)
    samples.chunk_gap.extend(gaps)
    samples.chunk_delay.extend(delays)
    _overhead_of(response, samples)


async def run(
    *,
    url: str,
    token: str,
    mode: str,
    concurrency: int,
    requests: int,
    warmup: int,
    pool: str = "per-worker",
    model: str = MODEL,
) -> dict:
    """Warm up, then measure without a pause in between; returns the summary."""
    endpoint = url.rstrip("/") + "/chat/completions"
    is_stream = mode == "stream"
    body = request_body(stream=is_stream, model=model)
    send = stream_request if is_stream else plain_request
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    samples = Samples()
    total = warmup + requests
    next_index = 0
    started = cpu_started = 0.0

    def new_client(connections: int) -> httpx.AsyncClient:
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        return httpx.AsyncClient(limits=limits, headers=headers, timeout=httpx.Timeout(60.0), trust_env=False)

    async def worker(http: httpx.AsyncClient) -> None:
        nonlocal next_index, started, cpu_started
        while next_index < total:
            index = next_index
            next_index += 1
            if index == warmup:
                started, cpu_started = time.perf_counter(), time.process_time()
            record = samples if index >= warmup else None
            try:
                await send(http, endpoint, body, record)
            except httpx.HTTPError as exc:
                if record is not None:
                    record.error(type(exc).__name__, str(exc))

    # httpx's shared pool costs CPU per request that grows with its size (it scans every connection,
    # polling idle sockets, on each checkout and release) and serves waiters unfairly: with 16
    # connections it halved this client's throughput and gave a p99 ten times the p50. So by default
    # each in-flight slot has its own client with one keep-alive connection.
    if pool == "shared":
        clients = [new_client(concurrency)] * concurrency
    else:
        clients = [new_client(1) for _ in range(concurrency)]
    # One continuous stream of requests: a pause between warm-up and measurement would leave
    # connections idle long enough for the server's keep-alive timeout to race their next use.
    async with contextlib.AsyncExitStack() as stack:
        for http in set(clients):
            await stack.enter_async_context(http)
        await asyncio.gather(*(worker(http) for http in clients[: max(1, min(concurrency, total))]))
    elapsed = time.perf_counter() - started
    cpu_seconds = time.process_time() - cpu_started

    ok = len(samples.latency)
    return {
        "url": url,
        "mode": mode,
        "concurrency": concurrency,
        "requests": requests,
        "warmup": warmup,
        "pool": pool,
        "ok": ok,
        "errors": sum(samples.errors.values()),
        "error_kinds": dict(samples.errors),
        "error_sample": samples.error_sample,
        "elapsed_s": round(elapsed, 3),
        "rps": round(ok / elapsed, 1) if elapsed else None,
        # Near 1.0 means the load generator itself was the bottleneck.
        "loadgen_cpu_share": round(cpu_seconds / elapsed, 3) if elapsed else None,
        "latency_ms": distribution(samples.latency),
        "ttft_ms": distribution(samples.ttft),
        "chunk_gap_ms": distribution(samples.chunk_gap),
        "chunk_delay_ms": distribution(samples.chunk_delay),
        "turbo_overhead_ms": distribution(samples.turbo_overhead),
        # X-Turbo-Upstream of the recorded requests that succeeded: deployment id -> requests.
        "turbo_upstreams": dict(samples.upstreams),
        "ratelimit_headers": samples.ratelimit_headers,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True, help="base URL ending in /v1")
    parser.add_argument("--token", default="bench")
    parser.add_argument("--mode", choices=("plain", "stream"), default="plain")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--requests", type=int, default=1000, help="measured requests (at least 1)")
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument(
        "--pool",
        choices=("per-worker", "shared"),
        default="per-worker",
        help="one client with one connection per in-flight request (default), or one shared pool of them all",
    )
    parser.add_argument("--model", default=MODEL, help=f"the model every request asks for (default {MODEL})")
    parser.add_argument("--out", required=True, help="where to write the JSON summary")
    args = parser.parse_args()
    if args.concurrency < 1 or args.requests < 1 or args.warmup < 0:
        parser.error("--concurrency and --requests must be at least 1, --warmup at least 0")
    summary = asyncio.run(
        run(
            url=args.url,
            token=args.token,
            mode=args.mode,
            concurrency=args.concurrency,
            requests=args.requests,
            warmup=args.warmup,
            pool=args.pool,
            model=args.model,
        )
    )
    with open(args.out, "w") as out:
        json.dump(summary, out, indent=2)
    if summary["errors"]:
        print(f"loadgen: {summary['errors']} errors: {summary['error_sample']}", file=sys.stderr)


if __name__ == "__main__":
    main()
