"""The /group/* endpoints over real HTTP, with the membership rules."""

import pytest

from groups.models import Group, GroupMember

pytestmark = pytest.mark.django_db


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def owner(signup):
    token, user, _ = signup()
    return token, user


def create_group(client, token, **fields) -> dict:
    response = client.post(
        "/group/create", data={"name": "Acme", "description": "my awesome group", **fields}, headers=bearer(token)
    )
    assert response.status_code == 200, response.text
    return response.json()


def test_create_read_index_like_the_seed(client, owner):
    token, user = owner
    group = create_group(client, token)
    assert {k: group[k] for k in ("name", "description", "owner_id")} == {
        "name": "Acme",
        "description": "my awesome group",
        "owner_id": user["id"],
    }
    assert client.get("/group/read", params={"id": group["id"]}, headers=bearer(token)).json() == group
    names = [g["name"] for g in client.get("/group/index", headers=bearer(token)).json()["groups"]]
    assert names == ["Personal", "Acme"]
    members = client.post("/group/members", json={"id": group["id"]}, headers=bearer(token)).json()["users"]
    assert [m["id"] for m in members] == [user["id"]]


def test_non_members_get_404_for_read_and_members(client, owner, signup):
    token, _ = owner
    group = create_group(client, token)
    stranger, _, _ = signup()
    for path in ("/group/read", "/group/members", "/group/update", "/group/delete"):
        response = client.post(path, data={"id": group["id"]}, headers=bearer(stranger))
        assert response.status_code == 404, path
    assert Group.objects.filter(pk=group["id"]).exists()


def test_members_add_by_group_id_or_id_in_every_list_format(client, owner, signup):
    token, _ = owner
    group = create_group(client, token)
    users = [signup()[1] for _ in range(4)]
    # repeated form fields, with the older group_id
    response = client.post(
        "/group/members/add",
        data={"group_id": group["id"], "user_ids": [users[0]["id"], users[1]["id"]]},
        headers=bearer(token),
    )
    assert response.status_code == 200 and response.json() == {}
    # a comma-separated string, with id
    client.post("/group/members/add", data={"id": group["id"], "user_ids": users[2]["id"]}, headers=bearer(token))
    # a JSON array, including an existing member (a no-op)
    again = client.post(
        "/group/members/add",
        json={"id": group["id"], "user_ids": [users[3]["id"], users[0]["id"]]},
        headers=bearer(token),
    )
    assert again.status_code == 200
    assert GroupMember.objects.filter(group_id=group["id"]).count() == 5
    member_view = client.get("/group/members", params={"id": group["id"]}, headers=bearer(token))
    assert len(member_view.json()["users"]) == 5


def test_adding_an_unknown_user_is_404_naming_it_and_adds_nobody(client, owner, signup):
    token, _ = owner
    group = create_group(client, token)
    _, known, _ = signup()
    missing = "00000000-0000-4000-8000-000000000000"
    response = client.post(
        "/group/members/add", json={"id": group["id"], "user_ids": [known["id"], missing]}, headers=bearer(token)
    )
    assert response.status_code == 404
    assert missing in response.json()["error"]["message"]
    assert GroupMember.objects.filter(group_id=group["id"]).count() == 1


def test_bad_user_ids_are_400(client, owner):
    token, _ = owner
    group = create_group(client, token)
    for bad in ({"id": group["id"], "user_ids": "not-a-uuid"}, {"id": group["id"]}, {"user_ids": group["owner_id"]}):
        response = client.post("/group/members/add", data=bad, headers=bearer(token))
        assert response.status_code == 400, bad
        assert response.json()["error"]["code"] == "invalid"


def test_only_the_owner_updates_deletes_and_adds(client, owner, signup):
    token, _ = owner
    group = create_group(client, token)
    member_token, member, _ = signup()
    _, other, _ = signup()
    client.post("/group/members/add", data={"id": group["id"], "user_ids": member["id"]}, headers=bearer(token))
    assert (
        client.post("/group/update", data={"id": group["id"], "name": "Mine"}, headers=bearer(member_token)).status_code
        == 403
    )
    assert client.post("/group/delete", data={"id": group["id"]}, headers=bearer(member_token)).status_code == 403
    add = client.post(
        "/group/members/add", data={"id": group["id"], "user_ids": other["id"]}, headers=bearer(member_token)
    )
    assert add.status_code == 403
    assert Group.objects.get(pk=group["id"]).name == "Acme"
    assert GroupMember.objects.filter(group_id=group["id"]).count() == 2


def test_update_changes_only_the_fields_given(client, owner):
    token, _ = owner
    group = create_group(client, token)
    updated = client.post("/group/update", json={"id": group["id"], "name": "Renamed"}, headers=bearer(token)).json()
    assert (updated["name"], updated["description"]) == ("Renamed", "my awesome group")
    cleared = client.post("/group/update", json={"id": group["id"], "description": ""}, headers=bearer(token)).json()
    assert (cleared["name"], cleared["description"]) == ("Renamed", "")


def test_members_remove_rules(client, owner, signup):
    token, user = owner
    group = create_group(client, token)
    a_token, a, _ = signup()
    b_token, b, _ = signup()
    client.post("/group/members/add", json={"id": group["id"], "user_ids": [a["id"], b["id"]]}, headers=bearer(token))
    # a member may not remove someone else, nor the owner
    assert (
        client.post(
            "/group/members/remove", json={"id": group["id"], "user_ids": [b["id"]]}, headers=bearer(a_token)
        ).status_code
        == 403
    )
    owner_out = client.post(
        "/group/members/remove", json={"id": group["id"], "user_ids": [user["id"]]}, headers=bearer(token)
    )
    assert owner_out.status_code == 400
    # a member may leave; the owner may remove others (form body, comma-separated)
    assert (
        client.post(
            "/group/members/remove", data={"group_id": group["id"], "user_ids": a["id"]}, headers=bearer(a_token)
        ).status_code
        == 200
    )
    assert (
        client.post(
            "/group/members/remove", data={"id": group["id"], "user_ids": b["id"]}, headers=bearer(token)
        ).status_code
        == 200
    )
    assert list(GroupMember.objects.filter(group_id=group["id"]).values_list("user_id", flat=True)) == [
        GroupMember.objects.get(group_id=group["id"]).user_id
    ]
    # the removed lose access at once
    assert client.post("/group/read", data={"id": group["id"]}, headers=bearer(b_token)).status_code == 404


def test_delete_removes_group_and_memberships(client, owner):
    token, _ = owner
    group = create_group(client, token)
    response = client.post("/group/delete", data={"id": group["id"]}, headers=bearer(token))
    assert response.status_code == 200 and response.json() == {}
    assert not Group.objects.filter(pk=group["id"]).exists()
    assert not GroupMember.objects.filter(group_id=group["id"]).exists()


def test_create_validation(client, owner):
    token, _ = owner
    count = Group.objects.count()
    for bad in ({}, {"name": ""}, {"name": "x" * 101}, {"name": "ok", "description": "d" * 1001}):
        response = client.post("/group/create", json=bad, headers=bearer(token))
        assert response.status_code == 400, bad
    assert Group.objects.count() == count
    assert client.post("/group/create", data={"name": "x"}).status_code == 401
