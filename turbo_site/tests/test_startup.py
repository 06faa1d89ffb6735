"""core.startup.process_start: one start for every kind of process, done once.

What it sets up is tested where it shows, in processes of their own: the ASGI server's spans
(test_tracing), `grpcserve`'s spans and metrics (test_grpc_server), a command's span
(proxy/tests/test_upstreams_command)."""

import json
import subprocess
import sys

import pytest

from conftest import PROJECT_ROOT

SCRIPT = """
import django, logging
django.setup()
from turbo_site.core import startup, tracing
from turbo_site.core.logs import RedactSecrets
first, again = startup.process_start(sys.argv[1]), startup.process_start("asgi")
filters = [f for f in logging.getLogger("uvicorn.error").filters if isinstance(f, RedactSecrets)]
print(first, again, len(filters), tracing.enabled)
"""


@pytest.mark.parametrize("kind", ["grpc", "command"])
def test_a_process_starts_once_whatever_calls_it_again(cli_env, kind):
    done = subprocess.run(
        [sys.executable, "-c", "import sys\n" + SCRIPT, kind],
        cwd=PROJECT_ROOT,
        env={**cli_env, "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"},  # nothing is sent: no span is made
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "False", "1", "True"]


def test_an_unknown_kind_of_process_is_refused():
    from turbo_site.core.startup import process_start

    with pytest.raises(ValueError, match="is not one of asgi, grpc, command"):
        process_start("worker")


ENCODINGS_SCRIPT = """
import json, sys, threading, time
import django
django.setup()
from proxy.usage import tokens
started = time.monotonic()
if sys.argv[1] == "asgi":
    import turbo_site.asgi  # the server's start: what uvicorn imports
else:
    from django.core.management import call_command
    call_command("upstreams", "list")  # an operator command: it counts no tokens
ready = tokens.encodings_ready(timeout=60)
threads = [thread.name for thread in threading.enumerate()]
print(json.dumps({"ready": ready, "built": sorted(tokens._encodings), "warming": "turbo-encodings" in threads}))
"""


def _encodings_after_start(env, kind: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", ENCODINGS_SCRIPT, kind],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_server_builds_its_token_encodings_at_start_not_on_its_first_count(cli_env):
    env = {**cli_env, "OPENAI_API_URL": "http://127.0.0.1:9/v1"}  # zero config: every name, counted in o200k
    assert _encodings_after_start(env, "asgi") == {"ready": True, "built": ["o200k_base"], "warming": False}


def test_an_operator_command_builds_no_token_encoding(cli_env):
    env = {**cli_env, "OPENAI_API_URL": "http://127.0.0.1:9/v1"}
    assert _encodings_after_start(env, "command") == {"ready": False, "built": [], "warming": False}


def test_the_encodings_in_use_are_those_of_the_gateway_s_model_names(settings, tmp_path):
    from proxy.usage.tokens import encodings_in_use

    def gateway_file(name: str, *models: str) -> str:
        path = tmp_path / name
        path.write_text(f"upstreams: [{{name: up, base_url: 'http://127.0.0.1:9'}}]\nmodels: [{', '.join(models)}]\n")
        return str(path)

    settings.TURBO_CONFIG = ""
    settings.OPENAI_API_URL = "http://127.0.0.1:9/v1"
    assert encodings_in_use() == ["o200k_base"]  # zero config serves any name: o200k unless told otherwise
    settings.TURBO_CONFIG = gateway_file(
        "both.yaml",
        "{name: old, deployments: [{upstream: up, model: gpt-3.5-turbo}]}",
        "{name: gpt-4o, deployments: [{upstream: up}]}",
    )
    assert encodings_in_use() == ["o200k_base", "cl100k_base"]  # "old" counts in o200k, its upstream's name in cl100k
    settings.TURBO_CONFIG = gateway_file("old.yaml", "{name: gpt-4, deployments: [{upstream: up}]}")
    assert encodings_in_use() == ["cl100k_base"]
