"""Groups limited to some public models, over HTTP and WebSocket (Turbo's whole ASGI app, in process) against
the fake upstream: /v1, /v1/models, /ws, chats and conversations refuse other models with 403
`model_not_allowed`, and a change in the admin or in a group's members applies to the very next request
(sessions stay cached)."""

import asyncio
import json
import textwrap

import httpx
import pytest
from asgiref.sync import async_to_sync, sync_to_async
from channels.testing import WebsocketCommunicator

from accounts.models import User
from accounts.tests.test_admin import ADMIN_PASSWORD, log_in, post_form
from chats.models import Chat, Message
from chats.stream import chat_stream_key
from conftest import unique_name
from groups.models import Group
from groups.selectors import models_allowed
from groups.services import group_allowed_models_set, group_create, group_members_add
from turbo_site.core import streams
from turbo_site.core.errors import Invalid
from turbo_site.core.loops import loop_clients_close

pytestmark = pytest.mark.django_db

ALLOWED, OTHER = "gpt-4o-mini", "gpt-4o"


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def member(signup):
    """A user (token, id) and the personal group signup made them."""
    token, user, _ = signup()
    return token, user["id"], Group.objects.get(owner_id=user["id"])


def someone(signup) -> tuple[str, str]:
    """A new user's token and id."""
    token, user, _ = signup()
    return token, user["id"]


def limit(group: Group, *names: str) -> None:
    """Set a group's list the way the admin does."""
    group_allowed_models_set(group=Group.objects.get(pk=group.pk), allowed_models=list(names))


def group_of(owner_id, *member_ids, models=()) -> Group:
    owner = User.objects.get(pk=owner_id)
    group = group_create(owner=owner, name=unique_name("group"))
    group_members_add(group=group, user=owner, user_ids=[User.objects.get(pk=i).pk for i in member_ids])
    limit(group, *models)
    return group


def ask(client, token, model, **headers) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "echo: hi"}]}
    return client.post("/v1/chat/completions", json=body, headers={**bearer(token), **headers})


def assert_refused(response: httpx.Response, model: str) -> None:
    assert response.status_code == 403, response.text
    assert response.json() == {
        "error": {
            "message": f"your groups may not use the model {model!r}",
            "type": "invalid_request_error",
            "code": "model_not_allowed",
        }
    }


def assert_refused_here(response: httpx.Response) -> None:
    """Turbo's own error shape (chats, conversations)."""
    assert response.status_code == 403, response.text
    assert response.json()["error"]["code"] == "model_not_allowed"


def published(chat_id) -> list[str]:
    """The types of the events kept on a chat's stream."""

    async def main():
        try:
            entries, _ = await streams.replay(chat_stream_key(chat_id), 0)
            return [entry.type for entry in entries]
        finally:
            await loop_clients_close()

    return asyncio.run(main())


# --- the rule ---------------------------------------------------------------------------------------


def test_models_allowed_is_the_intersection_of_limited_groups_in_one_query(member, signup, django_assert_num_queries):
    _, user_id, personal = member
    _, owner_id = someone(signup)
    assert models_allowed(user_id=user_id) is None  # no group of theirs is limited
    group_of(owner_id, user_id, models=["a", "b", "c"])
    group_of(owner_id, user_id, models=["b", "c", "d"])
    group_of(owner_id, user_id)  # empty: does not limit
    with django_assert_num_queries(1):
        assert models_allowed(user_id=user_id) == frozenset({"b", "c"})
    limit(personal, "a", "d")
    assert models_allowed(user_id=user_id) == frozenset()  # nothing in common: no model at all


def test_the_service_cleans_and_validates_a_list(member):
    _, _, group = member
    limit(group, " a ", "b", "a", "")
    group.refresh_from_db()
    assert group.allowed_models == ["a", "b"]
    for bad in (["x" * 101], [f"m{n}" for n in range(201)], "a,b", [1]):
        with pytest.raises(Invalid):
            group_allowed_models_set(group=group, allowed_models=bad)
    group.refresh_from_db()
    assert group.allowed_models == ["a", "b"]


# --- /v1 ----------------------------------------------------------------------------------------------


def test_a_limited_member_is_refused_other_models_on_v1_and_the_upstream_hears_nothing(client, member, upstream):
    token, _, group = member
    limit(group, ALLOWED)
    assert_refused(ask(client, token, OTHER), OTHER)
    # the same through Django (a browser's call, with an Origin), not the fast path
    assert_refused(ask(client, token, OTHER, Origin=str(client.base_url).rstrip("/")), OTHER)
    assert upstream.requests == []
    allowed = ask(client, token, ALLOWED)
    assert allowed.status_code == 200, allowed.text
    assert allowed.json()["choices"][0]["message"]["content"] == "hi"


def test_v1_models_lists_only_the_allowed_names(client, member, signup, upstream, settings, tmp_path):
    path = tmp_path / "turbo.yaml"
    path.write_text(
        textwrap.dedent(f"""
        upstreams:
          - {{name: fake, base_url: {upstream.url}/v1}}
        models:
          - {{name: small, deployments: [{{upstream: fake, model: gpt-4o-mini}}]}}
          - {{name: large, deployments: [{{upstream: fake, model: gpt-4o}}]}}
          - {{name: huge, deployments: [{{upstream: fake, model: gpt-4.1}}]}}
        """)
    )
    settings.TURBO_CONFIG = str(path)
    token, _, group = member
    free_token, _, _ = signup()
    limit(group, "small", "huge", "not-configured")

    listed = client.get("/v1/models", headers=bearer(token))
    assert listed.status_code == 200, listed.text
    assert [entry["id"] for entry in listed.json()["data"]] == ["small", "huge"]
    assert client.get("/v1/models/huge", headers=bearer(token)).json()["id"] == "huge"
    assert client.get("/v1/models/large", headers=bearer(token)).status_code == 404
    everything = client.get("/v1/models", headers=bearer(free_token)).json()["data"]
    assert [entry["id"] for entry in everything] == ["small", "large", "huge"]

    assert_refused(ask(client, token, "large"), "large")
    assert ask(client, token, "small").status_code == 200
    assert [json.loads(r.body)["model"] for r in upstream.requests] == ["gpt-4o-mini"]


def test_a_user_in_two_limited_groups_may_use_what_both_list(client, member, signup, upstream):
    token, user_id, _ = member
    _, owner_id = someone(signup)
    group_of(owner_id, user_id, models=[ALLOWED, OTHER])
    group_of(owner_id, user_id, models=[ALLOWED, "gpt-4.1"])
    assert ask(client, token, ALLOWED).status_code == 200
    for model in (OTHER, "gpt-4.1"):
        assert_refused(ask(client, token, model), model)


# --- changes apply at once ------------------------------------------------------------------------------


@pytest.fixture
def admin(new_client):
    """A browser logged into the admin as a fresh superuser."""
    username = unique_name("admin")
    User.objects.create_superuser(username=username, password=ADMIN_PASSWORD)
    browser = new_client()
    assert log_in(browser, username, ADMIN_PASSWORD).status_code == 302
    return browser


def change_group(admin, group: Group, allowed_models: str, **inline) -> httpx.Response:
    """Post the admin's change form of a group, as a browser would (no existing inline row sent)."""
    data = {
        "name": group.name,
        "description": group.description,
        "allowed_models": allowed_models,
        "memberships-TOTAL_FORMS": "0",
        "memberships-INITIAL_FORMS": "0",
        "memberships-MIN_NUM_FORMS": "0",
        "memberships-MAX_NUM_FORMS": "1000",
        **inline,
    }
    return post_form(admin, f"/admin/groups/group/{group.pk}/change/", data)


def test_a_change_in_the_admin_applies_to_the_next_request(client, member, upstream, admin):
    token, _, group = member
    assert ask(client, token, OTHER).status_code == 200  # the session is now cached, with no limit

    page = admin.get(f"/admin/groups/group/{group.pk}/change/")
    assert page.status_code == 200 and 'name="allowed_models"' in page.text
    assert change_group(admin, group, f" {ALLOWED} , {ALLOWED},gpt-4.1 ").status_code == 302
    group.refresh_from_db()
    assert group.allowed_models == [ALLOWED, "gpt-4.1"]
    assert f'value="{ALLOWED}, gpt-4.1"' in admin.get(f"/admin/groups/group/{group.pk}/change/").text
    assert_refused(ask(client, token, OTHER), OTHER)
    assert ask(client, token, ALLOWED).status_code == 200

    assert change_group(admin, group, "").status_code == 302  # empty again: any model
    assert ask(client, token, OTHER).status_code == 200


@pytest.mark.parametrize(
    "text, problem",
    [
        ("x" * 101, "at most 100 characters"),
        (",".join(f"m{n}" for n in range(201)), "at most 200 model names"),
    ],
)
def test_the_admin_refuses_a_bad_list_and_changes_nothing(member, admin, text, problem):
    _, _, group = member
    limit(group, ALLOWED)
    response = change_group(admin, group, text)
    assert response.status_code == 200 and problem in response.text
    group.refresh_from_db()
    assert group.allowed_models == [ALLOWED]


def test_joining_and_leaving_a_limited_group_applies_to_the_next_request(client, member, signup, upstream):
    token, user_id, _ = member
    owner_token, owner_id = someone(signup)
    group = group_of(owner_id, models=[ALLOWED])
    assert ask(client, token, OTHER).status_code == 200  # cached: no limit

    added = client.post(
        "/group/members/add", json={"id": str(group.pk), "user_ids": [user_id]}, headers=bearer(owner_token)
    )
    assert added.status_code == 200, added.text
    assert_refused(ask(client, token, OTHER), OTHER)

    removed = client.post(
        "/group/members/remove", json={"id": str(group.pk), "user_ids": [user_id]}, headers=bearer(owner_token)
    )
    assert removed.status_code == 200, removed.text
    assert ask(client, token, OTHER).status_code == 200

    group_members_add(group=group, user=User.objects.get(pk=owner_id), user_ids=[User.objects.get(pk=user_id).pk])
    assert_refused(ask(client, token, OTHER), OTHER)
    deleted = client.post("/group/delete", json={"id": str(group.pk)}, headers=bearer(owner_token))
    assert deleted.status_code == 200, deleted.text
    assert ask(client, token, OTHER).status_code == 200


def test_members_added_in_the_admin_get_the_limit_at_once(client, member, signup, upstream, admin):
    token, user_id, _ = member
    _, owner_id = someone(signup)
    group = group_of(owner_id, models=[ALLOWED])
    assert ask(client, token, OTHER).status_code == 200  # cached: no limit

    inline = {"memberships-TOTAL_FORMS": "1", "memberships-0-group": str(group.pk), "memberships-0-user": user_id}
    assert change_group(admin, group, ALLOWED, **inline).status_code == 302
    assert group.memberships.filter(user_id=user_id).exists()
    assert_refused(ask(client, token, OTHER), OTHER)

    # and through the membership list's own add page
    other_token, other, _ = signup()
    other_id = other["id"]
    assert ask(client, other_token, OTHER).status_code == 200
    response = post_form(admin, "/admin/groups/groupmember/add/", {"group": str(group.pk), "user": other_id})
    assert response.status_code == 302, response.text
    membership = group.memberships.get(user_id=other_id)
    assert admin.get(f"/admin/groups/groupmember/{membership.pk}/change/").status_code == 200
    assert_refused(ask(client, other_token, OTHER), OTHER)


# --- chats ------------------------------------------------------------------------------------------------


def test_creating_a_chat_or_conversation_with_a_forbidden_model_is_403_and_stores_nothing(client, member, upstream):
    token, user_id, group = member
    limit(group, ALLOWED)
    assert_refused_here(client.post("/chat/create", data={"name": "c", "model": OTHER}, headers=bearer(token)))
    created = client.post("/api/conversations/create", json={"title": "t", "model": OTHER}, headers=bearer(token))
    assert_refused_here(created)
    assert not Chat.objects.filter(owner_id=user_id).exists()
    allowed = client.post("/chat/create", data={"name": "c", "model": ALLOWED}, headers=bearer(token))
    assert allowed.status_code == 200, allowed.text
    assert client.post("/chat/create", data={"name": "default model"}, headers=bearer(token)).status_code == 200


def test_a_group_chat_obeys_the_groups_list_even_for_a_user_without_limit(client, member, signup, upstream):
    token, user_id, _ = member  # no limit of their own, and not in the group: a member of the chat only
    owner_token, owner_id = someone(signup)
    group = group_of(owner_id)
    chat = client.post(
        "/chat/create", data={"name": "g", "model": OTHER, "group_id": str(group.pk)}, headers=bearer(owner_token)
    ).json()
    added = client.post("/chat/user/add", data={"chat_id": chat["id"], "user_id": user_id}, headers=bearer(owner_token))
    assert added.status_code == 200, added.text
    limit(group, ALLOWED)
    assert models_allowed(user_id=user_id) is None

    response = client.post("/chat/prompt", data={"id": chat["id"], "prompt": "echo: hi"}, headers=bearer(token))
    assert_refused_here(response)
    assert not Message.objects.filter(chat_id=chat["id"]).exists()
    assert upstream.requests == []
    refused = client.post(
        "/chat/create", data={"name": "g2", "model": OTHER, "group_id": str(group.pk)}, headers=bearer(owner_token)
    )
    assert_refused_here(refused)
    assert Chat.objects.filter(group=group).count() == 1

    moved = client.post("/chat/update", data={"id": chat["id"], "model": ALLOWED}, headers=bearer(owner_token))
    assert moved.status_code == 200, moved.text
    response = client.post("/chat/prompt", data={"id": chat["id"], "prompt": "echo: hi"}, headers=bearer(token))
    assert response.status_code == 200 and response.json()["message"]["reply"] == "hi"


def test_prompting_a_chat_whose_model_became_forbidden_is_403_and_stores_and_sends_nothing(client, member, upstream):
    token, user_id, group = member
    chat = client.post("/chat/create", data={"name": "c", "model": OTHER}, headers=bearer(token)).json()
    conversation = client.post("/api/conversations/create", json={"title": "t", "model": OTHER}, headers=bearer(token))
    number = conversation.json()["conversation_id"]
    limit(group, ALLOWED)

    for stream in ("0", "1"):
        response = client.post(
            "/chat/prompt", data={"id": chat["id"], "prompt": "echo: hi", "stream": stream}, headers=bearer(token)
        )
        assert_refused_here(response)
    assert_refused_here(client.post(f"/api/chat/{number}", json={"message": "echo: hi"}, headers=bearer(token)))
    assert not Message.objects.filter(chat__owner_id=user_id).exists()
    assert published(chat["id"]) == []
    assert upstream.requests == []

    # an off-the-record note never reaches the model: it is not refused
    note = client.post("/chat/prompt", data={"id": chat["id"], "prompt": "a note", "otr": "1"}, headers=bearer(token))
    assert note.status_code == 200, note.text
    assert upstream.requests == []


def test_changing_a_chats_model_to_a_forbidden_one_is_403_and_changes_nothing(client, member, upstream):
    token, _, group = member
    chat = client.post("/chat/create", data={"name": "c", "model": OTHER}, headers=bearer(token)).json()
    limit(group, ALLOWED)
    changed = client.post("/chat/update", data={"id": chat["id"], "model": "gpt-4.1"}, headers=bearer(token))
    assert_refused_here(changed)
    assert Chat.objects.get(pk=chat["id"]).model == OTHER
    assert published(chat["id"]) == []
    # renaming (its model unchanged, even if now forbidden) and moving to an allowed model work
    renamed = client.post("/chat/update", data={"id": chat["id"], "name": "n", "model": OTHER}, headers=bearer(token))
    assert renamed.status_code == 200, renamed.text
    moved = client.post("/chat/update", data={"id": chat["id"], "model": ALLOWED}, headers=bearer(token))
    assert moved.status_code == 200 and moved.json()["model"] == ALLOWED
    response = client.post("/chat/prompt", data={"id": chat["id"], "prompt": "echo: hi"}, headers=bearer(token))
    assert response.status_code == 200 and response.json()["message"]["reply"] == "hi"


# --- /ws ----------------------------------------------------------------------------------------------------


def ws_session(token: str, talk) -> None:
    """Open /ws on Turbo's whole ASGI app in process (Channels' communicator) and run `await talk(ws)`; the
    app's ORM calls and those `talk` makes through sync_to_async run on the test's connection."""

    from turbo_site.asgi import application

    async def session():
        ws = WebsocketCommunicator(application, f"/ws?token={token}")
        connected, _ = await ws.connect(timeout=10)
        assert connected
        try:
            await talk(ws)
        finally:
            await ws.disconnect()

    async_to_sync(session)()


def test_ws_rpc_refuses_a_forbidden_model_with_an_error_frame(member, upstream):
    token, _, group = member
    limit(group, ALLOWED)

    async def talk(ws):
        for kind in ("chat_completion", "chat_completion_stream"):
            payload = {"messages": [{"role": "user", "content": "echo: hi"}], "model": OTHER}
            await ws.send_json_to({"type": kind, "request_id": kind, "payload": payload})
            frame = await ws.receive_json_from(timeout=15)
            assert frame["type"] == "error" and frame["request_id"] == kind
            assert frame["error"]["code"] == "model_not_allowed"
        assert upstream.requests == []
        payload = {"messages": [{"role": "user", "content": "echo: hi"}], "model": ALLOWED}
        await ws.send_json_to({"type": "chat_completion", "request_id": "ok", "payload": payload})
        frame = await ws.receive_json_from(timeout=15)
        assert frame["type"] == "chat_completion" and frame["data"]["choices"][0]["message"]["content"] == "hi"

    ws_session(token, talk)


def test_an_open_ws_socket_gets_a_new_limit_with_its_next_request(member, upstream):
    token, _, group = member
    payload = {"messages": [{"role": "user", "content": "echo: hi"}], "model": OTHER}
    frames = []

    async def talk(ws):
        await ws.send_json_to({"type": "chat_completion", "request_id": "before", "payload": payload})
        assert (await ws.receive_json_from(timeout=15))["type"] == "chat_completion"
        await sync_to_async(limit)(group, ALLOWED)  # while the socket stays open
        await ws.send_json_to({"type": "chat_completion", "request_id": "after", "payload": payload})
        frames.append(await ws.receive_json_from(timeout=15))

    ws_session(token, talk)
    (frame,) = frames
    assert frame["type"] == "error" and frame["error"]["code"] == "model_not_allowed"
    assert len(upstream.requests) == 1
