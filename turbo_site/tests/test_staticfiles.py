"""Production static files (STATIC_ROOT collected with WhiteNoise's manifest storage), served over ASGI by
turbo_site/core/staticfiles.py: hashed names cached for ever, gzip when asked, 304s, and every other path
left to the app behind."""

import gzip
from pathlib import Path

import httpx
import pytest
from django.contrib.staticfiles.storage import staticfiles_storage
from django.core.management import call_command
from django.test import override_settings

from turbo_site.core.staticfiles import StaticFiles


async def behind(scope, receive, send):
    """The app behind the static files: says it was reached."""
    await send({"type": "http.response.start", "status": 404, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"reached the app"})


def production_static(root) -> dict:
    return {
        "STATIC_ROOT": str(root),
        "STORAGES": {
            "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
            "staticfiles": {"BACKEND": "whitenoise.storage.CompressedManifestStaticFilesStorage"},
        },
        "WHITENOISE_USE_FINDERS": False,
        "DEBUG": False,
    }


@pytest.fixture(scope="module")
def static_root(tmp_path_factory):
    """The static files collected once for the module, as `make static` does."""
    root = tmp_path_factory.mktemp("static")
    with override_settings(**production_static(root)):
        call_command("collectstatic", "--noinput", "-v0")
    return root


@pytest.fixture
def collected(static_root, settings):
    for name, value in production_static(static_root).items():
        setattr(settings, name, value)
    transport = httpx.ASGITransport(app=StaticFiles(behind))
    return httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1")


async def test_a_hashed_name_is_gzipped_and_cached_for_ever(collected):
    hashed = staticfiles_storage.url("turbo/turbo.css")
    assert hashed != "/static/turbo/turbo.css" and hashed.startswith("/static/turbo/turbo.")
    async with collected as http:
        zipped = await http.get(hashed, headers={"Accept-Encoding": "gzip"})
        plain = await http.get(hashed, headers={"Accept-Encoding": "identity"})
        unchanged = await http.get(hashed, headers={"If-None-Match": plain.headers["etag"]})
        head = await http.head(hashed)
    assert zipped.status_code == 200 and zipped.headers["content-encoding"] == "gzip"
    assert zipped.headers["content-type"].startswith("text/css")
    assert "max-age=315360000" in zipped.headers["cache-control"] and "immutable" in zipped.headers["cache-control"]
    assert "content-encoding" not in plain.headers
    assert zipped.content == plain.content  # httpx undid the gzip
    stored = Path(staticfiles_storage.path(hashed.removeprefix("/static/")))
    assert gzip.decompress(stored.with_name(stored.name + ".gz").read_bytes()) == plain.content
    assert unchanged.status_code == 304 and unchanged.content == b""
    assert head.status_code == 200 and head.content == b""


async def test_an_unhashed_name_is_served_but_not_cached_for_ever(collected):
    async with collected as http:
        response = await http.get("/static/turbo/turbo.css")
    assert response.status_code == 200
    assert "immutable" not in response.headers["cache-control"]


async def test_unknown_files_and_other_paths_reach_the_app(collected):
    async with collected as http:
        for path in ("/static/turbo/nope.css", "/static/../settings.py", "/chat/index"):
            response = await http.get(path)
            assert (response.status_code, response.text) == (404, "reached the app"), path
