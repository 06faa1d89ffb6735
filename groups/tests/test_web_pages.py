"""The web app's group pages over HTTP (Turbo's whole ASGI app, in process): create, rename, add and remove
members, leave; who may do which (the owner manages, a member may only leave, anyone else gets a 404), and
that a refused request changes nothing."""

import uuid

import pytest

from chats.models import Chat
from conftest import unique_name
from groups.models import Group, GroupMember
from testing.pages import page_of, post_form

pytestmark = pytest.mark.django_db
pytest_plugins = ["testing.pages"]  # the browsers and person fixtures


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def team(client, person):
    """A group owned by one user with one other member, and a stranger: each (token, user, browser)."""
    owner, member, stranger = person(), person(), person()
    response = client.post("/group/create", data={"name": "Team"}, headers=bearer(owner[0]))
    group = Group.objects.get(pk=response.json()["id"])
    added = client.post(
        "/group/members/add", data={"id": group.pk, "user_ids": member[1]["id"]}, headers=bearer(owner[0])
    )
    assert added.status_code == 200
    return group, owner, member, stranger


def group_form(browser, group, data):
    path = f"/groups/{group.pk}"
    browser.get(path)
    return post_form(browser, path, data)


def members_of(group) -> set[str]:
    return set(GroupMember.objects.filter(group=group).values_list("user__username", flat=True))


def test_creating_a_group_from_the_index(person):
    _, user, browser = person()
    browser.get("/")
    response = post_form(browser, "/groups/new", {"name": "Climbers"}, referer="/")
    assert response.status_code == 302
    group = Group.objects.get(owner_id=user["id"], name="Climbers")
    assert response.headers["location"] == f"/groups/{group.pk}"
    page = page_of(browser.get(f"/groups/{group.pk}"))
    assert page.select_one("h1#group-title").text == "Climbers"
    assert [li.get("data-username") for li in page.select("ul#members li.member")] == [user["username"]]
    assert f"/groups/{group.pk}" in [a.get("href") for a in page_of(browser.get("/")).select("a.group-link")]


def test_a_blank_group_name_is_a_form_error(person):
    _, user, browser = person()
    before = Group.objects.filter(owner_id=user["id"]).count()
    browser.get("/")
    response = post_form(browser, "/groups/new", {"name": "   "}, referer="/")
    assert response.status_code == 200
    assert page_of(response).select_one("form#group-create-form .form-error").get("role") == "alert"
    assert Group.objects.filter(owner_id=user["id"]).count() == before


def test_the_owner_sees_the_management_forms_and_a_member_only_leave(client, team):
    group, owner, member, _ = team
    chat = Chat.objects.create(owner_id=member[1]["id"], group=group, name="Team <chat>", model="gpt-4o-mini")

    page = page_of(owner[2].get(f"/groups/{group.pk}"))
    assert page.select_one("h1#group-title").text == "Team"
    assert page.select_one("form#group-rename-form input[name=name]").get("value") == "Team"
    assert page.select_one("form#group-rename-form button#group-rename-submit")
    assert page.select_one("form#member-add-form input[name=username]")
    assert page.select_one("form#member-add-form button#member-add-submit")
    items = {li.get("data-username"): li for li in page.select("ul#members li.member")}
    assert set(items) == {owner[1]["username"], member[1]["username"]}
    assert not items[owner[1]["username"]].select("button.remove-member")  # not for the owner themself
    assert items[member[1]["username"]].select_one("form button.remove-member")
    assert not page.select("#leave-form")
    assert [(a.text, a.get("href")) for a in page.select("a.chat-link")] == [("Team <chat>", f"/chats/{chat.pk}")]

    page = page_of(member[2].get(f"/groups/{group.pk}"))
    assert not page.select("#group-rename-form, #member-add-form, button.remove-member")
    assert page.select_one("form#leave-form button#leave")
    assert len(page.select("ul#members li.member")) == 2
    assert page.select("a.chat-link")


def test_a_group_i_am_not_in_is_a_404_page(team):
    group, _, _, stranger = team
    for path in (f"/groups/{group.pk}", f"/groups/{uuid.uuid4()}"):
        response = stranger[2].get(path)
        assert response.status_code == 404
        assert "not found" in page_of(response).select_one("main").text.lower()
        assert "Team" not in page_of(response).select_one("main").text
    response = group_form(stranger[2], group, {"intent": "rename", "name": "Mine now"})
    assert response.status_code == 404
    group.refresh_from_db()
    assert group.name == "Team"


def test_the_owner_renames_and_a_member_cannot(team):
    group, owner, member, _ = team
    response = group_form(owner[2], group, {"intent": "rename", "name": "Rope team"})
    assert response.status_code == 302 and response.headers["location"] == f"/groups/{group.pk}"
    assert page_of(owner[2].get(f"/groups/{group.pk}")).select_one("h1#group-title").text == "Rope team"

    response = group_form(owner[2], group, {"intent": "rename", "name": ""})
    assert response.status_code == 200
    assert page_of(response).select_one("#group-rename-form .form-error").text.strip()

    for name in ("Hijacked", ""):
        response = group_form(member[2], group, {"intent": "rename", "name": name})
        assert response.status_code == 403
        assert page_of(response).select_one("h1").text.strip()
    group.refresh_from_db()
    assert group.name == "Rope team"


def test_the_owner_adds_a_member_by_username(team, person):
    group, owner, _, _ = team
    _, newcomer, newcomer_browser = person()
    assert newcomer_browser.get(f"/groups/{group.pk}").status_code == 404

    response = group_form(owner[2], group, {"intent": "add", "username": newcomer["username"].upper()})
    assert response.status_code == 302
    assert newcomer["username"] in members_of(group)
    page = page_of(owner[2].get(f"/groups/{group.pk}"))
    assert page.select_one(f"li.member[data-username={newcomer['username']}]")
    assert newcomer_browser.get(f"/groups/{group.pk}").status_code == 200

    again = group_form(owner[2], group, {"intent": "add", "username": newcomer["username"]})
    assert again.status_code == 302  # a member already: nothing to do
    assert len(members_of(group)) == 3


def test_an_unknown_username_is_a_form_error_and_adds_nobody(team):
    group, owner, _, _ = team
    before = members_of(group)
    name = unique_name("nobody")
    response = group_form(owner[2], group, {"intent": "add", "username": name})
    assert response.status_code == 200
    error = page_of(response).select_one("form#member-add-form .form-error")
    assert error.get("role") == "alert" and f"no user named '{name}'" in error.text.lower()
    assert page_of(response).select_one("form#member-add-form input[name=username]").get("value") == name
    assert members_of(group) == before


def test_a_member_cannot_add_anyone(team, person):
    group, _, member, _ = team
    _, newcomer, _ = person()
    before = members_of(group)
    for username in (newcomer["username"], unique_name("nobody")):  # the same answer: no name is confirmed
        response = group_form(member[2], group, {"intent": "add", "username": username})
        assert response.status_code == 403
    assert members_of(group) == before


def test_the_owner_removes_a_member_and_a_member_cannot(team, person):
    group, owner, member, _ = team
    _, third, _ = person()
    GroupMember.objects.create(group=group, user_id=third["id"])

    response = group_form(member[2], group, {"intent": "remove", "user_id": third["id"]})
    assert response.status_code == 403
    response = group_form(member[2], group, {"intent": "remove", "user_id": owner[1]["id"]})
    assert response.status_code == 403
    assert members_of(group) == {owner[1]["username"], member[1]["username"], third["username"]}

    response = group_form(owner[2], group, {"intent": "remove", "user_id": owner[1]["id"]})
    assert response.status_code == 200
    assert "owner cannot be removed" in page_of(response).select_one(".form-error").text
    assert owner[1]["username"] in members_of(group)

    response = group_form(owner[2], group, {"intent": "remove", "user_id": third["id"]})
    assert response.status_code == 302
    assert members_of(group) == {owner[1]["username"], member[1]["username"]}
    page = page_of(owner[2].get(f"/groups/{group.pk}"))
    assert not page.select(f"li.member[data-username={third['username']}]")


def test_a_member_leaves_and_the_owner_cannot(team):
    group, owner, member, _ = team
    response = group_form(owner[2], group, {"intent": "leave"})
    assert response.status_code == 200
    assert "owner" in page_of(response).select_one(".form-error").text
    assert owner[1]["username"] in members_of(group)

    response = group_form(member[2], group, {"intent": "leave"})
    assert response.status_code == 302 and response.headers["location"] == "/"
    assert members_of(group) == {owner[1]["username"]}
    assert member[2].get(f"/groups/{group.pk}").status_code == 404
    links = [a.get("href") for a in page_of(member[2].get("/")).select("a.group-link")]
    assert f"/groups/{group.pk}" not in links


def test_group_forms_need_the_csrf_token_and_a_known_intent(team):
    group, owner, _, _ = team
    owner[2].get(f"/groups/{group.pk}")
    response = owner[2].post(f"/groups/{group.pk}", data={"intent": "rename", "name": "No token"})
    assert response.status_code == 403
    response = group_form(owner[2], group, {"intent": "explode"})
    assert response.status_code == 400
    assert page_of(response).select_one("h1").text.strip()
    group.refresh_from_db()
    assert group.name == "Team" and len(members_of(group)) == 2
