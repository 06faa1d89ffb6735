"""The gRPC server as operators run it (`manage.py grpcserve` in a process of its own), and the generated
modules in protos/ matching turbo.proto."""

import signal
import subprocess
import sys
import uuid
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import PROJECT_ROOT, SERVER_KEY, run_python
from protos.turbo.v1 import turbo_pb2, turbo_pb2_grpc
from turbo_site.testing.grpc import bearer

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


async def test_grpcserve_serves_then_stops_gracefully_on_sigterm(cli_env, fake_upstream, tmp_path):
    fake_upstream.reset()
    env = {
        **cli_env,
        "DEBUG": "0",
        "OPENAI_API_URL": fake_upstream.url + "/v1",
        "OPENAI_API_KEY": SERVER_KEY,
        "SHUTDOWN_GRACE_SECONDS": "2",
    }
    created = run_python(
        env,
        "from accounts.services import session_create, user_create\n"
        "from chats.services import chat_create\n"
        "user = user_create(username='grpc-' + __import__('sys').argv[1], password='correct-horse')\n"
        "print(session_create(user=user)[1], chat_create(owner=user, name='e2e').pk)\n",
        uuid.uuid4().hex[:8],
    )
    token, chat_id = created.split()
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
