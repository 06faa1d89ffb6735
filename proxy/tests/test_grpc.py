"""The gRPC Completions service with a real grpc.aio client and generated stubs, against Turbo's gRPC server
on a loopback port and the fake upstream: unary, streamed, embeddings, structured output, health,
reflection, the error statuses and cancellation.

Each test's server is started on its scenario's own loop (run_in_process), so the servicers' database calls
run on the test's connection, inside its transaction (rolled back, not flushed); client and server speak
gRPC over the socket as they would between processes."""

import asyncio
import json

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from protos.turbo.v1 import turbo_pb2, turbo_pb2_grpc
from proxy.usage.ratelimits import ratelimits_forget
from testing.fake_upstream import fake_embedding
from testing.grpc import bearer, serving
from testing.inprocess import run_in_process

pytestmark = pytest.mark.django_db

SCHEMA = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"]}


def ask(text: str, **fields) -> turbo_pb2.CompleteRequest:
    return turbo_pb2.CompleteRequest(messages=[turbo_pb2.Message(role="user", content=text)], **fields)


def chat_requests(fake) -> list:
    return [request for request in fake.requests if request.path == "/v1/chat/completions"]


def key_create(client, token: str, **fields) -> str:
    response = client.post(
        "/user/keys/create", data={"name": "grpc", **fields}, headers={"Authorization": f"Bearer {token}"}
    )
    assert response.status_code == 200, response.text
    return response.json()["key"]


def test_complete_answers_with_content_model_finish_reason_and_usage(signup, upstream):
    token = signup()[0]

    async def scenario():
        async with serving() as channel:
            stub = turbo_pb2_grpc.CompletionsStub(channel)
            reply = await stub.Complete(
                ask("echo: hello over grpc", model="gpt-4o", temperature=0.5, max_tokens=20), metadata=bearer(token)
            )
        assert reply.content == "hello over grpc"
        assert reply.model == "gpt-4o"
        assert reply.finish_reason == "stop"
        assert (reply.usage.input_tokens, reply.usage.output_tokens) == (4, 3)
        sent = chat_requests(upstream)[-1].json()
        assert sent["model"] == "gpt-4o"
        assert (sent["temperature"], sent["max_tokens"]) == (0.5, 20)
        assert sent["messages"] == [{"role": "user", "content": "echo: hello over grpc"}]
        assert "response_format" not in sent

    run_in_process(scenario)


def test_complete_stream_sends_deltas_then_a_last_chunk_with_usage(signup, upstream):
    token = signup()[0]

    async def scenario():
        async with serving() as channel:
            stub = turbo_pb2_grpc.CompletionsStub(channel)
            chunks = [chunk async for chunk in stub.CompleteStream(ask("echo: one two three"), metadata=bearer(token))]
        assert "".join(chunk.delta for chunk in chunks) == "one two three"
        assert len([chunk for chunk in chunks if chunk.delta]) == 3  # streamed word by word, not at the end
        assert all(not chunk.finish_reason for chunk in chunks[:-1])
        last = chunks[-1]
        assert (last.delta, last.finish_reason) == ("", "stop")
        assert (last.usage.input_tokens, last.usage.output_tokens) == (4, 3)
        assert chat_requests(upstream)[-1].json()["stream"] is True

    run_in_process(scenario)


def test_embed_returns_one_vector_per_input_in_order(signup, upstream):
    token = signup()[0]

    async def scenario():
        async with serving() as channel:
            stub = turbo_pb2_grpc.CompletionsStub(channel)
            reply = await stub.Embed(turbo_pb2.EmbedRequest(input=["first text", "second"]), metadata=bearer(token))
        assert reply.model == "text-embedding-3-small"
        assert len(reply.embeddings) == 2
        for embedding, text in zip(reply.embeddings, ["first text", "second"], strict=True):
            assert list(embedding.values) == pytest.approx(fake_embedding(text), rel=1e-6, abs=1e-7)
        assert reply.usage.input_tokens == 3

    run_in_process(scenario)


def test_an_api_key_works_and_its_rate_limit_applies(client, signup, upstream, settings):
    settings.RATE_LIMIT_WINDOW_SECONDS = 3600
    ratelimits_forget()
    token = signup()[0]
    key = key_create(client, token, rpm=1)

    async def scenario():
        async with serving() as channel:
            stub = turbo_pb2_grpc.CompletionsStub(channel)
            reply = await stub.Complete(ask("echo: from a key"), metadata=bearer(key))
            assert reply.content == "from a key"
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Complete(ask("echo: again"), metadata=bearer(key))
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "request" in refused.value.details()
        retry_after = dict(refused.value.trailing_metadata())["retry-after"]
        assert 1 <= int(retry_after) <= 3600
        assert len(chat_requests(upstream)) == 1  # the refused call never left Turbo
        ratelimits_forget()

    run_in_process(scenario)


def test_structured_output_through_grpc(signup, upstream):
    token = signup()[0]

    async def scenario():
        schema_text = json.dumps(SCHEMA)
        async with serving() as channel:
            stub = turbo_pb2_grpc.CompletionsStub(channel)
            reply = await stub.Complete(
                ask('echo: {"answer": 42}', response_format_json_schema=schema_text), metadata=bearer(token)
            )
            assert json.loads(reply.content) == {"answer": 42}
            sent = chat_requests(upstream)[-1].json()
            assert sent["response_format"] == {
                "type": "json_schema",
                "json_schema": {"name": "response", "schema": SCHEMA},
            }

            # OpenAI's own shape (name, schema, strict) is taken too; streamed, the validated reply comes as deltas.
            named = json.dumps({"name": "answer_only", "schema": SCHEMA, "strict": True})
            chunks = [
                chunk
                async for chunk in stub.CompleteStream(
                    ask('echo: {"answer": 7}', response_format_json_schema=named), metadata=bearer(token)
                )
            ]
            assert json.loads("".join(chunk.delta for chunk in chunks)) == {"answer": 7}
            assert chunks[-1].finish_reason == "stop" and chunks[-1].usage.output_tokens > 0
            assert chat_requests(upstream)[-1].json()["response_format"]["json_schema"]["name"] == "answer_only"

            # A reply that never matches the schema is asked again, then refused (502: UNAVAILABLE).
            before = len(chat_requests(upstream))
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Complete(
                    ask('echo: {"answer": "forty-two"}', response_format_json_schema=schema_text),
                    metadata=bearer(token),
                )
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "did not match the response_format's schema" in refused.value.details()
            assert len(chat_requests(upstream)) - before > 1

            # A schema that is not JSON, or not a JSON Schema, is the caller's error; nothing is sent.
            before = len(chat_requests(upstream))
            for bad, words in (("{not json", "is not valid JSON"), ('{"type": 12}', "is not valid JSON Schema")):
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await stub.Complete(ask("echo: hi", response_format_json_schema=bad), metadata=bearer(token))
                assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert words in refused.value.details()
            assert len(chat_requests(upstream)) == before

    run_in_process(scenario)


def test_health_and_reflection():
    async def scenario():
        async with serving() as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for service in ("", "turbo.v1.Completions", "turbo.v1.Chats"):
                answer = await health.Check(health_pb2.HealthCheckRequest(service=service))
                assert answer.status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.aio.AioRpcError) as unknown:
                await health.Check(health_pb2.HealthCheckRequest(service="turbo.v1.Nothing"))
            assert unknown.value.code() == grpc.StatusCode.NOT_FOUND

            reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
            call = reflection.ServerReflectionInfo()
            await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
            listed = await call.read()
            names = {service.name for service in listed.list_services_response.service}
            assert {"turbo.v1.Completions", "turbo.v1.Chats", "grpc.health.v1.Health"} <= names
            await call.write(reflection_pb2.ServerReflectionRequest(file_containing_symbol="turbo.v1.Completions"))
            found = await call.read()
            await call.done_writing()
        assert found.file_descriptor_response.file_descriptor_proto  # a client can build stubs from it

    run_in_process(scenario)


def test_error_statuses_carry_our_message(client, signup, upstream):
    token = signup()[0]
    limited_key = key_create(client, token, models="gpt-4o-mini")

    async def scenario():

        async def status_of(call, request, metadata):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call(request, metadata=metadata)
            return refused.value.code(), refused.value.details()

        async with serving() as channel:
            stub = turbo_pb2_grpc.CompletionsStub(channel)
            cases = [
                (stub.Complete, ask("echo: hi"), (), grpc.StatusCode.UNAUTHENTICATED, "no token"),
                (stub.Complete, ask("echo: hi"), bearer("not-a-token"), grpc.StatusCode.UNAUTHENTICATED, "invalid"),
                (
                    stub.Embed,
                    turbo_pb2.EmbedRequest(input=["x"]),
                    bearer("tk-nope"),
                    grpc.StatusCode.UNAUTHENTICATED,
                    "",
                ),
                (
                    stub.Complete,
                    ask("echo: hi", model="gpt-4o"),
                    bearer(limited_key),
                    grpc.StatusCode.PERMISSION_DENIED,
                    "may not use the model 'gpt-4o'",
                ),
                (
                    stub.Complete,
                    turbo_pb2.CompleteRequest(),
                    bearer(token),
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "messages",
                ),
                (
                    stub.Complete,
                    turbo_pb2.CompleteRequest(messages=[turbo_pb2.Message(role="robot", content="x")]),
                    bearer(token),
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "messages[0].role",
                ),
                (
                    stub.Complete,
                    ask("hi", temperature=3),
                    bearer(token),
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "temperature",
                ),
                (stub.Embed, turbo_pb2.EmbedRequest(), bearer(token), grpc.StatusCode.INVALID_ARGUMENT, "input"),
                # The upstream's own refusals: a bad request, and a failure no retry fixes.
                (
                    stub.Complete,
                    ask("[scenario:error_400] echo: hi"),
                    bearer(token),
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "Bad thing",
                ),
                (
                    stub.Complete,
                    ask("[scenario:error_500] echo: hi"),
                    bearer(token),
                    grpc.StatusCode.UNAVAILABLE,
                    "upstream error 500",
                ),
                (
                    stub.CompleteStream,
                    ask("[scenario:error_500] echo: hi"),
                    bearer(token),
                    grpc.StatusCode.UNAVAILABLE,
                    "upstream error 500",
                ),
            ]
            for call, request, metadata, code, words in cases:
                if call is stub.CompleteStream:
                    with pytest.raises(grpc.aio.AioRpcError) as refused:
                        [chunk async for chunk in call(request, metadata=metadata)]
                    found = refused.value.code(), refused.value.details()
                else:
                    found = await status_of(call, request, metadata)
                assert found[0] == code, (request, found)
                assert words in found[1], found
                assert "Traceback" not in found[1]

    run_in_process(scenario)


def test_a_cancelled_stream_cancels_the_upstream_call(signup, upstream):
    token = signup()[0]

    async def scenario():
        async with serving() as channel:
            stub = turbo_pb2_grpc.CompletionsStub(channel)
            call = stub.CompleteStream(ask("[scenario:gated] echo: first then the rest"), metadata=bearer(token))
            first = await call.read()
            assert first.delta.strip() == "first"  # the fake holds the rest until released: the call is in flight
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call.read()
        assert await asyncio.to_thread(upstream.wait_for_abort, 10), "the upstream call was not cancelled"

    run_in_process(scenario)


def test_an_upstream_that_is_too_slow_is_deadline_exceeded(signup, upstream, settings):
    settings.PROXY_READ_TIMEOUT = 0.5
    token = signup()[0]

    async def scenario():
        async with serving() as channel:
            stub = turbo_pb2_grpc.CompletionsStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Complete(ask("[scenario:slow][delay:5] echo: hi"), metadata=bearer(token))
        assert refused.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert refused.value.details()

    run_in_process(scenario)


LOOKUP = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}


def test_completions_take_tools_and_tool_results(signup, upstream):
    token = signup()[0]

    async def scenario():
        tools_json = json.dumps([LOOKUP])
        async with serving() as channel:
            stub = turbo_pb2_grpc.CompletionsStub(channel)
            asked = ask("[scenario:tool_call][tool:lookup] find it", tools_json=tools_json, tool_choice_json='"auto"')
            chunks = [chunk async for chunk in stub.CompleteStream(asked, metadata=bearer(token))]
            (call,) = json.loads(chunks[-1].tool_calls_json)
            assert call["function"]["name"] == "lookup" and chunks[-1].finish_reason == "tool_calls"
            sent = chat_requests(upstream)[-1].json()
            assert sent["tools"] == [LOOKUP] and sent["tool_choice"] == "auto"
            unary = await stub.Complete(asked, metadata=bearer(token))
            assert json.loads(unary.tool_calls_json)[0]["function"]["name"] == "lookup"

            # The caller runs its function and answers with a tool message.
            answered = turbo_pb2.CompleteRequest(
                messages=[
                    *asked.messages,
                    turbo_pb2.Message(role="assistant", tool_calls_json=json.dumps([call])),
                    turbo_pb2.Message(role="tool", tool_call_id=call["id"], content="found at home"),
                ],
                tools_json=tools_json,
            )
            reply = await stub.Complete(answered, metadata=bearer(token))
            assert reply.content == "Tool said: found at home" and reply.tool_calls_json == ""
            tool_message = chat_requests(upstream)[-1].json()["messages"][-1]
            assert tool_message == {"role": "tool", "content": "found at home", "tool_call_id": call["id"]}

            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Complete(ask("hi", tools_json="[not json"), metadata=bearer(token))
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "tools_json" in refused.value.details()

    run_in_process(scenario)


def test_complete_stream_streams_structured_output_and_its_retries(signup, upstream):
    token = signup()[0]

    async def scenario():
        asked = ask('sequence: {"answer": "x"} ||| {"answer": 42}', response_format_json_schema=json.dumps(SCHEMA))
        async with serving() as channel:
            stub = turbo_pb2_grpc.CompletionsStub(channel)
            chunks = [chunk async for chunk in stub.CompleteStream(asked, metadata=bearer(token))]
        retries = [index for index, chunk in enumerate(chunks) if chunk.HasField("retry")]
        assert len(retries) == 1
        retry = chunks[retries[0]].retry
        assert retry.attempt == 1 and list(retry.errors) == ["at $.answer: 'x' is not of type 'integer'"]
        before, after = chunks[: retries[0]], chunks[retries[0] + 1 :]
        assert json.loads("".join(chunk.delta for chunk in before)) == {"answer": "x"}  # streamed, then voided
        assert json.loads("".join(chunk.delta for chunk in after)) == {"answer": 42}
        assert len([chunk for chunk in after if chunk.delta]) > 1  # streamed as it came, not whole at the end
        assert chunks[-1].finish_reason == "stop" and len(chat_requests(upstream)) == 2

    run_in_process(scenario)
