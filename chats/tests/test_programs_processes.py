"""A chat program resumed by another server process after the first one stopped, and `manage.py programs`
(through manage.py's entry point, in this process)."""

import signal

import httpx
import pytest
import redis
from django.conf import settings

from chats.models import ChatProgram
from chats.tests.test_programs import CHAT_PROGRAMS, chat_requests, wait_until
from testing.commands import manage

pytestmark = pytest.mark.django_db(transaction=True)


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


@pytest.mark.parametrize("program", ["looper", "redis_looper"])
def test_a_second_process_resumes_a_looping_program_with_one_new_upstream_call(start_server, upstream, program):  # noqa: F811
    if program == "redis_looper" and not settings.REDIS_ADDRESS:
        pytest.skip("RedisMemory needs REDIS_ADDRESS")
    env = {"CHAT_PROGRAMS": ",".join(CHAT_PROGRAMS), "REDIS_ADDRESS": settings.REDIS_ADDRESS or None}
    first = start_server(**env)
    with httpx.Client(base_url=first.url, timeout=30) as one:
        token = one.post("/user/signup", data={"username": f"prog-{program}", "password": "correct-horse"}).json()[
            "token"
        ]
        chat = one.post("/chat/create", json={"name": "loop", "program": program}, headers=bearer(token)).json()
        turn = one.post("/chat/prompt", data={"id": chat["id"], "prompt": "echo: first turn"}, headers=bearer(token))
        assert turn.status_code == 200, turn.text
        assert turn.json()["message"]["reply"] == "first turn\n\nSay something"
    first.stop()
    assert len(chat_requests(upstream)) == 1

    second = start_server(**env)
    with httpx.Client(base_url=second.url, timeout=30) as two:
        turn = two.post("/chat/prompt", data={"id": chat["id"], "prompt": "echo: second turn"}, headers=bearer(token))
        assert turn.status_code == 200, turn.text
        assert turn.json()["message"]["reply"] == "second turn\n\nSay something"
        history = two.post("/chat/read", data={"id": chat["id"]}, headers=bearer(token)).json()["messages"]
    # Exactly one new call, holding both turns: the first reply was replayed, not asked again.
    first_call, second_call = chat_requests(upstream)
    assert second_call["messages"] == [
        {"role": "system", "content": "You repeat after the user."},
        {"role": "user", "content": "echo: first turn"},
        {"role": "assistant", "content": "first turn"},
        {"role": "user", "content": "echo: second turn"},
    ]
    assert [m["reply"] for m in history] == [
        "Say something",
        "first turn\n\nSay something",
        "second turn\n\nSay something",
    ]
    state = ChatProgram.objects.get(chat_id=chat["id"])
    assert state.status == "waiting" and state.asking == "Say something"
    assert state.steps == [
        {"input": "echo: first turn"},
        {"generate": "first turn"},
        {"input": "echo: second turn"},
        {"generate": "second turn"},
    ]
    if program == "redis_looper":
        stored = redis.Redis.from_url(settings.REDIS_ADDRESS).get(f"turbo:program-memory:{chat['id']}")
        assert b'"steps": 4' in stored and b"second turn" in stored
        assert state.memory == []  # kept in Redis, not in the database
    else:
        assert state.memory_steps == 4 and state.memory[-1] == {"role": "assistant", "content": "second turn"}


@pytest.fixture
def programs_command(upstream, settings):
    """`manage.py programs ...` through manage.py's entry point in this process, against the fake upstream."""
    settings.CHAT_PROGRAMS = CHAT_PROGRAMS

    def run(*args: str, stdin: str = ""):
        return manage("programs", *args, stdin=stdin)

    return run


def test_programs_run_is_driven_through_stdin(programs_command, upstream):
    done = programs_command("run", "looper", stdin="echo: hello there\n\necho: and again\n")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "Say something\n> hello there\nSay something\n> > and again\nSay something\n> \n"
    first, second = chat_requests(upstream)
    assert second["messages"][1:] == [
        {"role": "user", "content": "echo: hello there"},
        {"role": "assistant", "content": "hello there"},
        {"role": "user", "content": "echo: and again"},
    ]
    assert second["stream"] is True

    horoscope = programs_command("run", "horoscope", "--context", '{"user_id": 1}', stdin="echo: yes\n")
    assert horoscope.returncode == 0, horoscope.stderr
    assert horoscope.stdout.startswith("What do you want to know?\n> yes\n")
    assert chat_requests(upstream)[-1]["temperature"] == 0.9


def test_programs_list_and_bad_arguments(programs_command):
    listed = programs_command("list")
    assert listed.returncode == 0, listed.stderr
    names = [line.split()[0] for line in listed.stdout.splitlines()[1:]]
    assert names == sorted(["horoscope", "tutor", "looper", "redis_looper", "composed", "broken"])

    unknown = programs_command("run", "nope")
    assert unknown.returncode == 1 and "no program named 'nope'" in unknown.stderr
    assert "Traceback" not in unknown.stderr
    bad_context = programs_command("run", "looper", "--context", "[1]")
    assert bad_context.returncode == 1 and "--context must be a JSON object" in bad_context.stderr
    failing = programs_command("run", "broken", stdin="boom\n")
    assert failing.returncode == 1 and "the program broke on purpose" in failing.stderr
    assert "Traceback" not in failing.stderr


def test_sigterm_mid_turn_saves_it_as_interrupted_and_the_next_process_resumes(start_server, upstream):  # noqa: F811
    env = {"CHAT_PROGRAMS": ",".join(CHAT_PROGRAMS), "REDIS_ADDRESS": settings.REDIS_ADDRESS or None}
    first = start_server(SHUTDOWN_GRACE_SECONDS=1, **env)
    with httpx.Client(base_url=first.url, timeout=30) as one:
        token = one.post("/user/signup", data={"username": "prog-term", "password": "correct-horse"}).json()["token"]
        chat = one.post("/chat/create", json={"name": "loop", "program": "looper"}, headers=bearer(token)).json()
        one.post("/chat/prompt", data={"id": chat["id"], "prompt": "echo: kept"}, headers=bearer(token))
        body = {"id": chat["id"], "prompt": "[scenario:stall] echo: never finished", "stream": "true"}
        assert one.post("/chat/prompt", data=body, headers=bearer(token)).status_code == 200
    wait_until(lambda: len(chat_requests(upstream)) == 2)
    first.process.send_signal(signal.SIGTERM)
    first.process.wait(timeout=30)
    first.stop()

    state = ChatProgram.objects.get(chat_id=chat["id"])
    assert state.status == "waiting" and state.lease_until is None  # the interrupted turn let go of the chat
    assert state.steps == [{"input": "echo: kept"}, {"generate": "kept"}]

    second = start_server(**env)
    with httpx.Client(base_url=second.url, timeout=30) as two:
        turn = two.post("/chat/prompt", data={"id": chat["id"], "prompt": "echo: again"}, headers=bearer(token))
        assert turn.status_code == 200, turn.text
        history = two.post("/chat/read", data={"id": chat["id"]}, headers=bearer(token)).json()["messages"]
    assert [(m["status"], m["error"][:11]) for m in history] == [
        ("complete", ""),
        ("complete", ""),
        ("error", "interrupted"),
        ("complete", ""),
    ]
    assert chat_requests(upstream)[-1]["messages"][1:] == [
        {"role": "user", "content": "echo: kept"},
        {"role": "assistant", "content": "kept"},
        {"role": "user", "content": "echo: again"},
    ]
