"""The /chat/* endpoints over real HTTP against a real fake upstream: CRUD, access, prompting, context."""

import json
from functools import partial

import pytest

from chats.models import Chat, ChatMember, Message

pytestmark = pytest.mark.django_db


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def alice(signup):
    token, user, _ = signup()
    return token, user


def create_chat(client, token, **fields) -> dict:
    response = client.post("/chat/create", data={"name": "foobar", "model": "gpt-4", **fields}, headers=bearer(token))
    assert response.status_code == 200, response.text
    return response.json()


def prompt(client, token, chat_id, text, **fields):
    return client.post("/chat/prompt", data={"id": chat_id, "prompt": text, **fields}, headers=bearer(token))


def sent_messages(upstream) -> list[dict]:
    chats = [r for r in upstream.requests if r.path == "/v1/chat/completions"]
    return json.loads(chats[-1].body)["messages"]


def test_seed_walkthrough_create_add_prompt_read(client, alice, signup, upstream):
    token, user = alice
    chat = create_chat(client, token)
    assert chat["model"] == "gpt-4" and chat["owner_id"] == user["id"] and chat["group_id"] is None
    bob_token, bob, _ = signup()
    added = client.post("/chat/user/add", data={"chat_id": chat["id"], "user_id": bob["id"]}, headers=bearer(token))
    assert added.status_code == 200 and added.json() == {}

    response = prompt(client, token, chat["id"], "echo: tell me about spain")
    assert response.status_code == 200, response.text
    message = response.json()["message"]
    assert message["reply"] == "tell me about spain"
    assert message["status"] == "complete" and message["otr"] is False
    assert message["user_id"] == user["id"] and message["chat_id"] == chat["id"]
    assert message["total_tokens"] > 0

    # the older form key chat_id and the JSON key id both read
    for read in (
        client.post("/chat/read", data={"chat_id": chat["id"]}, headers=bearer(bob_token)),
        client.get("/chat/read", params={"id": chat["id"]}, headers=bearer(bob_token)),
    ):
        assert read.status_code == 200
        body = read.json()
        assert [m["prompt"] for m in body["messages"]] == ["echo: tell me about spain"]
        assert {u["id"] for u in body["users"]} == {user["id"], bob["id"]}
    index = client.get("/chat/index", headers=bearer(bob_token)).json()["chats"]
    assert [c["id"] for c in index] == [chat["id"]]


def test_read_lists_everyone_who_can_see_a_group_chat_and_how(client, alice, signup):
    token, owner = alice
    member_token, member, _ = signup()
    in_group_token, in_group, _ = signup()
    outsider_token, _, _ = signup()
    group = client.post("/group/create", data={"name": "team"}, headers=bearer(token)).json()
    added = client.post(
        "/group/members/add", data={"id": group["id"], "user_ids": in_group["id"]}, headers=bearer(token)
    )
    assert added.status_code == 200, added.text
    chat = create_chat(client, token, group_id=group["id"])
    client.post("/chat/user/add", data={"chat_id": chat["id"], "user_id": member["id"]}, headers=bearer(token))

    for reader in (token, member_token, in_group_token):
        users = client.post("/chat/read", data={"id": chat["id"]}, headers=bearer(reader)).json()["users"]
        assert [(u["id"], u["access"]) for u in users] == [
            (owner["id"], "owner"),
            (member["id"], "member"),
            (in_group["id"], "group"),
        ]
        assert set(users[0]) == {"id", "username", "first_name", "last_name", "access"}
    assert client.post("/chat/read", data={"id": chat["id"]}, headers=bearer(outsider_token)).status_code == 404


def test_model_aliases_and_default(client, alice, settings):
    token, _ = alice
    assert create_chat(client, token, model="gpt-3")["model"] == "gpt-3.5-turbo"
    settings.DEFAULT_MODEL = "my-default"
    response = client.post("/chat/create", data={"name": "x"}, headers=bearer(token))
    assert response.json()["model"] == "my-default"


def test_strangers_get_404_everywhere(client, alice, signup, upstream):
    token, _ = alice
    chat = create_chat(client, token)
    stranger, _, _ = signup()
    for path, data in (
        ("/chat/read", {"id": chat["id"]}),
        ("/chat/prompt", {"id": chat["id"], "prompt": "hi"}),
        ("/chat/update", {"id": chat["id"], "name": "mine"}),
        ("/chat/delete", {"id": chat["id"]}),
        ("/chat/user/add", {"chat_id": chat["id"], "user_id": chat["owner_id"]}),
    ):
        assert client.post(path, data=data, headers=bearer(stranger)).status_code == 404, path
    assert client.get("/chat/index", headers=bearer(stranger)).json()["chats"] == []
    assert Message.objects.count() == 0
    assert upstream.requests == []


def test_only_the_owner_renames_deletes_and_manages_users(client, alice, signup):
    token, _ = alice
    chat = create_chat(client, token)
    bob_token, bob, _ = signup()
    _, carol, _ = signup()
    client.post("/chat/user/add", data={"chat_id": chat["id"], "user_id": bob["id"]}, headers=bearer(token))
    assert (
        client.post("/chat/update", data={"id": chat["id"], "name": "x"}, headers=bearer(bob_token)).status_code == 403
    )
    assert client.post("/chat/delete", data={"id": chat["id"]}, headers=bearer(bob_token)).status_code == 403
    add = client.post("/chat/user/add", data={"chat_id": chat["id"], "user_id": carol["id"]}, headers=bearer(bob_token))
    assert add.status_code == 403
    assert Chat.objects.get(pk=chat["id"]).name == "foobar"
    renamed = client.post(
        "/chat/update", json={"id": chat["id"], "name": "renamed", "system_prompt": "Be brief."}, headers=bearer(token)
    ).json()
    assert (renamed["name"], renamed["model"], renamed["system_prompt"]) == ("renamed", "gpt-4", "Be brief.")
    assert client.post("/chat/delete", data={"id": chat["id"]}, headers=bearer(token)).json() == {}
    assert not Chat.objects.filter(pk=chat["id"]).exists()


def test_adding_an_unknown_user_is_404_and_a_member_twice_is_a_noop(client, alice, signup):
    token, _ = alice
    chat = create_chat(client, token)
    _, bob, _ = signup()
    missing = client.post(
        "/chat/user/add",
        data={"chat_id": chat["id"], "user_id": "00000000-0000-4000-8000-000000000000"},
        headers=bearer(token),
    )
    assert missing.status_code == 404
    for _ in range(2):
        client.post("/chat/user/add", data={"chat_id": chat["id"], "user_id": bob["id"]}, headers=bearer(token))
    assert ChatMember.objects.filter(chat_id=chat["id"]).count() == 2


def test_removed_member_loses_all_access_at_once(client, alice, signup, upstream):
    token, _ = alice
    chat = create_chat(client, token)
    bob_token, bob, _ = signup()
    client.post("/chat/user/add", data={"chat_id": chat["id"], "user_id": bob["id"]}, headers=bearer(token))
    assert prompt(client, bob_token, chat["id"], "echo: hi").status_code == 200
    client.post("/chat/user/remove", data={"chat_id": chat["id"], "user_id": bob["id"]}, headers=bearer(token))
    assert client.post("/chat/read", data={"id": chat["id"]}, headers=bearer(bob_token)).status_code == 404
    assert prompt(client, bob_token, chat["id"], "echo: again").status_code == 404
    assert client.get("/chat/stream", params={"id": chat["id"]}, headers=bearer(bob_token)).status_code == 404
    assert client.get("/chat/index", headers=bearer(bob_token)).json()["chats"] == []


def test_group_chat_is_visible_to_group_members_only_while_they_are_members(client, alice, signup, upstream):
    token, _ = alice
    group = client.post("/group/create", data={"name": "team"}, headers=bearer(token)).json()
    member_token, member, _ = signup()
    outsider_token, _, _ = signup()
    client.post("/group/members/add", data={"id": group["id"], "user_ids": member["id"]}, headers=bearer(token))
    chat = create_chat(client, token, group_id=group["id"])
    assert chat["group_id"] == group["id"]
    assert client.post("/chat/read", data={"id": chat["id"]}, headers=bearer(member_token)).status_code == 200
    assert client.post("/chat/read", data={"id": chat["id"]}, headers=bearer(outsider_token)).status_code == 404
    # an outsider cannot create a chat in the group
    assert (
        client.post(
            "/chat/create", data={"name": "x", "group_id": group["id"]}, headers=bearer(outsider_token)
        ).status_code
        == 404
    )
    client.post(
        "/group/members/remove", data={"id": group["id"], "user_ids": member["id"]}, headers=bearer(member_token)
    )
    assert client.post("/chat/read", data={"id": chat["id"]}, headers=bearer(member_token)).status_code == 404


def test_context_is_system_prompt_then_newest_exchanges_then_prompt(client, alice, upstream):
    token, _ = alice
    chat = create_chat(client, token, system_prompt="You are terse.")
    for word in ("one", "two", "three"):
        prompt(client, token, chat["id"], f"echo: {word}")
    prompt(client, token, chat["id"], "echo: four", context=2)
    messages = sent_messages(upstream)
    assert messages == [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "echo: two"},
        {"role": "assistant", "content": "two"},
        {"role": "user", "content": "echo: three"},
        {"role": "assistant", "content": "three"},
        {"role": "user", "content": "echo: four"},
    ]
    prompt(client, token, chat["id"], "echo: five", context=0)
    assert sent_messages(upstream) == [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "echo: five"},
    ]


def test_context_is_clamped_whatever_the_format(client, alice, upstream, settings):
    settings.MAX_CONTEXT = 3
    token, _ = alice
    chat = create_chat(client, token)
    for n in range(5):
        prompt(client, token, chat["id"], f"echo: {n}")
    client.post("/chat/prompt", json={"id": chat["id"], "prompt": "echo: json", "context": 500}, headers=bearer(token))
    assert len(sent_messages(upstream)) == 3 * 2 + 1
    prompt(client, token, chat["id"], "echo: form", context="-4")
    assert len(sent_messages(upstream)) == 1
    bad = prompt(client, token, chat["id"], "echo: bad", context="lots")
    assert bad.status_code == 400 and bad.json()["error"]["message"].startswith("context")


def test_context_budget_drops_the_oldest_first(client, alice, upstream, settings):
    token, _ = alice
    chat = create_chat(client, token)
    prompt(client, token, chat["id"], "echo: " + "old " * 50)
    prompt(client, token, chat["id"], "echo: new")
    settings.CONTEXT_MAX_CHARS = 100
    prompt(client, token, chat["id"], "echo: last")
    contents = [m["content"] for m in sent_messages(upstream)]
    assert contents == ["echo: new", "new", "echo: last"]


def test_off_the_record_is_stored_shown_but_never_sent(client, alice, upstream):
    token, _ = alice
    chat = create_chat(client, token)
    response = prompt(client, token, chat["id"], "secret plan", otr="true")
    assert response.status_code == 200
    message = response.json()["message"]
    assert (message["otr"], message["reply"], message["status"]) == (True, "", "complete")
    assert upstream.requests == []
    prompt(client, token, chat["id"], "echo: public")
    assert all("secret plan" not in m["content"] for m in sent_messages(upstream))
    read = client.post("/chat/read", data={"id": chat["id"]}, headers=bearer(token)).json()
    assert [m["prompt"] for m in read["messages"]] == ["secret plan", "echo: public"]


def test_upstream_failure_keeps_the_prompt_and_answers_502(client, alice, upstream, settings):
    token, _ = alice
    chat = create_chat(client, token)
    settings.OPENAI_API_URL = "http://127.0.0.1:9/v1"
    response = prompt(client, token, chat["id"], "are you there?")
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "upstream_unreachable"  # the same code as /v1 and every front
    message = Message.objects.get(chat_id=chat["id"])
    assert (message.prompt, message.status) == ("are you there?", "error")
    assert message.error


def test_failed_messages_are_not_context(client, alice, upstream, settings):
    token, _ = alice
    chat = create_chat(client, token)
    settings.OPENAI_API_URL = "http://127.0.0.1:9/v1"
    prompt(client, token, chat["id"], "lost")
    settings.OPENAI_API_URL = upstream.url + "/v1"
    prompt(client, token, chat["id"], "echo: found")
    assert [m["content"] for m in sent_messages(upstream)] == ["echo: found"]


def test_deleting_a_message_drops_it_from_the_cached_context(client, alice, upstream):
    from chats.services import message_delete

    token, _ = alice
    chat = create_chat(client, token)
    first = prompt(client, token, chat["id"], "echo: forget me").json()["message"]
    prompt(client, token, chat["id"], "echo: keep me")
    message_delete(message_id=first["id"])
    prompt(client, token, chat["id"], "echo: now")
    contents = [m["content"] for m in sent_messages(upstream)]
    assert "echo: forget me" not in contents and "echo: keep me" in contents


def test_read_pages_with_limit_and_before(client, alice, upstream):
    token, _ = alice
    chat = create_chat(client, token)
    ids = [prompt(client, token, chat["id"], f"n{n}", otr="true").json()["message"]["id"] for n in range(5)]
    page = client.get("/chat/read", params={"id": chat["id"], "limit": 2}, headers=bearer(token)).json()["messages"]
    assert [m["id"] for m in page] == ids[3:]
    older = client.get(
        "/chat/read", params={"id": chat["id"], "limit": 2, "before": ids[3]}, headers=bearer(token)
    ).json()["messages"]
    assert [m["id"] for m in older] == ids[1:3]


@pytest.mark.parametrize(
    "data, field",
    [
        ({"prompt": "hi"}, "id"),
        ({"id": "nope", "prompt": "hi"}, "id"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": "   "}, "prompt"),
        ({"prompt": "hi", "stream": "perhaps"}, "stream"),
    ],
)
def test_prompt_bad_input_is_400(client, alice, upstream, data, field):
    token, _ = alice
    chat = create_chat(client, token)
    data = {"id": chat["id"], **data} if "id" not in data and field != "id" else data
    response = client.post("/chat/prompt", data=data, headers=bearer(token))
    assert response.status_code == 400, response.text
    assert response.json()["error"]["message"].startswith(field)
    assert Message.objects.count() == 0


def test_prompt_needs_post_and_a_token(client, alice):
    token, _ = alice
    chat = create_chat(client, token)
    assert (
        client.get("/chat/prompt", params={"id": chat["id"], "prompt": "x"}, headers=bearer(token)).status_code == 405
    )
    assert client.post("/chat/prompt", data={"id": chat["id"], "prompt": "x"}).status_code == 401


def test_prompt_too_long_is_400(client, alice, settings):
    settings.MAX_PROMPT_CHARS = 10
    token, _ = alice
    chat = create_chat(client, token)
    response = prompt(client, token, chat["id"], "x" * 11)
    assert response.status_code == 400


def test_query_counts_do_not_grow_with_history(client, alice, upstream):
    """The prompt and read paths cost the same number of queries at 3 and at 60 messages."""
    from django.core.cache import cache
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    token, _ = alice
    chat = create_chat(client, token)

    def count(action) -> int:
        cache.clear()  # measure the cold path: the context is rebuilt from the database
        with CaptureQueriesContext(connection) as captured:
            action()
        return len(captured.captured_queries)

    # Count them on the test's own connection by driving the same selectors and services the views use
    # (run_in_process: as an in-process request runs them, the connection kept through the transaction).
    from accounts.models import User
    from chats import generation, selectors
    from testing.inprocess import run_in_process

    user = User.objects.get(pk=chat["owner_id"])
    chat_row = Chat.objects.get(pk=chat["id"])

    def read():
        selectors.chat_messages(chat=chat_row, limit=100)
        selectors.chat_users(chat=chat_row)

    def send():
        fields = {"prompt": "echo: x", "context_size": 10, "stream": False, "otr": False}
        run_in_process(partial(generation.message_prompt, chat=chat_row, user=user, **fields))

    for _ in range(3):
        send()
    small = (count(read), count(send))
    Message.objects.bulk_create([Message(chat=chat_row, author=user, prompt=f"p{n}", reply=f"r{n}") for n in range(57)])
    large = (count(read), count(send))
    assert large == small


@pytest.mark.parametrize("path", ["/chat/prompt", "/chat/stop", "/chat/stream", "/api/chat/1"])
def test_a_multipart_body_without_a_boundary_is_a_400(client, signup, path):
    """Found by schemathesis: the async chat views answered 500 to multipart/form-data with no boundary."""
    token, _, _ = signup()
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "multipart/form-data"}
    response = client.post(path, content=b'{"id": "x"}', headers=headers)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "malformed_body"
