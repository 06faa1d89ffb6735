"""Bad input anywhere gets the JSON error shape with the right status, never HTML or a 500."""

import pytest

from accounts.models import User

pytestmark = pytest.mark.django_db


def assert_error(response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["message"]
    if code:
        assert error["code"] == code
    return error


def test_unknown_path_is_json_404(client):
    assert_error(client.get("/no/such/thing"), 404, "not_found")


def test_unknown_path_is_json_404_with_debug_on(client, settings):
    settings.DEBUG = True
    response = client.get("/no/such/thing")
    assert_error(response, 404, "not_found")
    assert "<html" not in response.text.lower()


def test_wrong_method_is_405(client):
    error = assert_error(client.get("/user/signup"), 405, "method_not_allowed")
    assert "GET" in error["message"]
    assert_error(client.delete("/user/session"), 401)  # auth is checked before the method


def test_malformed_json_is_400(client):
    response = client.post("/user/signup", content=b'{"username": ', headers={"Content-Type": "application/json"})
    assert_error(response, 400, "malformed_body")


def test_json_that_is_not_an_object_is_400(client):
    response = client.post("/user/signup", json=["username", "password"])
    assert_error(response, 400)


def test_unknown_content_type_is_415(client):
    response = client.post("/user/signup", content=b"<user/>", headers={"Content-Type": "application/xml"})
    assert_error(response, 415, "unsupported_media_type")


def test_body_over_the_limit_is_413_and_stores_nothing(client, settings):
    settings.MAX_BODY_BYTES = 1024
    count = User.objects.count()
    big = {"username": "big-body", "password": "long-enough", "first_name": "x" * 2000}
    assert_error(client.post("/user/signup", json=big), 413, "body_too_large")
    assert User.objects.count() == count


def test_chunked_body_over_the_limit_is_413(client, settings):
    settings.MAX_BODY_BYTES = 1024

    def chunks():
        for _ in range(4):
            yield b"x" * 512

    response = client.post("/user/signup", content=chunks(), headers={"Content-Type": "application/json"})
    assert_error(response, 413, "body_too_large")


def test_bad_content_length_is_400(turbo_server):
    """Over the live server's socket (the HTTP parser is under test); nothing reaches the database."""
    import socket

    with socket.create_connection(("127.0.0.1", turbo_server.port)) as raw:
        raw.sendall(b"POST /user/login HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: abc\r\n\r\n")
        reply = raw.recv(4096)
    assert reply.split(b" ")[1].startswith(b"4")


def test_disallowed_host_is_json_400(client):
    response = client.get("/user/session", headers={"Host": "evil.example"})
    assert_error(response, 400)


def test_cors_allows_only_listed_origins(client, settings):
    settings.CORS_ALLOWED_ORIGINS = ["https://app.example.com"]
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    allowed = client.options("/user/session", headers={"Origin": "https://app.example.com", **preflight})
    assert allowed.headers["access-control-allow-origin"] == "https://app.example.com"
    assert allowed.headers["access-control-allow-credentials"] == "true"
    other = client.options("/user/session", headers={"Origin": "https://evil.example", **preflight})
    assert "access-control-allow-origin" not in other.headers
