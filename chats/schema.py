"""Documents the async chat views (/chat/prompt, /chat/stream), which DRF does not serve, in OpenAPI."""

from chats.stream import EVENT_TYPES, NOTICE_TYPES

_ERROR = {"$ref": "#/components/schemas/ErrorResponse"}


def _errors(*codes: int) -> dict:
    return {str(code): {"description": "error", "content": {"application/json": {"schema": _ERROR}}} for code in codes}


def _form_and_json(schema: dict) -> dict:
    return {
        "required": True,
        "content": {
            "application/json": {"schema": schema},
            "application/x-www-form-urlencoded": {"schema": schema},
        },
    }


# A chat's id is `id` or (its older form key) `chat_id`: one of them is required.
CHAT_ID = {
    "id": {"type": "string", "format": "uuid"},
    "chat_id": {"type": "string", "format": "uuid", "description": "the same as id (its older name, still read)"},
}
ONE_CHAT_ID = [{"required": ["id"]}, {"required": ["chat_id"]}]
PROMPT_INPUT = {
    "type": "object",
    # A prompt, or (instead) the results of the calls a tool_calls message waits on; and the chat.
    "allOf": [{"anyOf": ONE_CHAT_ID}, {"anyOf": [{"required": ["prompt"]}, {"required": ["tool_results"]}]}],
    "properties": {
        **CHAT_ID,
        "prompt": {
            "type": "string",
            "minLength": 1,
            "pattern": r"\S",
            "description": "required, unless tool_results are sent; not only whitespace",
        },
        "context": {"type": "integer", "description": "earlier exchanges to send (default 10, clamped to MAX_CONTEXT)"},
        "stream": {"type": "boolean", "description": "return at once; the reply streams on /chat/stream"},
        "otr": {"type": "boolean", "description": "store and show, but never send to the model"},
        "response_format": {
            "type": "object",
            "additionalProperties": True,
            "description": (
                "OpenAI's response_format; type json_schema: the reply is validated against json_schema.schema "
                "(asked again with the errors, STRUCTURED_RETRIES times) and parsed into the message's `data`; "
                "502 invalid_structured_output (with `errors`) when it never matches. Default: the chat's"
            ),
        },
        "tools": {
            "type": "array",
            "items": {"type": "object", "additionalProperties": True},
            "description": (
                "the client's own functions (OpenAI tools shape), beside the chat's server-side tools; a call to "
                "one ends the turn: the message has status tool_calls and the calls in tool_calls (client: true)"
            ),
        },
        "tool_results": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["tool_call_id", "content"],
                "properties": {"tool_call_id": {"type": "string"}, "content": {}, "is_error": {"type": "boolean"}},
            },
            "description": "instead of a prompt: the results of the calls a tool_calls message waits on; it resumes",
        },
    },
}
STREAM_EVENT = {
    "type": "object",
    "required": ["type"],
    "description": "An event of the chat (with seq) or a notice for this subscriber (without); see chats/stream.py",
    "properties": {
        "seq": {"type": "integer", "description": "per-chat event number, one more than the previous; the SSE id"},
        "type": {
            "type": "string",
            "enum": [
                *EVENT_TYPES,
                *NOTICE_TYPES,
            ],
        },
        "chat_id": {"type": "string", "format": "uuid"},
        "message": {"$ref": "#/components/schemas/MessageOutput"},
        "delta": {"type": "string", "description": "message.*: text added since the previous event"},
        "partial": {"type": "boolean", "description": "message.*: false on the last event of a prompt"},
        "retry": {
            "type": "object",
            "description": (
                "message.delta: a structured reply failed its schema and is asked for again ({attempt, errors}); "
                "message.reply no longer holds the failed attempt"
            ),
        },
        "message_id": {"type": "string", "format": "uuid", "description": "message.deleted"},
        "chat": {"$ref": "#/components/schemas/ChatOutput"},
        "user_id": {"type": "string", "format": "uuid", "description": "member.added, member.removed"},
        "user_ids": {"type": "array", "items": {"type": "string", "format": "uuid"}, "description": "access.changed"},
        "reason": {"type": "string", "description": "stream.closed: chat_deleted, access or session"},
        "after": {"type": "integer", "description": "stream.gap: the events after this seq are gone"},
    },
}


# One server-sent event of /chat/stream: `event: message`, its seq as `id`, and as `data` a StreamEvent in
# JSON (OpenAPI 3.0 cannot say that of a string: the component documents it).
SSE_EVENT = {
    "type": "object",
    "properties": {
        "id": {"type": "string", "pattern": "^[0-9]+$"},
        "event": {"type": "string", "enum": ["message"]},
        "data": {"type": "string", "description": "a StreamEvent (see components) as JSON"},
        "retry": {"type": "integer"},
    },
}


def add_chat_paths(result, generator, request, public):
    """drf-spectacular postprocessing hook."""
    security = [{"bearerAuth": []}, {"cookieAuth": []}]
    result.setdefault("components", {}).setdefault("schemas", {})["StreamEvent"] = STREAM_EVENT
    result.setdefault("paths", {})["/chat/prompt"] = {
        "post": {
            "operationId": "chat_prompt",
            "tags": ["chat"],
            "summary": "Send a prompt; with stream=true the reply streams on /chat/stream",
            "requestBody": _form_and_json(PROMPT_INPUT),
            "security": security,
            "responses": {
                "200": {
                    "description": "the stored message (status 'streaming' with stream=true)",
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "properties": {"message": {"$ref": "#/components/schemas/MessageOutput"}},
                            }
                        }
                    },
                },
                **_errors(400, 401, 403, 404, 405, 409, 429, 502, 503, 504),
            },
        }
    }
    result["paths"]["/chat/stop"] = {
        "post": {
            "operationId": "chat_stop",
            "tags": ["chat"],
            "summary": "Stop the chat's replies being generated (the prompt's author or the chat's owner)",
            "description": (
                "Works whichever server process runs the reply. Each stopped message ends with `message.failed`, "
                '`status: "error"`, `error: "stopped"`, keeping its partial reply; a non-streamed prompt '
                "waiting for it answers 409 `stopped`."
            ),
            "requestBody": _form_and_json({"type": "object", "anyOf": ONE_CHAT_ID, "properties": CHAT_ID}),
            "security": security,
            "responses": {
                "200": {
                    "description": "how many replies were asked to stop",
                    "content": {
                        "application/json": {
                            "schema": {"type": "object", "properties": {"stopped": {"type": "integer"}}}
                        }
                    },
                },
                **_errors(400, 401, 403, 404, 503),
            },
        }
    }
    stream = {
        "tags": ["chat"],
        "summary": "Live events of a chat: SSE here, WebSocket (ws://.../chat/stream?id=&token=) on the same path",
        "description": (
            "Each event is sent as `id: <seq>`, `event: message`, `data: <json>` (notices have no id). Resume "
            "with the Last-Event-ID header (or `last_event_id` / `after`) within STREAM_REPLAY_SECONDS; when the "
            "events after it are gone a `stream.gap` notice says to reload the chat. A comment line is sent every "
            "STREAM_HEARTBEAT_SECONDS. The stream ends after `chat.deleted`, when access or the session ends "
            "(`stream.closed`), when the server stops (`server.shutdown`) or the stream breaks (`stream.error`): "
            "reconnect with the last seq. 503 `unavailable` (with Retry-After) while Redis is away."
        ),
        "security": security,
        "responses": {
            "200": {
                "description": "server-sent events",
                "content": {"text/event-stream": {"schema": SSE_EVENT}},
            },
            **_errors(400, 401, 404, 503),
        },
    }
    id_param = {"name": "id", "in": "query", "required": True, "schema": CHAT_ID["id"]}
    token_help = "a session token, for an EventSource (it cannot send headers); only this endpoint takes it"
    token_param = {
        "name": "token",
        "in": "query",
        "required": False,
        "schema": {"type": "string"},
        "description": token_help,
    }
    result["paths"]["/chat/stream"] = {
        "get": {**stream, "operationId": "chat_stream_get", "parameters": [id_param, token_param]},
        "post": {
            **stream,
            "operationId": "chat_stream_post",
            "requestBody": _form_and_json(
                {
                    "type": "object",
                    "anyOf": ONE_CHAT_ID,
                    "properties": {
                        **CHAT_ID,
                        "token": {"type": "string", "description": token_help + " (form bodies)"},
                    },
                }
            ),
        },
    }
    conversation_chat = {
        "operationId": "conversation_chat",
        "tags": ["api"],
        "summary": "Chat in a conversation: the reply streams back as server-sent events",
        "description": (
            "Events, each `data:` raw text (a line break in it continues on another `data:` line): "
            "`message` (one delta of the reply), then `done` (`Stream finished`) and `full_response` (the whole "
            "reply); `error` (data: the JSON error envelope) before `done` if the upstream failed."
        ),
        "parameters": [
            {
                "name": "number",
                "in": "path",
                "required": True,
                "schema": {"type": "integer"},
                "description": "the conversation_id from /api/conversations/create",
            }
        ],
        "requestBody": _form_and_json(
            {
                "type": "object",
                "required": ["message"],
                "properties": {"message": {"type": "string", "minLength": 1, "pattern": r"\S"}},
            }
        ),
        "security": security,
        "responses": {
            "200": {
                "description": "server-sent events",
                "content": {
                    "text/event-stream": {
                        "schema": {
                            "type": "object",
                            "required": ["event", "data"],
                            "properties": {
                                "event": {"type": "string", "enum": ["message", "done", "full_response", "error"]},
                                "data": {"type": "string"},
                            },
                        }
                    }
                },
            },
            **_errors(400, 401, 403, 404, 429, 503),
        },
    }
    result["paths"]["/api/chat/{number}"] = {"post": conversation_chat}
    result["paths"]["/api/chat/{number}/"] = {"post": {**conversation_chat, "operationId": "conversation_chat_slash"}}
    return result
