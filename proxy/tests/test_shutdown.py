"""Queued events are written when the server stops cleanly, not lost."""

import signal
import socket
import subprocess
import sys
import time

import httpx

from conftest import PROJECT_ROOT, run_python


def test_queued_events_are_saved_on_sigterm(cli_env):
    env = {**cli_env, "EVENT_FLUSH_MS": "600000"}  # the writer sleeps: only the shutdown flush can save them
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "turbo_site.asgi:application", "--port", str(port), "--log-level", "warning"],
        cwd=PROJECT_ROOT,
        env=env,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(200):
            try:
                httpx.get(base + "/api/schema/", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        token = httpx.post(
            base + "/user/signup", data={"username": "shutdown-user", "password": "correct-horse"}
        ).json()["token"]
        for _ in range(5):
            assert httpx.get(base + "/user/session", headers={"Authorization": f"Bearer {token}"}).status_code == 200
        # Under uvicorn (with its lifespan) the writer is a task on the server's loop, not a thread.
        assert httpx.get(base + "/health").json()["events"]["writer"] == "loop"
        before = run_python(
            env, "from proxy.models import Event; print(Event.objects.filter(user__username='shutdown-user').count())"
        )
        assert before == "0"  # all still queued in the server
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)  # uvicorn re-raises the signal once it has shut down cleanly
    after = run_python(
        env,
        "from proxy.models import Event; "
        "print(sorted(Event.objects.filter(user__username='shutdown-user').values_list('type', flat=True)))",
    )
    assert after == str(["request"] * 5 + ["signup"])
