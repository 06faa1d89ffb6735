"""The gRPC Chats service with a real grpc.aio client: prompts, a chat's live stream (resumed with
`after`, ended when access or the session ends), refusals with their statuses, structured output.

Each test runs in one transaction, rolled back after it: Turbo's gRPC server (turbo_site/grpc.py, its
interceptors and all) is started for the test on the event loop of run_in_process (testing/inprocess.py),
beside its grpc.aio client, so the servicers' database calls run on the test's own connection; the HTTP
calls made meanwhile (a member removed, a logout) go to the in-process client through sync_to_async,
on the same thread."""

import asyncio
import json
import uuid
from collections.abc import Awaitable, Callable

import grpc
import pytest
from asgiref.sync import sync_to_async

from protos.turbo.v1 import turbo_pb2, turbo_pb2_grpc
from testing.grpc import bearer, serving
from testing.inprocess import run_in_process

pytestmark = pytest.mark.django_db

SCHEMA = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"]}


def rest(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def over_grpc(scenario: Callable[[turbo_pb2_grpc.ChatsStub], Awaitable]):
    """`scenario(chats)` with a Chats stub of a grpc.aio channel to Turbo's gRPC server, both on the loop of
    run_in_process: the server is started for it on a free loopback port, and stopped after it."""

    async def served():
        async with serving() as channel:
            return await scenario(turbo_pb2_grpc.ChatsStub(channel))

    return run_in_process(served)


@pytest.fixture
def chat_of_two(client, signup):
    """A chat of its owner and one added member; returns (chat, owner token, member token, member user)."""
    owner, _, _ = signup()
    member, member_user, _ = signup()
    chat = client.post("/chat/create", data={"name": "grpc chat"}, headers=rest(owner)).json()
    added = client.post(
        "/chat/user/add", data={"chat_id": chat["id"], "user_id": member_user["id"]}, headers=rest(owner)
    )
    assert added.status_code == 200, added.text
    return chat, owner, member, member_user


async def until_final(call) -> list[turbo_pb2.ChatEvent]:
    """message.* events up to the first that is not partial (others skipped)."""
    events = []
    while True:
        event = await asyncio.wait_for(call.read(), 15)
        assert event is not grpc.aio.EOF
        if event.type.startswith("message."):
            events.append(event)
            if not event.partial:
                return events


def test_prompt_waits_for_the_reply(chat_of_two, upstream):
    chat, owner, _, _ = chat_of_two

    async def scenario(chats):
        return await chats.Prompt(
            turbo_pb2.PromptRequest(chat_id=chat["id"], prompt="echo: hello chat"), metadata=bearer(owner)
        )

    message = over_grpc(scenario).message
    assert (message.prompt, message.reply, message.status) == ("echo: hello chat", "hello chat", "complete")
    assert message.chat_id == chat["id"]
    assert message.completion_tokens == 2
    assert json.loads(message.tool_calls_json) == []


def test_events_stream_a_reply_to_every_member_and_resume_after_a_seq(client, chat_of_two, upstream):
    chat, owner, member, _ = chat_of_two

    async def scenario(chats):
        watching = [
            chats.Events(turbo_pb2.EventsRequest(chat_id=chat["id"]), metadata=bearer(token))
            for token in (owner, member)
        ]
        for call in watching:
            await call.initial_metadata()  # subscribed: nothing sent from now on is missed
        started = await chats.Prompt(
            turbo_pb2.PromptRequest(chat_id=chat["id"], prompt="echo: alpha beta gamma", stream=True),
            metadata=bearer(owner),
        )
        assert started.message.status == "streaming"
        received = [await until_final(call) for call in watching]
        for call in watching:
            call.cancel()

        for events in received:
            assert events[0].type == "message.created"
            assert events[-1].type == "message.completed"
            assert "".join(event.delta for event in events) == "alpha beta gamma"
            assert events[-1].message.reply == "alpha beta gamma"
            assert events[-1].message.id == started.message.id
            seqs = [event.seq for event in events]
            assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
            assert json.loads(events[-1].json)["seq"] == events[-1].seq  # the SSE frame's data, as is
        assert [e.json for e in received[0]] == [e.json for e in received[1]]

        # Resuming after the first event replays the rest of it, in order.
        first = received[0][0].seq
        resumed = chats.Events(turbo_pb2.EventsRequest(chat_id=chat["id"], after=first), metadata=bearer(member))
        replayed = await until_final(resumed)
        resumed.cancel()
        assert [e.seq for e in replayed] == [e.seq for e in received[0][1:]]

    over_grpc(scenario)


def test_a_removed_member_stream_ends_with_permission_denied(client, chat_of_two):
    chat, owner, member, member_user = chat_of_two

    async def scenario(chats):
        call = chats.Events(turbo_pb2.EventsRequest(chat_id=chat["id"]), metadata=bearer(member))
        await call.initial_metadata()
        removed = await sync_to_async(client.post)(
            "/chat/user/remove", data={"chat_id": chat["id"], "user_id": member_user["id"]}, headers=rest(owner)
        )
        assert removed.status_code == 200
        events = []
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            async for event in call:
                events.append(event)
        return ended, events

    ended, events = over_grpc(scenario)
    assert ended.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "no longer have access" in ended.value.details()
    assert [event.type for event in events] == ["member.removed", "stream.closed"]
    assert events[-1].seq == 0  # a notice: not numbered


def test_a_revoked_session_ends_its_stream_with_unauthenticated(client, chat_of_two):
    chat, _, member, _ = chat_of_two

    async def scenario(chats):
        call = chats.Events(turbo_pb2.EventsRequest(chat_id=chat["id"]), metadata=bearer(member))
        await call.initial_metadata()
        assert (await sync_to_async(client.post)("/user/logout", headers=rest(member))).status_code == 200
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            async for event in call:
                assert event.type == "stream.closed"
        return ended

    ended = over_grpc(scenario)
    assert ended.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_a_deleted_chat_ends_its_stream_with_not_found(client, chat_of_two):
    chat, owner, member, _ = chat_of_two

    async def scenario(chats):
        call = chats.Events(turbo_pb2.EventsRequest(chat_id=chat["id"]), metadata=bearer(member))
        await call.initial_metadata()
        deleted = await sync_to_async(client.post)("/chat/delete", data={"id": chat["id"]}, headers=rest(owner))
        assert deleted.status_code == 200
        types = []
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            async for event in call:
                types.append(event.type)
        return ended, types

    ended, types = over_grpc(scenario)
    assert ended.value.code() == grpc.StatusCode.NOT_FOUND
    assert types == ["chat.deleted", "stream.closed"]


def test_refusals_and_their_statuses(client, signup, chat_of_two, upstream):
    chat, owner, _, _ = chat_of_two
    outsider = signup()[0]
    key = client.post("/user/keys/create", data={"name": "k"}, headers=rest(owner)).json()["key"]
    prompt = turbo_pb2.PromptRequest(chat_id=chat["id"], prompt="echo: hi")
    events = turbo_pb2.EventsRequest(chat_id=chat["id"])

    async def scenario(chats):
        async def refusal(method, request, metadata):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                if method is chats.Events:
                    [event async for event in method(request, metadata=metadata)]
                else:
                    await method(request, metadata=metadata)
            return refused.value.code(), refused.value.details()

        for method, request in ((chats.Prompt, prompt), (chats.Events, events)):
            assert (await refusal(method, request, ()))[0] == grpc.StatusCode.UNAUTHENTICATED
            code, details = await refusal(method, request, bearer(key))  # chats take session tokens only
            assert code == grpc.StatusCode.PERMISSION_DENIED
            assert details.startswith("an API key works only for model calls")
            code, details = await refusal(method, request, bearer(outsider))  # an invisible chat is not found
            assert (code, details) == (grpc.StatusCode.NOT_FOUND, "chat not found")
        unknown = str(uuid.uuid4())
        code, _ = await refusal(chats.Events, turbo_pb2.EventsRequest(chat_id=unknown), bearer(owner))
        assert code == grpc.StatusCode.NOT_FOUND
        for request, words in (
            (turbo_pb2.PromptRequest(chat_id="nope", prompt="hi"), "id"),
            (turbo_pb2.PromptRequest(chat_id=chat["id"], prompt="   "), "prompt: may not be empty"),
            (turbo_pb2.PromptRequest(chat_id=chat["id"], prompt="hi", response_format_json_schema="[1]"), "JSON"),
        ):
            code, details = await refusal(chats.Prompt, request, bearer(owner))
            assert code == grpc.StatusCode.INVALID_ARGUMENT, details
            assert words in details
        code, details = await refusal(chats.Events, turbo_pb2.EventsRequest(chat_id="nope"), bearer(owner))
        assert (code, details) == (grpc.StatusCode.INVALID_ARGUMENT, "chat_id: must be a chat's id (a UUID)")
        code, _ = await refusal(chats.Events, turbo_pb2.EventsRequest(chat_id=chat["id"], after=-1), bearer(owner))
        assert code == grpc.StatusCode.INVALID_ARGUMENT

        # The upstream failing is UNAVAILABLE; the prompt is kept with the error.
        code, details = await refusal(
            chats.Prompt, turbo_pb2.PromptRequest(chat_id=chat["id"], prompt="[scenario:error_500] hi"), bearer(owner)
        )
        assert code == grpc.StatusCode.UNAVAILABLE
        assert "upstream error 500" in details

    over_grpc(scenario)
    messages = client.get("/chat/read", params={"id": chat["id"]}, headers=rest(owner)).json()["messages"]
    assert [(m["prompt"], m["status"]) for m in messages] == [("[scenario:error_500] hi", "error")]


def test_a_structured_prompt(chat_of_two, upstream):
    chat, owner, _, _ = chat_of_two

    async def scenario(chats):
        return await chats.Prompt(
            turbo_pb2.PromptRequest(
                chat_id=chat["id"], prompt='echo: {"answer": 3}', response_format_json_schema=json.dumps(SCHEMA)
            ),
            metadata=bearer(owner),
        )

    answer = over_grpc(scenario)
    assert answer.message.status == "complete"
    assert json.loads(answer.message.data_json) == {"answer": 3}
    sent = [request.json() for request in upstream.requests if request.path == "/v1/chat/completions"][-1]
    assert sent["response_format"]["json_schema"]["schema"] == SCHEMA


def test_a_prompt_whose_reply_is_stopped_is_aborted(client, chat_of_two, upstream):
    chat, owner, _, _ = chat_of_two

    async def scenario(chats):
        prompt = asyncio.ensure_future(
            chats.Prompt(
                turbo_pb2.PromptRequest(chat_id=chat["id"], prompt="[scenario:gated] echo: never finished"),
                metadata=bearer(owner),
            )
        )
        # Stop once the generation has reached the upstream (which holds it at its gate).
        for _ in range(1500):
            if any(request.path == "/v1/chat/completions" for request in upstream.requests):
                break
            assert not prompt.done(), prompt
            await asyncio.sleep(0.02)
        stopped = await sync_to_async(client.post)("/chat/stop", data={"id": chat["id"]}, headers=rest(owner))
        assert stopped.json() == {"stopped": 1}, stopped.text
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await prompt
        return ended

    ended = over_grpc(scenario)
    assert ended.value.code() == grpc.StatusCode.ABORTED
    assert ended.value.details() == "the reply was stopped"
