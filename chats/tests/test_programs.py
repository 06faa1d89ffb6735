"""Chat programs (async generators in the turbo-chat style) on chats and from Python, against the fake upstream."""

import asyncio
import json

import pytest
from websockets.sync.client import connect

from accounts.tests.test_admin import admin, browser, post_form  # noqa: F401
from chats.models import Chat, ChatProgram
from chats.tests.test_stream import bearer, receive_until_final, ws_url

pytestmark = pytest.mark.django_db

CHAT_PROGRAMS = [
    f"{name}=chats.tests.programs_for_tests:{name}" for name in ("looper", "redis_looper", "composed", "broken")
]


@pytest.fixture
def programs(settings):
    settings.CHAT_PROGRAMS = CHAT_PROGRAMS


def chat_requests(fake) -> list[dict]:
    return [request.json() for request in fake.requests if request.path == "/v1/chat/completions"]


@pytest.mark.django_db(transaction=True)
def test_horoscope_end_to_end_over_http_with_a_websocket_subscriber(client, turbo_server, signup, upstream):
    token, user, _ = signup()
    created = client.post(
        "/chat/create",
        json={"name": "stars", "program": "horoscope", "program_context": {"user_id": 1}},
        headers=bearer(token),
    )
    assert created.status_code == 200, created.text
    chat = created.json()
    assert chat["program"] == "horoscope"
    # The opening turn ran at once: it asks the question and made no model call.
    read = client.post("/chat/read", data={"id": chat["id"]}, headers=bearer(token)).json()
    (opening,) = read["messages"]
    assert opening["reply"] == "What do you want to know?"
    assert opening["status"] == "complete" and opening["user_id"] is None
    assert chat_requests(upstream) == []

    with connect(ws_url(turbo_server, chat["id"], token)) as ws:
        answered = client.post(
            "/chat/prompt",
            data={"id": chat["id"], "prompt": "echo: love is near", "stream": "true"},
            headers=bearer(token),
        )
        assert answered.status_code == 200, answered.text
        events = receive_until_final(ws)
    assert [e["type"] for e in events][0] == "message.created"
    assert events[-1]["type"] == "message.completed"
    deltas = "".join(e["delta"] for e in events if e["type"] == "message.delta")
    assert deltas == "love is near" == events[-1]["message"]["reply"]
    assert len([e for e in events if e["type"] == "message.delta"]) >= 3  # streamed word by word

    (request,) = chat_requests(upstream)
    assert request["messages"] == [
        {"role": "system", "content": "You are a fortune teller"},
        {"role": "user", "content": "My zodiac sign is pisces"},
        {"role": "user", "content": "echo: love is near"},
    ]
    assert request["temperature"] == 0.9
    assert request["stream"] is True

    state = ChatProgram.objects.get(chat_id=chat["id"])
    assert state.status == "finished"
    again = client.post("/chat/prompt", data={"id": chat["id"], "prompt": "more?"}, headers=bearer(token))
    assert again.status_code == 409 and again.json()["error"]["code"] == "program_finished"


def create_program_chat(client, token, program, context=None, **extra):
    body = {"name": program, "program": program, **extra}
    if context is not None:
        body["program_context"] = context
    response = client.post("/chat/create", json=body, headers=bearer(token))
    assert response.status_code == 200, response.text
    return response.json()


def prompt(client, token, chat, text):
    return client.post("/chat/prompt", data={"id": chat["id"], "prompt": text}, headers=bearer(token))


def messages_of(client, token, chat) -> list[dict]:
    return client.post("/chat/read", data={"id": chat["id"]}, headers=bearer(token)).json()["messages"]


SEED_EXAMPLE = """
from typing import AsyncGenerator, Union

from chats.programs import (
    turbo,
    System,
    User,
    Assistant,
    GetUserInput,
    Generate,
    run,
)

# Get user
async def get_user(id):
    return {"zodiac": "pisces"}

# Set user zodiac mixin
@turbo()
async def set_user_zodiac(context: dict):

    user_id: int = context["user_id"]
    user_data: dict = await get_user(user_id)
    zodiac: str = user_data["zodiac"]

    yield User(content=f"My zodiac sign is {zodiac}")


# Horoscope app
@turbo()
async def horoscope(context: dict):

    yield System(content="You are a fortune teller")

    while response := await run(set_user_zodiac(context)):
        output, done = response
        yield output
        if done:
            break

    # Prompt runner to ask for user input
    input = yield GetUserInput(message="What do you want to know?")

    # Yield the input
    yield User(content=input)

    # Generate (overriding the temperature)
    value = yield Generate(settings={"temperature": 0.9})


# Let's run this
app: AsyncGenerator[Union[Assistant, GetUserInput], str] = horoscope({"user_id": 1})

_input = None
while True:
    result, done = await run(app, _input)

    if isinstance(result, GetUserInput):
        _input = input(result.message)
        continue

    if isinstance(result, Assistant):
        print(result.content)

    if done:
        break
"""


def test_the_seed_example_runs_from_python_with_only_its_import_changed(upstream):
    asked, printed = [], []
    namespace = {"input": lambda message: asked.append(message) or "echo: the stars say yes", "print": printed.append}
    # The example's top-level `await` runs in a coroutine of its own.
    body = "\n".join("    " + line for line in SEED_EXAMPLE.splitlines())
    exec(f"async def main():\n{body}\n", namespace)
    asyncio.run(namespace["main"]())

    assert asked == ["What do you want to know?"]
    assert printed == ["the stars say yes"]
    (request,) = chat_requests(upstream)
    assert request["messages"] == [
        {"role": "system", "content": "You are a fortune teller"},
        {"role": "user", "content": "My zodiac sign is pisces"},
        {"role": "user", "content": "echo: the stars say yes"},
    ]
    assert request["temperature"] == 0.9


@pytest.mark.django_db(transaction=True)
def test_composition_sub_programs_keep_their_own_memory_and_settings(client, signup, upstream, programs):
    token, _, _ = signup()
    chat = create_program_chat(client, token, "composed", {"topic": "tides"})
    (opening,) = messages_of(client, token, chat)
    assert opening["reply"] == "Notes: notes on tides\n\nYour question?"
    (sub_call,) = chat_requests(upstream)
    assert sub_call["messages"] == [{"role": "user", "content": "echo: notes on tides"}]
    assert sub_call["temperature"] == 0.2

    answered = prompt(client, token, chat, "echo: why twice a day?")
    assert answered.status_code == 200, answered.text
    assert answered.json()["message"]["reply"] == "why twice a day?"
    parent_call = chat_requests(upstream)[-1]
    assert parent_call["messages"] == [
        {"role": "system", "content": "You help with tides."},
        {"role": "assistant", "content": "Notes: notes on tides"},
        {"role": "user", "content": "echo: why twice a day?"},
    ]
    assert parent_call["max_tokens"] == 50 and "temperature" not in parent_call
    assert ChatProgram.objects.get(chat_id=chat["id"]).status == "finished"


@pytest.mark.django_db(transaction=True)
def test_a_program_without_turbo_runs_as_if_decorated(client, signup, upstream, programs, settings):
    settings.CHAT_PROGRAMS = [*CHAT_PROGRAMS, "hello=chats.tests.programs_for_tests:undecorated"]
    token, _, _ = signup()
    chat = create_program_chat(client, token, "hello")
    assert prompt(client, token, chat, "Ada").json()["message"]["reply"] == "Hello, Ada!"
    assert chat_requests(upstream) == []


@pytest.mark.django_db(transaction=True)
def test_a_failing_program_fails_its_turn_and_the_chat_stays_usable(
    client, turbo_server, signup, upstream, programs, caplog
):
    token, _, _ = signup()
    chat = create_program_chat(client, token, "broken")
    with connect(ws_url(turbo_server, chat["id"], token)) as ws:
        failed = prompt(client, token, chat, "boom")
        events = receive_until_final(ws)
    assert failed.status_code == 502
    error = failed.json()["error"]
    assert error["code"] == "program_failed"
    assert "'broken'" in error["message"] and "the program broke on purpose" in error["message"]
    assert events[-1]["type"] == "message.failed"
    assert events[-1]["message"]["status"] == "error" and "'broken'" in events[-1]["message"]["error"]
    assert "chat program 'broken' failed" in caplog.text

    odd = prompt(client, token, chat, "odd")
    assert odd.status_code == 502 and "yielded int" in odd.json()["error"]["message"]

    fine = prompt(client, token, chat, "echo: still here")
    assert fine.status_code == 200, fine.text
    assert fine.json()["message"]["reply"] == "still here\n\nGo on"
    # The failed turns left nothing behind: the model saw only the turn that worked.
    (request,) = chat_requests(upstream)
    assert request["messages"] == [{"role": "user", "content": "echo: still here"}]
    state = ChatProgram.objects.get(chat_id=chat["id"])
    assert state.steps == [{"input": "echo: still here"}, {"generate": "still here"}]
    assert [m["status"] for m in messages_of(client, token, chat)] == ["complete", "error", "error", "complete"]


@pytest.mark.django_db(transaction=True)
def test_a_second_prompt_while_the_program_answers_is_refused(client, signup, upstream, programs):
    token, _, _ = signup()
    chat = create_program_chat(client, token, "looper")
    first = client.post(
        "/chat/prompt",
        data={"id": chat["id"], "prompt": "[scenario:gated] echo: slow", "stream": "true"},
        headers=bearer(token),
    )
    assert first.status_code == 200
    busy = prompt(client, token, chat, "echo: me too")
    assert busy.status_code == 409 and busy.json()["error"]["code"] == "program_busy"
    upstream.release()
    wait_until(lambda: ChatProgram.objects.get(chat_id=chat["id"]).status == "waiting")
    assert prompt(client, token, chat, "echo: now").status_code == 200
    assert len(chat_requests(upstream)) == 2


def wait_until(predicate, timeout: float = 15) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ({"program": "nope"}, "no program named 'nope'"),
        ({"program": "horoscope", "program_context": [1]}, "program_context: must be a JSON object"),
        ({"program": "horoscope", "program_context": {"x": "y" * 20_000}}, "at most 16384 bytes"),
        ({"settings": {"temperature": 5}}, "temperature"),
        ({"settings": {"temperature": "hot"}}, "temperature"),
        ({"settings": {"logit_bias": {}}}, "unknown setting(s): logit_bias"),
        ({"settings": {"stop": ["a", "b", "c", "d", "e"]}}, "at most 4"),
        ({"settings": "not json"}, "must be a JSON object"),
    ],
)
def test_bad_programs_and_settings_are_refused_and_store_nothing(client, signup, body, problem):
    token, _, _ = signup()
    response = client.post("/chat/create", json={"name": "x", **body}, headers=bearer(token))
    assert response.status_code == 400, response.text
    assert problem in response.json()["error"]["message"]
    assert not Chat.objects.exists()


def test_chat_settings_go_with_every_prompt_and_max_tokens_has_a_default(client, signup, upstream, settings):
    settings.DEFAULT_MAX_TOKENS = 321
    token, _, _ = signup()
    chat = client.post(
        "/chat/create",
        data={"name": "tuned", "settings": json.dumps({"temperature": 0.3, "stop": ["END"], "seed": 7})},
        headers=bearer(token),
    ).json()
    assert chat["settings"] == {"temperature": 0.3, "stop": ["END"], "seed": 7}
    assert prompt(client, token, chat, "echo: one").status_code == 200
    request = chat_requests(upstream)[-1]
    assert (request["temperature"], request["stop"], request["seed"], request["max_tokens"]) == (0.3, ["END"], 7, 321)

    updated = client.post(
        "/chat/update", json={"id": chat["id"], "settings": {"max_tokens": 20, "top_p": 0.5}}, headers=bearer(token)
    )
    assert updated.status_code == 200 and updated.json()["settings"] == {"max_tokens": 20, "top_p": 0.5}
    assert prompt(client, token, chat, "echo: two").status_code == 200
    request = chat_requests(upstream)[-1]
    assert request["max_tokens"] == 20 and request["top_p"] == 0.5 and "temperature" not in request

    bad = client.post("/chat/update", json={"id": chat["id"], "settings": {"top_p": 2}}, headers=bearer(token))
    assert bad.status_code == 400
    assert client.post("/chat/read", data={"id": chat["id"]}, headers=bearer(token)).json()["chat"]["settings"] == {
        "max_tokens": 20,
        "top_p": 0.5,
    }


@pytest.mark.django_db(transaction=True)
def test_the_admin_edits_settings_with_validation_and_shows_program_state(admin, client, signup, upstream):  # noqa: F811
    token, _, _ = signup()
    chat = create_program_chat(client, token, "horoscope", {"user_id": 1})
    page = f"/admin/chats/chat/{chat['id']}/change/"
    form = {"name": "renamed", "model": "gpt-4o-mini", "system_prompt": "", "settings": '{"temperature": 7}'}
    form.update({"memberships-TOTAL_FORMS": "0", "memberships-INITIAL_FORMS": "0"})
    refused = post_form(admin, page, form)
    assert refused.status_code == 200 and "temperature" in refused.text
    assert Chat.objects.get(pk=chat["id"]).name == "horoscope"  # nothing saved

    saved = post_form(admin, page, {**form, "settings": '{"temperature": 0.5}'})
    assert saved.status_code == 302, saved.text[:2000]
    stored = Chat.objects.get(pk=chat["id"])
    assert (stored.name, stored.settings) == ("renamed", {"temperature": 0.5})

    listing = admin.get("/admin/chats/chatprogram/")
    assert listing.status_code == 200 and "What do you want to know?" in listing.text
    state = admin.get(f"/admin/chats/chatprogram/{chat['id']}/change/")
    assert state.status_code == 200 and "horoscope" in state.text and 'name="_save"' not in state.text


def test_the_library_from_python_memory_argument_quiet_generate_and_errors(upstream):
    from chats.programs import (
        BaseMemory,
        Generate,
        GeneratorAlreadyExhaustedError,
        GetUserInput,
        ProgramError,
        System,
        User,
        run,
        turbo,
    )

    class Recorder(BaseMemory):
        def __init__(self):
            self.items = []

        async def append(self, item):
            self.items.append(item)

        async def clear(self):
            self.items = []

        async def get(self):
            return list(self.items)

    @turbo(memory=Recorder, model="gpt-4o-mini", seed=3)
    async def quiet(context, memory):
        yield System(content="Be brief.")
        yield User(content="echo: thinking")
        thought = yield Generate(forward=False)  # into memory only
        remembered = await memory.get()
        yield User(content=f"echo: {thought.content} ({len(remembered)} in memory)")
        yield Generate(settings={"seed": 4})

    async def scenario():
        app = quiet({})
        output, done = await run(app)
        assert done and output.content == "thinking (3 in memory)"
        with pytest.raises(GeneratorAlreadyExhaustedError):
            await run(app)

        @turbo()
        async def bad_settings(context):
            yield Generate(settings={"temperature": "hot"})

        with pytest.raises(ProgramError, match="Generate settings: temperature"):
            await run(bad_settings({}))

        @turbo()
        async def asks(context):
            yield GetUserInput(message="?")

        app = asks({})
        assert (await run(app))[0].message == "?"
        with pytest.raises(ProgramError, match="non-empty string"):
            await run(app, "")

    asyncio.run(scenario())
    first, second = chat_requests(upstream)
    assert first["seed"] == 3 and first["model"] == "gpt-4o-mini"
    assert second["seed"] == 4
    assert [m["content"] for m in second["messages"]] == [
        "Be brief.",
        "echo: thinking",
        "thinking",
        "echo: thinking (3 in memory)",
    ]


@pytest.mark.django_db(transaction=True)
def test_many_program_chats_at_once_and_racing_prompts_on_one(turbo_server, signup, upstream, programs):
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    token, _, _ = signup()
    with httpx.Client(base_url=turbo_server.url, timeout=60) as http:
        chats = [create_program_chat(http, token, "looper") for _ in range(8)]

    def converse(index: int) -> list[str]:
        with httpx.Client(base_url=turbo_server.url, timeout=60) as http:
            replies = []
            for turn in range(3):
                answered = prompt(http, token, chats[index], f"echo: chat {index} turn {turn}")
                assert answered.status_code == 200, answered.text
                replies.append(answered.json()["message"]["reply"])
            return replies

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(converse, range(8)))
    for index, replies in enumerate(results):
        assert replies == [f"chat {index} turn {turn}\n\nSay something" for turn in range(3)]
        state = ChatProgram.objects.get(chat_id=chats[index]["id"])
        assert [step.get("generate") for step in state.steps[1::2]] == [f"chat {index} turn {t}" for t in range(3)]
    # Each call carried its own chat's conversation only.
    for request in chat_requests(upstream):
        asked = request["messages"][-1]["content"]
        index = int(asked.split()[2])
        assert all(f"chat {index} " in m["content"] for m in request["messages"][1:])

    # Prompts racing on one chat: one turn at a time (held open by the gated upstream), the rest are refused.
    chat = chats[0]

    def race(turn: int) -> int:
        with httpx.Client(base_url=turbo_server.url, timeout=60) as http:
            body = {"id": chat["id"], "prompt": f"[scenario:gated] echo: race {turn}", "stream": "true"}
            response = http.post("/chat/prompt", data=body, headers=bearer(token))
            assert response.status_code in (200, 409), response.text
            return response.status_code

    with ThreadPoolExecutor(6) as pool:
        statuses = list(pool.map(race, range(6)))
    assert sorted(statuses) == [200, 409, 409, 409, 409, 409]
    upstream.release()
    wait_until(lambda: ChatProgram.objects.get(chat_id=chat["id"]).status == "waiting")
    assert len(ChatProgram.objects.get(chat_id=chat["id"]).steps) == 6 + 2
