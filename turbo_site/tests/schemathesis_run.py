"""The OpenAPI schema tells the truth: schemathesis runs over every operation on the live server, with
all its checks (status codes, content types, headers and bodies against the schema; no server error;
schema-valid requests accepted and invalid ones refused; unknown methods a 405 with `Allow`; auth
enforced...), in its examples, coverage and fuzzing phases, with a fixed seed and a fixed count, and
reports no failure.

It runs as `schemathesis run` does in a shell (its whole engine, not a part of it), against the test
server and its fake upstream; the failures it finds are listed one per line, each with the request it
sent and the answer it got.

The operations are split into shards (SHARDS), one test module each (test_schemathesis_*.py), so the
suite's workers share the run instead of one worker spending minutes on it. The last shard takes every
operation the others do not name, so a new operation is always tested; each shard checks it selected
the operations it should, so together they cover the whole schema. Schemathesis feeds an operation with
resources that others answered (a group from `POST /group/create`, a chat from `POST /chat/index`): a
shard also runs the operations its own draw from (`helpers`), and each run starts with a chat of the
user's, as the whole run had one from its earlier operations.
"""

import base64
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

# Each shard module's pytestmark.
MARKS = [
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
# Schemathesis stops reading after `max-stream-events` events that carry data, and `retry:` carries none,
# so on a chat with nothing happening it reads until the request timeout: 3 s there, not the default
# 10 s (a stream's headers and first frame come at once, in milliseconds even on a loaded machine).
STREAMS = """
[[operations]]
include-path = "/chat/stream"
max-stream-events = 1
request-timeout = 3
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


@dataclass(frozen=True)
class Shard:
    """Operations one test runs: `operations` are its own (None: every one no other shard names), and
    `helpers` those whose answers give them resources to draw (checked here too; another shard owns them)."""

    operations: tuple[str, ...] | None
    helpers: tuple[str, ...] = ()


GROUPS_FROM = ("POST /group/create",)
CHATS_FROM = ("POST /chat/index",)
MEMBERS_FROM = ("POST /chat/user/remove",)

# About equal shares of the run's time, which goes on the coverage phase's cases: about 570 each for
# /chat/create and /chat/update, 950 for the user operations together, 600 for the chats' others.
SHARDS = {
    # Deleting chats beside creating them: the other chat operations keep the chats they draw.
    "chat_create": Shard(("POST /chat/create", "POST /chat/delete"), helpers=GROUPS_FROM + CHATS_FROM),
    "chat_update": Shard(("POST /chat/update",), helpers=CHATS_FROM),
    "chats": Shard(
        (
            "POST /chat/stream",
            "GET /chat/stream",
            "POST /chat/prompt",
            "POST /chat/read",
            "GET /chat/read",
            "POST /chat/stop",
            "POST /chat/message/delete",
            "POST /chat/user/add",
            "POST /chat/user/remove",
        ),
        helpers=CHATS_FROM,
    ),
    "users": Shard(
        (
            "POST /user/keys/create",
            "POST /user/keys/revoke",
            "POST /user/keys/list",
            "GET /user/keys/list",
            "POST /user/signup",
            "POST /user/login",
            "POST /user/logout",
            "GET /user/logout",
            "POST /user/update",
            "POST /user/password/update",
            "POST /user/read",
            "GET /user/read",
            "POST /user/session",
            "GET /user/session",
            "POST /api/users/register",
            "POST /api/users/login",
        ),
        helpers=GROUPS_FROM,
    ),
    "the_rest": Shard(None, helpers=MEMBERS_FROM),
}


def _filters(name: str) -> list[str]:
    """The shard's `schemathesis run` options that select its operations and helpers."""
    shard = SHARDS[name]
    if shard.operations is not None:
        return [f"--include-name={label}" for label in (*shard.operations, *shard.helpers)]
    return [f"--exclude-name={label}" for label in sorted(_named_elsewhere(name))]


def _named_elsewhere(name: str) -> set[str]:
    """The operations other shards test, less this shard's helpers (the last shard leaves them out)."""
    named = {label for other in SHARDS.values() if other.operations for label in other.operations}
    return named - set(SHARDS[name].helpers)


def run_shard(name: str, *, server_url: str, signup, client, tmp_path: Path) -> None:
    """Run schemathesis over the shard's operations; fail with each failure it found."""
    token, _, _ = signup()
    chat = client.post("/chat/create", data={"name": "seed"}, headers={"Authorization": f"Bearer {token}"})
    assert chat.status_code == 200, chat.text
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
            f"{server_url}/api/schema/?format=json",
            "--checks",
            "all",
            *_filters(name),
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
    shard = SHARDS[name]
    if shard.operations is not None:
        expected = len(shard.operations) + len(shard.helpers)
    else:
        expected = int(selected[2]) - len(_named_elsewhere(name))
    # the shard's operations, each tested (a name no longer in the schema, or one skipped, fails here)
    assert int(selected[1]) == expected and selected[3] == selected[1], selected[0]
