"""`manage.py upstreams list|check`, run as an operator would (manage.py's entry point, in this process; one
test in a subprocess, for what a fresh process does at start-up), against fake upstreams on loopback ports
and a closed port; the view of a running server's health through Redis (this leg's, or one of the test's own)."""

import json
import textwrap
import uuid

import pytest

from chats.tests.processes import free_port, redis_start
from conftest import run_manage
from proxy.gateway import health
from testing.commands import manage
from testing.fake_upstream import FakeUpstream
from turbo_site.tests.test_tracing import receiver  # noqa: F401  (an OTLP/HTTP receiver)

pytestmark = pytest.mark.django_db

LIVE_KEY = "sk-live-upstream-key-0123456789"
DEAD_KEY = "sk-dead-upstream-key-9876543210"


@pytest.fixture
def live():
    fake = FakeUpstream().start()
    yield fake
    fake.stop()


@pytest.fixture
def names():
    """Upstream names of this test's own: health in a shared Redis is keyed by deployment id."""
    suffix = uuid.uuid4().hex[:6]
    return {"live": f"live-{suffix}", "dead": f"dead-{suffix}"}


@pytest.fixture
def config_file(tmp_path, live, names):
    """A TURBO_CONFIG with two upstreams: `live` (a fake) and `dead` (a closed port)."""
    path = tmp_path / "turbo.yaml"
    path.write_text(
        textwrap.dedent(f"""
            upstreams:
              - {{name: {names["live"]}, base_url: {live.url}/v1, api_key: {LIVE_KEY}}}
              - {{name: {names["dead"]}, base_url: "http://127.0.0.1:{free_port()}/v1", api_key: {DEAD_KEY}}}
            models:
              - name: m
                deployments:
                  - {{upstream: {names["live"]}, model: gpt-4o-mini, weight: 3}}
                  - {{upstream: {names["dead"]}, model: gpt-4o-mini, priority: 1}}
              - name: other
                deployments:
                  - {{upstream: {names["live"]}, model: not-served-here}}
            """)
    )
    return path


@pytest.fixture
def per_process(settings):
    """Settings as `manage.py` sees them without REDIS_ADDRESS: health is this process's, from nothing."""
    settings.REDIS_ADDRESS = ""
    health.forget()
    yield settings
    health.forget()


@pytest.fixture
def env(per_process, config_file):
    per_process.TURBO_CONFIG = str(config_file)
    return per_process


def configured(settings, path) -> None:
    settings.TURBO_CONFIG = str(path)


def assert_no_keys(done):
    for key in (LIVE_KEY, DEAD_KEY):
        assert key not in done.stdout and key not in done.stderr


def row_of(output: str, deployment: str) -> str:
    rows = [line for line in output.splitlines() if f" {deployment} " in line]
    assert len(rows) == 1, output
    return rows[0]


# --- check ---------------------------------------------------------------------------------------------


def test_check_names_the_reachable_and_the_unreachable_upstream_and_exits_1(env, live, names):
    done = manage("upstreams", "check")
    assert done.returncode == 1, done.stderr
    assert done.stderr == f"CommandError: 1 of 2 upstreams failed the check: {names['dead']}\n"
    reachable = row_of(done.stdout, f"{live.url}/v1")
    assert reachable.startswith(names["live"])
    assert "reachable: 200 in " in reachable and "2 models" in reachable
    assert "gpt-4o-mini listed" in reachable and "not-served-here NOT listed" in reachable
    unreachable = next(line for line in done.stdout.splitlines() if line.startswith(names["dead"]))
    assert "unreachable: the upstream could not be reached" in unreachable and "connection refused" in unreachable
    assert_no_keys(done)
    # It asked with the server's credentials for this upstream.
    (asked,) = live.requests
    assert (asked.method, asked.path) == ("GET", "/v1/models")
    assert asked.headers["authorization"] == f"Bearer {LIVE_KEY}"


def test_check_as_json(env, names):
    done = manage("upstreams", "check", "--json", "--timeout", "2")
    assert done.returncode == 1
    checks = {check["upstream"]: check for check in json.loads(done.stdout)["upstreams"]}
    live, dead = checks[names["live"]], checks[names["dead"]]
    assert (live["is_reachable"], live["status"], live["model_count"]) == (True, 200, 2)
    assert live["listed"] == {"gpt-4o-mini": True, "not-served-here": False}
    assert (dead["is_reachable"], dead["status"]) == (False, None)
    assert "connection refused" in dead["problem"]
    assert_no_keys(done)


def test_check_passes_when_every_upstream_answers(per_process, live, tmp_path):
    path = tmp_path / "one.yaml"
    path.write_text(
        f"upstreams: [{{name: only, base_url: '{live.url}', api_key: {LIVE_KEY}}}]\n"
        "models: [{name: m, deployments: [{upstream: only, model: gpt-4o}]}]\n"
    )
    configured(per_process, path)
    done = manage("upstreams", "check")
    assert done.returncode == 0, done.stderr
    assert "gpt-4o listed" in done.stdout
    assert done.stdout.endswith("all 1 upstreams reachable\n")


def test_an_upstream_that_quotes_the_key_back_fails_the_check_without_showing_it(env, live, names):
    live.forced_scenario = "error_401_echo"  # "Incorrect API key provided: sk-..."
    done = manage("upstreams", "check")
    assert done.returncode == 1
    answered = next(line for line in done.stdout.splitlines() if line.startswith(names["live"]))
    assert "error: answered 401: Incorrect API key provided: [redacted]" in answered
    assert_no_keys(done)


def test_check_refuses_a_bad_timeout_in_one_line(env):
    done = manage("upstreams", "check", "--timeout", "soon")
    assert done.returncode == 2
    assert done.stderr == "manage.py upstreams check: error: argument --timeout: 'soon' is not a number of seconds\n"


def test_help_explains_both_subcommands(env):
    done = manage("upstreams", "--help")
    assert done.returncode == 0
    text = " ".join(done.stdout.split())
    assert "list List every deployment" in text and "check Ask every upstream for GET /models" in text
    for action, says in (("list", "cooling until HH:MM:SS"), ("check", "Exits 1 if any upstream")):
        done = manage("upstreams", action, "--help")
        assert done.returncode == 0 and says in " ".join(done.stdout.split())


# --- list ----------------------------------------------------------------------------------------------


def test_list_shows_every_deployment_and_says_health_is_per_process(env, live, names):
    done = manage("upstreams", "list")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split() == [
        "MODELS",
        "DEPLOYMENT",
        "UPSTREAM",
        "BASE",
        "URL",
        "WEIGHT",
        "PRIORITY",
        "STATE",
        "FAILURES",
        "EWMA",
        "MS",
        "IN",
        "FLIGHT",
        "LAST",
        "ERROR",
    ]
    first = row_of(done.stdout, f"{names['live']}/gpt-4o-mini").split()
    assert first[:6] == ["m", f"{names['live']}/gpt-4o-mini", names["live"], f"{live.url}/v1", "3", "0"]
    second = row_of(done.stdout, f"{names['dead']}/gpt-4o-mini").split()
    assert second[:3] == ["m", f"{names['dead']}/gpt-4o-mini", names["dead"]] and second[4:6] == ["1", "1"]
    assert row_of(done.stdout, f"{names['live']}/not-served-here").startswith("other ")
    assert lines[-1].startswith("health is per process without REDIS_ADDRESS")
    assert "admin" in lines[-1]
    assert_no_keys(done)


def test_list_never_shows_credentials_in_a_base_url(per_process, tmp_path):
    path = tmp_path / "userinfo.yaml"
    path.write_text(
        "upstreams: [{name: u, base_url: 'https://someone:hunter2-password@llm.example.com/v1', api_key: sk-x1234}]\n"
        "models: [{name: m, deployments: [{upstream: u}]}]\n"
    )
    configured(per_process, path)
    done = manage("upstreams", "list", "--json")
    assert done.returncode == 0, done.stderr
    (deployment,) = json.loads(done.stdout)["deployments"]
    assert deployment["base_url"] == "https://llm.example.com/v1"
    assert "hunter2" not in done.stdout and "sk-x1234" not in done.stdout


def test_list_with_redis_out_of_reach_says_so_in_one_line(env):
    env.REDIS_ADDRESS = f"redis://127.0.0.1:{free_port()}/0"
    done = manage("upstreams", "list")
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.startswith("CommandError: cannot read the shared health from Redis (REDIS_ADDRESS): ")
    assert done.stderr.count("\n") == 1


# --- list across processes: the state a running server shares through Redis -----------------------------


@pytest.fixture
def shared_redis(settings, processes):  # noqa: F811
    """A Redis the live server shares its health through: this leg's, or one of the test's own."""
    if not settings.REDIS_ADDRESS:
        port = free_port()
        processes.append(redis_start(port))
        settings.REDIS_ADDRESS = f"redis://127.0.0.1:{port}/0"
    health.forget()
    yield settings.REDIS_ADDRESS
    health.forget()


def test_list_shows_a_deployment_cooling_in_the_running_server(
    client, signup, settings, live, names, config_file, shared_redis
):
    settings.TURBO_CONFIG = str(config_file)
    settings.GATEWAY_HEALTH_SYNC_SECONDS = 0
    live.forced_scenario = "error_500"
    token = signup()[0]
    body = {"model": "m", "messages": [{"role": "user", "content": "hello"}]}
    # The live deployment fails (500) and cools down; the dead one cannot be reached and cools down too.
    response = client.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 500

    # The server runs in this process: without its in-memory health, the command sees only what Redis holds,
    # as a command in another process would.
    health.forget()
    done = manage("upstreams", "list")
    assert done.returncode == 0, done.stderr
    failed = row_of(done.stdout, f"{names['live']}/gpt-4o-mini")
    assert " cooling until " in failed and "the upstream answered 500" in failed
    assert row_of(done.stdout, f"{names['dead']}/gpt-4o-mini").count("cooling until") == 1
    assert " healthy " in row_of(done.stdout, f"{names['live']}/not-served-here")
    assert "per process" not in done.stdout
    assert_no_keys(done)

    listed = manage("upstreams", "list", "--json")
    document = json.loads(listed.stdout)
    assert document["health_is_shared"] is True
    states = {deployment["id"]: deployment for deployment in document["deployments"]}
    cooling = states[f"{names['live']}/gpt-4o-mini"]
    assert cooling["state"] == "cooling" and cooling["recent_failures"] == 1 and cooling["cooling_until"] > 0
    assert states[f"{names['live']}/not-served-here"]["state"] == "healthy"


def test_a_command_starts_like_every_process_and_exports_its_span(cli_env, live, tmp_path, receiver):  # noqa: F811
    """Operator commands start through core.startup.process_start: with an OTLP endpoint, the command is a
    span of its own (the parent of what it does), exported when the command exits. A subprocess: start-up
    and the export at exit are what is checked."""
    path = tmp_path / "one.yaml"
    path.write_text(
        f"upstreams: [{{name: only, base_url: '{live.url}', api_key: {LIVE_KEY}}}]\n"
        "models: [{name: m, deployments: [{upstream: only, model: gpt-4o}]}]\n"
    )
    env = {**cli_env, "TURBO_CONFIG": str(path), "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url}
    done = run_manage(env, "upstreams", "check")
    assert done.returncode == 0, done.stderr
    received = receiver.wait(lambda got: any(span.name == "manage.py upstreams check" for _, _, span in got))
    (command,) = [(resource, span) for _, resource, span in received if span.name == "manage.py upstreams check"]
    assert command[0]["turbo.process"] == "command"
    assert LIVE_KEY not in str(received)


def test_check_lists_the_models_with_no_price(per_process, live, tmp_path):
    path = tmp_path / "prices.yaml"
    path.write_text(
        f"upstreams: [{{name: only, base_url: '{live.url}/v1', api_key: {LIVE_KEY}}}]\n"
        "models:\n"
        "  - {name: house-llama, deployments: [{upstream: only, model: gpt-4o}]}\n"
        "  - {name: priced, price: {input: 1, output: 2}, deployments: [{upstream: only, model: gpt-4o}]}\n"
        "  - {name: gpt-4o-mini, deployments: [{upstream: only}]}\n"
        "  - {name: '*', deployments: [{upstream: only}]}\n"
    )
    configured(per_process, path)
    done = manage("upstreams", "check")
    assert done.returncode == 0, done.stderr
    line = "models with no price, counted at DEFAULT_PRICE 10,30 USD per 1M tokens (input,output): house-llama\n"
    assert line in done.stdout  # the fake's own list (gpt-4o-mini, gpt-4o) is priced by the shipped table
    per_process.UNPRICED_MODELS = "refuse"
    done = manage("upstreams", "check", "--json")
    assert json.loads(done.stdout)["unpriced_models"] == ["house-llama"]
