"""/graphql against hostile input, in process (the ASGI app through httpx.ASGITransport, the socket
through Channels' WebsocketCommunicator), with DEBUG=0: frames that break graphql-transport-ws close
the socket 4400, deep JSON is a 400, and no document can cost more than its limits (bytes, tokens,
fields, fragments that expand, model calls) or reveal the schema through "Did you mean" suggestions."""

import json
import logging

import httpx
import pytest
from channels.routing import URLRouter
from channels.testing import WebsocketCommunicator
from graphql import get_introspection_query

from accounts.keys import api_key_create
from accounts.services import session_create, user_create
from conftest import unique_name
from testing.inprocess import run_in_process
from turbo_site.asgi import application
from turbo_site.graphql_server import websocket_urlpatterns

PROTOCOL = "graphql-transport-ws"
DEEP = 10_000
ME = "{ me { sessionKind } }"
COMPLETE = 'a{n}: complete(input: {{messages: [{{role: "user", content: "echo: hi"}}]}}) {{ text }}'


@pytest.fixture(autouse=True)
def production(settings):
    settings.DEBUG = False
    settings.GRAPHQL_PLAYGROUND = False


def deep_json(levels: int = DEEP) -> str:
    return '{"a":' * levels + "1" + "}" * levels


async def post(body, **kwargs) -> httpx.Response:
    transport = httpx.ASGITransport(app=application)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
        if isinstance(body, str):
            return await http.post("/graphql", content=body, headers={"Content-Type": "application/json"}, **kwargs)
        return await http.post("/graphql", json=body, **kwargs)


async def graphql(query: str, *, token: str | None = None, variables: dict | None = None) -> dict:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    response = await post({"query": query, "variables": variables or {}}, headers=headers)
    assert response.status_code == 200, response.text
    return response.json()


def codes(body: dict) -> list[str]:
    return [error["extensions"]["code"] for error in body.get("errors") or []]


def user_token(*, key: bool = False) -> str:
    user = user_create(username=unique_name("hostile"), password="correct-horse-battery")
    if key:
        return api_key_create(user=user, name="program")[1]
    return session_create(user=user)[1]


# --- HTTP: deep JSON -------------------------------------------------------------------------------


async def test_deeply_nested_variables_are_a_400_not_a_500():
    body = '{"query": "' + ME + '", "variables": ' + deep_json() + "}"
    response = await post(body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "invalid_json"
    assert "nested" in response.json()["error"]["message"]

    deep_body = await post(deep_json())
    assert deep_body.status_code == 400 and deep_body.json()["error"]["code"] == "invalid_json"

    transport = httpx.ASGITransport(app=application)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
        by_get = await http.get("/graphql", params={"query": ME, "variables": deep_json(2000)})
    assert by_get.status_code == 400 and by_get.json()["error"]["code"] == "invalid_json"

    # NaN is not JSON either; a body that is not an object is no request
    assert (await post('{"query": "' + ME + '", "variables": {"a": NaN}}')).status_code == 400
    for body in ("1", "null", '"x"', "true"):
        response = await post(body)
        assert response.status_code == 400 and response.json()["error"]["code"] == "bad_request", body


# --- HTTP: documents that would cost too much -------------------------------------------------------


async def test_a_document_over_the_byte_limit_is_refused_before_parsing(settings):
    settings.GRAPHQL_MAX_QUERY_BYTES = 1000
    padded = '{ me(pad: "' + "x" * 1000 + '") { sessionKind } }'
    body = await graphql(padded)
    assert body["data"] is None and codes(body) == ["invalid_query"]
    assert "GRAPHQL_MAX_QUERY_BYTES" in body["errors"][0]["message"]
    # bytes, not characters: 400 three-byte characters are 1200 bytes
    body = await graphql('{ me(pad: "' + "€" * 400 + '") { sessionKind } }')
    assert "GRAPHQL_MAX_QUERY_BYTES" in body["errors"][0]["message"]
    # under the limit, the same document is parsed (and refused for what it asks, not its size)
    body = await graphql('{ me(pad: "x") { sessionKind } }')
    assert "GRAPHQL_MAX_QUERY_BYTES" not in body["errors"][0]["message"]


async def test_a_document_over_the_token_limit_is_refused_while_parsing(settings):
    body = await graphql("{ me(" + "a: 1 " * 1000 + ") { sessionKind } }")  # 3000 tokens, 5 KB
    assert body["data"] is None and codes(body) == ["invalid_query"]
    assert "more than 2000 tokens" in body["errors"][0]["message"]


async def test_variables_over_the_value_limit_are_refused_before_they_are_read():
    complete = "mutation($i: CompletionInput!) { complete(input: $i) { text } }"
    messages = [{"role": "user", "content": "x"}] * 2000  # 6003 values, 70 KB
    body = await graphql(complete, variables={"i": {"messages": messages}})
    assert body["data"] is None and codes(body) == ["invalid_query"]
    assert "GRAPHQL_MAX_VARIABLE_VALUES" in body["errors"][0]["message"]
    # the longest conversation a completion may have (1000 messages) is read, then refused without a token
    body = await graphql(complete, variables={"i": {"messages": messages[:1000]}})
    assert codes(body) == ["unauthorized"]


async def test_a_document_over_the_field_limit_is_refused_before_validation(settings):
    # graphql-core compares same-named fields pairwise: 1000 of them cost seconds before this limit
    repeated = "{" + " me { sessionKind }" * 60 + "}"  # 120 fields, 241 tokens
    body = await graphql(repeated)
    assert body["data"] is None and codes(body) == ["query_too_costly"]
    assert "GRAPHQL_MAX_FIELDS" in body["errors"][0]["message"]
    aliased = "{" + "".join(f" a{n}: me {{ sessionKind }}" for n in range(60)) + "}"
    assert codes(await graphql(aliased)) == ["query_too_costly"]
    # fields inside fragments count too
    fragments = "{ ...F } fragment F on Query {" + " me { sessionKind }" * 60 + "}"
    assert codes(await graphql(fragments)) == ["query_too_costly"]
    # under the limit: validated, and (without a token) refused as unauthorized, not as too large
    settings.GRAPHQL_MAX_FIELDS = 200
    assert set(codes(await graphql(repeated))) == {"unauthorized"}


async def test_fragment_spreads_count_toward_the_field_limit():
    # 40 fields each spreading the same 20 one-field fragments: 60 fields, 6 KB, and 0.17 s of validation
    # on the event loop (each field is compared with each fragment beside it) before spreads counted
    fragments = " ".join(f"fragment V{n} on Viewer {{ sessionKind }}" for n in range(20))
    spreads = "me { " + " ".join(f"...V{n}" for n in range(20)) + " }"
    body = await graphql("{" + " ".join([spreads] * 40) + "} " + fragments)
    assert body["data"] is None and codes(body) == ["query_too_costly"]
    assert "GRAPHQL_MAX_FIELDS" in body["errors"][0]["message"]
    inline = "{" + " me { ... on Viewer { sessionKind } }" * 40 + "}"  # 80 fields and 40 inline fragments
    assert codes(await graphql(inline)) == ["query_too_costly"]
    # the same spreads, fewer times: validated, then refused for want of a token
    assert set(codes(await graphql("{" + " ".join([spreads] * 3) + "} " + fragments))) == {"unauthorized"}


async def test_fragments_that_spread_fragments_are_measured_once_each():
    # 30 fragments, each spreading the next twice: 2^30 fields once expanded, 1.3 KB as written
    fragments = " ".join(f"fragment F{n} on Query {{ ...F{n + 1} ...F{n + 1} }}" for n in range(30))
    body = await graphql("{ ...F0 } " + fragments + " fragment F30 on Query { me { sessionKind } }")
    assert body["data"] is None and codes(body) == ["query_too_costly"]
    assert f"cost is {2**30 * 2}" in body["errors"][0]["message"]

    deep = " ".join(f"fragment D{n} on Viewer {{ user {{ ...U{n} }} }}" for n in range(2))
    deep += " " + " ".join(f"fragment U{n} on User {{ id }}" for n in range(2))
    assert codes(await graphql("{ me { ...D0 ...D1 } } " + deep)) == ["unauthorized"]  # valid: it ran

    cycle = await graphql("{ ...A } fragment A on Query { ...B } fragment B on Query { ...A }")
    assert codes(cycle) == ["invalid_query"] and "within itself" in cycle["errors"][0]["message"]


async def test_depth_is_measured_through_fragments(settings):
    settings.GRAPHQL_MAX_DEPTH = 3
    nested = "{ me { ...V } } fragment V on Viewer { user { ...U } } fragment U on User { id }"
    assert "depth" not in json.dumps(await graphql(nested))
    deeper = "{ chats { ...C } } fragment C on Chat { group { chats { owner { id } } } }"
    body = await graphql(deeper)
    assert body["data"] is None and "exceeds maximum operation depth of 3" in body["errors"][0]["message"]


async def test_suggestions_only_with_debug(settings):
    queries = ["{ mee { sessionKind } }", "{ me { sessionKnd } }", '{ chats(groupI: "x") { id } }']
    for query in queries:
        body = await graphql(query)
        assert codes(body) == ["invalid_query"], body
        assert "Did you mean" not in body["errors"][0]["message"], body
        assert body["errors"][0]["message"].endswith(".")
    settings.DEBUG = True
    for query in queries:
        assert "Did you mean" in (await graphql(query))["errors"][0]["message"]


# --- model calls --------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_aliased_model_calls_are_refused_before_any_upstream_call(upstream, settings):
    key = user_token(key=True)

    async def scenario():
        many = "mutation {" + " ".join(COMPLETE.format(n=n) for n in range(200)) + "}"
        settings.GRAPHQL_MAX_FIELDS = 1000  # the model-call limit alone refuses it
        settings.GRAPHQL_MAX_TOKENS = 10_000
        body = await graphql(many, token=key)
        assert body["data"] is None and codes(body) == ["query_too_costly"]
        assert "200 times" in body["errors"][0]["message"] and "GRAPHQL_MAX_MODEL_CALLS" in body["errors"][0]["message"]
        two = "mutation {" + " ".join(COMPLETE.format(n=n) for n in range(2)) + "}"
        assert codes(await graphql(two, token=key)) == ["query_too_costly"]
        # fragments are counted where they are spread
        spread = "mutation { ...M ...M2 } fragment M on Mutation { " + COMPLETE.format(n=1)
        spread += " } fragment M2 on Mutation { " + COMPLETE.format(n=2) + " }"
        assert codes(await graphql(spread, token=key)) == ["query_too_costly"]
        assert upstream.requests == []

        # one is allowed, and answered
        body = await graphql("mutation {" + COMPLETE.format(n=0) + "}", token=key)
        assert body["data"] == {"a0": {"text": "hi"}}, body
        assert len(upstream.requests) == 1
        settings.GRAPHQL_MAX_MODEL_CALLS = 2
        assert not codes(await graphql(two, token=key))
        assert len(upstream.requests) == 3

    run_in_process(scenario)


@pytest.mark.django_db
def test_prompts_count_as_model_calls(upstream):
    token = user_token()

    async def scenario():
        prompts = (
            'mutation($c: ID!) { a: prompt(chatId: $c, prompt: "x") { id } b: prompt(chatId: $c, prompt: "y") { id } }'
        )
        body = await graphql(prompts, token=token, variables={"c": "00000000-0000-0000-0000-000000000000"})
        assert codes(body) == ["query_too_costly"]
        assert upstream.requests == []

    run_in_process(scenario)


@pytest.mark.django_db
def test_aliased_models_ask_the_upstream_once(upstream):
    key = user_token(key=True)

    async def scenario():
        body = await graphql("{" + " ".join(f"m{n}: models {{ id }}" for n in range(20)) + "}", token=key)
        assert not codes(body), body
        assert len({json.dumps(listed) for listed in body["data"].values()}) == 1
        assert [request.path for request in upstream.requests] == ["/v1/models"]

    run_in_process(scenario)


# --- the socket ---------------------------------------------------------------------------------------

BAD_FRAMES = {
    "list id": {"id": ["a"], "type": "subscribe", "payload": {"query": ME}},
    "object id": {"id": {"a": 1}, "type": "subscribe", "payload": {"query": ME}},
    "list payload": {"id": "a", "type": "subscribe", "payload": []},
    "text payload": {"id": "a", "type": "subscribe", "payload": "x"},
    "complete with a list id": {"id": ["a"], "type": "complete"},
    "a list": [],
    "a string": "x",
    "null": None,
    "number type": {"type": 1},
    "no query": {"id": "a", "type": "subscribe", "payload": {"variables": {}}},
    "list variables": {"id": "a", "type": "subscribe", "payload": {"query": ME, "variables": [1]}},
    "ping with a list payload": {"type": "ping", "payload": [1]},
}


async def socket_for(token: str) -> WebsocketCommunicator:
    socket = WebsocketCommunicator(URLRouter(websocket_urlpatterns), "/graphql", subprotocols=[PROTOCOL])
    connected, _ = await socket.connect()
    assert connected
    await socket.send_json_to({"type": "connection_init", "payload": {"authorization": f"Bearer {token}"}})
    assert await socket.receive_json_from(timeout=10) == {"type": "connection_ack"}
    return socket


async def answered(socket: WebsocketCommunicator, operation_id: str, query: str, variables=None) -> list[dict]:
    await socket.send_json_to(
        {"id": operation_id, "type": "subscribe", "payload": {"query": query, "variables": variables}}
    )
    found = []
    while True:
        message = await socket.receive_json_from(timeout=10)
        assert message["id"] == operation_id, message
        if message["type"] == "complete":
            return found
        found.append(message)
        if message["type"] == "error":
            return found


async def closed_with(socket: WebsocketCommunicator) -> dict:
    closed = await socket.receive_output(timeout=10)
    assert closed["type"] == "websocket.close", closed
    # What a server sends once the close handshake is done: the consumer then ends. (Without it, it
    # waits for it, and wait() below would sit out its whole timeout.)
    await socket.send_input({"type": "websocket.disconnect", "code": closed["code"]})
    await socket.wait(timeout=10)  # raises what the consumer raised, if it did
    # wait() swallows its own timeout, cancelling the consumer: a consumer still running is a failure.
    assert not socket.future.cancelled(), "the consumer did not end after the disconnect"
    return closed


@pytest.mark.django_db
@pytest.mark.parametrize("frame", BAD_FRAMES.values(), ids=BAD_FRAMES.keys())
def test_frames_that_break_the_protocol_close_4400(frame, caplog):
    token = user_token()

    async def scenario():
        socket = await socket_for(token)
        await socket.send_json_to({"type": "ping"})
        assert await socket.receive_json_from(timeout=10) == {"type": "pong"}
        await socket.send_to(text_data=json.dumps(frame))
        closed = await closed_with(socket)
        assert closed["code"] == 4400 and closed["reason"]
        assert not [record for record in caplog.records if record.levelno >= logging.ERROR]

    run_in_process(scenario)


@pytest.mark.django_db
def test_deep_or_broken_json_closes_4400(caplog):
    token = user_token()

    async def scenario():
        for text in (
            '{"id": "a", "type": "subscribe", "payload": {"query": "' + ME + '", "variables": ' + deep_json() + "}}",
            "[" * DEEP + "]" * DEEP,
            '{"type": "ping", "payload": {"a": NaN}}',
            "not json",
        ):
            socket = await socket_for(token)
            await socket.send_to(text_data=text)
            closed = await closed_with(socket)
            assert closed["code"] == 4400 and "JSON" in closed["reason"], closed
        assert not [record for record in caplog.records if record.levelno >= logging.ERROR]

    run_in_process(scenario)


@pytest.mark.django_db
def test_costly_operations_are_refused_and_the_socket_answers_on(upstream, settings):
    key = user_token(key=True)

    async def scenario():
        socket = await socket_for(key)
        many = "mutation {" + " ".join(COMPLETE.format(n=n) for n in range(20)) + "}"
        [refused] = await answered(socket, "many", many)
        assert refused["type"] == "error" and refused["payload"][0]["extensions"]["code"] == "query_too_costly"
        assert upstream.requests == []

        settings.GRAPHQL_MAX_QUERY_BYTES = 100
        [refused] = await answered(socket, "large", '{ me(pad: "' + "x" * 100 + '") { sessionKind } }')
        assert refused["type"] == "error" and refused["payload"][0]["extensions"]["code"] == "invalid_query"
        settings.GRAPHQL_MAX_QUERY_BYTES = 32 * 1024
        [refused] = await answered(socket, "values", ME, {"a": list(range(6000))})
        assert "GRAPHQL_MAX_VARIABLE_VALUES" in refused["payload"][0]["message"]

        [refused] = await answered(socket, "suggest", "{ mee { sessionKind } }")
        assert "Did you mean" not in refused["payload"][0]["message"]

        # still answering: a query, then one model call
        assert await answered(socket, "me", ME) == [
            {"id": "me", "type": "next", "payload": {"data": {"me": {"sessionKind": "key"}}}}
        ]
        [done] = await answered(socket, "one", "mutation {" + COMPLETE.format(n=0) + "}")
        assert done["payload"] == {"data": {"a0": {"text": "hi"}}}
        assert len(upstream.requests) == 1
        await socket.disconnect()

    run_in_process(scenario)


async def test_the_playground_s_introspection_fits_the_default_limits(settings):
    settings.GRAPHQL_PLAYGROUND = True
    query = get_introspection_query(
        descriptions=True,
        specified_by_url=True,
        directive_is_repeatable=True,
        schema_description=True,
        input_value_deprecation=True,
    )
    body = await graphql(query)
    assert not body.get("errors"), body["errors"]
    assert body["data"]["__schema"]["queryType"]["name"] == "Query"
