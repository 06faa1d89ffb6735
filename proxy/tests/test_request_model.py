"""The one request model (proxy.requests): one set of limits for a chat completion or an embedding,
whichever front reads it (/ws, GraphQL and gRPC each hand it their fields), and one context clamp."""

import pytest

from proxy import requests
from proxy.requests import chat_request_read, context_size, embedding_request_read
from proxy.structured import ResponseFormatInvalid
from turbo_site.core.errors import Invalid


def read(**fields) -> dict:
    return chat_request_read({"messages": [{"role": "user", "content": "hi"}], **fields}, default_model="default-m")


def test_a_plain_request_gets_the_default_model_and_keeps_only_what_it_gave():
    assert read() == {"messages": [{"role": "user", "content": "hi"}], "model": "default-m"}
    assert read(model="gpt-4o", max_tokens=5, temperature=0.5, stream=True, user="x") == {
        "messages": [{"role": "user", "content": "hi"}],
        "model": "gpt-4o",
        "max_tokens": 5,
        "temperature": 0.5,
    }


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"messages": []}, "p.messages: a list of 1 to 1000"),
        ({"messages": [{"role": "user"}] * (requests.MESSAGES_MAX + 1)}, "p.messages: a list of 1 to 1000"),
        ({"messages": "hi"}, "p.messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "p.messages[0].role: one of"),
        ({"messages": ["hi"]}, "p.messages[0]: must be an object"),
        ({"messages": [{"role": "user", "content": "x", "name": "n" * 65}]}, "p.messages[0].name"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "p.messages[0].tool_call_id"),
        ({"model": "m" * 201}, "p.model: a model name of at most 200"),
        ({"model": 4}, "p.model"),
        ({"max_tokens": 0}, "p.max_tokens: a whole number from 1 to 1000000"),
        ({"max_tokens": 1_000_001}, "p.max_tokens"),
        ({"max_tokens": True}, "p.max_tokens"),
        ({"max_tokens": 2.5}, "p.max_tokens"),
        ({"temperature": 2.5}, "p.temperature: a number from 0 to 2"),
        ({"temperature": "hot"}, "p.temperature"),
        ({"tools": [{}] * (requests.TOOLS_MAX + 1)}, "p.tools: a list of at most 128"),
        ({"tools": ["calculator"]}, "p.tools"),
    ],
)
def test_every_limit_names_its_field(fields, named):
    base = {"messages": [{"role": "user", "content": "hi"}]}
    with pytest.raises(Invalid) as refused:
        chat_request_read({**base, **fields}, prefix="p.", default_model="m")
    assert named in refused.value.message


def test_tools_in_the_flat_seed_shape_become_openai_s_and_a_bad_schema_is_its_own_error():
    tools = [{"name": "calculator", "parameters": {"type": "object"}}]
    assert read(tools=tools)["tools"] == [{"type": "function", "function": tools[0]}]
    with pytest.raises(ResponseFormatInvalid):
        read(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}})


def test_an_embedding_request_is_a_text_or_texts_with_a_default_model():
    assert embedding_request_read({"input": "hi"}) == {"model": "text-embedding-3-small", "input": "hi"}
    assert embedding_request_read({"input": ["a", "b"], "model": "e"})["model"] == "e"
    for bad in (5, [], ["a", 1], None):
        with pytest.raises(Invalid, match="input: a string or a non-empty list of strings"):
            embedding_request_read({"input": bad})


def test_the_context_clamp_reads_the_settings(settings):
    settings.DEFAULT_CONTEXT, settings.MAX_CONTEXT = 7, 12
    assert [context_size(asked) for asked in (None, -3, 0, 5, 12, 99)] == [7, 0, 0, 5, 12, 12]
