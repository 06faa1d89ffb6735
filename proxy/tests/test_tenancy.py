"""`/v1` serves each tenant only its own (proxy.paths, proxy.owners), in process through both front doors.

The upstream stores chat completions, responses, files... under the server's one key, and would hand
any of them to anyone; so the proxy lets only the user whose call created an object reach it, answers
404 to everyone else without asking the upstream, keeps account-wide listings and model deletion to
staff, and refuses methods no OpenAI endpoint uses.
"""

from collections.abc import Awaitable, Callable

import httpx
import pytest
from asgiref.sync import sync_to_async
from django.core.cache import cache

from accounts.models import User
from accounts.services import session_create, user_create
from proxy.events import events_flush
from proxy.models import StoredObject
from proxy.owners import objects_forget
from proxy.usage.ratelimits import redis_script
from testing.inprocess import run_in_process
from turbo_site.asgi import application

pytestmark = pytest.mark.django_db

STORED = {"model": "gpt-4o", "store": True, "messages": [{"role": "user", "content": "echo: mine"}]}


def serve(scenario: Callable[[httpx.AsyncClient], Awaitable[None]]) -> None:
    """`await scenario(http)`, `http` an async client of Turbo's whole ASGI app, through run_in_process: the
    app's database calls on the test's connection, inside its transaction (rolled back, not flushed)."""

    async def run() -> None:
        transport = httpx.ASGITransport(app=application, client=("127.0.0.1", 4000))
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1", timeout=30) as http:
            await scenario(http)

    run_in_process(run)


def _account(username: str, *, is_staff: bool = False) -> tuple[str, str]:
    """A new user's token and id."""
    user = user_create(username=username, password="correct-horse-battery")
    if is_staff:
        User.objects.filter(pk=user.pk).update(is_staff=True)
    _, token = session_create(user=user)
    return token, str(user.pk)


@pytest.fixture
def people():
    """Two users, alice and bob, and a staff user: name -> (token, user id)."""
    cache.clear()
    return {"alice": _account("alice"), "bob": _account("bob"), "staff": _account("staff", is_staff=True)}


@pytest.fixture
def accounts(people):
    return {name: token for name, (token, _) in people.items()}


@pytest.fixture
def user_ids(people):
    return {name: user_id for name, (_, user_id) in people.items()}


async def _created(http, headers, path="/v1/chat/completions", body=STORED) -> str:
    response = await http.post(path, json=body, headers=headers)
    assert response.status_code == 200, response.text
    return response.json()["id"]


# --- stored chat completions ------------------------------------------------------------------------


def test_another_users_completion_is_404_and_never_reaches_the_upstream(upstream, accounts, door):
    async def scenario(http):
        completion = await _created(http, door(accounts["alice"]))
        upstream.requests.clear()
        bob = door(accounts["bob"])
        for method, path in [
            ("GET", f"/v1/chat/completions/{completion}"),
            ("POST", f"/v1/chat/completions/{completion}"),
            ("DELETE", f"/v1/chat/completions/{completion}"),
            ("GET", f"/v1/chat/completions/{completion}/messages"),
        ]:
            response = await http.request(
                method, path, headers=bob, json={"metadata": {}} if method == "POST" else None
            )
            assert response.status_code == 404, (method, path, response.text)
            assert response.json()["error"]["code"] == "not_found"
        assert upstream.requests == []
        assert completion in upstream.stored  # nothing deleted

    serve(scenario)


def test_the_owner_reaches_their_completion_and_its_messages(upstream, accounts, door):
    async def scenario(http):
        alice = door(accounts["alice"])
        completion = await _created(http, alice)
        got = await http.get(f"/v1/chat/completions/{completion}", headers=alice)
        assert got.status_code == 200, got.text
        assert got.json()["id"] == completion
        messages = await http.get(f"/v1/chat/completions/{completion}/messages", headers=alice)
        assert messages.status_code == 200
        assert messages.json()["data"] == STORED["messages"]
        deleted = await http.delete(f"/v1/chat/completions/{completion}", headers=alice)
        assert deleted.json() == {"id": completion, "object": "chat.completion.deleted", "deleted": True}

    serve(scenario)


def test_a_streamed_completion_is_recorded_too(upstream, accounts):
    async def scenario(http):
        alice, bob = {"Authorization": f"Bearer {accounts['alice']}"}, {"Authorization": f"Bearer {accounts['bob']}"}
        async with http.stream("POST", "/v1/chat/completions", json={**STORED, "stream": True}, headers=alice) as reply:
            assert reply.status_code == 200
            body = (await reply.aread()).decode()
        completion = body.split('"id": "', 1)[1].split('"', 1)[0]
        assert completion.startswith("chatcmpl-")
        assert (await http.get(f"/v1/chat/completions/{completion}", headers=alice)).status_code == 200
        assert (await http.get(f"/v1/chat/completions/{completion}", headers=bob)).status_code == 404

    serve(scenario)


def test_ownership_outlives_the_process_memory(upstream, accounts, user_ids, settings):
    """Another process (or this one after a restart) finds the owner on Redis or in the database."""

    async def scenario(http):
        alice, bob = {"Authorization": f"Bearer {accounts['alice']}"}, {"Authorization": f"Bearer {accounts['bob']}"}
        completion = await _created(http, alice)
        if settings.REDIS_ADDRESS:  # the other processes know it at once: Redis has it (read on the same
            # connection the SET went out on without waiting, so after it)
            key = f"turbo:owner:chat/completions:{completion}"
            assert await redis_script("return redis.call('GET', KEYS[1])", [key], []) == user_ids["alice"].encode()
        await sync_to_async(events_flush)()
        assert await StoredObject.objects.filter(collection="chat/completions", object_id=completion).aexists()
        objects_forget()
        assert (await http.get(f"/v1/chat/completions/{completion}", headers=alice)).status_code == 200
        objects_forget()
        cache.clear()  # Redis too (the Redis leg): the database alone
        assert (await http.get(f"/v1/chat/completions/{completion}", headers=bob)).status_code == 404
        assert (await http.get(f"/v1/chat/completions/{completion}", headers=alice)).status_code == 200

    serve(scenario)


def test_an_unstored_completion_is_nobodys(upstream, accounts):
    """Without `store` the upstream keeps nothing, and Turbo records nothing (its ids are not reachable)."""

    async def scenario(http):
        alice = {"Authorization": f"Bearer {accounts['alice']}"}
        completion = await _created(http, alice, body={**STORED, "store": False})
        upstream.requests.clear()
        assert (await http.get(f"/v1/chat/completions/{completion}", headers=alice)).status_code == 404
        assert upstream.requests == []

    serve(scenario)


def test_an_id_nobody_created_is_404_without_the_upstream(upstream, accounts, door):
    async def scenario(http):
        response = await http.get("/v1/chat/completions/chatcmpl-unknown", headers=door(accounts["alice"]))
        assert response.status_code == 404
        assert upstream.requests == []

    serve(scenario)


# --- responses ------------------------------------------------------------------------------------------


def test_responses_are_their_creators_only(upstream, accounts, door):
    async def scenario(http):
        alice, bob = door(accounts["alice"]), door(accounts["bob"])
        response_id = await _created(http, alice, "/v1/responses", {"model": "gpt-4o", "input": "echo: secret"})
        upstream.requests.clear()
        for method, path in [
            ("GET", f"/v1/responses/{response_id}"),
            ("DELETE", f"/v1/responses/{response_id}"),
            ("GET", f"/v1/responses/{response_id}/input_items"),
            ("POST", f"/v1/responses/{response_id}/cancel"),
        ]:
            assert (await http.request(method, path, headers=bob)).status_code == 404, (method, path)
        # Nor may bob continue alice's conversation (the upstream would read hers to answer him).
        follow = {"model": "gpt-4o", "input": "what did I say?", "previous_response_id": response_id}
        assert (await http.post("/v1/responses", json=follow, headers=bob)).status_code == 404
        assert upstream.requests == []

        items = await http.get(f"/v1/responses/{response_id}/input_items", headers=alice)
        assert items.status_code == 200 and items.json()["data"][0]["content"] == "echo: secret"
        assert (await http.post("/v1/responses", json=follow, headers=alice)).status_code == 200

    serve(scenario)


def test_a_streamed_response_is_recorded(upstream, accounts):
    async def scenario(http):
        alice, bob = {"Authorization": f"Bearer {accounts['alice']}"}, {"Authorization": f"Bearer {accounts['bob']}"}
        body = {"model": "gpt-4o", "input": "echo: hi", "stream": True}
        async with http.stream("POST", "/v1/responses", json=body, headers=alice) as reply:
            text = (await reply.aread()).decode()
        response_id = text.split('"id": "', 1)[1].split('"', 1)[0]
        assert response_id.startswith("resp_")
        assert (await http.get(f"/v1/responses/{response_id}", headers=alice)).status_code == 200
        assert (await http.get(f"/v1/responses/{response_id}", headers=bob)).status_code == 404

    serve(scenario)


@pytest.mark.parametrize(
    "raw",
    [
        b'{"model": "gpt-4o", "input": "x", "previous_response_id": "resp_a", "previous_response_id": "resp_b"}',
        b'{"model": "gpt-4o", "input": "x", "previous_response_id": "resp_a", "n": NaN}',
        '{"model": "gpt-4o", "previous_response_id": "resp_a"}'.encode("utf-16"),
    ],
    ids=["named-twice", "not-json", "utf-16"],
)
def test_a_body_that_may_name_an_object_unreadably_is_refused(upstream, accounts, raw):
    async def scenario(http):
        headers = {"Authorization": f"Bearer {accounts['alice']}", "Content-Type": "application/json"}
        response = await http.post("/v1/responses", content=raw, headers=headers)
        assert response.status_code in (400, 404), response.text
        assert upstream.requests == []

    serve(scenario)


def test_a_field_name_spelled_with_escapes_is_still_read(upstream, accounts):
    async def scenario(http):
        alice = {"Authorization": f"Bearer {accounts['alice']}"}
        response_id = await _created(http, alice, "/v1/responses", {"model": "gpt-4o", "input": "hi"})
        raw = b'{"model": "gpt-4o", "input": "x", "previous\\u005fresponse_id": "' + response_id.encode() + b'"}'
        bob = {"Authorization": f"Bearer {accounts['bob']}", "Content-Type": "application/json"}
        upstream.requests.clear()
        assert (await http.post("/v1/responses", content=raw, headers=bob)).status_code == 404
        assert upstream.requests == []

    serve(scenario)


# --- account-wide paths and methods --------------------------------------------------------------------


@pytest.mark.parametrize(
    "method, path",
    [("GET", "/v1/chat/completions"), ("DELETE", "/v1/models/ft:gpt-4o:acme::abc")],
)
def test_account_wide_listings_and_model_deletion_are_staff_only(upstream, accounts, door, method, path):
    async def scenario(http):
        refused = await http.request(method, path, headers=door(accounts["alice"]))
        assert refused.status_code == 403, refused.text
        assert refused.json()["error"]["code"] == "staff_only"
        assert upstream.requests == []
        served = await http.request(method, path, headers=door(accounts["staff"]))
        assert served.status_code != 403
        assert [(r.method, r.path) for r in upstream.requests] == [(method, path)]

    serve(scenario)


def test_staff_listing_shows_what_users_stored(upstream, accounts):
    async def scenario(http):
        completion = await _created(http, {"Authorization": f"Bearer {accounts['alice']}"})
        listed = await http.get("/v1/chat/completions", headers={"Authorization": f"Bearer {accounts['staff']}"})
        assert [entry["id"] for entry in listed.json()["data"]] == [completion]

    serve(scenario)


def test_fine_tuning_is_closed_and_staff_only_once_opened(upstream, accounts, settings):
    async def scenario(http):
        alice, staff = (
            {"Authorization": f"Bearer {accounts['alice']}"},
            {"Authorization": f"Bearer {accounts['staff']}"},
        )
        closed = await http.post("/v1/fine_tuning/jobs", json={}, headers=staff)
        assert (closed.status_code, closed.json()["error"]["code"]) == (403, "path_not_allowed")
        settings.PROXY_ALLOWED_PATHS = [*settings.PROXY_ALLOWED_PATHS, "fine_tuning"]  # opened to all: still staff's
        refused = await http.post("/v1/fine_tuning/jobs", json={}, headers=alice)
        assert (refused.status_code, refused.json()["error"]["code"]) == (403, "staff_only")
        assert upstream.requests == []
        assert (await http.post("/v1/fine_tuning/jobs", json={}, headers=staff)).status_code == 404  # the fake's
        assert [r.path for r in upstream.requests] == ["/v1/fine_tuning/jobs"]

    serve(scenario)


@pytest.mark.parametrize("method", ["TRACE", "PATCH", "PUT", "HEAD", "CONNECT", "PROPFIND"])
def test_unknown_methods_are_refused_before_the_upstream(upstream, accounts, door, method):
    async def scenario(http):
        response = await http.request(method, "/v1/chat/completions", headers=door(accounts["staff"]))
        assert response.status_code == 405
        assert set(response.headers["allow"].split(", ")) == {"GET", "POST", "DELETE"}
        if method != "HEAD":
            assert response.json()["error"]["code"] == "method_not_allowed"
        assert upstream.requests == []

    serve(scenario)


def test_a_known_path_with_a_method_it_does_not_take_is_405(upstream, accounts, door):
    async def scenario(http):
        response = await http.delete("/v1/embeddings", headers=door(accounts["staff"]))
        assert response.status_code == 405
        assert response.headers["allow"] == "POST"
        assert upstream.requests == []

    serve(scenario)


def test_an_unlisted_path_under_a_known_prefix_is_refused(upstream, accounts, door):
    async def scenario(http):
        response = await http.get("/v1/chat/completions/abc/def/ghi", headers=door(accounts["staff"]))
        assert (response.status_code, response.json()["error"]["code"]) == (403, "path_not_allowed")
        assert upstream.requests == []

    serve(scenario)


def test_opted_in_files_are_their_uploaders_only(upstream, accounts, settings):
    async def scenario(http):
        settings.PROXY_ALLOWED_PATHS = [*settings.PROXY_ALLOWED_PATHS, "files"]
        alice, bob = {"Authorization": f"Bearer {accounts['alice']}"}, {"Authorization": f"Bearer {accounts['bob']}"}
        uploaded = await http.post("/v1/files", headers=alice, data={"purpose": "batch"}, files={"file": ("a", b"{}")})
        assert uploaded.status_code == 200, uploaded.text
        file_id = uploaded.json()["id"]
        upstream.requests.clear()
        assert (await http.get(f"/v1/files/{file_id}", headers=bob)).status_code == 404
        assert (await http.get("/v1/files", headers=bob)).status_code == 403
        assert upstream.requests == []
        assert (
            await http.get(f"/v1/files/{file_id}", headers=alice)
        ).status_code == 404  # reached: the fake has no GET
        assert [r.path for r in upstream.requests] == [f"/v1/files/{file_id}"]

    serve(scenario)
