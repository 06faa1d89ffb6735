"""Fixtures for the proxy's tests."""

import pytest

BROWSER_ORIGIN = "https://app.example.com"


@pytest.fixture(params=["fast", "django"])
def door(request, settings):
    """Request headers that send a call through one front door or the other: the raw ASGI hot path
    (a token and no Origin) or Django (a browser's Origin, allowed by CORS)."""
    settings.CORS_ALLOWED_ORIGINS = [BROWSER_ORIGIN]
    if request.param == "fast":
        return lambda token: {"Authorization": f"Bearer {token}"}
    return lambda token: {"Authorization": f"Bearer {token}", "Origin": BROWSER_ORIGIN}
