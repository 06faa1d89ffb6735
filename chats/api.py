"""The chat API: the /chat/* paths. Prompt and stream are async views (they wait on the model)."""

import functools
import logging

from channels.db import database_sync_to_async
from django.conf import settings
from django.http import JsonResponse, StreamingHttpResponse
from django.views.decorators.csrf import csrf_exempt
from drf_spectacular.extensions import OpenApiSerializerFieldExtension
from drf_spectacular.utils import extend_schema, extend_schema_field, inline_serializer
from rest_framework import serializers
from rest_framework.response import Response
from rest_framework.views import APIView

from accounts.api import UserBriefOutput
from accounts.auth import arequest_authenticate
from chats import generation, running, selectors, services
from chats.models import Message
from chats.options import ModelSettingsField
from chats.programs.registry import programs
from chats.programs.runner import program_context_check
from chats.serializers import ChatOutput, MessageOutput, chat_data, message_data
from chats.stream import ChatSubscriber
from proxy import tools
from proxy.requests import context_size
from turbo_site.core.errors import Invalid, NotFound, error_response, failure_response
from turbo_site.core.schema import EmptyResponse, errors, get_and_post, one_of_required, schema_extra
from turbo_site.core.serializers import StrictCharField, StrictUUIDField, plain_request_input, request_input
from turbo_site.core.streams import Entry

logger = logging.getLogger("turbo.chats")

MODEL_FIELD = {"max_length": 100, "required": False, "allow_blank": True}
SYSTEM_PROMPT_FIELD = {"max_length": 16_000, "required": False, "allow_blank": True}


def _parse(serializer_class, data: dict) -> dict:
    parsed = serializer_class(data=data)
    parsed.is_valid(raise_exception=True)
    return dict(parsed.validated_data)


@schema_extra(**one_of_required("id", "chat_id"))
class ChatIdInput(serializers.Serializer):
    """A chat id, as `id` or (the older form key) `chat_id`."""

    id = serializers.UUIDField(required=False)
    chat_id = serializers.UUIDField(required=False)

    def validate(self, data):
        chat_id = data.get("id") or data.get("chat_id")
        if chat_id is None:
            raise Invalid("id: this field is required")
        data["id"] = chat_id
        return data


class ToolNamesField(serializers.ListField):
    """Registered tool names: a JSON array, repeated form fields or one comma-separated string."""

    max_tools = 32

    def __init__(self, **kwargs):
        super().__init__(
            child=serializers.CharField(max_length=64), max_length=self.max_tools, allow_empty=True, **kwargs
        )

    def to_internal_value(self, data):
        if isinstance(data, str):
            data = [name.strip() for name in data.split(",") if name.strip()]
        names = list(dict.fromkeys(super().to_internal_value(data)))
        unknown = sorted(set(names) - tools.tool_names())
        if unknown:
            raise serializers.ValidationError(
                f"unknown tool(s): {', '.join(unknown)}; see /info for the registered ones"
            )
        return names


class ToolNamesFieldSchema(OpenApiSerializerFieldExtension):
    """ToolNamesField in the schema: names from the registry as it stands when the schema is made."""

    target_class = ToolNamesField

    def map_serializer_field(self, auto_schema, direction):
        names = sorted(tools.tool_names())
        if not names:
            return {"type": "array", "maxItems": 0}
        item = {"type": "string", "enum": names}
        return {"type": "array", "items": item, "maxItems": ToolNamesField.max_tools}


class ProgramNameField(StrictCharField):
    """A registered chat program's name ("" for none); checked by the service (chats.programs)."""


class ProgramNameFieldSchema(OpenApiSerializerFieldExtension):
    """ProgramNameField in the schema: "" or a name from the registry as it stands when the schema is made."""

    target_class = ProgramNameField

    def map_serializer_field(self, auto_schema, direction):
        return {"type": "string", "enum": ["", *sorted(programs())]}


@extend_schema_field({"type": "object", "additionalProperties": True})
class ProgramContextField(serializers.Field):
    """A JSON object (or its text), at most 16 KiB as JSON."""

    def to_internal_value(self, data):
        return program_context_check(data)

    def to_representation(self, value):
        return value


RESPONSE_FORMAT_HELP = (
    "OpenAI's response_format (a JSON object or its text): type json_schema with json_schema {name, schema, "
    "strict} for a reply validated against the schema and parsed into the message's `data`; type text for text"
)


class JsonValueField(serializers.Field):
    """A JSON value as given (or its text, from a form): the service checks it (proxy.structured,
    proxy.functions), so every front refuses the same things."""

    def to_internal_value(self, data):
        return data

    def to_representation(self, value):
        return value


@extend_schema_field(
    {
        "nullable": True,
        "oneOf": [
            {
                "type": "object",
                "required": ["type"],
                "additionalProperties": False,
                "properties": {"type": {"type": "string", "enum": ["text", "json_object"]}},
            },
            {
                "type": "object",
                "required": ["type", "json_schema"],
                "additionalProperties": False,
                "properties": {
                    "type": {"type": "string", "enum": ["json_schema"]},
                    "json_schema": {
                        "type": "object",
                        "required": ["name", "schema"],
                        "additionalProperties": False,
                        "properties": {
                            "name": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"},
                            "schema": {
                                "type": "object",
                                "description": "a JSON Schema (2020-12 unless its $schema names another draft)",
                            },
                            "strict": {"type": "boolean", "nullable": True},
                            "description": {"type": "string"},
                        },
                    },
                },
            },
        ],
    }
)
class ResponseFormatField(JsonValueField):
    pass


@extend_schema_field(
    {
        "type": "array",
        "items": {"type": "object", "additionalProperties": True},
        "description": "the client's own functions (OpenAI tools: {type: function, function: {name, description, "
        "parameters}}); a call to one ends the turn with status tool_calls",
    }
)
class ClientFunctionsField(JsonValueField):
    pass


@extend_schema_field(
    {
        "type": "array",
        "items": {
            "type": "object",
            "properties": {"tool_call_id": {"type": "string"}, "content": {}, "is_error": {"type": "boolean"}},
            "required": ["tool_call_id", "content"],
        },
        "description": "results of the client function calls a message waits on (send instead of a prompt)",
    }
)
class ToolResultsField(JsonValueField):
    pass


SETTINGS_HELP = (
    "model settings sent with every prompt: temperature, top_p, max_tokens, presence_penalty, "
    "frequency_penalty, stop, seed (a JSON object)"
)


# A chat that runs a program takes no structured response_format (chats.services.chat_create).
@schema_extra(
    **{
        "not": {
            "required": ["program", "response_format"],
            "properties": {
                "program": {"type": "string", "minLength": 1},
                "response_format": {"type": "object", "properties": {"type": {"enum": ["json_object", "json_schema"]}}},
            },
        }
    }
)
class ChatCreateInput(serializers.Serializer):
    name = StrictCharField(max_length=200)
    model = StrictCharField(**MODEL_FIELD)
    group_id = StrictUUIDField(required=False, allow_null=True)
    system_prompt = StrictCharField(**SYSTEM_PROMPT_FIELD)
    tools = ToolNamesField(required=False)
    settings = ModelSettingsField(required=False, help_text=SETTINGS_HELP)
    program = ProgramNameField(
        max_length=100, required=False, allow_blank=True, help_text="run this chat program (see /info)"
    )
    program_context = ProgramContextField(required=False, help_text="the program's context (a JSON object)")
    response_format = ResponseFormatField(required=False, allow_null=True, help_text=RESPONSE_FORMAT_HELP)


class ChatUpdateInput(ChatIdInput):
    name = StrictCharField(max_length=200, required=False)
    model = StrictCharField(**MODEL_FIELD)
    system_prompt = StrictCharField(**SYSTEM_PROMPT_FIELD)
    tools = ToolNamesField(required=False)
    settings = ModelSettingsField(required=False, help_text=SETTINGS_HELP + "; replaces the chat's settings")
    response_format = ResponseFormatField(
        required=False, allow_null=True, help_text=RESPONSE_FORMAT_HELP + "; null: back to text"
    )


class ChatReadInput(ChatIdInput):
    limit = serializers.IntegerField(required=False, min_value=1, max_value=500, default=100)
    before = serializers.UUIDField(required=False, help_text="a message id: return the messages before it")


@schema_extra(**one_of_required("id", "chat_id"))
class ChatUserInput(serializers.Serializer):
    chat_id = StrictUUIDField(required=False)
    id = StrictUUIDField(required=False)
    user_id = StrictUUIDField()

    def validate(self, data):
        if not data.get("chat_id") and not data.get("id"):
            raise Invalid("chat_id: this field is required")
        return data


class ChatUserOutput(UserBriefOutput):
    """A user who can see the chat, and how: its owner, a member of the chat, or a member of its group."""

    access = serializers.ChoiceField(choices=selectors.ACCESS_KINDS)


class ChatReadOutput(serializers.Serializer):
    chat = ChatOutput()
    messages = MessageOutput(many=True)
    users = ChatUserOutput(many=True, help_text="everyone who can see the chat: owner, members, group members")


class ChatCreateView(APIView):
    @extend_schema(
        request=ChatCreateInput, responses={200: ChatOutput, **errors(400, 401, 404)}, summary="Create a chat"
    )
    def post(self, request):
        fields = _parse(ChatCreateInput, request_input(request))
        chat = services.chat_create(owner=request.user, allowed_models=request.auth.allowed_models, **fields)
        if chat.program:
            generation.program_open(chat=chat, user=request.user, allowed_models=request.auth.allowed_models)
        return Response(chat_data(chat))


@get_and_post(
    request=ChatReadInput,
    responses={200: ChatReadOutput, **errors(400, 401, 404)},
    summary="A chat, its messages (oldest first, paged with limit/before) and its users",
)
class ChatReadView(APIView):
    def post(self, request):
        fields = _parse(ChatReadInput, request_input(request))
        chat = selectors.chat_get_for_member(user=request.user, chat_id=fields["id"])
        before = None
        if fields.get("before"):
            anchor = Message.objects.filter(chat=chat, pk=fields["before"]).values_list("created_at", flat=True).first()
            if anchor is None:  # like any id that is not there: a 404
                raise NotFound("before: no such message in this chat")
            before = anchor
        messages = selectors.chat_messages(chat=chat, limit=fields["limit"], before=before)
        return Response(
            {
                "chat": chat_data(chat),
                "messages": MessageOutput(messages, many=True).data,
                "users": ChatUserOutput(selectors.chat_users(chat=chat), many=True).data,
            }
        )


class ChatUpdateView(APIView):
    @extend_schema(
        request=ChatUpdateInput,
        responses={200: ChatOutput, **errors(400, 401, 403, 404)},
        summary="Rename a chat or change its model or system prompt (owner)",
    )
    def post(self, request):
        fields = _parse(ChatUpdateInput, request_input(request))
        chat = selectors.chat_get_for_member(user=request.user, chat_id=fields.pop("id"))
        fields.pop("chat_id", None)
        if fields.get("model") == "":
            fields.pop("model")
        chat = services.chat_update(chat=chat, user=request.user, allowed_models=request.auth.allowed_models, **fields)
        return Response(chat_data(chat))


class ChatDeleteView(APIView):
    @extend_schema(
        request=ChatIdInput, responses={200: EmptyResponse, **errors(400, 401, 403, 404)}, summary="Delete a chat"
    )
    def post(self, request):
        fields = _parse(ChatIdInput, request_input(request))
        chat = selectors.chat_get_for_member(user=request.user, chat_id=fields["id"])
        services.chat_delete(chat=chat, user=request.user)
        return Response({})


@get_and_post(
    responses={200: inline_serializer("ChatIndex", {"chats": ChatOutput(many=True)}), **errors(401)},
    summary="The chats you may see, newest activity first",
)
class ChatIndexView(APIView):
    def post(self, request):
        return Response({"chats": ChatOutput(selectors.chats_visible_to(user=request.user), many=True).data})


class ChatUserAddView(APIView):
    @extend_schema(
        request=ChatUserInput,
        responses={200: EmptyResponse, **errors(400, 401, 403, 404)},
        summary="Add a user to a chat (owner)",
    )
    def post(self, request):
        fields = _parse(ChatUserInput, request_input(request))
        chat = selectors.chat_get_for_member(user=request.user, chat_id=fields.get("chat_id") or fields["id"])
        services.chat_user_add(chat=chat, user=request.user, user_id=fields["user_id"])
        return Response({})


class ChatUserRemoveView(APIView):
    @extend_schema(
        request=ChatUserInput,
        responses={200: EmptyResponse, **errors(400, 401, 403, 404)},
        summary="Remove a user from a chat (owner); they lose access at once",
    )
    def post(self, request):
        fields = _parse(ChatUserInput, request_input(request))
        chat = selectors.chat_get_for_member(user=request.user, chat_id=fields.get("chat_id") or fields["id"])
        services.chat_user_remove(chat=chat, user=request.user, user_id=fields["user_id"])
        return Response({})


# --- async views ----------------------------------------------------------------------------------


def async_endpoint(methods: tuple[str, ...], *, token_parameter: bool = False):
    """Authentication, method check and the error shape for async views (which DRF does not serve).

    `token_parameter` also accepts a `token` query or form parameter, for endpoints a browser's EventSource
    opens (it cannot send headers); the event log stores such query strings with the token redacted.
    """

    def decorate(view):
        @csrf_exempt
        @functools.wraps(view)
        async def wrapper(request, *args, **kwargs):
            if request.method not in methods:
                response = error_response(405, "method_not_allowed", f"method {request.method} is not allowed here")
                response["Allow"] = ", ".join(methods)
                return response
            try:
                session = await arequest_authenticate(request, "chat.stream" if token_parameter else "chat")
                request.user = session.user
                request.turbo_session = session
                return await view(request, *args, **kwargs)
            except Exception as exc:
                return failure_response(exc)

        return wrapper

    return decorate


class PromptInput(ChatIdInput):
    prompt = StrictCharField(trim_whitespace=False, required=False)
    context = serializers.IntegerField(required=False)
    stream = serializers.BooleanField(required=False, default=False)
    otr = serializers.BooleanField(required=False, default=False)
    # Checked by the service (proxy.structured, proxy.functions), for every front alike.
    response_format = ResponseFormatField(required=False, allow_null=True, help_text=RESPONSE_FORMAT_HELP)
    tools = ClientFunctionsField(required=False, allow_null=True)
    tool_results = ToolResultsField(required=False, allow_null=True)

    def validate_prompt(self, value: str) -> str:
        if not value.strip():
            raise serializers.ValidationError("may not be empty")
        if len(value) > settings.MAX_PROMPT_CHARS:
            raise serializers.ValidationError(f"may be at most {settings.MAX_PROMPT_CHARS} characters")
        return value

    def validate(self, data):
        data = super().validate(data)
        if data.get("tool_results") is None and "prompt" not in data:
            raise Invalid("prompt: this field is required")
        return data


@async_endpoint(("POST",))
async def chat_prompt(request):
    fields = _parse(PromptInput, plain_request_input(request))
    chat = await database_sync_to_async(selectors.chat_get_for_member)(user=request.user, chat_id=fields["id"])
    context = context_size(fields.get("context"))
    message = await generation.message_prompt(
        chat=chat,
        user=request.user,
        prompt=fields.get("prompt"),
        context_size=context,
        stream=fields["stream"],
        otr=fields["otr"],
        allowed_models=request.turbo_session.allowed_models,
        response_format=fields.get("response_format"),
        client_functions=fields.get("tools"),
        tool_results=fields.get("tool_results"),
    )
    return JsonResponse({"message": message_data(message)})


SSE_BATCH_MAX = 64  # events joined into one write when a subscriber has several waiting


def sse_frame(entry: Entry) -> bytes:
    """One SSE frame: stored events carry their number as `id:`, notices (no number) do not."""
    return entry.sse_frame()


def _resume_point(request) -> int | None:
    """Where a client resumes: Last-Event-ID (EventSource sets it), or `last_event_id` / `after`."""
    raw = request.META.get("HTTP_LAST_EVENT_ID") or request.GET.get("last_event_id") or request.GET.get("after")
    if raw in (None, ""):
        return None
    try:
        after = int(raw)
    except ValueError:
        raise Invalid("Last-Event-ID: must be a whole number (the seq of the last event received)") from None
    if after < 0:
        raise Invalid("Last-Event-ID: may not be negative")
    return after


@async_endpoint(("GET", "POST"), token_parameter=True)
async def chat_stream(request):
    """The chat's events as Server-Sent Events: what came after Last-Event-ID, then live."""
    fields = _parse(ChatIdInput, plain_request_input(request))
    chat = await database_sync_to_async(selectors.chat_get_for_member)(user=request.user, chat_id=fields["id"])
    after = _resume_point(request)
    subscriber = await ChatSubscriber(chat_id=chat.pk, session=request.turbo_session, after=after).start()

    async def frames():
        try:
            yield b"retry: 2000\n\n"  # headers and a first line go out at once
            while True:
                try:
                    entry = await subscriber.get(timeout=settings.STREAM_HEARTBEAT_SECONDS)
                except StopAsyncIteration:
                    return
                if entry is None:
                    yield b": heartbeat\n\n"
                    continue
                # The events already here go out in one write: a busy process that fell behind catches up
                # at the cost of one send per batch instead of one per event.
                chunk, ended = [sse_frame(entry)], False
                while len(chunk) < SSE_BATCH_MAX:
                    try:
                        entry = await subscriber.get(timeout=0)
                    except StopAsyncIteration:
                        ended = True
                        break
                    if entry is None:
                        break
                    chunk.append(sse_frame(entry))
                yield chunk[0] if len(chunk) == 1 else b"".join(chunk)
                if ended:
                    return
        finally:
            await subscriber.close()

    response = StreamingHttpResponse(frames(), content_type="text/event-stream")
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"
    return response


class MessageDeleteInput(serializers.Serializer):
    id = serializers.UUIDField(help_text="the message's id")


class MessageDeleteView(APIView):
    @extend_schema(
        request=MessageDeleteInput,
        responses={200: EmptyResponse, **errors(400, 401, 403, 404)},
        summary="Delete a message (its author, or the chat's owner); members see message.deleted",
    )
    def post(self, request):
        fields = _parse(MessageDeleteInput, request_input(request))
        services.message_delete(message_id=fields["id"], user=request.user)
        return Response({})


@async_endpoint(("POST",))
async def chat_stop(request):
    """Stop the chat's replies being generated (documented in chats/schema.py)."""
    fields = _parse(ChatIdInput, plain_request_input(request))
    chat = await database_sync_to_async(selectors.chat_get_for_member)(user=request.user, chat_id=fields["id"])
    stopped = await running.generations_stop_chat(chat=chat, user=request.user)
    return JsonResponse({"stopped": stopped})
