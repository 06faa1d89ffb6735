"""A key's own rate limits (`rpm`, `tpm`) must fit the column on every database: out of range is a 400."""

import pytest
from django.test import Client

from accounts.keys import LIMIT_PER_MINUTE_MAX
from accounts.models import ApiKey

pytestmark = pytest.mark.django_db


@pytest.fixture
def signed_in(settings):
    settings.DEBUG = False
    http = Client()
    response = http.post("/user/signup", {"username": "key-limits", "password": "correct-horse"})
    assert response.status_code == 200, response.content
    return http, {"Authorization": f"Bearer {response.json()['token']}"}


@pytest.mark.parametrize("field", ["rpm", "tpm"])
@pytest.mark.parametrize("value", [2**31, 2**63, 10**30, 0, -1])
def test_a_limit_out_of_range_is_a_400_and_makes_no_key(signed_in, field, value):
    http, headers = signed_in
    response = http.post(
        "/user/keys/create", {"name": "k", field: value}, content_type="application/json", headers=headers
    )
    assert response.status_code == 400, response.content
    assert response.json()["error"]["code"] == "invalid"
    assert field in response.json()["error"]["message"]
    assert not ApiKey.objects.exists()


@pytest.mark.parametrize("field", ["rpm", "tpm"])
def test_the_largest_limit_is_kept(signed_in, field):
    http, headers = signed_in
    response = http.post(
        "/user/keys/create",
        {"name": "k", field: LIMIT_PER_MINUTE_MAX},
        content_type="application/json",
        headers=headers,
    )
    assert response.status_code == 200, response.content
    assert response.json()[field] == LIMIT_PER_MINUTE_MAX
    assert getattr(ApiKey.objects.get(), field) == LIMIT_PER_MINUTE_MAX
