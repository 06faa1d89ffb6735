"""The ASGI stack keeps async views async, and still serves the admin's static files."""

import httpx
import pytest
from django.conf import settings
from django.utils.module_loading import import_string


def test_every_middleware_is_async_capable():
    """One sync-only middleware would push every request, the proxy's included, through one thread."""
    sync_only = [path for path in settings.MIDDLEWARE if not getattr(import_string(path), "async_capable", False)]
    assert sync_only == []


@pytest.mark.django_db
def test_admin_static_files_are_served_without_debug(client):
    assert settings.DEBUG is False
    response = client.get("/static/admin/css/base.css")
    assert response.status_code == 200
    assert "text/css" in response.headers["content-type"]
    assert client.get("/static/admin/css/nope.css").status_code == 404


async def test_favicon_ico_leads_to_the_web_app_icon():
    """Browsers ask /favicon.ico on every page (the admin, Swagger, a JSON answer): never a 404."""
    from turbo_site.asgi import application

    transport = httpx.ASGITransport(app=application)
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as http:
        asked = await http.get("/favicon.ico")
        assert asked.status_code == 301
        icon = await http.get(asked.headers["location"])
    assert icon.status_code == 200
    assert icon.headers["content-type"].startswith("image/svg+xml")
    assert icon.content.startswith(b"<svg")
