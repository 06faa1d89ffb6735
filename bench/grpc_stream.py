"""Time to first token through gRPC `CompleteStream` beside `/v1` streaming, on the same Turbo.

    python -m bench.grpc_stream [--concurrency 1] [--requests 1000] [--warmup 100] [--runs 3] [--quick]

Starts, each in its own process: the fast fake upstream (bench.fast_upstream), Turbo under uvicorn (as
bench.proxy_overhead runs it) and `manage.py grpcserve` on the same fresh SQLite database, with the same
user. Then, per run and in turn, a load generator streams the same chat completion directly from the
upstream, through `/v1/chat/completions` (bench.loadgen) and through gRPC `turbo.v1.Completions/
CompleteStream` (this module's `--client` mode, a grpc.aio client with generated stubs): TTFT is the time
until the first chunk with content. Reports each figure's median over the runs, and what gRPC adds over
`/v1` (the issue's target: at most 2 ms at p99, c=1). Writes bench/results/grpc_stream-<timestamp>.json.
This is a benchmark, not a test: it asserts nothing about wall-clock times.
"""

import asyncio
import subprocess
import time

from bench.front_ttft import Front, Schedule, StreamTimes, run_benchmark
from bench.loadgen import MODEL, Samples
from bench.proxy_overhead import PYTHON, Processes, free_port

# --- the gRPC load generator (its own process, like bench.loadgen) -----------------------------------


async def grpc_load(*, address: str, token: str, concurrency: int, requests: int, warmup: int) -> dict:
    """Stream `warmup` + `requests` completions through CompleteStream, `concurrency` at a time, one channel
    each (as bench.loadgen gives each in-flight slot its own connection); the recorded ones' figures."""
    import grpc

    from protos.turbo.v1 import turbo_pb2, turbo_pb2_grpc

    request = turbo_pb2.CompleteRequest(model=MODEL, messages=[turbo_pb2.Message(role="user", content="Say hello.")])
    metadata = (("authorization", f"Bearer {token}"),)
    schedule = Schedule(url=f"grpc://{address}", concurrency=concurrency, requests=requests, warmup=warmup)

    async def one(stub, record: Samples | None) -> None:
        times = StreamTimes()
        finished = False
        async for chunk in stub.CompleteStream(request, metadata=metadata):
            arrived, arrived_ns = time.perf_counter(), time.time_ns()
            if chunk.finish_reason:
                finished = True
            if chunk.delta:
                times.content(chunk.delta, arrived, arrived_ns)
        times.record(record, finished=finished, last="chunk")

    async def worker(channel) -> None:
        stub = turbo_pb2_grpc.CompletionsStub(channel)
        for _index, record in schedule:
            try:
                await one(stub, record)
            except grpc.aio.AioRpcError as exc:
                if record is not None:
                    record.error(exc.code().name, exc.details() or "")

    channels = [grpc.aio.insecure_channel(address) for _ in range(concurrency)]
    try:
        await asyncio.gather(*(worker(channel) for channel in channels))
    finally:
        for channel in channels:
            await channel.close()
    return schedule.summary()


# --- the run ------------------------------------------------------------------------------------------


def wait_for_grpc(processes: Processes, process: subprocess.Popen, address: str, timeout: float = 60) -> None:
    """Until the health service says SERVING; raises with the server's log if it exits first."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"grpcserve exited with {process.returncode}:\n{processes.log_tail('grpcserve')}")
            try:
                if health.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    raise RuntimeError(f"grpcserve did not answer at {address}:\n{processes.log_tail('grpcserve')}")


def serve_grpc(processes: Processes, env: dict[str, str], http_port: int) -> str:
    """Starts `manage.py grpcserve` on a port of its own (same database, same environment as Turbo) and waits
    until it is SERVING; its address."""
    address = f"127.0.0.1:{free_port()}"
    grpcserve = processes.start("grpcserve", [PYTHON, "manage.py", "grpcserve", "--address", address], env)
    wait_for_grpc(processes, grpcserve, address)
    return address


FRONT = Front(
    name="grpc_stream",
    side="grpc",
    label="gRPC",
    description=__doc__,
    load=grpc_load,
    address_arg="address",
    serve=serve_grpc,
    server="manage.py grpcserve (grpc.aio, asyncio loop)",
    env={"GRPC_VERBOSITY": "ERROR"},
)


def main() -> None:
    run_benchmark(FRONT)


if __name__ == "__main__":
    main()
