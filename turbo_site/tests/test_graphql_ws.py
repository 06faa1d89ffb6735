"""/graphql over a WebSocket speaking graphql-transport-ws by hand (connection_init/ack, subscribe,
next, complete): queries and mutations, a chat's events while another user prompts, completions,
and who is refused.

In process, in one transaction rolled back after each test: the socket is Channels' WebsocketCommunicator
on Turbo's whole ASGI app (the protocol and its consumer are under test, not a server's WebSocket
framing), run by run_in_process (testing/inprocess.py), so the consumer's database calls run on the
test's connection; the HTTP calls made while a socket is open (a prompt, a logout) go to the in-process
client through sync_to_async on the same thread and the same event loop, where a streamed reply goes
on being generated after its response."""

import json

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator

from groups.models import Group
from testing.inprocess import ORIGIN, run_in_process
from turbo_site.asgi import application

pytestmark = pytest.mark.django_db

PROTOCOL = "graphql-transport-ws"
HOST = ORIGIN.removeprefix("http://")  # the Host a client of this server sends: its own origin is ORIGIN


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


class Closed(Exception):
    """The server closed the socket with `code`."""

    def __init__(self, code: int):
        super().__init__(f"closed with {code}")
        self.code = code


class Refused(Exception):
    """The handshake was closed before it was accepted: a server answers it with HTTP 403 (the ASGI spec)."""


class Socket:
    """One graphql-transport-ws connection (`async with`): acknowledged, or `closed` with the code that says why."""

    def __init__(self, token: str | None, *, origin: str | None = None, init: dict | None = None):
        headers = [(b"host", HOST.encode())]
        if origin:
            headers.append((b"origin", origin.encode()))
        self.ws = WebsocketCommunicator(application, "/graphql", headers=headers, subprotocols=[PROTOCOL])
        self.payload = init if init is not None else {"authorization": f"Bearer {token}"}
        self.ack, self.closed = None, None

    async def __aenter__(self) -> "Socket":
        connected, subprotocol = await self.ws.connect(timeout=10)
        if not connected:
            await self.ws.disconnect()
            raise Refused(subprotocol)
        assert subprotocol == PROTOCOL
        await self.send({"type": "connection_init", "payload": self.payload})
        try:
            self.ack = await self.recv()
        except Closed as closed:  # refused: the close frame says why
            self.closed = closed
        return self

    async def __aexit__(self, *exc_info):
        await self.ws.disconnect()

    async def send(self, message: dict) -> None:
        await self.ws.send_to(text_data=json.dumps(message))

    async def recv(self, timeout: float = 15) -> dict:
        output = await self.ws.receive_output(timeout)
        if output["type"] == "websocket.close":
            raise Closed(output.get("code", 1000))
        return json.loads(output["text"])

    async def subscribe(self, operation_id: str, query: str, variables: dict | None = None) -> None:
        await self.send(
            {"id": operation_id, "type": "subscribe", "payload": {"query": query, "variables": variables or {}}}
        )

    async def results(self, operation_id: str, *, until=None, timeout: float = 15) -> list[dict]:
        """`next` payloads of one operation until it completes (or `until(payload)` holds)."""
        found = []
        while True:
            message = await self.recv(timeout)
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


def gql(client, query: str, variables: dict | None = None, token: str | None = None) -> dict:
    response = client.post("/graphql", json={"query": query, "variables": variables or {}}, headers=bearer(token))
    body = response.json()
    assert not body.get("errors"), body
    return body["data"]


agql = sync_to_async(gql)  # from a scenario: the in-process request on this thread, on the scenario's loop


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


def test_queries_and_mutations_over_the_socket(signup):
    token, user, _ = signup()

    async def scenario():
        async with Socket(token) as socket:
            assert socket.ack["type"] == "connection_ack"
            await socket.subscribe("1", "{ me { user { id } sessionKind } }")
            assert await socket.results("1") == [{"data": {"me": {"user": {"id": user["id"]}, "sessionKind": "token"}}}]
            await socket.subscribe("2", 'mutation { groupCreate(name: "by socket") { name owner { id } } }')
            [result] = await socket.results("2")
            assert result["data"]["groupCreate"] == {"name": "by socket", "owner": {"id": user["id"]}}
            await socket.subscribe("3", '{ chat(id: "00000000-0000-0000-0000-000000000000") { id } }')
            [result] = await socket.results("3")
            assert result["errors"][0]["extensions"]["code"] == "not_found"

    run_in_process(scenario)
    assert Group.objects.filter(name="by socket").count() == 1


def test_a_member_receives_deltas_while_another_user_prompts(client, group_chat, upstream):
    chat_id, owner, member, _, _ = group_chat

    async def scenario():
        async with Socket(member) as socket:
            # after: 0 replays everything kept: whether the subscription is live before the prompt does not matter
            await socket.subscribe("events", EVENTS, {"c": chat_id, "after": 0})
            prompted = (
                await agql(
                    client,
                    'mutation($c: ID!) { prompt(chatId: $c, prompt: "echo: alpha beta gamma", stream: true)'
                    " { id status } }",
                    {"c": chat_id},
                    owner,
                )
            )["prompt"]
            assert prompted["status"] == "streaming"
            payloads = await socket.results("events", until=final_message_event)
        events = [p["data"]["chatEvents"] for p in payloads if p["data"]["chatEvents"]["type"].startswith("MESSAGE_")]
        assert events[0]["type"] == "MESSAGE_CREATED" and events[0]["message"]["id"] == prompted["id"]
        assert events[-1]["type"] == "MESSAGE_COMPLETED"
        assert events[-1]["message"]["reply"] == "alpha beta gamma"
        assert "".join(e["delta"] for e in events if e["type"] == "MESSAGE_DELTA") == "alpha beta gamma"
        assert all(e["chatId"] == chat_id for e in events)
        seqs = [e["seq"] for e in events]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)

        # resumable: after the first event, the rest again (from the replay store), in order
        async with Socket(member) as socket:
            await socket.subscribe("again", EVENTS, {"c": chat_id, "after": seqs[0]})
            replayed = [p["data"]["chatEvents"] for p in await socket.results("again", until=final_message_event)]
        assert [e["seq"] for e in replayed] == seqs[1:]

    run_in_process(scenario)


def test_an_outsider_and_a_bad_token_are_refused(client, group_chat, signup):
    chat_id, owner, _, _, outsider = group_chat

    async def scenario():
        async with Socket(outsider) as socket:
            await socket.subscribe("events", EVENTS, {"c": chat_id})
            [result] = await socket.results("events")
            assert result["errors"][0]["extensions"]["code"] == "not_found"

        async with Socket("not-a-token") as socket:
            assert socket.ack is None and socket.closed.code == 4403
        async with Socket(None, init={}) as socket:  # no authorization and no cookie
            assert socket.ack is None and socket.closed.code == 4403

        with pytest.raises(Refused):  # closed before it is accepted: HTTP 403
            async with Socket(owner, origin="https://evil.example"):
                pass
        # this server's own origin is fine
        async with Socket(owner, origin=ORIGIN) as socket:
            assert socket.ack["type"] == "connection_ack"

    run_in_process(scenario)


def test_removal_ends_the_subscription_and_revocation_closes_the_socket(client, group_chat):
    chat_id, owner, member, member_id, _ = group_chat
    # a chat member outside the group: removing them from the chat takes their access away
    other = client.post("/user/signup", data={"username": f"m-{chat_id[:8]}", "password": "correct-horse"}).json()
    gql(
        client,
        "mutation($c: ID!, $u: ID!) { chatUserAdd(chatId: $c, userId: $u) }",
        {"c": chat_id, "u": other["user"]["id"]},
        owner,
    )

    async def scenario():
        async with Socket(other["token"]) as socket:
            await socket.subscribe("events", EVENTS, {"c": chat_id, "after": 0})  # replayed if sent before it is live
            # an event through the stream first: the subscription is live before the removal
            await agql(
                client, 'mutation($c: ID!) { chatUpdate(id: $c, name: "renamed") { id } }', {"c": chat_id}, owner
            )
            await socket.results("events", until=lambda p: p["data"]["chatEvents"]["type"] == "CHAT_UPDATED")
            await agql(
                client,
                "mutation($c: ID!, $u: ID!) { chatUserRemove(chatId: $c, userId: $u) }",
                {"c": chat_id, "u": other["user"]["id"]},
                owner,
            )
            events = [p["data"]["chatEvents"] for p in await socket.results("events")]  # to its `complete`
        assert events[0]["type"] == "MEMBER_REMOVED" and events[0]["userId"] == other["user"]["id"], events
        assert (events[-1]["type"], events[-1]["reason"]) == ("STREAM_CLOSED", "access")

        async with Socket(member) as socket:
            await socket.subscribe("events", EVENTS, {"c": chat_id, "after": 0})
            await agql(client, 'mutation($c: ID!) { chatUpdate(id: $c, name: "again") { id } }', {"c": chat_id}, owner)
            await socket.results("events", until=lambda p: p["data"]["chatEvents"]["type"] == "CHAT_UPDATED")
            assert (await sync_to_async(client.post)("/user/logout", headers=bearer(member))).status_code == 200
            with pytest.raises(Closed) as closed:
                while True:
                    await socket.recv()
            assert closed.value.code == 4401

    run_in_process(scenario)


STREAM = """subscription($i: CompletionInput!) { completionStream(input: $i) {
  text done model finishReason data usage { totalTokens }
} }"""


def test_completion_stream_with_an_api_key(client, signup, upstream):
    token, _, _ = signup()
    key = client.post("/user/keys/create", json={"name": "prog"}, headers=bearer(token)).json()["key"]

    async def scenario():
        async with Socket(key) as socket:
            await socket.subscribe(
                "s", STREAM, {"i": {"messages": [{"role": "user", "content": "echo: one two three four"}]}}
            )
            deltas = [payload["data"]["completionStream"] for payload in await socket.results("s")]
            assert "".join(d["text"] for d in deltas) == "one two three four"
            assert len(deltas) > 2 and deltas[-1]["done"] is True and deltas[-1]["usage"]["totalTokens"]

            # structured output: the streamed reply, validated at its end
            response_format = {"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "object"}}}
            await socket.subscribe(
                "j",
                STREAM,
                {"i": {"messages": [{"role": "user", "content": 'echo: {"a": 1}'}], "responseFormat": response_format}},
            )
            deltas = [payload["data"]["completionStream"] for payload in await socket.results("j")]
            assert deltas[-1]["data"] == {"a": 1}

            # a key may not read chats, here as anywhere but model calls
            await socket.subscribe("c", "{ chats { id } }")
            [result] = await socket.results("c")
            assert result["errors"][0]["extensions"]["code"] == "key_not_allowed_here"

    run_in_process(scenario)


TOOLED = """subscription($i: CompletionInput!) { completionStream(input: $i) {
  text done finishReason data toolCalls retry
} }"""
LOOKUP = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}


def test_completion_stream_takes_tools_and_streams_structured_retries(signup, upstream):
    token, _, _ = signup()
    asked = {"role": "user", "content": "[scenario:tool_call][tool:lookup] find it"}

    async def scenario():
        async with Socket(token) as socket:
            await socket.subscribe("t", TOOLED, {"i": {"messages": [asked], "tools": [LOOKUP]}})
            deltas = [payload["data"]["completionStream"] for payload in await socket.results("t")]
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
            await socket.subscribe("r", TOOLED, {"i": {"messages": answered, "tools": [LOOKUP]}})
            deltas = [payload["data"]["completionStream"] for payload in await socket.results("r")]
            assert "".join(delta["text"] for delta in deltas) == "Tool said: found at home"
            assert deltas[-1]["toolCalls"] is None
            assert upstream.requests[-1].json()["messages"][-1]["tool_call_id"] == call["id"]

            # A structured reply that fails its schema: a delta with `retry`, then the next attempt streams.
            schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
            response_format = {"type": "json_schema", "json_schema": {"name": "n", "schema": schema}}
            retried = {"role": "user", "content": 'sequence: {"n": "x"} ||| {"n": 3}'}
            await socket.subscribe("s", TOOLED, {"i": {"messages": [retried], "responseFormat": response_format}})
            deltas = [payload["data"]["completionStream"] for payload in await socket.results("s")]
            (at,) = [index for index, delta in enumerate(deltas) if delta["retry"]]
            assert deltas[at]["retry"] == {"attempt": 1, "errors": ["at $.n: 'x' is not of type 'integer'"]}
            assert json.loads("".join(delta["text"] for delta in deltas[:at])) == {"n": "x"}
            assert json.loads("".join(delta["text"] for delta in deltas[at + 1 :])) == {"n": 3}
            assert deltas[-1]["data"] == {"n": 3}

    run_in_process(scenario)


def test_socket_without_the_protocol_is_refused():
    async def scenario():
        socket = WebsocketCommunicator(
            application, "/graphql", headers=[(b"host", HOST.encode())], subprotocols=["graphql-ws"]
        )
        connected, _ = await socket.connect(timeout=10)
        assert connected
        closed = await socket.receive_output(timeout=10)
        await socket.disconnect()
        return closed

    closed = run_in_process(scenario)
    assert (closed["type"], closed["code"]) == ("websocket.close", 4406)


def test_bad_arguments_are_the_query_s_fault(group_chat):
    chat_id, owner, _, _, _ = group_chat

    async def scenario():
        async with Socket(owner) as socket:
            await socket.subscribe("text", EVENTS, {"c": chat_id, "after": "soon"})
            [result] = await socket.results("text")
            assert result["errors"][0]["extensions"]["code"] == "invalid_query"
            await socket.subscribe("negative", EVENTS, {"c": chat_id, "after": -1})
            [result] = await socket.results("negative")
            assert result["errors"][0]["extensions"]["code"] == "invalid"
            assert "after" in result["errors"][0]["message"]
            # the socket is still good
            await socket.subscribe("me", "{ me { sessionKind } }")
            assert await socket.results("me") == [{"data": {"me": {"sessionKind": "token"}}}]

    run_in_process(scenario)
