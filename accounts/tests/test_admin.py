"""The Django admin through Turbo's whole ASGI app (in process: testing/inprocess.py), logged in as a
superuser the way a browser would be.

Every page loads; a session's token and token hash never appear; the revoke actions and the other admin
writes go through Turbo's services, so a revoked token stops working at once.
"""

import uuid

import httpx
import pytest
from django.utils import timezone

from accounts.models import Session, User
from chats.models import Chat, ChatMember, Message
from conftest import unique_name
from groups.models import Group, GroupMember
from proxy.models import Event

pytestmark = pytest.mark.django_db

ADMIN_PASSWORD = "admin-pass-123"


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def token_works(client, token: str) -> int:
    """The status of GET /user/session with this token."""
    return client.get("/user/session", headers=bearer(token)).status_code


def post_form(browser: httpx.Client, path: str, data: dict) -> httpx.Response:
    """POST an admin form as a browser does: the CSRF token from the cookie, and a same-site Referer."""
    referer = f"{browser.base_url}{path}"
    form = {"csrfmiddlewaretoken": browser.cookies["csrftoken"], **data}
    return browser.post(path, data=form, headers={"Referer": referer})


def log_in(browser: httpx.Client, username: str, password: str) -> httpx.Response:
    page = browser.get("/admin/login/", params={"next": "/admin/"})
    assert page.status_code == 200
    return post_form(browser, "/admin/login/?next=/admin/", {"username": username, "password": password})


def run_action(browser: httpx.Client, changelist: str, action: str, ids: list) -> httpx.Response:
    data = {"action": action, "select_across": "0", "index": "0", "_selected_action": [str(i) for i in ids]}
    return post_form(browser, changelist, data)


@pytest.fixture
def browser(new_client):
    """An HTTP client that keeps cookies, like a browser (in process, or the live server's in a
    transactional test: conftest's `new_client`)."""
    return new_client()


@pytest.fixture
def admin(browser):
    """`browser`, logged into the admin as a fresh superuser."""
    username = unique_name("admin")
    User.objects.create_superuser(username=username, password=ADMIN_PASSWORD)
    response = log_in(browser, username, ADMIN_PASSWORD)
    assert response.status_code == 302, response.text
    assert response.headers["location"] == "/admin/"
    return browser


@pytest.fixture
def world(client, signup):
    """One of everything: a user with a session and group, a chat with a second member, a message, an event."""
    token, user, _ = signup()
    _, guest, _ = signup()
    response = client.post("/chat/create", data={"name": unique_name("chat"), "model": "gpt-4"}, headers=bearer(token))
    assert response.status_code == 200, response.text
    chat = Chat.objects.get(pk=response.json()["id"])
    ChatMember.objects.create(chat=chat, user_id=guest["id"])
    message = Message.objects.create(chat=chat, author_id=user["id"], prompt="hello there", reply="general kenobi")
    event = Event.objects.create(
        type="proxy", user_id=user["id"], method="POST", path="/v1/chat/completions", status=200, model="gpt-4"
    )
    return {
        "token": token,
        "user": User.objects.get(pk=user["id"]),
        "session": Session.objects.get(user_id=user["id"]),
        "group": Group.objects.get(owner_id=user["id"]),
        "group_member": GroupMember.objects.get(user_id=user["id"]),
        "chat": chat,
        "chat_member": ChatMember.objects.get(chat=chat, user_id=guest["id"]),
        "message": message,
        "event": event,
    }


# --- access and pages -----------------------------------------------------------------------------


def test_admin_needs_a_staff_login(browser, signup):
    response = browser.get("/admin/accounts/session/")
    assert response.status_code == 302
    assert response.headers["location"].startswith("/admin/login/")

    _, user, password = signup()
    refused = log_in(browser, user["username"], password)
    assert refused.status_code == 200
    assert "Please enter the correct username and password for a staff account" in refused.text
    assert browser.get("/admin/").status_code == 302


def test_index_is_branded_and_lists_turbo_groups_not_django_groups(admin):
    index = admin.get("/admin/")
    assert index.status_code == 200
    assert "<title>Site administration | Turbo admin</title>" in index.text
    assert '<a href="/admin/">Turbo admin</a>' in index.text
    assert "/admin/groups/group/" in index.text
    assert "/admin/auth/group/" not in index.text
    assert admin.get("/admin/auth/group/").status_code == 404


@pytest.mark.parametrize(
    "changelist, shown",
    [
        ("/admin/accounts/user/", lambda w: w["user"].username),
        ("/admin/accounts/session/", lambda w: w["user"].username),
        ("/admin/groups/group/", lambda w: w["user"].username),
        ("/admin/groups/groupmember/", lambda w: w["group"].name),
        ("/admin/chats/chat/", lambda w: w["chat"].name),
        ("/admin/chats/chatmember/", lambda w: w["chat"].name),
        ("/admin/chats/message/", lambda w: str(w["message"].pk)),
        ("/admin/proxy/event/", lambda w: "/v1/chat/completions"),
    ],
)
def test_every_changelist_loads_and_shows_its_rows(admin, world, changelist, shown):
    response = admin.get(changelist)
    assert response.status_code == 200
    assert shown(world) in response.text


@pytest.mark.parametrize(
    "changelist, search, shown",
    [
        ("/admin/accounts/user/", lambda w: w["user"].username, lambda w: w["user"].username),
        ("/admin/accounts/session/", lambda w: w["user"].username, lambda w: w["user"].username),
        ("/admin/groups/group/", lambda w: w["user"].username, lambda w: w["group"].name),
        ("/admin/chats/chat/", lambda w: w["chat"].name, lambda w: w["chat"].name),
        ("/admin/chats/message/", lambda w: "kenobi", lambda w: str(w["message"].pk)),
        ("/admin/proxy/event/", lambda w: w["user"].username, lambda w: "/v1/chat/completions"),
    ],
)
def test_search_finds_the_row_and_only_matching_rows(admin, world, changelist, search, shown):
    found = admin.get(changelist, params={"q": search(world)})
    assert found.status_code == 200
    assert shown(world) in found.text
    missed = admin.get(changelist, params={"q": "no-such-thing-" + uuid.uuid4().hex})
    assert missed.status_code == 200
    assert shown(world) not in missed.text


def test_every_change_page_loads(admin, world):
    pages = {
        "/admin/accounts/user/{}/change/": world["user"],
        "/admin/accounts/session/{}/change/": world["session"],
        "/admin/groups/group/{}/change/": world["group"],
        "/admin/groups/groupmember/{}/change/": world["group_member"],
        "/admin/chats/chat/{}/change/": world["chat"],
        "/admin/chats/chatmember/{}/change/": world["chat_member"],
        "/admin/chats/message/{}/change/": world["message"],
        "/admin/proxy/event/{}/change/": world["event"],
    }
    for page, obj in pages.items():
        response = admin.get(page.format(obj.pk))
        assert response.status_code == 200, page
        assert str(obj) in response.text, page


def test_read_only_models_offer_no_add_or_edit(admin, world):
    for add_page in ("/admin/accounts/session/add/", "/admin/proxy/event/add/", "/admin/chats/message/add/"):
        assert admin.get(add_page).status_code == 403, add_page
    for add_page in ("/admin/groups/group/add/", "/admin/chats/chat/add/"):
        assert admin.get(add_page).status_code == 403, add_page
    session_page = admin.get(f"/admin/accounts/session/{world['session'].pk}/change/")
    assert 'name="_save"' not in session_page.text
    assert admin.get(f"/admin/accounts/session/{world['session'].pk}/delete/").status_code == 403


# --- sessions: secrets and revocation -------------------------------------------------------------


def test_session_pages_never_show_the_token_or_its_hash(admin, signup):
    token, user, _ = signup()
    session = Session.objects.get(user_id=user["id"])
    pages = {
        "/admin/accounts/session/": user["username"],
        f"/admin/accounts/session/?q={user['username']}": user["username"],
        f"/admin/accounts/session/{session.pk}/change/": user["username"],
        f"/admin/accounts/session/{session.pk}/history/": str(session),
        f"/admin/accounts/user/{user['id']}/change/": user["username"],
    }
    for page, shown in pages.items():
        response = admin.get(page)
        assert response.status_code == 200, page
        assert shown in response.text, page
        assert session.token_hash not in response.text, page
        assert token not in response.text, page
        assert "token_hash" not in response.text and "Token hash" not in response.text, page

    change_page = admin.get(f"/admin/accounts/session/{session.pk}/change/").text
    for label in ("Kind", "Expires at", "Last used at", "Revoked at", "Client ip", "User agent"):
        assert label in change_page


def test_changelists_cannot_be_filtered_on_the_token_hash(admin, signup):
    _, user, _ = signup()
    prefix = Session.objects.get(user_id=user["id"]).token_hash[:8]
    for page in (
        f"/admin/accounts/session/?token_hash__startswith={prefix}",
        f"/admin/accounts/user/?login_sessions__token_hash__startswith={prefix}",
    ):
        response = admin.get(page)
        assert response.status_code == 400, page
        assert user["username"] not in response.text


def test_revoke_all_sessions_ends_every_token_of_the_selected_user_only(admin, client, signup):
    alice_token, alice, password = signup()
    login = client.post("/user/login", data={"username": alice["username"], "password": password})
    assert login.status_code == 200
    alice_second_token = login.json()["token"]
    bob_token, _, _ = signup()
    # Used once first, so that the lookups are cached: revocation must drop them too.
    for token in (alice_token, alice_second_token, bob_token):
        assert token_works(client, token) == 200

    response = run_action(admin, "/admin/accounts/user/", "revoke_all_sessions", [alice["id"]])
    assert response.status_code == 302
    assert "Revoked 2 sessions of 1 user." in admin.get(response.headers["location"]).text

    assert token_works(client, alice_token) == 401
    assert token_works(client, alice_second_token) == 401
    assert token_works(client, bob_token) == 200
    assert not Session.objects.filter(user_id=alice["id"], revoked_at__isnull=True).exists()


def test_revoke_selected_sessions_ends_only_those(admin, client, signup):
    first_token, user, password = signup()
    first = Session.objects.get(user_id=user["id"])
    second_token = client.post("/user/login", data={"username": user["username"], "password": password}).json()["token"]
    for token in (first_token, second_token):
        assert token_works(client, token) == 200

    response = run_action(admin, "/admin/accounts/session/", "revoke_selected_sessions", [first.pk])
    assert response.status_code == 302
    assert "Revoked 1 session." in admin.get(response.headers["location"]).text
    assert token_works(client, first_token) == 401
    assert token_works(client, second_token) == 200

    again = run_action(admin, "/admin/accounts/session/", "revoke_selected_sessions", [first.pk])
    assert "Revoked 0 sessions." in admin.get(again.headers["location"]).text


def test_revoked_filter_splits_active_from_revoked_sessions(admin, client, signup):
    token, user, _ = signup()
    assert client.post("/user/logout", headers=bearer(token)).status_code == 200
    _, other, _ = signup()
    revoked = admin.get("/admin/accounts/session/", params={"revoked": "yes"}).text
    active = admin.get("/admin/accounts/session/", params={"revoked": "no", "kind__exact": "token"}).text
    assert user["username"] in revoked and other["username"] not in revoked
    assert other["username"] in active and user["username"] not in active


# --- users ----------------------------------------------------------------------------------------


def test_adding_a_user_gives_them_a_personal_group_and_a_working_login(admin, client):
    username = unique_name()
    response = post_form(
        admin,
        "/admin/accounts/user/add/",
        {"username": username, "first_name": "Ada", "password1": "a-long-pass-1", "password2": "a-long-pass-1"},
    )
    assert response.status_code == 302, response.text
    user = User.objects.get(username=username)
    assert user.first_name == "Ada"
    assert [g.name for g in Group.objects.filter(owner=user)] == ["Personal"]
    assert GroupMember.objects.filter(user=user, group__owner=user).exists()
    login = client.post("/user/login", data={"username": username, "password": "a-long-pass-1"})
    assert login.status_code == 200


def test_adding_a_username_taken_in_another_case_is_refused(admin, signup):
    _, user, _ = signup()
    count = User.objects.count()
    response = post_form(
        admin,
        "/admin/accounts/user/add/",
        {"username": user["username"].upper(), "password1": "a-long-pass-1", "password2": "a-long-pass-1"},
    )
    assert response.status_code == 200
    assert "errornote" in response.text
    assert User.objects.count() == count


def test_password_change_in_the_admin_ends_the_users_sessions(admin, client, signup):
    token, user, _ = signup()
    assert token_works(client, token) == 200
    response = post_form(
        admin,
        f"/admin/accounts/user/{user['id']}/password/",
        {"usable_password": "true", "password1": "brand-new-pass", "password2": "brand-new-pass"},
    )
    assert response.status_code == 302, response.text
    assert token_works(client, token) == 401
    login = client.post("/user/login", data={"username": user["username"], "password": "brand-new-pass"})
    assert login.status_code == 200


# --- groups and chats -----------------------------------------------------------------------------


def test_removing_members_keeps_owners(admin, world):
    group = world["group"]
    guest = User.objects.exclude(pk=world["user"].pk).get(chat_memberships__chat=world["chat"])
    guest_membership = GroupMember.objects.create(group=group, user=guest)

    response = run_action(
        admin, "/admin/groups/groupmember/", "remove_selected", [world["group_member"].pk, guest_membership.pk]
    )
    assert response.status_code == 302
    page = admin.get(response.headers["location"]).text
    assert "Removed 1 member." in page
    assert "an owner cannot be removed" in page
    assert list(GroupMember.objects.filter(group=group).values_list("user_id", flat=True)) == [world["user"].pk]

    owner_delete = post_form(
        admin, f"/admin/chats/chatmember/{_owner_chat_membership(world).pk}/delete/", {"post": "yes"}
    )
    assert owner_delete.status_code == 302
    assert ChatMember.objects.filter(chat=world["chat"], user=world["user"]).exists()


def _owner_chat_membership(world) -> ChatMember:
    return ChatMember.objects.get(chat=world["chat"], user=world["user"])


def test_the_inline_cannot_remove_the_groups_owner(admin, world):
    group, owner_membership = world["group"], world["group_member"]
    response = post_form(
        admin,
        f"/admin/groups/group/{group.pk}/change/",
        {
            "name": "Renamed",
            "description": "",
            "memberships-TOTAL_FORMS": "1",
            "memberships-INITIAL_FORMS": "1",
            "memberships-MIN_NUM_FORMS": "0",
            "memberships-MAX_NUM_FORMS": "1000",
            "memberships-0-id": str(owner_membership.pk),
            "memberships-0-group": str(group.pk),
            "memberships-0-user": str(world["user"].pk),
            "memberships-0-DELETE": "on",
        },
    )
    assert response.status_code == 200
    assert "The owner cannot be removed." in response.text
    group.refresh_from_db()
    assert group.name != "Renamed"
    assert GroupMember.objects.filter(pk=owner_membership.pk).exists()


def test_removing_a_chat_member_in_the_admin_ends_their_access(admin, client, world, signup):
    guest_token, guest, _ = signup()
    chat = world["chat"]
    membership = ChatMember.objects.create(chat=chat, user_id=guest["id"])
    assert client.get("/chat/read", params={"id": str(chat.pk)}, headers=bearer(guest_token)).status_code == 200

    response = post_form(admin, f"/admin/chats/chatmember/{membership.pk}/delete/", {"post": "yes"})
    assert response.status_code == 302
    assert not ChatMember.objects.filter(pk=membership.pk).exists()
    assert client.get("/chat/read", params={"id": str(chat.pk)}, headers=bearer(guest_token)).status_code == 404


def test_deleting_a_message_in_the_admin_removes_it_from_the_chat(admin, client, world):
    message = world["message"]
    response = post_form(admin, f"/admin/chats/message/{message.pk}/delete/", {"post": "yes"})
    assert response.status_code == 302
    read = client.get("/chat/read", params={"id": str(world["chat"].pk)}, headers=bearer(world["token"]))
    assert read.status_code == 200
    assert read.json()["messages"] == []


# --- the event log --------------------------------------------------------------------------------


def test_event_changelist_filters_by_type_status_method_date_and_user(admin, signup):
    _, alice, _ = signup()
    _, bob, _ = signup()
    marker = uuid.uuid4().hex
    Event.objects.create(type="proxy", user_id=alice["id"], method="POST", path=f"/v1/alice-{marker}", status=200)
    Event.objects.create(type="request", user_id=bob["id"], method="GET", path=f"/v1/bob-{marker}", status=404)
    now = timezone.now()

    def listed(**params) -> str:
        response = admin.get("/admin/proxy/event/", params=params)
        assert response.status_code == 200, params
        return response.text

    both = listed(q=marker)
    assert f"alice-{marker}" in both and f"bob-{marker}" in both
    for params in (
        {"type__exact": "proxy"},
        {"status__exact": "200"},
        {"method__exact": "POST"},
        {"user_id": alice["id"]},
        {"type__exact": "proxy", "status__exact": "200", "method__exact": "POST", "user_id": alice["id"]},
        {"created_at__year": now.year, "created_at__month": now.month, "created_at__day": now.day},
    ):
        page = listed(q=marker, **params)
        assert f"alice-{marker}" in page, params
        if "created_at__year" not in params:
            assert f"bob-{marker}" not in page, params
    by_user = listed(user_id=bob["id"])
    assert f"bob-{marker}" in by_user and f"alice-{marker}" not in by_user
    assert f'<a href="/admin/proxy/event/?user_id={bob["id"]}"' in by_user

    bad = admin.get("/admin/proxy/event/", params={"user_id": "not-a-uuid"})
    assert bad.status_code == 302
    assert bad.headers["location"].endswith("?e=1")


def test_events_are_read_only_but_a_superuser_may_delete_them(admin, world):
    event = world["event"]
    page = admin.get(f"/admin/proxy/event/{event.pk}/change/")
    assert page.status_code == 200
    assert 'name="_save"' not in page.text
    response = post_form(admin, f"/admin/proxy/event/{event.pk}/delete/", {"post": "yes"})
    assert response.status_code == 302
    assert not Event.objects.filter(pk=event.pk).exists()


def test_adding_a_chat_member_in_the_admin_gives_access_but_not_to_inactive_users(admin, client, world, signup):
    chat = world["chat"]
    token, newcomer, _ = signup()
    _, dormant, _ = signup()
    User.objects.filter(pk=dormant["id"]).update(is_active=False)

    refused = post_form(admin, "/admin/chats/chatmember/add/", {"chat": str(chat.pk), "user": dormant["id"]})
    assert refused.status_code == 200
    assert "errornote" in refused.text
    assert not ChatMember.objects.filter(chat=chat, user_id=dormant["id"]).exists()

    added = post_form(admin, "/admin/chats/chatmember/add/", {"chat": str(chat.pk), "user": newcomer["id"]})
    assert added.status_code == 302, added.text
    assert client.get("/chat/read", params={"id": str(chat.pk)}, headers=bearer(token)).status_code == 200


def test_deleting_a_chat_in_the_admin_deletes_it_with_members_and_messages(admin, client, world):
    chat = world["chat"]
    response = post_form(admin, f"/admin/chats/chat/{chat.pk}/delete/", {"post": "yes"})
    assert response.status_code == 302
    assert client.get("/chat/read", params={"id": str(chat.pk)}, headers=bearer(world["token"])).status_code == 404
    assert not ChatMember.objects.filter(chat_id=chat.pk).exists()
    assert not Message.objects.filter(chat_id=chat.pk).exists()


def test_deleting_a_group_in_the_admin_keeps_its_chats(admin, client, world):
    group = world["group"]
    response = client.post(
        "/chat/create", data={"name": "in the group", "group_id": str(group.pk)}, headers=bearer(world["token"])
    )
    assert response.status_code == 200, response.text
    chat_id = response.json()["id"]

    deleted = post_form(admin, f"/admin/groups/group/{group.pk}/delete/", {"post": "yes"})
    assert deleted.status_code == 302
    assert not Group.objects.filter(pk=group.pk).exists()
    assert not GroupMember.objects.filter(group_id=group.pk).exists()
    read = client.get("/chat/read", params={"id": chat_id}, headers=bearer(world["token"]))
    assert read.status_code == 200
    assert read.json()["chat"]["group_id"] is None
