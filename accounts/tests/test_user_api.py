"""The /user/* endpoints over real HTTP, form and JSON bodies alike."""

import json

import pytest

from accounts.models import Session, User
from conftest import unique_name
from groups.models import Group, GroupMember

pytestmark = pytest.mark.django_db


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def test_signup_with_form_body_returns_token_user_cookie_and_personal_group(client):
    name = unique_name()
    response = client.post("/user/signup", data={"username": name, "password": "bazbar99"})
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"token", "user"}
    assert body["user"]["username"] == name
    assert [g["name"] for g in body["user"]["groups"]] == ["Personal"]
    assert "password" not in response.text and "md5$" not in response.text
    cookie = response.headers["set-cookie"]
    assert f"sess={body['token']}" in cookie
    assert "HttpOnly" in cookie and "Path=/" in cookie and "SameSite=Lax" in cookie
    group = Group.objects.get(pk=body["user"]["groups"][0]["id"])
    assert group.owner.username == name
    assert GroupMember.objects.filter(group=group, user__username=name).exists()


def test_signup_with_json_body_names_group_and_defaults_first_name(client):
    name = f"{unique_name()}@example.com"
    response = client.post(
        "/user/signup",
        json={"username": name, "password": "s3cret-pass", "last_name": "Ahmed", "group_name": "Acme"},
    )
    assert response.status_code == 200, response.text
    user = response.json()["user"]
    assert user["first_name"] == name.split("@")[0]
    assert user["last_name"] == "Ahmed"
    assert [g["name"] for g in user["groups"]] == ["Acme"]


def test_token_is_stored_only_as_a_hash(signup):
    token, user, _ = signup()
    session = Session.objects.get(user_id=user["id"])
    assert session.token_hash != token
    assert token not in session.token_hash
    assert len(session.token_hash) == 64


def test_signup_taken_username_is_409_case_insensitively_and_changes_nothing(client, signup):
    _, user, _ = signup(username="Taken-Name")
    before = (User.objects.count(), Group.objects.count())
    response = client.post("/user/signup", data={"username": "taken-name", "password": "another-pass"})
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "username_taken"
    assert (User.objects.count(), Group.objects.count()) == before


@pytest.mark.parametrize(
    "body, field",
    [
        ({"password": "long-enough"}, "username"),
        ({"username": "someone"}, "password"),
        ({"username": "someone", "password": ""}, "password"),
        ({"username": "someone", "password": "abc"}, "password"),
        ({"username": "x" * 151, "password": "long-enough"}, "username"),
        ({"username": "bad name!", "password": "long-enough"}, "username"),
        ({"username": 12345, "password": "long-enough"}, "username"),
        ({"username": ["a"], "password": "long-enough"}, "username"),
        ({"username": "someone", "password": "long-enough", "first_name": "f" * 151}, "first_name"),
    ],
)
def test_signup_bad_input_is_a_400_naming_the_field(client, body, field):
    count = User.objects.count()
    response = client.post("/user/signup", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid"
    assert error["message"].startswith(field)
    assert User.objects.count() == count


def test_login_with_form_and_json_returns_new_token_and_groups(client, signup):
    _, user, password = signup()
    form = client.post("/user/login", data={"username": user["username"], "password": password})
    as_json = client.post("/user/login", json={"username": user["username"], "password": password})
    assert form.status_code == as_json.status_code == 200
    assert form.json()["token"] != as_json.json()["token"]
    assert form.json()["user"]["groups"][0]["name"] == "Personal"
    assert "sess=" in form.headers["set-cookie"]


def test_login_failures_are_identical_for_unknown_user_and_wrong_password(client, signup):
    _, user, _ = signup()
    wrong = client.post("/user/login", data={"username": user["username"], "password": "not-it-at-all"})
    unknown = client.post("/user/login", data={"username": unique_name(), "password": "not-it-at-all"})
    assert wrong.status_code == unknown.status_code == 401
    assert wrong.json() == unknown.json()


def test_failed_logins_are_rate_limited_per_username_and_address(client, signup, settings):
    settings.LOGIN_FAILURES_PER_USERNAME = 3
    _, user, password = signup()
    for _ in range(3):
        assert (
            client.post("/user/login", data={"username": user["username"], "password": "wrong-pw"}).status_code == 401
        )
    limited = client.post("/user/login", data={"username": user["username"], "password": password})
    assert limited.status_code == 429
    assert int(limited.headers["Retry-After"]) > 0
    assert limited.json()["error"]["code"] == "rate_limited"


def test_a_lockout_from_one_address_leaves_the_user_free_elsewhere(client, signup, settings):
    settings.TRUSTED_PROXIES = ["127.0.0.1"]  # the test client stands for a reverse proxy: X-Forwarded-For counts
    settings.LOGIN_FAILURES_PER_USERNAME = 3
    _, user, password = signup()
    attacker, owner = {"X-Forwarded-For": "203.0.113.5"}, {"X-Forwarded-For": "198.51.100.7"}

    def login(headers, pw):
        return client.post("/user/login", data={"username": user["username"], "password": pw}, headers=headers)

    for _ in range(3):
        assert login(attacker, "wrong-pw").status_code == 401
    assert login(attacker, password).status_code == 429  # the attacker's address is locked out
    assert login(owner, password).status_code == 200  # the real user, elsewhere, is not
    for _ in range(3):
        login(owner, "wrong-pw")
    assert login(owner, password).status_code == 429  # and the owner's address has its own count


def test_failed_logins_are_rate_limited_per_client_address(client, settings):
    settings.LOGIN_FAILURES_PER_IP = 2
    for _ in range(2):
        client.post("/user/login", data={"username": unique_name(), "password": "wrong-pw"})
    assert client.post("/user/login", data={"username": unique_name(), "password": "wrong-pw"}).status_code == 429


def test_every_token_source_authenticates(client, signup, new_client):
    token, user, _ = signup()
    by_bearer = client.get("/user/session", headers=bearer(token))
    by_basic = client.get("/user/session", auth=("ignored-username", token))
    by_cookie = new_client(cookies={"sess": token}).get("/user/session")
    for response in (by_bearer, by_basic, by_cookie):
        assert response.status_code == 200, response.text
        assert response.json()["user"]["id"] == user["id"]
    assert by_bearer.json()["session"]["expires_at"]


def test_missing_and_bad_tokens_are_401(client):
    assert client.get("/user/session").status_code == 401
    bad = client.get("/user/session", headers=bearer("not-a-real-token"))
    assert bad.status_code == 401
    assert bad.json()["error"]["code"] == "unauthorized"
    assert client.get("/user/session", headers={"Authorization": "Basic !!!"}).status_code == 401


def test_expired_session_is_401(client, signup):
    from datetime import timedelta

    from django.core.cache import cache
    from django.utils import timezone

    token, user, _ = signup()
    Session.objects.filter(user_id=user["id"]).update(expires_at=timezone.now() - timedelta(seconds=1))
    cache.clear()
    assert client.get("/user/session", headers=bearer(token)).status_code == 401


def test_session_lookups_are_cached_but_logout_revokes_at_once(client, signup, django_assert_max_num_queries):
    token, _, _ = signup()
    assert client.get("/user/session", headers=bearer(token)).status_code == 200
    from accounts.services import session_lookup

    with django_assert_max_num_queries(0):
        assert session_lookup(token) is not None
    assert client.post("/user/logout", headers=bearer(token)).status_code == 200
    assert client.get("/user/session", headers=bearer(token)).status_code == 401


def test_logout_by_token_field_form_and_json_and_clears_cookie(client, signup):
    first, _, _ = signup()
    second, _, _ = signup()
    form = client.post("/user/logout", data={"token": first})
    assert form.status_code == 200 and form.json() == {}
    assert 'sess=""' in form.headers["set-cookie"] or "sess=;" in form.headers["set-cookie"]
    as_json = client.post("/user/logout", json={"token": second})
    assert as_json.status_code == 200
    for token in (first, second):
        assert client.get("/user/session", headers=bearer(token)).status_code == 401


def test_logout_with_get_and_cookie_like_the_seed(new_client, signup):
    token, _, _ = signup()
    assert new_client(cookies={"sess": token}).get("/user/logout").status_code == 200
    from accounts.tokens import token_hash

    assert Session.objects.get(token_hash=token_hash(token)).revoked_at is not None


def test_logout_without_token_is_401(client):
    response = client.post("/user/logout")
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "unauthorized"


def test_user_read_own_and_others(client, signup):
    token, me, _ = signup()
    _, other, _ = signup()
    own = client.get("/user/read", params={"id": me["id"]}, headers=bearer(token))
    assert own.status_code == 200
    assert own.json()["user"] == me
    assert client.post("/user/read", data={"id": other["id"]}, headers=bearer(token)).status_code == 404
    bad = client.post("/user/read", json={"id": "not-a-uuid"}, headers=bearer(token))
    assert bad.status_code == 400 and bad.json()["error"]["message"].startswith("id")


def test_user_update_changes_only_given_fields(client, signup):
    token, me, _ = signup(first_name="Ada", last_name="Lovelace")
    new_name = unique_name()
    response = client.post("/user/update", data={"id": me["id"], "username": new_name}, headers=bearer(token))
    assert response.status_code == 200, response.text
    updated = response.json()["user"]
    assert updated["username"] == new_name
    assert (updated["first_name"], updated["last_name"]) == ("Ada", "Lovelace")
    # The cached session carries the new name at once.
    assert client.get("/user/session", headers=bearer(token)).json()["user"]["username"] == new_name


def test_user_update_taken_username_is_409_and_changes_nothing(client, signup):
    token, me, _ = signup()
    _, other, _ = signup()
    response = client.post(
        "/user/update",
        json={"id": me["id"], "username": other["username"].upper(), "first_name": "X"},
        headers=bearer(token),
    )
    assert response.status_code == 409
    assert User.objects.get(pk=me["id"]).username == me["username"]
    assert User.objects.get(pk=me["id"]).first_name == me["first_name"]


def test_user_update_of_another_user_is_404(client, signup):
    token, _, _ = signup()
    _, other, _ = signup()
    response = client.post("/user/update", json={"id": other["id"], "first_name": "Mallory"}, headers=bearer(token))
    assert response.status_code == 404
    assert User.objects.get(pk=other["id"]).first_name == ""


def test_password_update_revokes_every_other_session(client, signup):
    token, user, password = signup()
    other = client.post("/user/login", data={"username": user["username"], "password": password}).json()["token"]
    response = client.post(
        "/user/password/update",
        data={"old_password": password, "new_password": "brand-new-pass"},
        headers=bearer(token),
    )
    assert response.status_code == 200 and response.json() == {}
    assert client.get("/user/session", headers=bearer(token)).status_code == 200
    assert client.get("/user/session", headers=bearer(other)).status_code == 401
    assert client.post("/user/login", data={"username": user["username"], "password": password}).status_code == 401
    relogin = client.post("/user/login", data={"username": user["username"], "password": "brand-new-pass"})
    assert relogin.status_code == 200


def test_password_update_with_wrong_old_password_is_401_and_keeps_password(client, signup):
    token, user, password = signup()
    response = client.post(
        "/user/password/update",
        json={"old_password": "nope-nope", "new_password": "brand-new-pass"},
        headers=bearer(token),
    )
    assert response.status_code == 401
    assert User.objects.get(pk=user["id"]).check_password(password)


def test_password_update_rejects_empty_new_password(client, signup):
    token, user, password = signup()
    response = client.post(
        "/user/password/update", json={"old_password": password, "new_password": ""}, headers=bearer(token)
    )
    assert response.status_code == 400
    assert response.json()["error"]["message"].startswith("new_password")
    assert User.objects.get(pk=user["id"]).check_password(password)


def test_register_and_jwt_login_of_seed_002(client):
    name = unique_name()
    registered = client.post("/api/users/register", json={"username": name, "password": "pass-word"})
    assert registered.status_code == 201
    assert registered.json() == {"message": "User registered successfully"}
    again = client.post("/api/users/register", json={"username": name, "password": "pass-word"})
    assert again.status_code == 400
    assert again.json()["error"]["message"] == "username already exists"

    login = client.post("/api/users/login", json={"username": name, "password": "pass-word"})
    assert login.status_code == 200
    jwt_token = login.json()["token"]
    assert jwt_token.count(".") == 2
    session = client.get("/user/session", headers=bearer(jwt_token))
    assert session.status_code == 200
    assert session.json()["session"]["kind"] == "jwt"

    bad = client.post("/api/users/login", json={"username": name, "password": "wrong-one"})
    assert bad.status_code == 401
    assert bad.json()["error"]["message"] == "invalid username or password"


def test_jwt_is_revoked_by_logout_and_forgery_is_refused(client):
    import jwt as pyjwt

    name = unique_name()
    client.post("/api/users/register", json={"username": name, "password": "pass-word"})
    token = client.post("/api/users/login", json={"username": name, "password": "pass-word"}).json()["token"]
    claims = pyjwt.decode(token, options={"verify_signature": False})
    forged = pyjwt.encode(claims, "not-the-secret-key-but-32-bytes-long!", algorithm="HS256")
    assert client.get("/user/session", headers=bearer(forged)).status_code == 401
    assert client.post("/user/logout", headers=bearer(token)).status_code == 200
    assert client.get("/user/session", headers=bearer(token)).status_code == 401


def test_cookie_authenticated_cross_site_post_is_refused(client, new_client, signup):
    token, me, _ = signup()
    with new_client(cookies={"sess": token}) as browser:
        evil = browser.post(
            "/user/update", data={"id": me["id"], "first_name": "pwned"}, headers={"Origin": "https://evil.example"}
        )
        assert evil.status_code == 403
        assert User.objects.get(pk=me["id"]).first_name == ""
        same_origin = browser.post(
            "/user/update",
            data={"id": me["id"], "first_name": "Me"},
            headers={"Origin": str(browser.base_url).rstrip("/")},
        )
        assert same_origin.status_code == 200
        # curl --cookie sends no Origin at all: still works, as documented.
        assert browser.post("/user/update", data={"id": me["id"], "first_name": "Curl"}).status_code == 200
    # Bearer tokens are not sent by browsers on their own: no Origin rule for them.
    assert (
        client.post(
            "/user/update", data={"id": me["id"]}, headers={**bearer(token), "Origin": "https://evil.example"}
        ).status_code
        == 200
    )


def test_cross_site_login_is_refused(client, signup):
    _, user, password = signup()
    response = client.post(
        "/user/login",
        data={"username": user["username"], "password": password},
        headers={"Origin": "https://evil.example"},
    )
    assert response.status_code == 403


def test_logout_with_json_sent_as_a_form_like_the_seeds_curl_line(client, signup):
    token, _, _ = signup()
    # curl -XPOST /user/logout -d '{"token": "..."}' labels the JSON as a form.
    response = client.post(
        "/user/logout",
        content=json.dumps({"token": token}).encode(),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert response.status_code == 200
    assert client.get("/user/session", headers=bearer(token)).status_code == 401
