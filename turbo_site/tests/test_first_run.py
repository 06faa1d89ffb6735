"""What a new user runs first: a local secret without a manual step, the fake upstream to try Turbo
without a provider key, and the API docs working offline."""

import json
import os
import re
import subprocess
import sys

import openai
import pytest

from conftest import PROJECT_ROOT

# These run with no Turbo settings at all (their own SQLite file, no Redis): the same on both legs, so
# only on the first (the second sets DB_ADDRESS), which keeps CI's longer leg about a minute shorter.
zero_config = pytest.mark.skipif(
    bool(os.environ.get("DB_ADDRESS")), reason="runs with no settings at all: the embedded-defaults leg covers it"
)


def bare_env(tmp_path, **extra) -> dict:
    """The environment of a new user's shell: no Turbo settings at all."""
    env = {name: value for name, value in os.environ.items() if not name.startswith(("DJANGO_", "DEBUG"))}
    for name in ("SECRET_KEY", "DB_ADDRESS", "REDIS_ADDRESS", "TURBO_ENV_FILE", "OPENAI_API_URL", "OPENAI_API_KEY"):
        env.pop(name, None)
    env["DB_ADDRESS"] = f"sqlite:///{tmp_path / 'turbo.db'}"
    env.update(extra)
    return env


def manage(env, *args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        input="echo: and then?\n",  # what an interactive command (`programs run`) reads
    )


@zero_config
def test_make_env_writes_a_secret_once_and_the_documented_commands_then_work(tmp_path, fake_upstream):
    env_file = tmp_path / ".env"
    made = subprocess.run(
        ["make", "--no-print-directory", f"ENV_FILE={env_file}", "PYTHON=" + sys.executable, "env"],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert made.returncode == 0, made.stderr
    text = env_file.read_text()
    assert re.fullmatch(r"SECRET_KEY=[A-Za-z0-9_\-]{50,}\n", text)
    assert env_file.stat().st_mode & 0o077 == 0  # readable by its owner only
    subprocess.run(["make", f"ENV_FILE={env_file}", "env"], cwd=PROJECT_ROOT, capture_output=True, timeout=60)
    assert env_file.read_text() == text  # never overwritten

    without = bare_env(tmp_path, TURBO_ENV_FILE=str(tmp_path / "missing.env"))
    refused = manage(without, "users", "list")
    assert refused.returncode == 1 and "SECRET_KEY is not set" in refused.stderr  # production refuses

    with_file = bare_env(tmp_path, TURBO_ENV_FILE=str(env_file))
    # Every operator command of the Operating page, as printed there (placeholders filled in), works.
    page = (PROJECT_ROOT / "docs" / "operating.md").read_text()
    block = page.split("Management commands (each has", 1)[1].split("```sh", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].split() for line in block.strip().splitlines()]
    assert len(commands) >= 9
    fills = {
        "<id-or-username>": ["chat-owner"],
        "<username>": ["first-user"],
        "<password>": ["another-horse"],
        "[--password": ["--password"],
        "P]": ["correct-horse"],
        "[--days": ["--days"],
        "N]": ["30"],
        "[--since": ["--since"],
        "7d]": ["7d"],
        "[--by": ["--by"],
        "user|group|model|key|day]": ["model"],
        "[--json]": ["--json"],
        "[--timeout": ["--timeout"],
        "S]": ["5"],
        "<name>": ["horoscope"],
        "[--context": ["--context"],
        "JSON]": ['{"user_id": 1}'],
        "[--user": ["--user"],
        "NAME]": ["chat-owner"],
        "<prefix-or-id>": ["@key_prefix@"],
        "[--check]": ["--check"],  # graphql_schema: compare, do not write
    }
    command_args = []
    for words in commands:
        assert words[:3] == [".venv/bin/python", "manage.py", words[2]]
        args = []
        for word in words[2:]:
            if word == "<id>":
                word = "@message_id@" if "delete-message" in words else "@chat_id@"
            args += fills.get(word, [word])
        command_args.append(args)
    # `upstreams check` asks the upstream: a real (fake) one, as an operator's would be.
    with_upstream = {**with_file, "OPENAI_API_URL": fake_upstream.url + "/v1", "OPENAI_API_KEY": "sk-first-run"}
    operated = operator_session(with_upstream, command_args)
    migrated, *documented, listed = operated["ran"]
    assert migrated["returncode"] == 0, migrated["stderr"]
    for done in documented:
        assert done["returncode"] == 0, (done["args"], done["stderr"])
    assert listed["returncode"] == 0 and "first-user" in listed["stdout"]
    assert operated["secret_key"] == text.strip().removeprefix("SECRET_KEY=")  # from the file
    # the environment wins over the file
    code = "from django.conf import settings; print(settings.SECRET_KEY)"
    overridden = manage({**with_file, "SECRET_KEY": "from-the-environment"}, "shell", "-c", code)
    assert overridden.stdout.splitlines()[-1] == "from-the-environment"


# One fresh interpreter for a new user's whole session of operator commands (migrate, the Operating page's
# commands in order, `users list`): each through manage.py's entry point (testing.commands), with
# the settings of the environment it was started in. A process per command cost ~25 interpreter start-ups.
OPERATOR_SESSION = """\
import io, json, os, sys
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "turbo_site.settings")
import django
django.setup()
from django.conf import settings
from testing.commands import manage

ran = [manage("migrate", "--noinput", "-v0")]
from accounts.keys import api_key_create
from accounts.services import user_create
from chats.models import Message
from chats.services import chat_create

owner = user_create(username="chat-owner", password="correct-horse")
chat = chat_create(owner=owner, name="c")
message = Message.objects.create(chat=chat, author=owner, prompt="p", reply="r")
key, _ = api_key_create(user=owner, name="k")
fills = {"@chat_id@": str(chat.pk), "@message_id@": str(message.pk), "@key_prefix@": key.prefix}
for args in json.loads(sys.argv[1]):
    sys.stdin = io.StringIO("echo: and then?\\n")  # what an interactive command (`programs run`) reads
    ran.append(manage(*[fills.get(arg, arg) for arg in args]))
ran.append(manage("users", "list"))
print(json.dumps({"ran": [vars(done) for done in ran], "secret_key": settings.SECRET_KEY}))
"""


def operator_session(env, command_args: list[list[str]]) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", OPERATOR_SESSION, json.dumps(command_args)],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


@zero_config
def test_fakellm_serves_an_openai_compatible_stand_in(tmp_path, unused_port):
    env = bare_env(tmp_path, DEBUG="1")
    process = subprocess.Popen(
        [sys.executable, "manage.py", "fakellm", "--port", str(unused_port)],
        cwd=PROJECT_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        banner = process.stdout.readline()
        assert f"127.0.0.1:{unused_port}/v1" in banner
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{unused_port}/v1", api_key="sk-anything")
        assert [model.id for model in client.models.list()]
        reply = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "echo: hi"}])
        assert reply.choices[0].message.content == "hi"
        streamed = client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "echo: a b c"}], stream=True
        )
        assert "".join(chunk.choices[0].delta.content or "" for chunk in streamed if chunk.choices) == "a b c"
    finally:
        process.terminate()
        assert process.wait(timeout=20) == 0


@pytest.fixture
def unused_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@zero_config
def test_fakellm_help_and_a_taken_port(tmp_path):
    env = bare_env(tmp_path, DEBUG="1")
    helped = manage(env, "fakellm", "--help")
    assert helped.returncode == 0 and "OPENAI_API_URL" in helped.stdout
    import socket

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = manage(env, "fakellm", "--port", str(holder.getsockname()[1]))
    assert taken.returncode == 1 and "cannot listen" in taken.stderr and "Traceback" not in taken.stderr


@pytest.mark.django_db
def test_api_docs_load_no_external_asset(client):
    page = client.get("/api/docs/")
    assert page.status_code == 200
    assets = re.findall(r"""(?:src|href)=["']([^"']+)["']""", page.text)
    assert assets, page.text[:500]
    assert not [asset for asset in assets if asset.startswith(("http:", "https:", "//"))]
    for asset in assets:
        if asset.startswith("/"):
            assert client.get(asset).status_code == 200, asset
    # and no script is pulled in by URL from inside an inline script either
    assert "cdn." not in page.text and "unpkg" not in page.text and "jsdelivr" not in page.text


@pytest.mark.django_db
def test_upstream_headers_pass_an_allowlist(client, signup, upstream):
    token, _, _ = signup()
    for path in ("/v1/models", "/v1/chat/completions"):
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
        response = (
            client.get(path, headers={"Authorization": f"Bearer {token}"})
            if path.endswith("models")
            else client.post(path, json=body, headers={"Authorization": f"Bearer {token}"})
        )
        assert response.status_code == 200
        assert "x-fake-upstream" not in response.headers  # not on the allowlist (it may carry anything)
        assert response.headers["x-request-id"].startswith("req_")  # on it
        assert "set-cookie" not in response.headers  # a cookie for Turbo's domain is Turbo's to set


def make(*args, timeout=60) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["make", "--no-print-directory", "PYTHON=" + sys.executable, *args],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_make_help_lists_every_target_a_user_runs():
    shown = make("help")
    assert shown.returncode == 0, shown.stderr
    listed = set(re.findall(r"^  make (\S+)", shown.stdout, re.MULTILINE))
    assert {"install", "run", "demo", "serve", "grpcserve", "test", "test-pg", "lint", "bench"} <= listed


@zero_config
def test_make_demo_and_run_with_the_port_taken_say_so_and_stop(tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        with socket.socket() as free:
            free.bind(("127.0.0.1", 0))
            fake_port = str(free.getsockname()[1])
        env_file = str(tmp_path / ".env")
        for target in ("demo", "run"):
            done = make(target, f"ADDRESS={address}", f"FAKE_PORT={fake_port}", f"ENV_FILE={env_file}")
            assert done.returncode != 0
            assert f"{address} is already in use" in done.stderr


def test_a_first_install_says_what_it_is_doing(tmp_path):
    """A fresh `make install` (a minute or so) prints each step and lets the installers show their progress."""
    planned = make("-n", "install", f"VENV={tmp_path / 'venv'}")
    assert planned.returncode == 0, planned.stderr
    steps = planned.stdout
    for step in ("== creating the virtualenv", "== installing the installer", "== installing the requirements"):
        assert step in steps, steps
    assert "pip install --progress-bar on" in steps
    (install,) = [line for line in steps.splitlines() if "uv pip install" in line]
    assert "-q" not in install.split() and "--quiet" not in install  # uv's own progress stays on
