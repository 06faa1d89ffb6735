"""/v1 policy reads every model call, whatever its Content-Type, through both front doors, in process.

The hot path (proxy.fast: a token in Authorization, no Origin) and the Django view (an Origin) are both
driven through turbo_site.asgi.application served in process (testing/inprocess.py), inside the test's
transaction; the fake upstream records what reached it, so a refusal is also checked to have sent nothing
upstream.
"""

import json
from decimal import Decimal

import httpx
import pytest

from accounts.keys import api_key_create
from accounts.services import session_create, user_create
from groups.models import Group
from groups.services import group_allowed_models_set
from proxy.requests import form_fields, v1_request_read
from testing.inprocess import in_process_client

pytestmark = pytest.mark.django_db

ORIGIN = {"Origin": "http://127.0.0.1"}  # a browser's request: proxy_view, behind Django's middleware
DOORS = {"fast": {}, "django": ORIGIN}
CONTENT_TYPES = ["Application/JSON", "text/plain", "application/vnd.api+json", None]


def post_all(requests: list[tuple[str, dict, bytes]]) -> list[httpx.Response]:
    """POST each (path, headers, body) in turn to the ASGI app, in this process."""
    with in_process_client() as http:
        return [http.post(path, headers=headers, content=body) for path, headers, body in requests]


def post(path: str, headers: dict, body: bytes) -> httpx.Response:
    return post_all([(path, headers, body)])[0]


def headers_for(token: str, content_type: str | None, door: str) -> dict:
    headers = {"Authorization": f"Bearer {token}", **DOORS[door]}
    if content_type is not None:
        headers["Content-Type"] = content_type
    return headers


def chat_body(model: str, padding: int = 0) -> bytes:
    body = {"model": model, "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
    if padding:
        body["metadata"] = {"padding": "x" * padding}
    return json.dumps(body).encode()


def multipart(fields: dict[str, str], boundary: str = "turbo-boundary") -> tuple[bytes, str]:
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        for name, value in fields.items()
    ]
    audio = f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
    parts.append(audio.encode() + b"Content-Type: audio/wav\r\n\r\nRIFF\x00\x01fake-audio\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


@pytest.fixture
def member():
    user = user_create(username="policy-member", password="correct-horse-battery")
    _, token = session_create(user=user)
    return user, token


@pytest.fixture
def mini_key(member):
    """An API key limited to gpt-4o-mini."""
    user, _ = member
    _, key = api_key_create(user=user, name="mini", models=["gpt-4o-mini"])
    return key


@pytest.mark.parametrize("door", DOORS)
@pytest.mark.parametrize("content_type", CONTENT_TYPES)
def test_a_key_limited_to_one_model_cannot_ask_another_whatever_the_content_type(
    upstream, mini_key, content_type, door
):
    refused = post("/v1/chat/completions", headers_for(mini_key, content_type, door), chat_body("gpt-4"))
    assert refused.status_code == 403, refused.text
    assert refused.json()["error"]["code"] == "model_not_allowed"
    assert upstream.requests == []
    allowed = post("/v1/chat/completions", headers_for(mini_key, content_type, door), chat_body("gpt-4o-mini"))
    assert allowed.status_code == 200, allowed.text
    assert len(upstream.requests) == 1 and upstream.requests[0].json()["model"] == "gpt-4o-mini"


@pytest.mark.parametrize("door", DOORS)
def test_a_body_over_one_mib_is_still_read(upstream, mini_key, door):
    big = chat_body("gpt-4", padding=1_200_000)
    assert len(big) > 1024 * 1024
    refused = post("/v1/chat/completions", headers_for(mini_key, "application/json", door), big)
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "model_not_allowed"
    assert upstream.requests == []


@pytest.mark.parametrize("content_type", CONTENT_TYPES)
def test_a_group_s_allowed_models_hold_whatever_the_content_type(upstream, member, content_type):
    user, token = member
    group_allowed_models_set(group=Group.objects.get(owner=user), allowed_models=["gpt-4o-mini"])
    refused = post("/v1/chat/completions", headers_for(token, content_type, "fast"), chat_body("gpt-4"))
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "model_not_allowed"
    assert upstream.requests == []


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b'{"messages": []}', "invalid"),
        (b"not json at all", "invalid_json"),
        (b"[1, 2]", "invalid_json"),
        (b"", "invalid_json"),
        (b'{"model": 4}', "invalid"),
        (b'{"model": "gpt-4o-mini", "model": "gpt-4"}', "invalid"),
        (b'{"model": "gpt-4o-mini", "mod\\u0065l": "gpt-4"}', "invalid"),
    ],
)
def test_a_model_call_whose_model_cannot_be_read_is_refused_not_forwarded(upstream, mini_key, body, code):
    refused = post("/v1/chat/completions", headers_for(mini_key, "text/plain", "fast"), body)
    assert refused.status_code == 400, refused.text
    assert refused.json()["error"]["code"] == code
    assert upstream.requests == []


@pytest.mark.parametrize("door", DOORS)
def test_the_model_field_of_a_multipart_form_is_read(upstream, mini_key, door):
    body, content_type = multipart({"model": "gpt-4", "language": "en"})
    refused = post("/v1/audio/transcriptions", headers_for(mini_key, content_type, door), body)
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "model_not_allowed"
    assert upstream.requests == []
    body, content_type = multipart({"model": "gpt-4o-mini"})
    post("/v1/audio/transcriptions", headers_for(mini_key, content_type, door), body)
    assert len(upstream.requests) == 1 and upstream.requests[0].body == body  # forwarded byte for byte


def test_a_form_without_a_model_or_with_two_is_refused(upstream, mini_key):
    for fields in ({"language": "en"}, {"model": "gpt-4o-mini", "MODEL": "gpt-4"}):
        body, content_type = multipart(fields)
        refused = post("/v1/audio/transcriptions", headers_for(mini_key, content_type, "fast"), body)
        assert refused.status_code == 400 and refused.json()["error"]["code"] in ("invalid", "malformed_body")
    body, content_type = multipart({"model": "gpt-4o-mini"})
    refused = post("/v1/audio/transcriptions", headers_for(mini_key, "multipart/form-data", "fast"), body)
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "malformed_body"
    assert upstream.requests == []


def test_an_image_edit_without_a_model_is_governed_as_the_api_s_default(upstream, mini_key):
    body, content_type = multipart({"prompt": "a cat"})
    refused = post("/v1/images/edits", headers_for(mini_key, content_type, "fast"), body)
    assert refused.status_code == 403 and "dall-e-2" in refused.json()["error"]["message"]
    assert upstream.requests == []


def test_form_fields_take_only_delimiters_that_start_a_line():
    body = (
        b'--b\r\nContent-Disposition: form-data; name="file"; filename="x"\r\n\r\n'
        b'junk--b\r\nContent-Disposition: form-data; name="model"\r\n\r\ngpt-4o-mini\r\n'
        b'--b\r\nContent-Disposition: form-data; name="model"\r\n\r\ngpt-4\r\n--b--\r\n'
    )
    assert form_fields(body, "multipart/form-data; boundary=b") == {"model": "gpt-4"}


def test_a_request_that_calls_no_model_is_not_read_as_one():
    read = v1_request_read("models", "GET", b"", "")
    assert read.model == "" and read.payload is None
    read = v1_request_read("chat/completions/abc", "POST", b'{"metadata": {}}', "application/json")
    assert read.model == "" and read.payload == {"metadata": {}}


def test_a_key_with_rpm_5_gets_at_most_5_calls_through_whatever_the_content_type(upstream, member):
    user, _ = member
    _, key = api_key_create(user=user, name="five", rpm=5)
    answers = post_all([("/v1/chat/completions", headers_for(key, "text/plain", "fast"), chat_body("gpt-4o-mini"))] * 8)
    statuses = [answer.status_code for answer in answers]
    assert statuses.count(200) == 5 and statuses.count(429) == 3, statuses
    assert all(answer.json()["error"]["code"] == "rate_limited" for answer in answers if answer.status_code == 429)
    assert len(upstream.requests) == 5


def test_a_one_cent_budget_is_not_overspent_whatever_the_content_type(upstream, member):
    from decimal import Decimal

    from django.db.models import Sum

    from proxy.events import events_flush
    from proxy.models import UsageRollup
    from proxy.usage.budgets import budget_rules_forget, budget_set

    user, token = member
    budget_set(scope="user", target_id=user.pk, usd=Decimal("0.01"), period="day")
    budget_rules_forget()
    # The fake echoes 50 words: about $0.0045 a call at gpt-4's price, about $0.0054 reserved (max_tokens 60).
    words = "echo: " + " ".join(["word"] * 50)
    body = json.dumps({"model": "gpt-4", "max_tokens": 60, "messages": [{"role": "user", "content": words}]}).encode()
    answers = post_all(
        [("/v1/chat/completions", headers_for(token, content_type, "fast"), body) for content_type in CONTENT_TYPES * 3]
    )
    statuses = [answer.status_code for answer in answers]
    assert 200 in statuses and 429 in statuses, statuses
    assert all(answer.json()["error"]["code"] == "budget_exceeded" for answer in answers if answer.status_code == 429)
    events_flush()
    spent = UsageRollup.objects.filter(user_id=user.pk).aggregate(total=Sum("cost_usd"))["total"]
    assert Decimal(0) < spent <= Decimal("0.01")
    assert len(upstream.requests) == statuses.count(200)


# --- every paid path is governed ------------------------------------------------------------------------

PAID_CALLS = {
    "images/generations": {"model": "dall-e-2", "prompt": "a cat", "n": 1, "size": "256x256"},
    "audio/speech": {"model": "tts-1", "input": "hello there", "voice": "alloy"},
    "embeddings": {"model": "text-embedding-3-small", "input": "hello"},
    "moderations": {"input": "hello"},
    "chat/completions": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
}


def rollup_costs(user_id) -> dict[str, Decimal]:
    from django.db.models import Sum

    from proxy.events import events_flush
    from proxy.models import UsageRollup

    events_flush()
    rows = UsageRollup.objects.filter(user_id=user_id).values("model").annotate(cost=Sum("cost_usd"))
    return {row["model"]: row["cost"] for row in rows}


@pytest.fixture
def budgeted(member):
    from proxy.usage.budgets import budget_rules_forget, budget_set

    user, token = member
    budget_set(scope="user", target_id=user.pk, usd=Decimal("1.00"), period="day")
    budget_rules_forget()
    yield user, token
    budget_rules_forget()


def test_a_used_up_budget_refuses_every_paid_path_before_the_upstream(upstream, budgeted):
    from proxy.usage.caller import Caller
    from proxy.usage.records import Usage, usage_record

    user, token = budgeted
    usage_record(Caller(user.pk), Usage("gpt-4", "default", 0, 20_000))  # $1.20 of a $1.00 budget
    assert rollup_costs(user.pk)["gpt-4"] == Decimal("1.2")
    calls = [
        ("/v1/" + path, headers_for(token, None, "fast"), json.dumps(body).encode())
        for path, body in PAID_CALLS.items()
    ]
    audio, content_type = multipart({"model": "whisper-1"})
    calls.append(("/v1/audio/transcriptions", headers_for(token, content_type, "fast"), audio))
    for answer in post_all(calls):
        assert answer.status_code == 429, answer.text
        assert answer.json()["error"]["code"] == "budget_exceeded"
    assert upstream.requests == []


def test_images_speech_and_audio_seconds_are_priced_by_what_they_make(upstream, budgeted):
    user, token = budgeted
    images = {"model": "dall-e-2", "prompt": "a cat", "n": 3, "size": "512x512"}
    speech = {"model": "tts-1", "input": "x" * 1000, "voice": "alloy"}
    audio, content_type = multipart({"model": "whisper-1"})  # the fake says 1 second (one per 1000 bytes)
    answers = post_all(
        [
            ("/v1/images/generations", headers_for(token, None, "fast"), json.dumps(images).encode()),
            ("/v1/audio/speech", headers_for(token, None, "fast"), json.dumps(speech).encode()),
            ("/v1/audio/transcriptions", headers_for(token, content_type, "fast"), audio),
            ("/v1/moderations", headers_for(token, None, "fast"), b'{"input": "hi"}'),
        ]
    )
    assert [answer.status_code for answer in answers] == [200, 200, 200, 200]
    assert len(answers[0].json()["data"]) == 3
    costs = rollup_costs(user.pk)
    assert costs["dall-e-2"] == Decimal("0.054")  # 3 images at $0.018 (512x512)
    assert costs["tts-1"] == Decimal("0.015")  # 1000 characters at $15 per 1M
    assert costs["whisper-1"] == Decimal("0.0001")  # the 1 second the upstream reported at $0.006 a minute
    assert costs["omni-moderation-latest"] == Decimal(0)  # priced (at 0), so governed
    assert upstream.requests[3].json()["model"] == "omni-moderation-latest"


def test_the_most_a_call_may_cost_counts_images_characters_and_upload_seconds():
    from proxy.usage.budgets import call_cost_ceiling

    images = {"model": "dall-e-3", "n": 3, "size": "1792x1024", "quality": "hd"}
    assert call_cost_ceiling("images/generations", "dall-e-3", images) == Decimal("0.36")
    assert call_cost_ceiling("images/generations", "dall-e-3", {"size": "999x999"}) == Decimal("0.12")  # the dearest
    assert call_cost_ceiling("audio/speech", "tts-1-hd", {"input": "y" * 2000}) == Decimal("0.06")
    form, content_type = multipart({"model": "whisper-1"})
    upload = form + b"\x00" * 19_000  # ~20,000 bytes: at most 10 seconds at 16 kbit/s (rounded up)
    ceiling = call_cost_ceiling("audio/transcriptions", "whisper-1", None, raw=upload, content_type=content_type)
    assert ceiling == Decimal("0.0001") * -(-len(upload) // 2000)
    edit, content_type = multipart({"model": "dall-e-2", "n": "2", "size": "256x256"})
    assert call_cost_ceiling("images/edits", "dall-e-2", None, raw=edit, content_type=content_type) == Decimal("0.032")


# --- no free model under a budget -------------------------------------------------------------------------

ECHO_50 = "echo: " + " ".join(["word"] * 50)


def unpriced_body() -> bytes:
    messages = [{"role": "user", "content": ECHO_50}]
    return json.dumps({"model": "local-llama", "max_tokens": 60, "messages": messages}).encode()


def test_a_model_with_no_price_counts_at_the_default_price_and_a_budget_stops_it(upstream, member, settings):
    from proxy.usage.budgets import budget_rules_forget, budget_set

    settings.DEFAULT_PRICE = "100,100"  # about $0.01 a call here
    user, token = member
    budget_set(scope="user", target_id=user.pk, usd=Decimal("0.05"), period="day")
    budget_rules_forget()
    answers = post_all([("/v1/chat/completions", headers_for(token, None, "fast"), unpriced_body())] * 8)
    statuses = [answer.status_code for answer in answers]
    assert statuses.count(200) >= 1 and statuses[-1] == 429, statuses
    assert answers[-1].json()["error"]["code"] == "budget_exceeded"
    spent = rollup_costs(user.pk)["local-llama"]
    assert Decimal("0.01") <= spent <= Decimal("0.05")
    assert len(upstream.requests) == statuses.count(200)


def test_unpriced_models_refused_under_a_budget_when_the_operator_says_so(upstream, member, settings):
    from proxy.usage.budgets import budget_rules_forget, budget_set

    settings.UNPRICED_MODELS = "refuse"
    user, token = member
    free = user_create(username="policy-free", password="correct-horse-battery")
    _, free_token = session_create(user=free)
    budget_set(scope="user", target_id=user.pk, usd=Decimal("5"), period="day")
    budget_rules_forget()
    refused, unbudgeted, priced = post_all(
        [
            ("/v1/chat/completions", headers_for(token, None, "fast"), unpriced_body()),
            ("/v1/chat/completions", headers_for(free_token, None, "fast"), unpriced_body()),
            ("/v1/chat/completions", headers_for(token, None, "fast"), chat_body("gpt-4o-mini")),
        ]
    )
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "model_not_priced"
    assert unbudgeted.status_code == 200 and priced.status_code == 200  # no budget: nothing to protect
    assert [request.json()["model"] for request in upstream.requests] == ["local-llama", "gpt-4o-mini"]
