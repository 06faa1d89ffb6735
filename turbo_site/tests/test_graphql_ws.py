"""/graphql over a real WebSocket speaking graphql-transport-ws by hand (connection_init/ack, subscribe,
next, complete): queries and mutations, a chat's events while another user prompts, completions,
and who is refused."""

import contextlib
import json

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from groups.models import Group

pytestmark = pytest.mark.django_db(transaction=True)

PROTOCOL = "graphql-transport-ws"


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


class Socket:
    """One graphql-transport-ws connection, acknowledged."""

    def __init__(self, server, token: str | None, *, origin: str | None = None, init: dict | None = None):
        headers = {"Origin": origin} if origin else {}
        self.stack = contextlib.ExitStack()
        self.ws = self.stack.enter_context(
            connect(
                f"ws://127.0.0.1:{server.port}/graphql",
                subprotocols=[PROTOCOL],
                additional_headers=headers,
                open_timeout=10,
            )
        )
        assert self.ws.subprotocol == PROTOCOL
        payload = init if init is not None else {"authorization": f"Bearer {token}"}
        self.send({"type": "connection_init", "payload": payload})
        try:
            self.ack, self.closed = self.recv(), None
        except ConnectionClosed as closed:  # refused: the close frame says why
            self.ack, self.closed = None, closed.rcvd

    def send(self, message: dict) -> None:
        self.ws.send(json.dumps(message))

    def recv(self, timeout: float = 15) -> dict:
        return json.loads(self.ws.recv(timeout=timeout))

    def subscribe(self, operation_id: str, query: str, variables: dict | None = None) -> None:
        self.send({"id": operation_id, "type": "subscribe", "payload": {"query": query, "variables": variables or {}}})

    def results(self, operation_id: str, *, until=None, timeout: float = 15) -> list[dict]:
        """`next` payloads of one operation until it completes (or `until(payload)` holds)."""
        found = []
        while True:
            message = self.recv(timeout)
            if message.get("id") != operation_id:
                continue
            if message["type"] == "complete":
                return found
            if message["type"] == "error":
                found.append({"errors": message["payload"]})
                return found
            found.append(message["payload"])
            if until is not None and until(message["payload"]):
                return found

    def close(self) -> None:
        self.stack.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


def gql(client, query: str, variables: dict | None = None, token: str | None = None) -> dict:
    response = client.post("/graphql", json={"query": query, "variables": variables or {}}, headers=bearer(token))
    body = response.json()
    assert not body.get("errors"), body
    return body["data"]


@pytest.fixture
def group_chat(client, signup):
    """A group chat of owner + member, and an outsider; returns (chat id, owner, member, member id, outsider)."""
    owner, _, _ = signup()
    member, member_user, _ = signup()
    outsider, _, _ = signup()
    group = gql(client, 'mutation { groupCreate(name: "team") { id } }', token=owner)["groupCreate"]
    gql(
        client,
        "mutation($g: ID!, $u: [ID!]!) { groupMembersAdd(groupId: $g, userIds: $u) { id } }",
        {"g": group["id"], "u": [member_user["id"]]},
        token=owner,
    )
    chat = gql(client, 'mutation($g: ID!) { chatCreate(name: "c", groupId: $g) { id } }', {"g": group["id"]}, owner)
    return chat["chatCreate"]["id"], owner, member, member_user["id"], outsider


EVENTS = """subscription($c: ID!, $after: BigInt) { chatEvents(chatId: $c, after: $after) {
  type seq chatId delta partial userId notice reason message { id reply status userId }
} }"""


def final_message_event(payload: dict) -> bool:
    event = payload.get("data", {}).get("chatEvents") or {}
    return event.get("type") in ("MESSAGE_COMPLETED", "MESSAGE_FAILED")


def test_queries_and_mutations_over_the_socket(turbo_server, signup):
    token, user, _ = signup()
    with Socket(turbo_server, token) as socket:
        assert socket.ack["type"] == "connection_ack"
        socket.subscribe("1", "{ me { user { id } sessionKind } }")
        assert socket.results("1") == [{"data": {"me": {"user": {"id": user["id"]}, "sessionKind": "token"}}}]
        socket.subscribe("2", 'mutation { groupCreate(name: "by socket") { name owner { id } } }')
        [result] = socket.results("2")
        assert result["data"]["groupCreate"] == {"name": "by socket", "owner": {"id": user["id"]}}
        socket.subscribe("3", '{ chat(id: "00000000-0000-0000-0000-000000000000") { id } }')
        [result] = socket.results("3")
        assert result["errors"][0]["extensions"]["code"] == "not_found"
    assert Group.objects.filter(name="by socket").count() == 1


def test_a_member_receives_deltas_while_another_user_prompts(client, turbo_server, group_chat, upstream):
    chat_id, owner, member, _, _ = group_chat
    with Socket(turbo_server, member) as socket:
        # after: 0 replays everything kept: whether the subscription is live before the prompt does not matter
        socket.subscribe("events", EVENTS, {"c": chat_id, "after": 0})
        prompted = gql(
            client,
            'mutation($c: ID!) { prompt(chatId: $c, prompt: "echo: alpha beta gamma", stream: true) { id status } }',
            {"c": chat_id},
            owner,
        )["prompt"]
        assert prompted["status"] == "streaming"
        payloads = socket.results("events", until=final_message_event)
    events = [p["data"]["chatEvents"] for p in payloads if p["data"]["chatEvents"]["type"].startswith("MESSAGE_")]
    assert events[0]["type"] == "MESSAGE_CREATED" and events[0]["message"]["id"] == prompted["id"]
    assert events[-1]["type"] == "MESSAGE_COMPLETED"
    assert events[-1]["message"]["reply"] == "alpha beta gamma"
    assert "".join(e["delta"] for e in events if e["type"] == "MESSAGE_DELTA") == "alpha beta gamma"
    assert all(e["chatId"] == chat_id for e in events)
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)

    # resumable: after the first event, the rest again (from the replay store), in order
    with Socket(turbo_server, member) as socket:
        socket.subscribe("again", EVENTS, {"c": chat_id, "after": seqs[0]})
        replayed = [p["data"]["chatEvents"] for p in socket.results("again", until=final_message_event)]
    assert [e["seq"] for e in replayed] == seqs[1:]


def test_an_outsider_and_a_bad_token_are_refused(client, turbo_server, group_chat, signup):
    chat_id, owner, _, _, outsider = group_chat
    with Socket(turbo_server, outsider) as socket:
        socket.subscribe("events", EVENTS, {"c": chat_id})
        [result] = socket.results("events")
        assert result["errors"][0]["extensions"]["code"] == "not_found"

    with Socket(turbo_server, "not-a-token") as socket:
        assert socket.ack is None and socket.closed.code == 4403
    with Socket(turbo_server, None, init={}) as socket:  # no authorization and no cookie
        assert socket.ack is None and socket.closed.code == 4403

    with pytest.raises(InvalidStatus) as refused:
        Socket(turbo_server, owner, origin="https://evil.example")
    assert refused.value.response.status_code == 403
    # this server's own origin is fine
    with Socket(turbo_server, owner, origin=turbo_server.url) as socket:
        assert socket.ack["type"] == "connection_ack"


def test_removal_ends_the_subscription_and_revocation_closes_the_socket(client, turbo_server, group_chat):
    chat_id, owner, member, member_id, _ = group_chat
    # a chat member outside the group: removing them from the chat takes their access away
    other = client.post("/user/signup", data={"username": f"m-{chat_id[:8]}", "password": "correct-horse"}).json()
    gql(
        client,
        "mutation($c: ID!, $u: ID!) { chatUserAdd(chatId: $c, userId: $u) }",
        {"c": chat_id, "u": other["user"]["id"]},
        owner,
    )
    with Socket(turbo_server, other["token"]) as socket:
        socket.subscribe("events", EVENTS, {"c": chat_id, "after": 0})  # replayed if sent before it is live
        # an event through the stream first: the subscription is live before the removal
        gql(client, 'mutation($c: ID!) { chatUpdate(id: $c, name: "renamed") { id } }', {"c": chat_id}, owner)
        socket.results("events", until=lambda p: p["data"]["chatEvents"]["type"] == "CHAT_UPDATED")
        gql(
            client,
            "mutation($c: ID!, $u: ID!) { chatUserRemove(chatId: $c, userId: $u) }",
            {"c": chat_id, "u": other["user"]["id"]},
            owner,
        )
        events = [p["data"]["chatEvents"] for p in socket.results("events")]  # to its `complete`
    assert events[0]["type"] == "MEMBER_REMOVED" and events[0]["userId"] == other["user"]["id"], events
    assert (events[-1]["type"], events[-1]["reason"]) == ("STREAM_CLOSED", "access")

    with Socket(turbo_server, member) as socket:
        socket.subscribe("events", EVENTS, {"c": chat_id, "after": 0})
        gql(client, 'mutation($c: ID!) { chatUpdate(id: $c, name: "again") { id } }', {"c": chat_id}, owner)
        socket.results("events", until=lambda p: p["data"]["chatEvents"]["type"] == "CHAT_UPDATED")
        assert client.post("/user/logout", headers=bearer(member)).status_code == 200
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                socket.recv()
        assert closed.value.rcvd.code == 4401


STREAM = """subscription($i: CompletionInput!) { completionStream(input: $i) {
  text done model finishReason data usage { totalTokens }
} }"""


def test_completion_stream_with_an_api_key(client, turbo_server, signup, upstream):
    token, _, _ = signup()
    key = client.post("/user/keys/create", json={"name": "prog"}, headers=bearer(token)).json()["key"]
    with Socket(turbo_server, key) as socket:
        socket.subscribe("s", STREAM, {"i": {"messages": [{"role": "user", "content": "echo: one two three four"}]}})
        deltas = [payload["data"]["completionStream"] for payload in socket.results("s")]
        assert "".join(d["text"] for d in deltas) == "one two three four"
        assert len(deltas) > 2 and deltas[-1]["done"] is True and deltas[-1]["usage"]["totalTokens"]

        # structured output: the streamed reply, validated at its end
        response_format = {"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "object"}}}
        socket.subscribe(
            "j",
            STREAM,
            {"i": {"messages": [{"role": "user", "content": 'echo: {"a": 1}'}], "responseFormat": response_format}},
        )
        deltas = [payload["data"]["completionStream"] for payload in socket.results("j")]
        assert deltas[-1]["data"] == {"a": 1}

        # a key may not read chats, here as anywhere but model calls
        socket.subscribe("c", "{ chats { id } }")
        [result] = socket.results("c")
        assert result["errors"][0]["extensions"]["code"] == "key_not_allowed_here"


TOOLED = """subscription($i: CompletionInput!) { completionStream(input: $i) {
  text done finishReason data toolCalls retry
} }"""
LOOKUP = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}


def test_completion_stream_takes_tools_and_streams_structured_retries(turbo_server, signup, upstream):
    token, _, _ = signup()
    asked = {"role": "user", "content": "[scenario:tool_call][tool:lookup] find it"}
    with Socket(turbo_server, token) as socket:
        socket.subscribe("t", TOOLED, {"i": {"messages": [asked], "tools": [LOOKUP]}})
        deltas = [payload["data"]["completionStream"] for payload in socket.results("t")]
        last = deltas[-1]
        assert last["done"] is True and last["finishReason"] == "tool_calls"
        (call,) = last["toolCalls"]
        assert call["function"]["name"] == "lookup"

        # The caller runs its function and answers with a tool message.
        answered = [
            asked,
            {"role": "assistant", "toolCalls": [call]},
            {"role": "tool", "toolCallId": call["id"], "content": "found at home"},
        ]
        socket.subscribe("r", TOOLED, {"i": {"messages": answered, "tools": [LOOKUP]}})
        deltas = [payload["data"]["completionStream"] for payload in socket.results("r")]
        assert "".join(delta["text"] for delta in deltas) == "Tool said: found at home"
        assert deltas[-1]["toolCalls"] is None
        assert upstream.requests[-1].json()["messages"][-1]["tool_call_id"] == call["id"]

        # A structured reply that fails its schema: a delta with `retry`, then the next attempt streams.
        schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
        response_format = {"type": "json_schema", "json_schema": {"name": "n", "schema": schema}}
        retried = {"role": "user", "content": 'sequence: {"n": "x"} ||| {"n": 3}'}
        socket.subscribe("s", TOOLED, {"i": {"messages": [retried], "responseFormat": response_format}})
        deltas = [payload["data"]["completionStream"] for payload in socket.results("s")]
        (at,) = [index for index, delta in enumerate(deltas) if delta["retry"]]
        assert deltas[at]["retry"] == {"attempt": 1, "errors": ["at $.n: 'x' is not of type 'integer'"]}
        assert json.loads("".join(delta["text"] for delta in deltas[:at])) == {"n": "x"}
        assert json.loads("".join(delta["text"] for delta in deltas[at + 1 :])) == {"n": 3}
        assert deltas[-1]["data"] == {"n": 3}


def test_socket_without_the_protocol_is_refused(turbo_server, signup):
    token, _, _ = signup()
    with connect(f"ws://127.0.0.1:{turbo_server.port}/graphql", subprotocols=["graphql-ws"], open_timeout=10) as ws:
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=10)
    assert closed.value.rcvd.code == 4406


def test_bad_arguments_are_the_query_s_fault(turbo_server, group_chat):
    chat_id, owner, _, _, _ = group_chat
    with Socket(turbo_server, owner) as socket:
        socket.subscribe("text", EVENTS, {"c": chat_id, "after": "soon"})
        [result] = socket.results("text")
        assert result["errors"][0]["extensions"]["code"] == "invalid_query"
        socket.subscribe("negative", EVENTS, {"c": chat_id, "after": -1})
        [result] = socket.results("negative")
        assert result["errors"][0]["extensions"]["code"] == "invalid"
        assert "after" in result["errors"][0]["message"]
        # the socket is still good
        socket.subscribe("me", "{ me { sessionKind } }")
        assert socket.results("me") == [{"data": {"me": {"sessionKind": "token"}}}]
