"""core.startup.process_start: one start for every kind of process, done once.

What it sets up is tested where it shows, in processes of their own: the ASGI server's spans
(test_tracing), `grpcserve`'s spans and metrics (test_grpc_server), a command's span
(proxy/tests/test_upstreams_command)."""

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
