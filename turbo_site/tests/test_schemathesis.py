"""The OpenAPI schema tells the truth: schemathesis runs over every operation on the live server, with
all its checks (status codes, content types, headers and bodies against the schema; no server error;
schema-valid requests accepted and invalid ones refused; unknown methods a 405 with `Allow`; auth
enforced...), in its examples, coverage and fuzzing phases, with a fixed seed and a fixed count, and
reports no failure.

It runs as `schemathesis run` does in a shell (its whole engine, not a part of it), against the test
server and its fake upstream; the failures it finds are listed one per line, each with the request it
sent and the answer it got.
"""

import base64
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.django_db(transaction=True),
    # What the schema promises does not depend on the database: one leg runs it (the embedded one, which
    # finishes first), keeping the Postgres + Redis leg, CI's longer, a few minutes shorter.
    pytest.mark.skipif(bool(os.environ.get("DB_ADDRESS")), reason="the embedded-defaults leg runs schemathesis"),
]

EXAMPLES_PER_OPERATION = 5
SEED = 1

# Operations that end the caller's own login get a user of their own: with the shared token they would
# turn every later call into a 401. (Once that user is logged out, their 401s are answers the schema has.)
OWN_USER = ("POST /user/logout", "GET /user/logout", "POST /user/password/update")

CONFIG = """
seed = {seed}
workers = 1
headers = {{ Authorization = "Bearer {token}" }}

[generation]
mode = "all"
max-examples = {examples}
deterministic = true
# The credentials are the test's own (headers above): a generated `sess` cookie, or its absence, says
# nothing while the Authorization header is there.
with-security-parameters = false
# NUL in any text field is a 400 everywhere (DRF's fields, and turbo_site/tests/test_malformed_input.py
# covers it); the schema cannot say so of each string, so none is generated.
allow-x00 = false
codec = "utf-8"  # lone surrogates: no UTF-8 for them, refused (400) as malformed

[phases]
examples.enabled = true
coverage.enabled = true
fuzzing.enabled = true
stateful.enabled = false  # the schema has no links between operations

[checks]
enabled = true
"""

# Well-formed requests a rule no schema can state refuses: the conversation API's contract answers a taken username
# 400 (not 409), an API key's `expires_at` must be in the future, /usage's `since` before its `until`;
# and /ws over plain HTTP is a 426 (schemathesis speaks no WebSocket: the WebSocket tests cover it).
REFUSED_WELL_FORMED = """
[[operations]]
include-name = "POST /api/users/register"
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "429"]

[[operations]]
include-name = "POST /user/keys/create"
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "403", "404", "409", "429"]

[[operations]]
include-name = "GET /usage"
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "403", "404", "429"]

[[operations]]
include-name = "GET /ws"
checks.positive_data_acceptance.expected-statuses = ["101", "426"]
"""

# A chat's live stream ends only when the client leaves: its first frame (`retry:`) is enough to check.
STREAMS = """
[[operations]]
include-path = "/chat/stream"
max-stream-events = 1
"""

OWN_USER_OPERATION = """
[[operations]]
include-name = "{label}"
headers = {{ Authorization = "Bearer {token}" }}
"""


def _failures(report: Path) -> list[str]:
    """Each failure in the run's NDJSON events: operation, check, why, request, answer."""
    found = []
    for line in report.read_text().splitlines():
        event = json.loads(line)
        finished = event.get("ScenarioFinished")
        if not finished:
            continue
        recorder = finished.get("recorder") or {}
        for case_id, checks in (recorder.get("checks") or {}).items():
            for check in checks:
                if check["status"] != "failure":
                    continue
                failure = check["failure_info"]["failure"]
                exchange = (recorder.get("interactions") or {}).get(case_id) or {}
                request, response = exchange.get("request") or {}, exchange.get("response") or {}
                body = response.get("content") or ""
                if isinstance(body, dict) and "$base64" in body:
                    body = base64.b64decode(body["$base64"]).decode("utf-8", "replace")
                found.append(
                    f"{recorder.get('label')} [{finished['phase']}] {failure['code']} {failure['title']}: "
                    f"{failure['message'][:200]!r} <- {request.get('method')} {request.get('uri')} "
                    f"{str(request.get('body', ''))[:120]!r} -> {response.get('status_code')} {str(body)[:200]!r}"
                )
    return sorted(set(found))


def test_every_operation_answers_as_the_schema_says(turbo_server, signup, upstream, tmp_path):
    token, _, _ = signup()
    config = CONFIG.format(seed=SEED, token=token, examples=EXAMPLES_PER_OPERATION) + REFUSED_WELL_FORMED + STREAMS
    for label in OWN_USER:
        own_token, _, _ = signup()
        config += OWN_USER_OPERATION.format(label=label, token=own_token)
    (tmp_path / "schemathesis.toml").write_text(config)
    executable = shutil.which("schemathesis", path=str(Path(sys.executable).parent)) or "schemathesis"
    run = subprocess.run(
        [
            executable,
            "--config-file",
            str(tmp_path / "schemathesis.toml"),
            "--no-color",
            "run",
            f"{turbo_server.url}/api/schema/?format=json",
            "--checks",
            "all",
            "--report",
            "ndjson",
            "--report-ndjson-path",
            str(tmp_path / "events.ndjson"),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,
    )
    failures = _failures(tmp_path / "events.ndjson") if (tmp_path / "events.ndjson").exists() else []
    assert not failures, "\n".join(failures)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    selected = re.search(r"Selected: (\d+)/(\d+)\s+Tested: (\d+)", run.stdout)
    assert selected, run.stdout[-3000:]
    assert selected[1] == selected[2] == selected[3], selected[0]  # every operation, none skipped
