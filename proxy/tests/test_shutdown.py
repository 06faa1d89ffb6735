"""Queued events and usage records are written when the server stops cleanly, not lost."""

import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

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


@pytest.mark.django_db(transaction=True)
def test_usage_of_a_call_still_queued_is_written_on_sigterm(start_server, upstream):
    """A /v1 call's usage waits in the server's queue (its writer asleep); SIGTERM writes it, not loses it."""
    from proxy.models import UsageRollup

    server = start_server(EVENT_FLUSH_MS="600000")
    try:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            signed = http.post("/user/signup", data={"username": "shutdown-usage", "password": "correct-horse"})
            token, user_id = signed.json()["token"], signed.json()["user"]["id"]
            chat = {"model": "gpt-4o", "messages": [{"role": "user", "content": "echo: counted"}]}
            answered = http.post("/v1/chat/completions", json=chat, headers={"Authorization": f"Bearer {token}"})
        assert answered.status_code == 200, answered.text
        assert not UsageRollup.objects.filter(user_id=user_id).exists()  # still queued in the server
    finally:
        server.stop()  # SIGTERM, and the wait for the process to end
    assert server.process.returncode in (0, -signal.SIGTERM), server.stderr()[-3000:]
    assert list(UsageRollup.objects.filter(user_id=user_id).values_list("model", "requests")) == [("gpt-4o", 1)]
