"""API keys through Turbo's whole ASGI app (in process; over the live server's socket where a test needs one:
the openai SDK, WebSockets) and the fake upstream: made and shown once, used on /v1 (the openai SDK, both
front doors) and /ws, limited to their models, refused everywhere else, expired and revoked at once (an open
socket closes), group keys, bad input, the admin, `manage.py keys`, and a revocation crossing from one server
process to another."""

import asyncio
import hashlib
import json
import textwrap
import time
from datetime import timedelta

import httpx
import openai
import pytest
from django.conf import settings as django_settings
from django.db import connection
from django.utils import timezone
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from accounts.keys import KEYS_PER_USER_MAX, api_key_create
from accounts.models import ApiKey, User
from accounts.services import asession_lookup, session_create, session_lookup, user_create
from accounts.tests.test_admin import ADMIN_PASSWORD, log_in, run_action
from chats.models import Chat
from chats.tests.conftest import two_servers  # noqa: F401 (a fixture)
from conftest import unique_name
from groups.models import Group
from groups.services import group_allowed_models_set, group_create, group_members_add
from testing.commands import manage

pytestmark = pytest.mark.django_db

ALLOWED, OTHER = "gpt-4o-mini", "gpt-4o"
LISTED_FIELDS = {
    "id",
    "name",
    "prefix",
    "created_at",
    "expires_at",
    "last_used_at",
    "models",
    "group_id",
    "rpm",
    "tpm",
    "budget_usd",
    "budget_period",
}


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def make_key(client, token: str, **fields) -> dict:
    response = client.post("/user/keys/create", json={"name": "my program", **fields}, headers=bearer(token))
    assert response.status_code == 200, response.text
    return response.json()


def ask(client, key: str, model: str = ALLOWED, **headers) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "echo: hi"}]}
    return client.post("/v1/chat/completions", json=body, headers={**bearer(key), **headers})


def sdk(turbo_server, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=turbo_server.url + "/v1", api_key=key, max_retries=0)


def ws_url(server, key: str) -> str:
    return f"ws://127.0.0.1:{server.port}/ws?token={key}"


def ws_call(ws, kind: str, request_id: str, model: str = ALLOWED) -> dict:
    payload = {"messages": [{"role": "user", "content": "echo: over ws"}], "model": model}
    ws.send(json.dumps({"type": kind, "request_id": request_id, "payload": payload}))
    while True:
        frame = json.loads(ws.recv(timeout=15))
        if frame["request_id"] == request_id and frame["type"] != "chat_completion_chunk":
            return frame


def frames_until_closed(ws) -> list[dict]:
    frames = []
    with pytest.raises(ConnectionClosed):
        while True:
            frames.append(json.loads(ws.recv(timeout=15)))
    return frames


def limit(group: Group, *names: str) -> None:
    group_allowed_models_set(group=Group.objects.get(pk=group.pk), allowed_models=list(names))


def personal_group(user: dict) -> Group:
    return Group.objects.get(owner_id=user["id"])


# --- made, shown once, listed ---------------------------------------------------------------------------


def test_a_key_is_shown_once_stored_hashed_and_listed_without_it(client, signup):
    token, user, _ = signup()
    made = make_key(client, token, name="  ci runner  ")
    key = made.pop("key")
    assert key.startswith("tk-") and len(key) == 3 + 43
    assert made["prefix"] == key[:12] and made["name"] == "ci runner"
    assert set(made) == {
        "id",
        "name",
        "prefix",
        "created_at",
        "expires_at",
        "models",
        "group_id",
        "rpm",
        "tpm",
        "budget_usd",
        "budget_period",
    }
    assert made["expires_at"] is None and made["models"] == [] and made["group_id"] is None

    stored = ApiKey.objects.get(pk=made["id"])
    assert stored.key_hash == hashlib.sha256(key.encode()).hexdigest()
    assert key not in json.dumps([getattr(stored, field.attname) for field in ApiKey._meta.fields], default=str)

    second = make_key(client, token, name="second")
    for listed in (
        client.get("/user/keys/list", headers=bearer(token)),
        client.post("/user/keys/list", headers=bearer(token)),
    ):
        assert listed.status_code == 200, listed.text
        assert key not in listed.text and stored.key_hash not in listed.text
        keys = listed.json()["keys"]
        assert [entry["id"] for entry in keys] == [second["id"], made["id"]]  # newest first
        assert all(set(entry) == LISTED_FIELDS for entry in keys)
        assert keys[1]["prefix"] == made["prefix"] and keys[1]["last_used_at"] is None
    # another user's list does not show them
    other_token, _, _ = signup()
    assert client.get("/user/keys/list", headers=bearer(other_token)).json() == {"keys": []}


# --- used on /v1 and /ws --------------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)  # the openai SDK, over the live server's socket
def test_a_key_works_with_the_openai_sdk_on_v1_streamed_and_not(client, signup, upstream, turbo_server):
    token, _, _ = signup()
    key = make_key(client, token)["key"]
    api = sdk(turbo_server, key)

    completion = api.chat.completions.create(model=ALLOWED, messages=[{"role": "user", "content": "echo: hi there"}])
    assert completion.choices[0].message.content == "hi there"
    chunks = api.chat.completions.create(
        model=OTHER, messages=[{"role": "user", "content": "echo: one two three"}], stream=True
    )
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices) == "one two three"
    assert [model.id for model in api.models.list().data] == ["gpt-4o-mini", "gpt-4o"]
    # and through Django (a browser's call, with an Origin), not the fast path
    browser = ask(client, key, Origin=turbo_server.url)
    assert browser.status_code == 200, browser.text
    assert all(request.headers["authorization"] == "Bearer sk-server-side-key" for request in upstream.requests)
    assert key not in json.dumps([dict(request.headers) for request in upstream.requests])

    listed = client.get("/user/keys/list", headers=bearer(token)).json()["keys"]
    assert listed[0]["last_used_at"] is not None


@pytest.mark.django_db(transaction=True)  # /ws over the live server's socket
def test_a_key_works_on_ws(client, signup, upstream, turbo_server):
    token, _, _ = signup()
    key = make_key(client, token)["key"]
    with connect(ws_url(turbo_server, key), open_timeout=10) as ws:
        answer = ws_call(ws, "chat_completion", "c1")
        assert answer["type"] == "chat_completion"
        assert answer["data"]["choices"][0]["message"]["content"] == "over ws"
        done = ws_call(ws, "chat_completion_stream", "s1", OTHER)
        assert done["type"] == "chat_completion_done" and done["data"]["content"] == "over ws"


def test_the_lookup_of_a_key_is_cached_like_a_sessions(client, signup, django_assert_num_queries):
    token, _, _ = signup()
    key = make_key(client, token)["key"]
    first = session_lookup(key, keys=True)
    assert first is not None and first.kind == "key" and first.allowed_models is None
    with django_assert_num_queries(0):
        assert session_lookup(key, keys=True) == first
        assert asyncio.run(asession_lookup(key, keys=True)) == first  # the /v1 fast path's lookup
    # only where keys are asked for
    assert session_lookup(key) is None
    assert asyncio.run(asession_lookup(key)) is None


def test_a_session_token_that_happens_to_start_like_a_key_is_still_a_session(client, signup, monkeypatch):
    _, user, _ = signup()
    monkeypatch.setattr("accounts.services.secrets.token_urlsafe", lambda size: "tk-" + "a" * 40)
    _, token = session_create(user=User.objects.get(pk=user["id"]))
    assert token.startswith("tk-")
    found = session_lookup(token)
    assert found is not None and found.kind == "token"
    assert client.get("/user/session", headers=bearer(token)).status_code == 200


# --- limited to its models ------------------------------------------------------------------------------


def assert_model_refused(response: httpx.Response) -> None:
    assert response.status_code == 403, response.text
    assert response.json()["error"]["code"] == "model_not_allowed"


@pytest.mark.django_db(transaction=True)  # the openai SDK and /ws, over the live server's socket
def test_a_key_is_limited_to_its_models_on_v1_and_ws(client, signup, upstream, turbo_server):
    token, _, _ = signup()
    key = make_key(client, token, models=[ALLOWED])["key"]
    assert_model_refused(ask(client, key, OTHER))
    assert_model_refused(ask(client, key, OTHER, Origin=turbo_server.url))
    with pytest.raises(openai.PermissionDeniedError):
        sdk(turbo_server, key).chat.completions.create(model=OTHER, messages=[{"role": "user", "content": "hi"}])
    with connect(ws_url(turbo_server, key), open_timeout=10) as ws:
        refused = ws_call(ws, "chat_completion", "no", OTHER)
        assert refused["type"] == "error" and refused["error"]["code"] == "model_not_allowed"
        assert ws_call(ws, "chat_completion", "yes", ALLOWED)["type"] == "chat_completion"
    assert ask(client, key, ALLOWED).status_code == 200
    assert [json.loads(request.body)["model"] for request in upstream.requests] == [ALLOWED, ALLOWED]
    # the session that made it is not limited
    assert ask(client, token, OTHER).status_code == 200


def test_v1_models_lists_only_the_keys_models(client, signup, upstream, settings, tmp_path):
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
    token, user, _ = signup()
    limit(personal_group(user), "small", "large")
    key = make_key(client, token, models=["small"])["key"]
    listed = client.get("/v1/models", headers=bearer(key))
    assert listed.status_code == 200, listed.text
    assert [entry["id"] for entry in listed.json()["data"]] == ["small"]
    assert client.get("/v1/models", headers=bearer(token)).json()["data"][1]["id"] == "large"
    assert_model_refused(ask(client, key, "large"))
    assert ask(client, key, "small").status_code == 200


def test_a_key_follows_its_users_group_limit_as_it_changes(client, signup, upstream):
    token, user, _ = signup()
    key = make_key(client, token)["key"]
    assert ask(client, key, OTHER).status_code == 200  # cached, with no limit
    limit(personal_group(user), ALLOWED)
    assert_model_refused(ask(client, key, OTHER))
    assert ask(client, key, ALLOWED).status_code == 200


# --- expired and revoked ---------------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)  # an open /ws socket
def test_an_expired_key_is_refused_at_once_and_its_socket_closes(client, signup, upstream, turbo_server):
    token, _, _ = signup()
    expires_at = timezone.now() + timedelta(seconds=3)
    made = make_key(client, token, expires_at=expires_at.isoformat())
    key = made["key"]
    assert made["expires_at"] is not None
    assert ask(client, key).status_code == 200  # its lookup is now cached
    with connect(ws_url(turbo_server, key), open_timeout=10) as ws:
        time.sleep(max(0.0, (expires_at - timezone.now()).total_seconds()) + 0.2)
        for response in (ask(client, key), ask(client, key, Origin=turbo_server.url)):
            assert response.status_code == 401, response.text
            assert response.json()["error"]["code"] == "unauthorized"
        assert frames_until_closed(ws)[-1]["error"]["code"] == "session_ended"
    with pytest.raises(InvalidStatus):
        connect(ws_url(turbo_server, key), open_timeout=10)


@pytest.mark.django_db(transaction=True)  # open /ws sockets and the SDK
def test_a_revoked_key_is_refused_at_once_and_its_open_socket_closes(client, signup, upstream, turbo_server):
    token, _, _ = signup()
    made = make_key(client, token)
    key = made["key"]
    other = make_key(client, token, name="another")["key"]
    assert ask(client, key).status_code == 200  # cached
    with connect(ws_url(turbo_server, key), open_timeout=10) as ws, connect(ws_url(turbo_server, other)) as kept:
        assert ws_call(ws, "chat_completion", "before")["type"] == "chat_completion"
        revoked = client.post("/user/keys/revoke", json={"id": made["id"]}, headers=bearer(token))
        assert revoked.status_code == 200 and revoked.json() == {}
        for response in (ask(client, key), ask(client, key, Origin=turbo_server.url)):
            assert response.status_code == 401, response.text
        with pytest.raises(openai.AuthenticationError):
            sdk(turbo_server, key).models.list()
        frames = frames_until_closed(ws)
        assert frames[-1]["type"] == "error" and frames[-1]["error"]["code"] == "session_ended"
        assert ws.close_code == 4401
        # the user's other key, and their session, go on
        assert ws_call(kept, "chat_completion", "still")["type"] == "chat_completion"
    assert ask(client, other).status_code == 200
    assert ask(client, token).status_code == 200
    with pytest.raises(InvalidStatus):
        connect(ws_url(turbo_server, key), open_timeout=10)
    assert made["id"] not in {
        entry["id"] for entry in client.get("/user/keys/list", headers=bearer(token)).json()["keys"]
    }
    again = client.post("/user/keys/revoke", json={"id": made["id"]}, headers=bearer(token))
    assert again.status_code == 200  # revoking twice is no error


def test_another_users_key_cannot_be_revoked(client, signup, upstream):
    token, _, _ = signup()
    made = make_key(client, token)
    intruder, _, _ = signup()
    for key_id in (made["id"], "0b7e1c9a-3f5d-4a51-9d0c-2f0c3c1f6a11"):
        response = client.post("/user/keys/revoke", json={"id": key_id}, headers=bearer(intruder))
        assert response.status_code == 404, response.text
        assert response.json()["error"]["code"] == "not_found"
    assert ApiKey.objects.get(pk=made["id"]).revoked_at is None
    assert ask(client, made["key"]).status_code == 200
    bad = client.post("/user/keys/revoke", json={"id": "not-a-uuid"}, headers=bearer(token))
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid"


def test_deactivating_the_user_ends_their_keys_at_once(client, signup, upstream):
    token, user, _ = signup()
    key = make_key(client, token)["key"]
    assert ask(client, key).status_code == 200
    found = User.objects.get(pk=user["id"])
    found.is_active = False
    found.save()
    assert ask(client, key).status_code == 401


# --- a key is not the account ------------------------------------------------------------------------------


def assert_key_refused(response: httpx.Response) -> None:
    assert response.status_code == 403, response.text
    error = response.json()["error"]
    assert error["code"] == "key_not_allowed_here"
    assert "/v1" in error["message"] and "/ws" in error["message"]


@pytest.mark.django_db(transaction=True)  # a WebSocket handshake
def test_a_key_cannot_use_or_change_the_account(client, signup, upstream, turbo_server):
    token, user, password = signup()
    key = make_key(client, token)["key"]
    chat = client.post("/chat/create", data={"name": "mine"}, headers=bearer(token)).json()
    calls = [
        ("GET", "/user/session", {}),
        ("POST", "/user/read", {"id": user["id"]}),
        ("POST", "/user/update", {"id": user["id"], "first_name": "Mallory"}),
        ("POST", "/user/password/update", {"old_password": password, "new_password": "a-new-horse-battery"}),
        ("POST", "/user/logout", {}),
        ("POST", "/user/keys/create", {"name": "one more"}),
        ("GET", "/user/keys/list", {}),
        ("POST", "/user/keys/revoke", {"id": str(ApiKey.objects.get(user_id=user["id"]).pk)}),
        ("POST", "/chat/create", {"name": "by key"}),
        ("POST", "/chat/index", {}),
        ("POST", "/chat/prompt", {"id": chat["id"], "prompt": "echo: hi"}),  # an async view
        ("POST", "/group/create", {"name": "by key"}),
    ]
    for method, path, body in calls:
        assert_key_refused(client.request(method, path, json=body or None, headers=bearer(key)))
    # as a cookie, too
    assert_key_refused(client.get("/user/session", headers={"Cookie": f"sess={key}"}))
    # the chat stream WebSocket is not /ws: the handshake is refused
    with pytest.raises(InvalidStatus):
        connect(f"ws://127.0.0.1:{turbo_server.port}/chat/stream?id={chat['id']}&token={key}", open_timeout=10)
    # nor does it stand in for a password
    for path in ("/user/login", "/api/users/login"):
        response = client.post(path, json={"username": user["username"], "password": key})
        assert response.status_code == 401, (path, response.text)

    # nothing changed, and the key and the session still work
    found = User.objects.get(pk=user["id"])
    assert found.first_name != "Mallory" and found.check_password(password)
    assert list(Chat.objects.filter(owner_id=user["id"]).values_list("name", flat=True)) == ["mine"]
    assert ApiKey.objects.filter(user_id=user["id"]).count() == 1
    assert ask(client, key).status_code == 200
    assert client.get("/user/session", headers=bearer(token)).status_code == 200


# --- group keys -----------------------------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)  # /ws over the live server's socket
def test_a_group_key_is_the_owners_and_limited_to_what_the_group_allows(client, signup, upstream, turbo_server):
    owner_token, owner, _ = signup()
    member_token, member, _ = signup()
    outsider_token, _, _ = signup()
    group = group_create(owner=User.objects.get(pk=owner["id"]), name=unique_name("team"))
    group_members_add(group=group, user=group.owner, user_ids=[User.objects.get(pk=member["id"]).pk])
    limit(group, ALLOWED, "gpt-4.1")

    # the group limits the key, not the owner's own (personal, unlimited) use
    refused = client.post(
        "/user/keys/create",
        json={"name": "k", "group_id": str(group.pk), "models": [OTHER]},
        headers=bearer(owner_token),
    )
    assert_model_refused(refused)
    made = make_key(client, owner_token, name="team key", group_id=str(group.pk))
    assert made["group_id"] == str(group.pk)
    key = made["key"]
    assert ask(client, key, ALLOWED).status_code == 200
    assert_model_refused(ask(client, key, OTHER))
    with connect(ws_url(turbo_server, key), open_timeout=10) as ws:
        assert ws_call(ws, "chat_completion", "no", OTHER)["error"]["code"] == "model_not_allowed"

    # only the owner may make one: a member is refused, an outsider does not see the group
    as_member = client.post(
        "/user/keys/create", json={"name": "k", "group_id": str(group.pk)}, headers=bearer(member_token)
    )
    assert as_member.status_code == 403 and as_member.json()["error"]["code"] == "forbidden"
    as_outsider = client.post(
        "/user/keys/create", json={"name": "k", "group_id": str(group.pk)}, headers=bearer(outsider_token)
    )
    assert as_outsider.status_code == 404, as_outsider.text
    assert ApiKey.objects.filter(group=group).count() == 1

    # nobody else may revoke it, not even a member
    for other in (member_token, outsider_token):
        assert client.post("/user/keys/revoke", json={"id": made["id"]}, headers=bearer(other)).status_code == 404
    assert ask(client, key, ALLOWED).status_code == 200

    # the group's list applies as it changes, and the key ends with its group
    limit(group, OTHER)
    assert_model_refused(ask(client, key, ALLOWED))
    assert ask(client, key, OTHER).status_code == 200
    deleted = client.post("/group/delete", json={"id": str(group.pk)}, headers=bearer(owner_token))
    assert deleted.status_code == 200, deleted.text
    assert ask(client, key, OTHER).status_code == 401
    assert not ApiKey.objects.filter(pk=made["id"]).exists()


# --- bad input --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields, status, code",
    [
        ({"name": ""}, 400, "invalid"),
        ({"name": "   "}, 400, "invalid"),
        ({"name": "x" * 101}, 400, "invalid"),
        ({"name": 5}, 400, "invalid"),
        ({}, 400, "invalid"),
        ({"name": "k", "expires_at": "2001-01-01T00:00:00Z"}, 400, "invalid"),
        ({"name": "k", "expires_at": "tomorrow"}, 400, "invalid"),
        ({"name": "k", "models": [f"m{n}" for n in range(101)]}, 400, "invalid"),
        ({"name": "k", "models": ["x" * 101]}, 400, "invalid"),
        ({"name": "k", "models": [""]}, 400, "invalid"),
        ({"name": "k", "models": "gpt-4o-mini,no-such-model"}, 403, "model_not_allowed"),
        ({"name": "k", "models": ["no-such-model"]}, 403, "model_not_allowed"),
        ({"name": "k", "group_id": "not-a-uuid"}, 400, "invalid"),
        ({"name": "k", "group_id": "0b7e1c9a-3f5d-4a51-9d0c-2f0c3c1f6a11"}, 404, "not_found"),
    ],
)
def test_bad_input_is_refused_and_nothing_is_stored(client, signup, fields, status, code):
    token, user, _ = signup()
    limit(personal_group(user), ALLOWED)  # so that a model outside it is one the user may not use
    response = client.post("/user/keys/create", json=fields, headers=bearer(token))
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["message"]
    assert not ApiKey.objects.filter(user_id=user["id"]).exists()


def test_form_fields_work_too(client, signup):
    token, user, _ = signup()
    limit(personal_group(user), ALLOWED, OTHER)
    response = client.post(
        "/user/keys/create", data={"name": "form", "models": [ALLOWED, OTHER]}, headers=bearer(token)
    )
    assert response.status_code == 200, response.text
    assert response.json()["models"] == [ALLOWED, OTHER]


def test_the_51st_live_key_is_refused(client, signup):
    token, user, _ = signup()
    owner = User.objects.get(pk=user["id"])
    made = [api_key_create(user=owner, name=f"k{n}")[0] for n in range(KEYS_PER_USER_MAX)]
    refused = client.post("/user/keys/create", json={"name": "one too many"}, headers=bearer(token))
    assert refused.status_code == 409, refused.text
    assert refused.json()["error"]["code"] == "too_many_keys"
    assert ApiKey.objects.filter(user=owner).count() == KEYS_PER_USER_MAX
    # a revoked or expired key frees its place
    assert client.post("/user/keys/revoke", json={"id": str(made[0].pk)}, headers=bearer(token)).status_code == 200
    ApiKey.objects.filter(pk=made[1].pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    make_key(client, token, name="in place of the revoked one")
    make_key(client, token, name="in place of the expired one")
    assert client.post("/user/keys/create", json={"name": "full again"}, headers=bearer(token)).status_code == 409


# --- the admin ----------------------------------------------------------------------------------------------------


@pytest.fixture
def admin(new_client):
    username = unique_name("admin")
    User.objects.create_superuser(username=username, password=ADMIN_PASSWORD)
    browser = new_client()
    assert log_in(browser, username, ADMIN_PASSWORD).status_code == 302
    return browser


def test_the_admin_lists_and_searches_keys_never_shows_a_hash_and_revokes(admin, client, signup, upstream):
    token, user, _ = signup()
    made = make_key(client, token, name="deploy bot")
    other = make_key(client, token, name="laptop")
    stored = ApiKey.objects.get(pk=made["id"])
    for page in (
        "/admin/accounts/apikey/",
        f"/admin/accounts/apikey/?q={made['prefix']}",
        "/admin/accounts/apikey/?q=deploy",
        f"/admin/accounts/apikey/?q={user['username']}",
        f"/admin/accounts/apikey/{made['id']}/change/",
    ):
        response = admin.get(page)
        assert response.status_code == 200, page
        assert made["prefix"] in response.text, page
        assert stored.key_hash not in response.text and made["key"] not in response.text, page
        assert "key_hash" not in response.text and "Key hash" not in response.text, page
    assert other["prefix"] not in admin.get("/admin/accounts/apikey/?q=deploy").text
    assert admin.get(f"/admin/accounts/apikey/?key_hash__startswith={stored.key_hash[:8]}").status_code == 400
    assert admin.get("/admin/accounts/apikey/add/").status_code == 403
    assert admin.get(f"/admin/accounts/apikey/{made['id']}/delete/").status_code == 403
    assert 'name="_save"' not in admin.get(f"/admin/accounts/apikey/{made['id']}/change/").text

    assert ask(client, made["key"]).status_code == 200  # cached
    response = run_action(admin, "/admin/accounts/apikey/", "revoke_selected_keys", [made["id"]])
    assert response.status_code == 302, response.text
    assert "Revoked 1 API key." in admin.get(response.headers["location"]).text
    assert ask(client, made["key"]).status_code == 401
    assert ask(client, other["key"]).status_code == 200


# --- manage.py keys --------------------------------------------------------------------------------------------------


@pytest.mark.django_db  # in this process, through manage.py's entry point: no other thread reads the rows
def test_manage_keys_lists_and_revokes():
    olga = user_create(username="olga", password="correct-horse")
    pat = user_create(username="pat", password="correct-horse")
    key, secret = api_key_create(user=olga, name="nightly export")
    other, _ = api_key_create(user=pat, name="pat laptop")
    key_id, prefix, key_hash, other_prefix = str(key.pk), key.prefix, key.key_hash, other.prefix

    listed = manage("keys", "list")
    assert listed.returncode == 0, listed.stderr
    header, *rows = listed.stdout.splitlines()
    assert header.split()[:5] == ["ID", "PREFIX", "NAME", "USER", "GROUP"]
    row = next(row for row in rows if prefix in row)
    assert row.startswith(key_id) and "nightly export" in row and "olga" in row and row.endswith("live")
    assert secret not in listed.stdout and key_hash not in listed.stdout

    mine = manage("keys", "list", "--user", "OLGA")
    assert mine.returncode == 0 and prefix in mine.stdout and other_prefix not in mine.stdout

    revoked = manage("keys", "revoke", prefix)
    assert revoked.returncode == 0, revoked.stderr
    assert revoked.stdout.strip() == f"API key {prefix} ('nightly export') of 'olga' revoked"
    assert session_lookup(secret, keys=True) is None
    again = manage("keys", "revoke", key_id)
    assert again.returncode == 0 and "already revoked" in again.stdout
    assert manage("keys", "list", "--user", "olga").stdout.splitlines()[1].endswith("revoked")


@pytest.mark.parametrize(
    "args, returncode, says",
    [
        (["revoke", "tk-nosuchkey"], 1, "CommandError: no API key with id or prefix 'tk-nosuchkey'"),
        (["revoke", "0b7e1c9a-3f5d-4a51-9d0c-2f0c3c1f6a11"], 1, "CommandError: no API key with id or prefix"),
        (["list", "--user", "nobody-at-all"], 1, "CommandError: no user named 'nobody-at-all'"),
        (["revoke"], 2, "error: the following arguments are required: PREFIX_OR_ID"),
        (["teleport"], 2, "error: argument SUBCOMMAND: invalid choice"),
    ],
)
@pytest.mark.django_db
def test_manage_keys_errors_are_one_line(args, returncode, says):
    done = manage("keys", *args)
    assert done.returncode == returncode, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and says in done.stderr, done.stderr


@pytest.mark.django_db
def test_manage_keys_help():
    for args in (["--help"], ["list", "--help"], ["revoke", "--help"]):
        done = manage("keys", *args)
        assert done.returncode == 0, done.stderr
    assert "PREFIX_OR_ID" in manage("keys", "revoke", "--help").stdout
    assert "manage.py keys revoke" in manage("keys", "--help").stdout


# --- two processes ---------------------------------------------------------------------------------------------


@pytest.mark.skipif(
    not django_settings.REDIS_ADDRESS or connection.vendor != "postgresql",
    reason="needs DB_ADDRESS=postgresql://... and REDIS_ADDRESS",
)
@pytest.mark.django_db(transaction=True)  # two server processes
def test_a_key_revoked_through_one_process_is_refused_by_the_other_at_once(two_servers):  # noqa: F811
    first, second = (server.address for server in two_servers)
    with (
        httpx.Client(base_url=f"http://{first}", timeout=20) as one,
        httpx.Client(base_url=f"http://{second}", timeout=20) as two,
    ):
        token = one.post("/user/signup", data={"username": unique_name(), "password": "correct-horse"}).json()["token"]
        made = make_key(one, token)
        key = made["key"]
        assert ask(two, key).status_code == 200  # cached in the second process's view
        with connect(f"ws://{second}/ws?token={key}", open_timeout=10) as ws:
            assert ws_call(ws, "chat_completion", "before")["type"] == "chat_completion"
            assert one.post("/user/keys/revoke", json={"id": made["id"]}, headers=bearer(token)).status_code == 200
            assert ask(two, key).status_code == 401
            assert frames_until_closed(ws)[-1]["error"]["code"] == "session_ended"
            assert ws.close_code == 4401
