"""What schemathesis found (turbo_site/tests/test_schemathesis.py), each pinned by a test of its own:
no 500 for a body that is not what GraphQL reads, a 405 with `Allow` for any method an endpoint does not
take, a 426 for /ws over plain HTTP, and ids that are not text refused rather than read as UUIDs.

The requests go to Turbo's whole ASGI app in process (testing/inprocess.py), in one transaction."""

import pytest
from django.core.cache import cache

from accounts.services import session_create, user_create
from testing.inprocess import in_process_client

pytestmark = pytest.mark.django_db


@pytest.fixture
def http():
    with in_process_client() as client:
        yield client


@pytest.fixture
def bearer():
    cache.clear()
    _, token = session_create(user=user_create(username="finder", password="correct-horse-battery"))
    return {"Authorization": f"Bearer {token}"}


@pytest.mark.parametrize("body", [b'"AAA"', b"[1]", b"\xaf\xba\xa4\xd8", b"{"], ids=["string", "list", "utf8", "cut"])
def test_a_graphql_body_that_is_not_one_request_is_a_400(http, body):
    response = http.post("/graphql", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "bad_request"


def test_a_graphql_operation_name_must_be_text(http):
    body = {"query": "{ __typename }", "operationName": {}}
    response = http.post("/graphql", json=body)
    assert response.status_code == 400
    assert "operationName" in response.json()["error"]["message"]


@pytest.mark.parametrize(
    "method, path, allowed",
    [
        ("QUERY", "/health", "GET"),
        ("POST", "/info", "GET"),
        ("TRACE", "/metrics", "GET, HEAD"),
        ("DELETE", "/ws", "GET"),
        ("TRACE", "/graphql", "GET, POST"),
    ],
)
def test_a_method_an_endpoint_does_not_take_is_a_405_with_allow(http, method, path, allowed):
    response = http.request(method, path)
    assert response.status_code == 405, response.text
    assert response.headers["allow"] == allowed


def test_ws_over_plain_http_asks_for_the_upgrade(http):
    response = http.get("/ws")
    assert response.status_code == 426
    assert response.headers["upgrade"] == "websocket"
    assert response.json()["error"]["code"] == "upgrade_required"


@pytest.mark.parametrize("user_id", [0, False, 7])
def test_an_id_that_is_not_text_is_refused(http, bearer, user_id):
    chat = http.post("/chat/create", json={"name": "c"}, headers=bearer)
    assert chat.status_code == 200, chat.text
    body = {"chat_id": chat.json()["id"], "user_id": user_id}
    response = http.post("/chat/user/remove", json=body, headers=bearer)
    assert response.status_code == 400, response.text


def test_a_list_over_its_limit_is_refused_before_duplicates_go(http, bearer):
    group = http.post("/group/create", json={"name": "g"}, headers=bearer)
    ids = ["e3e70682-c209-4cac-a29f-6fbed82c07cd"] * 101
    response = http.post("/group/members/remove", json={"id": group.json()["id"], "user_ids": ids}, headers=bearer)
    assert response.status_code == 400, response.text
    assert "user_ids" in response.json()["error"]["message"]
