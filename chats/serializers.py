"""How chats and messages look on the wire: REST responses and stream events use these same shapes."""

from rest_framework import serializers

from chats.models import Chat, Message


class ChatOutput(serializers.Serializer):
    id = serializers.UUIDField()
    name = serializers.CharField()
    model = serializers.CharField()
    owner_id = serializers.UUIDField()
    group_id = serializers.UUIDField(allow_null=True)
    system_prompt = serializers.CharField()
    tools = serializers.ListField(child=serializers.CharField())
    settings = serializers.DictField(help_text="model settings sent with every prompt (temperature, max_tokens, ...)")
    program = serializers.CharField(help_text="the chat program this chat runs; empty for an ordinary chat")
    response_format = serializers.JSONField(
        allow_null=True, help_text="the response_format of prompts that give none (OpenAI's shape); null: text"
    )
    created_at = serializers.DateTimeField()
    updated_at = serializers.DateTimeField()


class MessageOutput(serializers.Serializer):
    id = serializers.UUIDField()
    chat_id = serializers.UUIDField()
    user_id = serializers.UUIDField(source="author_id", allow_null=True)
    prompt = serializers.CharField()
    reply = serializers.CharField()
    model = serializers.CharField()
    otr = serializers.BooleanField(source="is_otr")
    status = serializers.CharField(
        help_text="streaming, complete, error, or tool_calls (the model called a client function: answer with "
        "tool_results)"
    )
    error = serializers.CharField()
    tool_calls = serializers.ListField(
        child=serializers.DictField(),
        help_text="the tool calls of the reply: {id, name, arguments, result, is_error}; a client function's "
        "call also has client: true (its result is null until the client sends it)",
    )
    data = serializers.JSONField(
        allow_null=True, help_text="the reply parsed as JSON, valid against the prompt's json_schema response_format"
    )
    prompt_tokens = serializers.IntegerField(allow_null=True)
    completion_tokens = serializers.IntegerField(allow_null=True)
    total_tokens = serializers.IntegerField(allow_null=True)
    created_at = serializers.DateTimeField()


class StreamEventOutput(serializers.Serializer):
    """One event on a chat's live stream."""

    seq = serializers.IntegerField(help_text="increases by one per event of the chat; the SSE id")
    message = MessageOutput(help_text="the message, with the reply so far")
    delta = serializers.CharField(help_text="the text added since the previous event")
    partial = serializers.BooleanField(help_text="false on the last event of a prompt")


# One serializer of each for every call: making one deep-copies and binds all its fields (a quarter of a
# millisecond of CPU for MessageOutput, three times per prompt, on the event loop); the output is the same.
_chat_output = ChatOutput()
_message_output = MessageOutput()


def chat_data(chat: Chat) -> dict:
    return dict(_chat_output.to_representation(chat))


def message_data(message: Message) -> dict:
    return dict(_message_output.to_representation(message))
