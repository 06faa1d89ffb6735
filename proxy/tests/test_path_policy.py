"""Which /v1/ paths the proxy serves, to whom, and whose organization and project the upstream sees.

Every call upstream carries the server's key, so a path outside PROXY_ALLOWED_PATHS (or, for staff,
PROXY_ADMIN_PATHS) is refused before the upstream hears of it: through both front doors, the raw ASGI
hot path (a token and no Origin) and Django (a browser's Origin).
"""

import pytest
from django.core.cache import cache

from accounts.models import User

pytestmark = pytest.mark.django_db


def make_staff(user_json) -> None:
    User.objects.filter(pk=user_json["id"]).update(is_staff=True)
    cache.clear()  # the cached session holds the user as it was


REFUSED_BY_DEFAULT = [
    ("DELETE", "/v1/files/file-abc"),
    ("GET", "/v1/files"),
    ("POST", "/v1/batches"),
    ("GET", "/v1/organization/admin_api_keys"),
    ("POST", "/v1/fine_tuning/jobs"),
    ("GET", "/v1/modelsx"),  # a prefix matches whole segments only
    ("GET", "/v1/"),
]


@pytest.mark.parametrize("method, path", REFUSED_BY_DEFAULT)
def test_paths_outside_the_allowed_list_never_reach_the_upstream(client, upstream, signup, door, method, path):
    token, _, _ = signup()
    response = client.request(method, path, headers=door(token))
    assert response.status_code == 403, response.text
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("invalid_request_error", "path_not_allowed")
    assert upstream.requests == []


@pytest.mark.parametrize(
    "method, path, body",
    [
        ("GET", "/v1/models", None),
        ("POST", "/v1/chat/completions", {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}),
        ("POST", "/v1/embeddings", {"model": "text-embedding-3-small", "input": "hi"}),
        ("POST", "/v1/moderations", {"input": "hi"}),  # the fake has no such route: its 404 passes through
    ],
)
def test_inference_paths_are_allowed_by_default(client, upstream, signup, door, method, path, body):
    token, _, _ = signup()
    response = client.request(method, path, headers=door(token), json=body)
    assert response.status_code != 403
    assert [(r.method, r.path) for r in upstream.requests] == [(method, path)]


def test_files_are_opt_in(client, upstream, signup, door, settings):
    token, _, _ = signup()
    settings.PROXY_ALLOWED_PATHS = [*settings.PROXY_ALLOWED_PATHS, "files"]
    response = client.post(
        "/v1/files", headers=door(token), data={"purpose": "batch"}, files={"file": ("a.jsonl", b"{}\n")}
    )
    assert response.status_code == 200, response.text
    assert [r.path for r in upstream.requests] == ["/v1/files"]


def test_admin_paths_are_for_staff_only(client, upstream, signup, door, settings):
    settings.PROXY_ADMIN_PATHS = ["organization", "fine_tuning"]
    token, user, _ = signup()
    refused = client.get("/v1/organization/admin_api_keys", headers=door(token))
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "staff_only"
    assert upstream.requests == []

    make_staff(user)
    served = client.get("/v1/organization/admin_api_keys", headers=door(token))
    assert served.status_code != 403
    assert [(r.method, r.path) for r in upstream.requests] == [("GET", "/v1/organization/admin_api_keys")]
    other = client.delete("/v1/files/file-abc", headers=door(token))  # staff or not: not in either list
    assert other.status_code == 403
    assert len(upstream.requests) == 1


def test_client_organization_and_project_are_not_forwarded(client, upstream, signup, door, settings):
    settings.PROXY_FORWARD_HEADERS = [*settings.PROXY_FORWARD_HEADERS, "openai-organization"]
    token, _, _ = signup()
    headers = {**door(token), "OpenAI-Organization": "org-client", "OpenAI-Project": "proj-client"}
    assert client.get("/v1/models", headers=headers).status_code == 200
    seen = upstream.requests[-1].headers
    assert "openai-organization" not in seen and "openai-project" not in seen


def test_the_servers_organization_and_project_are_sent(client, upstream, signup, door, settings):
    settings.OPENAI_ORGANIZATION = "org-server"
    settings.OPENAI_PROJECT = "proj-server"
    token, _, _ = signup()
    headers = {**door(token), "OpenAI-Organization": "org-client", "OpenAI-Project": "proj-client"}
    assert client.get("/v1/models", headers=headers).status_code == 200
    seen = upstream.requests[-1].headers
    assert (seen["openai-organization"], seen["openai-project"]) == ("org-server", "proj-server")
    assert seen["authorization"] == "Bearer sk-server-side-key"
