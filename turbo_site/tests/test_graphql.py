"""/graphql over HTTP with a real client against the whole ASGI app, in process: every query and mutation,
API keys, access, limits, introspection and GraphiQL, structured output, and the schema file."""

import re
import uuid

import pytest
from django.core.management import call_command

from chats.models import Chat, ChatMember, Message
from groups.models import Group

pytestmark = pytest.mark.django_db


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def gql(client, query: str, variables: dict | None = None, token: str | None = None, **kwargs) -> dict:
    """POST a GraphQL request; the response body (GraphQL answers 200 with `errors` for field errors)."""
    headers = {**(bearer(token) if token else {}), **kwargs.pop("headers", {})}
    response = client.post("/graphql", json={"query": query, "variables": variables or {}}, headers=headers, **kwargs)
    assert response.status_code == 200, response.text
    return response.json()


def data_of(body: dict) -> dict:
    assert not body.get("errors"), body["errors"]
    return body["data"]


def error_codes(body: dict) -> list[str]:
    return [error["extensions"]["code"] for error in body.get("errors") or []]


GROUP_FIELDS = "id name description ownerId owner { id username } members { id username } chats { id name }"
CHAT_FIELDS = "id name model ownerId groupId systemPrompt tools settings program owner { id } group { id name }"


def test_groups_queries_and_mutations(client, signup):
    owner, owner_user, _ = signup()
    member, member_user, _ = signup()

    me = data_of(gql(client, "{ me { user { id username } sessionKind } }", token=owner))["me"]
    assert me == {"user": {"id": owner_user["id"], "username": owner_user["username"]}, "sessionKind": "token"}

    created = data_of(
        gql(
            client,
            f'mutation($name: String!) {{ groupCreate(name: $name, description: "d") {{ {GROUP_FIELDS} }} }}',
            {"name": "team"},
            token=owner,
        )
    )["groupCreate"]
    assert (created["name"], created["description"], created["ownerId"]) == ("team", "d", owner_user["id"])
    assert [m["id"] for m in created["members"]] == [owner_user["id"]]

    added = data_of(
        gql(
            client,
            "mutation($g: ID!, $u: [ID!]!) { groupMembersAdd(groupId: $g, userIds: $u) { members { id } } }",
            {"g": created["id"], "u": [member_user["id"]]},
            token=owner,
        )
    )["groupMembersAdd"]
    assert [m["id"] for m in added["members"]] == [owner_user["id"], member_user["id"]]

    # the member sees it; the member may not rename it (owner only), and nothing changes
    listed = data_of(gql(client, "{ groups { id name } }", token=member))["groups"]
    assert {"id": created["id"], "name": "team"} in listed
    refused = gql(
        client,
        'mutation($id: ID!) { groupUpdate(id: $id, name: "mine") { name } }',
        {"id": created["id"]},
        token=member,
    )
    assert error_codes(refused) == ["forbidden"]
    assert Group.objects.get(pk=created["id"]).name == "team"

    renamed = data_of(
        gql(
            client,
            'mutation($id: ID!) { groupUpdate(id: $id, name: "renamed") { name description } }',
            {"id": created["id"]},
            token=owner,
        )
    )["groupUpdate"]
    assert renamed == {"name": "renamed", "description": "d"}
    one = data_of(
        gql(client, f"query($id: ID!) {{ group(id: $id) {{ {GROUP_FIELDS} }} }}", {"id": created["id"]}, token=member)
    )
    assert one["group"]["name"] == "renamed"

    # invalid input names the field
    invalid = gql(client, 'mutation { groupCreate(name: "") { id } }', token=owner)
    assert error_codes(invalid) == ["invalid"]
    assert "name" in invalid["errors"][0]["message"]

    left = data_of(
        gql(
            client,
            "mutation($g: ID!, $u: [ID!]!) { groupMembersRemove(groupId: $g, userIds: $u) }",
            {"g": created["id"], "u": [member_user["id"]]},
            token=member,
        )
    )
    assert left == {"groupMembersRemove": True}
    gone = gql(client, "query($id: ID!) { group(id: $id) { id } }", {"id": created["id"]}, token=member)
    assert error_codes(gone) == ["not_found"]

    assert data_of(gql(client, "mutation($id: ID!) { groupDelete(id: $id) }", {"id": created["id"]}, token=owner)) == {
        "groupDelete": True
    }
    assert not Group.objects.filter(pk=created["id"]).exists()


def test_chats_queries_mutations_and_prompt(client, signup, upstream):
    owner, owner_user, _ = signup()
    member, member_user, _ = signup()
    group = data_of(gql(client, 'mutation { groupCreate(name: "team") { id } }', token=owner))["groupCreate"]

    chat = data_of(
        gql(
            client,
            f'mutation($g: ID!) {{ chatCreate(name: "plan", groupId: $g, systemPrompt: "be brief", '
            f"settings: {{temperature: 0.5}}) {{ {CHAT_FIELDS} }} }}",
            {"g": group["id"]},
            token=owner,
        )
    )["chatCreate"]
    assert (chat["name"], chat["groupId"], chat["group"], chat["settings"]) == (
        "plan",
        group["id"],
        {"id": group["id"], "name": "team"},
        {"temperature": 0.5},
    )
    updated = data_of(
        gql(
            client,
            'mutation($id: ID!) { chatUpdate(id: $id, name: "plans") { name } }',
            {"id": chat["id"]},
            token=owner,
        )
    )
    assert updated == {"chatUpdate": {"name": "plans"}}

    # the member is not in the group: the chat is invisible to them until added
    assert error_codes(gql(client, "query($id: ID!) { chat(id: $id) { id } }", {"id": chat["id"]}, token=member)) == [
        "not_found"
    ]
    add = "mutation($c: ID!, $u: ID!) { chatUserAdd(chatId: $c, userId: $u) }"
    assert data_of(gql(client, add, {"c": chat["id"], "u": member_user["id"]}, token=owner)) == {"chatUserAdd": True}
    seen = data_of(
        gql(client, "query($id: ID!) { chat(id: $id) { name group { id } } }", {"id": chat["id"]}, token=member)
    )
    assert seen == {"chat": {"name": "plans", "group": None}}  # the group itself stays the group's members' to see

    for word in ("one", "two", "three"):
        reply = data_of(
            gql(
                client,
                "mutation($c: ID!, $p: String!) { prompt(chatId: $c, prompt: $p, context: 2) "
                "{ id chatId userId prompt reply status otr chat { id } author { username } } }",
                {"c": chat["id"], "p": f"echo: {word}"},
                token=member,
            )
        )["prompt"]
        assert (reply["reply"], reply["status"], reply["userId"], reply["chat"]) == (
            word,
            "complete",
            member_user["id"],
            {"id": chat["id"]},
        )

    page = (
        "query($id: ID!, $before: String) { chat(id: $id) { messages(last: 2, before: $before) "
        "{ nodes { reply } hasPrevious startCursor } } }"
    )
    newest = data_of(gql(client, page, {"id": chat["id"]}, token=owner))["chat"]["messages"]
    assert ([n["reply"] for n in newest["nodes"]], newest["hasPrevious"]) == (["two", "three"], True)
    older = data_of(gql(client, page, {"id": chat["id"], "before": newest["startCursor"]}, token=owner))["chat"][
        "messages"
    ]
    assert ([n["reply"] for n in older["nodes"]], older["hasPrevious"]) == (["one"], False)

    listed = data_of(gql(client, "{ chats { id name } }", token=member))["chats"]
    assert listed == [{"id": chat["id"], "name": "plans"}]
    in_group = data_of(
        gql(client, "query($g: ID!) { group(id: $g) { chats { id } } }", {"g": group["id"]}, token=owner)
    )
    assert in_group == {"group": {"chats": [{"id": chat["id"]}]}}

    # a member deletes their own message; the owner stops (nothing running) and removes them
    first = Message.objects.filter(chat_id=chat["id"]).order_by("created_at").first()
    assert data_of(
        gql(client, "mutation($id: ID!) { messageDelete(id: $id) }", {"id": str(first.pk)}, token=member)
    ) == {"messageDelete": True}
    assert data_of(gql(client, "mutation($id: ID!) { chatStop(id: $id) }", {"id": chat["id"]}, token=owner)) == {
        "chatStop": 0
    }
    remove = "mutation($c: ID!, $u: ID!) { chatUserRemove(chatId: $c, userId: $u) }"
    assert error_codes(gql(client, remove, {"c": chat["id"], "u": owner_user["id"]}, token=member)) == ["forbidden"]
    assert data_of(gql(client, remove, {"c": chat["id"], "u": member_user["id"]}, token=owner)) == {
        "chatUserRemove": True
    }
    assert not ChatMember.objects.filter(chat_id=chat["id"], user_id=member_user["id"]).exists()

    assert data_of(gql(client, "mutation($id: ID!) { chatDelete(id: $id) }", {"id": chat["id"]}, token=owner)) == {
        "chatDelete": True
    }
    assert not Chat.objects.filter(pk=chat["id"]).exists()


def test_model_limits_apply_and_errors_carry_codes_not_traces(client, signup, upstream):
    token, _, _ = signup()
    key = client.post(
        "/user/keys/create", json={"name": "narrow", "models": ["gpt-4o-mini"]}, headers=bearer(token)
    ).json()["key"]
    body = gql(
        client,
        'mutation { complete(input: {model: "gpt-4o", messages: [{role: "user", content: "hi"}]}) { text } }',
        token=key,
    )
    assert error_codes(body) == ["model_not_allowed"]
    assert set(body["errors"][0]) <= {"message", "locations", "path", "extensions"}
    assert "Traceback" not in str(body)
    assert not [r for r in upstream.requests if r.path == "/v1/chat/completions"]


def test_structured_output_through_prompt_and_complete(client, signup, upstream):
    token, _, _ = signup()
    chat = data_of(gql(client, 'mutation { chatCreate(name: "json") { id } }', token=token))["chatCreate"]
    response_format = {
        "type": "json_schema",
        "json_schema": {
            "name": "answer",
            "schema": {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]},
        },
    }
    prompted = data_of(
        gql(
            client,
            "mutation($c: ID!, $p: String!, $f: JSON) { prompt(chatId: $c, prompt: $p, responseFormat: $f) "
            "{ reply status data } }",
            {"c": chat["id"], "p": 'echo: {"n": 7}', "f": response_format},
            token=token,
        )
    )["prompt"]
    assert (prompted["status"], prompted["data"]) == ("complete", {"n": 7})
    assert upstream.requests[-1].json()["response_format"]["json_schema"]["name"] == "answer"

    completed = data_of(
        gql(
            client,
            "mutation($i: CompletionInput!) { complete(input: $i) { text data usage { totalTokens } } }",
            {
                "i": {
                    "messages": [{"role": "user", "content": 'sequence: {"n": "x"} ||| {"n": 3}'}],
                    "responseFormat": response_format,
                }
            },
            token=token,
        )
    )["complete"]
    assert (completed["text"], completed["data"]) == ('{"n": 3}', {"n": 3})  # asked again once, then valid

    bad = gql(
        client,
        "mutation($i: CompletionInput!) { complete(input: $i) { text } }",
        {"i": {"messages": [{"role": "user", "content": "hi"}], "responseFormat": {"type": "xml"}}},
        token=token,
    )
    assert error_codes(bad) == ["invalid_response_format"]
    assert "response_format" in bad["errors"][0]["message"]


def test_complete_takes_tools_and_returns_the_model_s_calls(client, signup, upstream):
    token, _, _ = signup()
    lookup = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}
    query = "mutation($i: CompletionInput!) { complete(input: $i) { text finishReason toolCalls } }"
    asked = {"role": "user", "content": "[scenario:tool_call][tool:lookup] find it"}
    called = data_of(gql(client, query, {"i": {"messages": [asked], "tools": [lookup]}}, token=token))["complete"]
    (call,) = called["toolCalls"]
    assert call["function"]["name"] == "lookup" and called["finishReason"] == "tool_calls"
    assert upstream.requests[-1].json()["tools"] == [lookup]

    answered = [
        asked,
        {"role": "assistant", "toolCalls": [call]},
        {"role": "tool", "toolCallId": call["id"], "content": "found at home"},
    ]
    reply = data_of(gql(client, query, {"i": {"messages": answered, "tools": [lookup]}}, token=token))["complete"]
    assert reply["text"] == "Tool said: found at home" and reply["toolCalls"] == []

    bad = gql(client, query, {"i": {"messages": [{"role": "tool", "content": "x"}]}}, token=token)
    assert "input.messages[0].tool_call_id" in bad["errors"][0]["message"]


def test_api_key_only_where_keys_act(client, signup, upstream):
    token, user, _ = signup()
    key = client.post("/user/keys/create", json={"name": "prog"}, headers=bearer(token)).json()["key"]

    allowed = data_of(
        gql(
            client,
            "query { me { user { id } sessionKind } models { id } usage { total { requests } } }",
            token=key,
        )
    )
    assert allowed["me"] == {"user": {"id": user["id"]}, "sessionKind": "key"}
    assert allowed["models"] and all(model["id"] for model in allowed["models"])
    completed = data_of(
        gql(
            client,
            'mutation { complete(input: {messages: [{role: "user", content: "echo: via key"}]}) { text model } }',
            token=key,
        )
    )["complete"]
    assert completed["text"] == "via key"

    # usage is checked as GET /usage checks it
    by_day = data_of(gql(client, '{ usage(since: "7d", by: "day") { total { costUsd } rows { day } } }', token=key))
    assert by_day["usage"]["total"]["costUsd"]
    bad = gql(client, '{ usage(by: "year") { total { requests } } }', token=key)
    assert error_codes(bad) == ["invalid"] and "by" in bad["errors"][0]["message"]

    for query in ("{ groups { id } }", "{ chats { id } }", 'mutation { groupCreate(name: "x") { id } }'):
        body = gql(client, query, token=key)
        assert error_codes(body) == ["key_not_allowed_here"], query
        from accounts.auth import KEY_NOT_ALLOWED_MESSAGE

        assert body["errors"][0]["message"] == KEY_NOT_ALLOWED_MESSAGE
    assert not Group.objects.filter(name="x").exists()


def test_unauthenticated_and_outsiders_are_refused(client, signup):
    owner, _, _ = signup()
    outsider, _, _ = signup()
    chat = data_of(gql(client, 'mutation { chatCreate(name: "private") { id } }', token=owner))["chatCreate"]

    assert error_codes(gql(client, "{ me { user { id } } }")) == ["unauthorized"]
    assert error_codes(gql(client, "{ me { user { id } } }", token="not-a-token")) == ["unauthorized"]
    for query in (
        "query($id: ID!) { chat(id: $id) { id } }",
        'mutation($id: ID!) { chatUpdate(id: $id, name: "taken") { id } }',
        "mutation($id: ID!) { chatDelete(id: $id) }",
        'mutation($id: ID!) { prompt(chatId: $id, prompt: "hi") { id } }',
    ):
        assert error_codes(gql(client, query, {"id": chat["id"]}, token=outsider)) == ["not_found"], query
    assert Chat.objects.get(pk=chat["id"]).name == "private"
    assert not Message.objects.filter(chat_id=chat["id"]).exists()


def test_cookie_mutations_follow_the_origin_rule(client, signup):
    token, _, _ = signup()
    mutation = {"query": 'mutation { groupCreate(name: "from a page") { id } }'}
    foreign = client.post(
        "/graphql", json=mutation, headers={"Cookie": f"sess={token}", "Origin": "https://evil.example"}
    )
    assert error_codes(foreign.json()) == ["forbidden"]
    assert not Group.objects.filter(name="from a page").exists()

    own_origin = str(client.base_url).rstrip("/")
    ours = client.post("/graphql", json=mutation, headers={"Cookie": f"sess={token}", "Origin": own_origin})
    assert not ours.json().get("errors")
    # a GET runs queries only, with the cookie, from anywhere (nothing changes)
    query = client.get(
        "/graphql", params={"query": "{ me { user { username } } }"}, headers={"Cookie": f"sess={token}"}
    )
    assert query.json()["data"]["me"]["user"]["username"]
    refused = client.get("/graphql", params={"query": mutation["query"]}, headers={"Cookie": f"sess={token}"})
    assert refused.status_code in (400, 405)


def test_depth_and_cost_limits(client, signup, settings):
    token, _, _ = signup()
    # a chat's group's chats' group...: the types link both ways, so only the depth limit ends this
    deep = "{ chats { " + "group { chats { " * 5 + "id" + " } }" * 5 + " } }"
    body = gql(client, deep, token=token)
    assert body["data"] is None and any("depth" in error["message"] for error in body["errors"]), body

    settings.GRAPHQL_MAX_COST = 50
    costly = "{ chats { id messages(last: 100) { nodes { id reply } } } }"
    body = gql(client, costly, token=token)
    assert body["data"] is None and "cost" in body["errors"][0]["message"]
    assert error_codes(body) == ["query_too_costly"]
    cheap = gql(client, "{ chats { id messages(last: 1) { nodes { id } } } }", token=token)
    assert not cheap.get("errors")


def test_request_body_limit_applies(client, signup, settings):
    token, _, _ = signup()
    settings.MAX_BODY_BYTES = 1000
    response = client.post(
        "/graphql", json={"query": "{ me { user { id } } }", "pad": "x" * 2000}, headers=bearer(token)
    )
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "body_too_large"


INTROSPECTION = "{ __schema { queryType { name } } }"


def test_introspection_and_graphiql_only_when_on(client, signup, settings):
    token, _, _ = signup()
    settings.DEBUG = False
    settings.GRAPHQL_PLAYGROUND = False
    body = gql(client, INTROSPECTION, token=token)
    assert body["data"] is None and "introspection" in body["errors"][0]["message"].lower()
    page = client.get("/graphql", headers={"Accept": "text/html"})
    assert page.status_code == 404
    assert page.json()["error"]["code"] == "not_found"

    settings.GRAPHQL_PLAYGROUND = True
    assert data_of(gql(client, INTROSPECTION, token=token)) == {"__schema": {"queryType": {"name": "Query"}}}
    page = client.get("/graphql", headers={"Accept": "text/html"})
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assets = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert assets and all(asset.startswith("/static/") for asset in assets), assets
    assert "http://" not in page.text and "https://" not in page.text and "//unpkg" not in page.text
    for asset in assets:
        served = client.get(asset)
        assert served.status_code == 200, asset
    scripts = " ".join(client.get(asset).text for asset in assets if asset.endswith("turbo-graphiql.js"))
    assert "createFetcher" in scripts


def test_schema_file_is_current(tmp_path):
    """schema.graphql is the schema as the code defines it: run `manage.py graphql_schema` after a change."""
    from turbo_site.management.commands.graphql_schema import SCHEMA_FILE, schema_text

    assert SCHEMA_FILE.read_text() == schema_text(), "schema.graphql is stale: run manage.py graphql_schema"
    written = tmp_path / "schema.graphql"
    call_command("graphql_schema", output=str(written))
    assert written.read_text() == SCHEMA_FILE.read_text()


def test_ids_must_be_uuids(client, signup):
    token, _, _ = signup()
    body = gql(client, 'query { chat(id: "42") { id } }', token=token)
    assert error_codes(body) == ["invalid"]
    body = gql(client, "query($id: ID!) { group(id: $id) { id } }", {"id": str(uuid.uuid4())}, token=token)
    assert error_codes(body) == ["not_found"]
