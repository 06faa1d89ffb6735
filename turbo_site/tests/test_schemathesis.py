"""The OpenAPI schema tells the truth: schemathesis calls every operation on the live server with a few
generated requests (fixed seed, fixed count) and checks each answer against the schema (status code,
content type, headers and body), and that none is
a server error."""

import httpx
import hypothesis
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

pytestmark = pytest.mark.django_db(transaction=True)

EXAMPLES_PER_OPERATION = 20
# Calls that end the caller's own session would turn every later call into a 401.
SKIPPED = {"POST /user/logout", "POST /user/password/update"}


def test_every_operation_answers_as_the_schema_says(turbo_server, signup, upstream):
    token, _, _ = signup()
    raw = httpx.get(f"{turbo_server.url}/api/schema/?format=json", timeout=30).json()
    schema = schemathesis.openapi.from_dict(raw)
    headers = {"Authorization": f"Bearer {token}"}
    mismatches: dict[str, str] = {}
    for result in schema.get_all_operations():
        operation = result.ok()
        if operation.label in SKIPPED or set(operation.definition.raw.get("responses", {})) == {"101"}:
            continue  # WebSocket handshakes are tested by the WebSocket tests

        @hypothesis.settings(
            max_examples=EXAMPLES_PER_OPERATION,
            derandomize=True,
            deadline=None,
            database=None,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @hypothesis.given(case=operation.as_strategy())
        def call(case):
            response = case.call(base_url=turbo_server.url, headers=headers, timeout=30)
            case.validate_response(
                response,
                checks=[
                    not_a_server_error,
                    status_code_conformance,
                    content_type_conformance,
                    response_headers_conformance,
                    response_schema_conformance,
                ],
            )

        try:
            call()
        except BaseException as exc:  # every operation's failures (an exception group), reported at once
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            mismatches[operation.label] = " | ".join(lines[:12])[:600]
    assert not mismatches, "\n".join(f"{label}: {why}" for label, why in sorted(mismatches.items()))
