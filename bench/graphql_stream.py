"""Time to first token through a GraphQL subscription (`completionStream`) beside `/v1` streaming, on the
same Turbo.

    python -m bench.graphql_stream [--concurrency 1] [--requests 1000] [--warmup 100] [--runs 3] [--quick]

Starts, each in its own process: the fast fake upstream (bench.fast_upstream) and Turbo under uvicorn (as
bench.proxy_overhead runs it) on a fresh SQLite database, with one user. Then, per run and in turn, a load
generator streams the same chat completion directly from the upstream, through `/v1/chat/completions`
(bench.loadgen) and through `/graphql` over a WebSocket speaking graphql-transport-ws (this module's
`--client` mode: one socket per in-flight slot, signed in once with connection_init, a `subscribe` per
request): TTFT is the time until the first delta with content. Reports each figure's median over the runs,
and what GraphQL adds over `/v1` (the issue's target: at most 2 ms at p99, c=1). Writes
bench/results/graphql_stream-<timestamp>.json. This is a benchmark, not a test: it asserts nothing about
wall-clock times.
"""

import asyncio
import json
import time

from bench.front_ttft import Front, Schedule, StreamTimes, run_benchmark
from bench.loadgen import MODEL, Samples
from bench.proxy_overhead import Processes

SUBSCRIPTION = "subscription($i: CompletionInput!) { completionStream(input: $i) { text done } }"


# --- the GraphQL load generator (its own process, like bench.loadgen) --------------------------------


async def graphql_load(*, url: str, token: str, concurrency: int, requests: int, warmup: int) -> dict:
    """Stream `warmup` + `requests` completions through the completionStream subscription, `concurrency` at
    a time, one socket each (as bench.loadgen gives each in-flight slot its own connection); the recorded
    ones' figures."""
    from websockets.asyncio.client import connect

    variables = {"i": {"model": MODEL, "messages": [{"role": "user", "content": "Say hello."}]}}
    schedule = Schedule(url=url, concurrency=concurrency, requests=requests, warmup=warmup)

    async def one(socket, operation_id: str, record: Samples | None) -> None:
        times = StreamTimes()
        finished = False
        subscribe = {
            "id": operation_id,
            "type": "subscribe",
            "payload": {"query": SUBSCRIPTION, "variables": variables},
        }
        await socket.send(json.dumps(subscribe))
        while True:
            message = json.loads(await socket.recv())
            arrived, arrived_ns = time.perf_counter(), time.time_ns()
            if message.get("id") != operation_id:
                continue
            if message["type"] == "complete":
                break
            if message["type"] == "error" or message["payload"].get("errors"):
                raise RuntimeError(json.dumps(message)[:300])
            delta = message["payload"]["data"]["completionStream"]
            if delta["done"]:
                finished = True
            if delta["text"]:
                times.content(delta["text"], arrived, arrived_ns)
        times.record(record, finished=finished, last="delta")

    async def worker(slot: int) -> None:
        async with connect(url, subprotocols=["graphql-transport-ws"], max_size=None, compression=None) as socket:
            await socket.send(json.dumps({"type": "connection_init", "payload": {"authorization": f"Bearer {token}"}}))
            ack = json.loads(await socket.recv())
            if ack.get("type") != "connection_ack":
                raise RuntimeError(f"no connection_ack: {ack}")
            for index, record in schedule:
                try:
                    await one(socket, str(index), record)
                except RuntimeError as exc:
                    if record is not None:
                        record.error("graphql_error", str(exc))

    await asyncio.gather(*(worker(slot) for slot in range(concurrency)))
    return schedule.summary()


# --- the run ------------------------------------------------------------------------------------------


def serve_graphql(processes: Processes, env: dict[str, str], http_port: int) -> str:
    """Nothing to start: /graphql is served by Turbo itself; its WebSocket address."""
    return f"ws://127.0.0.1:{http_port}/graphql"


FRONT = Front(
    name="graphql_stream",
    side="graphql",
    label="GraphQL",
    description=__doc__,
    load=graphql_load,
    address_arg="url",
    serve=serve_graphql,
    server="the same server: /graphql, graphql-transport-ws",
)


def main() -> None:
    run_benchmark(FRONT)


if __name__ == "__main__":
    main()
