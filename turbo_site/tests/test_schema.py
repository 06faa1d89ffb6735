"""The OpenAPI schema lists every endpoint with its request and response shapes."""

import re

import pytest
from django.urls import get_resolver

pytestmark = pytest.mark.django_db

NOT_IN_SCHEMA = ("admin/", "api/schema/", "api/docs/")


def _api_paths() -> set[str]:
    paths = set()
    for pattern in get_resolver().url_patterns:
        route = str(pattern.pattern)
        if route.startswith(NOT_IN_SCHEMA) or not hasattr(pattern, "url_patterns"):
            is_page = getattr(getattr(pattern, "callback", None), "is_web_page", False)
            if hasattr(pattern, "callback") and not route.startswith(NOT_IN_SCHEMA) and not is_page:
                paths.add("/" + route)
            continue
        for inner in pattern.url_patterns:
            if getattr(getattr(inner, "callback", None), "is_web_page", False):
                continue  # the web app's HTML pages are not API endpoints
            paths.add("/" + route + str(inner.pattern))
    return paths


def test_schema_covers_every_endpoint(client):
    response = client.get("/api/schema/", headers={"Accept": "application/json"})
    assert response.status_code == 200
    schema = response.json()
    documented = set(schema["paths"])
    routes = {re.sub(r"\(\?P<(\w+)>[^)]*\)", r"{\1}", p).replace("^", "").rstrip("$") for p in _api_paths()}
    routes = {re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", r) for r in routes}
    missing = routes - documented
    assert not missing, f"endpoints missing from the schema: {sorted(missing)}"
    signup = schema["paths"]["/user/signup"]["post"]
    assert "requestBody" in signup
    assert "200" in signup["responses"] and "409" in signup["responses"]


HISTORY = re.compile(r"(?i)\bseed \d|\bthe seed\b|\bseed's\b|turbo-chat")


def prose_of(value, key: str = "") -> list[str]:
    """Every summary, description and title in a schema document."""
    if isinstance(value, dict):
        return [text for name, inner in value.items() for text in prose_of(inner, name)]
    if isinstance(value, list):
        return [text for inner in value for text in prose_of(inner, key)]
    return [value] if key in ("summary", "description", "title") and isinstance(value, str) else []


def test_the_schema_speaks_a_readers_words_not_the_projects_history(client):
    """Summaries and descriptions say what an endpoint does, not which early spec of the project it came from
    (`seed`, OpenAI's sampling setting, is a word of the API itself and may appear)."""
    schema = client.get("/api/schema/", headers={"Accept": "application/json"}).json()
    prose = prose_of(schema)
    assert len(prose) > 50  # the walk found the schema's prose
    assert not [text for text in prose if HISTORY.search(text)]


def test_swagger_ui_is_served(client):
    response = client.get("/api/docs/")
    assert response.status_code == 200
    assert "swagger" in response.text.lower()


def test_schema_generates_without_warnings(tmp_path):
    from django.core.management import call_command

    target = tmp_path / "schema.yaml"
    call_command("spectacular", "--validate", "--fail-on-warn", "--file", str(target))
    assert "/user/login" in target.read_text()
