"""The gRPC server as operators run it (`manage.py grpcserve` in a process of its own), and the generated
modules in protos/ matching turbo.proto."""

import asyncio
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import grpc
import pytest
from django.test import AsyncClient
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.proto.trace.v1.trace_pb2 import Span as SpanProto
from opentelemetry.proto.trace.v1.trace_pb2 import Status as StatusProto

from conftest import PROJECT_ROOT, SERVER_KEY, run_python
from protos.turbo.v1 import turbo_pb2, turbo_pb2_grpc
from testing.grpc import bearer

# The metrics tests' scrape parser, and the tracing tests' OTLP/HTTP receiver.
from turbo_site.tests.test_metrics import TOKEN as METRICS_TOKEN
from turbo_site.tests.test_metrics import Scrape, moved
from turbo_site.tests.test_tracing import receiver, traceparent_parts  # noqa: F401

GENERATED = ("turbo_pb2.py", "turbo_pb2.pyi", "turbo_pb2_grpc.py")
PROTO = "protos/turbo/v1/turbo.proto"


def test_the_generated_modules_match_the_proto(tmp_path):
    """Regenerated into a temporary folder, the modules are the ones checked in (run `make protos`)."""
    done = subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I.", *(f"--{kind}_out={tmp_path}" for kind in ("python", "pyi"))]
        + [f"--grpc_python_out={tmp_path}", PROTO],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    for name in GENERATED:
        fresh = (tmp_path / "protos/turbo/v1" / name).read_text()
        checked_in = (PROJECT_ROOT / "protos/turbo/v1" / name).read_text()
        assert fresh == checked_in, f"protos/turbo/v1/{name} is out of date with {PROTO}: run `make protos`"


def _serve(env: dict, log: Path) -> tuple[subprocess.Popen, str]:
    """`manage.py grpcserve` on a free port; returns the process and its address once it listens."""
    with open(log, "wb") as output:
        process = subprocess.Popen(
            [sys.executable, "manage.py", "grpcserve", "--address", "127.0.0.1:0"],
            cwd=PROJECT_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=output,
            text=True,
        )
    first = process.stdout.readline()  # "gRPC on 127.0.0.1:PORT (...)": written once it listens
    assert first.startswith("gRPC on "), first + log.read_text()
    return process, first.split()[2]


def _user_with_a_chat(env: dict) -> tuple[str, str]:
    """A new user in the subprocesses' database: (a session token, the id of a chat of theirs)."""
    created = run_python(
        env,
        "from accounts.services import session_create, user_create\n"
        "from chats.services import chat_create\n"
        "user = user_create(username='grpc-' + __import__('sys').argv[1], password='correct-horse')\n"
        "print(session_create(user=user)[1], chat_create(owner=user, name='e2e').pk)\n",
        uuid.uuid4().hex[:8],
    )
    token, chat_id = created.split()
    return token, chat_id


async def test_grpcserve_serves_then_stops_gracefully_on_sigterm(cli_env, fake_upstream, tmp_path):
    fake_upstream.reset()
    env = {
        **cli_env,
        "DEBUG": "0",
        "OPENAI_API_URL": fake_upstream.url + "/v1",
        "OPENAI_API_KEY": SERVER_KEY,
        "SHUTDOWN_GRACE_SECONDS": "2",
    }
    token, chat_id = _user_with_a_chat(env)
    process, address = _serve(env, tmp_path / "grpcserve.log")
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            status = (await health.Check(health_pb2.HealthCheckRequest(service="turbo.v1.Chats"))).status
            assert status == health_pb2.HealthCheckResponse.SERVING

            completions = turbo_pb2_grpc.CompletionsStub(channel)
            request = turbo_pb2.CompleteRequest(messages=[turbo_pb2.Message(role="user", content="echo: e2e ok")])
            assert (await completions.Complete(request, metadata=bearer(token))).content == "e2e ok"

            # An open chat stream is told the server is stopping, then ends with UNAVAILABLE (reconnect).
            events = turbo_pb2_grpc.ChatsStub(channel).Events(
                turbo_pb2.EventsRequest(chat_id=chat_id), metadata=bearer(token)
            )
            await events.initial_metadata()
            process.send_signal(signal.SIGTERM)
            received = []
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                async for event in events:
                    received.append(event.type)
            assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
            assert received == ["server.shutdown"]
        assert process.wait(timeout=30) == 0
        assert "stopping" in process.stdout.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stdout.close()


def test_grpcserve_says_in_one_line_when_it_cannot_listen(cli_env, tmp_path):
    env = {**cli_env, "DEBUG": "0"}
    done = subprocess.run(
        [sys.executable, "manage.py", "grpcserve", "--address", "256.1.1.1:1"],
        cwd=PROJECT_ROOT,
        env={**env, "GRPC_VERBOSITY": "NONE"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith("grpcserve: cannot listen on 256.1.1.1:1")
    assert "Traceback" not in done.stderr


async def test_grpcserve_traces_each_call_with_its_attempts_and_counts_it_in_metrics(
    cli_env,
    fake_upstream,
    receiver,  # noqa: F811
    settings,
    tmp_path,
):
    """As operators run it: `grpcserve` exports its spans to the OTLP endpoint and writes its figures where
    this process's /metrics reads them (one METRICS_MULTIPROC_DIR)."""
    fake_upstream.reset()
    shared = tmp_path / "metrics"
    env = {
        **cli_env,
        "DEBUG": "0",
        "OPENAI_API_URL": fake_upstream.url + "/v1",
        "OPENAI_API_KEY": SERVER_KEY,
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
        "OTEL_BSP_SCHEDULE_DELAY": "600000",  # nothing goes out before the server stops, which must send it all
        "METRICS_TOKEN": METRICS_TOKEN,
        "METRICS_MULTIPROC_DIR": str(shared),
    }
    settings.METRICS_TOKEN, settings.METRICS_MULTIPROC_DIR = METRICS_TOKEN, str(shared)
    token, _ = _user_with_a_chat(env)
    process, address = _serve(env, tmp_path / "grpcserve.log")
    try:
        before = await _scrape()
        client_trace, client_span = "5bf92f3577b34da6a3ce929d0e0e4736", "10f067aa0ba902b7"
        request = turbo_pb2.CompleteRequest(
            model="gpt-4o-mini", messages=[turbo_pb2.Message(role="user", content="echo: traced and counted")]
        )
        async with grpc.aio.insecure_channel(address) as channel:
            completions = turbo_pb2_grpc.CompletionsStub(channel)
            traced = (*bearer(token), ("traceparent", f"00-{client_trace}-{client_span}-01"))
            assert (await completions.Complete(request, metadata=traced)).content == "traced and counted"
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await completions.Complete(request, metadata=bearer("not-a-token"))
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        counted = {"grpc_service": "turbo.v1.Completions", "grpc_method": "Complete"}
        # A refused call's status reaches the client as `abort` sends it, before the server's interceptor
        # has counted it: wait (a little) until both calls are counted, then read every figure.
        after = await _scrape()
        for _ in range(100):
            if moved(before, after, "turbo_grpc_request_duration_seconds_count", **counted) >= 2:
                break
            await asyncio.sleep(0.05)
            after = await _scrape()
        assert moved(before, after, "turbo_grpc_requests_total", grpc_code="OK", **counted) == 1
        assert moved(before, after, "turbo_grpc_requests_total", grpc_code="UNAUTHENTICATED", **counted) == 1
        assert moved(before, after, "turbo_grpc_request_duration_seconds_count", **counted) == 2
        assert after.value("turbo_grpc_requests_in_flight", **counted) == 0
        assert moved(before, after, "turbo_upstream_attempts_total", outcome="ok", model="gpt-4o-mini") == 1
        assert receiver.spans == []
        process.send_signal(signal.SIGTERM)  # the stop exports what is buffered
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stdout.close()

    received = receiver.wait(lambda got: sum(span.name.startswith("gRPC ") for _, _, span in got) >= 2, timeout=5)
    assert {resource["turbo.process"] for _, resource, _ in received} == {"grpc"}
    calls = [span for _, _, span in received if span.name == "gRPC /turbo.v1.Completions/Complete"]
    served = next(span for span in calls if span.trace_id.hex() == client_trace)
    assert served.kind == SpanProto.SpanKind.SPAN_KIND_SERVER and served.parent_span_id.hex() == client_span
    attributes = {a.key: a.value for a in served.attributes}
    assert attributes["rpc.system"].string_value == "grpc"
    assert attributes["rpc.service"].string_value == "turbo.v1.Completions"
    assert attributes["rpc.grpc.status_code"].int_value == grpc.StatusCode.OK.value[0]
    (attempt,) = [span for _, _, span in received if span.parent_span_id == served.span_id]
    assert attempt.name == "chat gpt-4o-mini" and attempt.kind == SpanProto.SpanKind.SPAN_KIND_CLIENT
    assert attempt.trace_id.hex() == client_trace
    _, parent_id = traceparent_parts(fake_upstream.requests[-1].headers["traceparent"])
    assert parent_id == attempt.span_id.hex()
    # The refused call: a span of its own (a new trace), its status the caller's doing, not a server fault.
    (refused_span,) = [span for span in calls if span is not served]
    refused_attributes = {a.key: a.value for a in refused_span.attributes}
    assert refused_attributes["rpc.grpc.status_code"].int_value == grpc.StatusCode.UNAUTHENTICATED.value[0]
    assert refused_span.status.code != StatusProto.StatusCode.STATUS_CODE_ERROR
    assert not [span for _, _, span in received if span.parent_span_id == refused_span.span_id]


async def _scrape() -> Scrape:
    """This process's /metrics (in process), which reads the shared METRICS_MULTIPROC_DIR."""
    response = await AsyncClient().get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
    assert response.status_code == 200, response.content
    return Scrape(response.content.decode())
