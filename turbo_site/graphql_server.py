"""/graphql: the schema (turbo_site.graphql) over HTTP and over a WebSocket (graphql-transport-ws).

HTTP: an async view; GET runs queries (and, with DEBUG=1 or GRAPHQL_PLAYGROUND=1, serves GraphiQL from
our own static files to browsers), POST runs queries and mutations. Authentication happens per field
(accounts.graphql.viewer), so one request may mix fields a key may and may not use.

WebSocket: the handshake's Origin must be ours or allowed (as on every socket); connection_init's
payload `{"authorization": "Bearer <token>"}` signs in (without it, the handshake's cookie or
Authorization header), or the socket closes 4403. It lives as long as its session: revoked or
expired, it closes 4401. A frame that breaks the protocol (not JSON, nested deeper than JSON may be,
not an object, an `id` that is not a string, a `subscribe` payload that is not an object holding a
query) closes it 4400, as the protocol says.
"""

import asyncio
import logging
from datetime import timedelta

from cross_web import HTTPException
from django.conf import settings
from django.shortcuts import render
from django.urls import path
from django.views.decorators.csrf import csrf_exempt
from strawberry.channels import GraphQLWSConsumer
from strawberry.django.views import AsyncGraphQLView
from strawberry.exceptions import ConnectionRejectionError
from strawberry.subscriptions import GRAPHQL_TRANSPORT_WS_PROTOCOL
from strawberry.subscriptions.protocols.graphql_transport_ws.handlers import BaseGraphQLTransportWSHandler
from strawberry.types.unset import UNSET

from accounts.auth import AuthRefused, aauthenticate, scope_credentials, websocket_origin_allowed
from accounts.live import session_watch
from turbo_site.core.errors import error_response
from turbo_site.core.graphql import GraphQLContext
from turbo_site.core.parsers import JSONTooDeep, client_json_loads
from turbo_site.core.streams import StreamUnavailable
from turbo_site.graphql import schema

logger = logging.getLogger("turbo.graphql")

HTTP_CODES = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 415: "unsupported_media_type"}


def playground_on() -> bool:
    return bool(settings.DEBUG or settings.GRAPHQL_PLAYGROUND)


class CodedHTTPException(HTTPException):
    """A refusal before any GraphQL, with Turbo's code (else HTTP_CODES names it by its status)."""

    def __init__(self, status_code: int, reason: str, *, code: str):
        super().__init__(status_code, reason)
        self.code = code


class GraphQLView(AsyncGraphQLView):
    schema = schema
    allow_queries_via_get = True  # queries only: strawberry refuses a mutation over GET

    def parse_json(self, data: str | bytes):
        """A body (or GET's `variables`) read as every client JSON is: deep nesting is a 400, not a 500;
        so is a body that is not an object (or a list: strawberry answers that batching is off)."""
        try:
            parsed = client_json_loads(data)
        except JSONTooDeep as exc:  # `invalid_json`, as every front answers deep nesting
            raise CodedHTTPException(400, f"the body is not valid JSON: {exc}", code="invalid_json") from None
        except ValueError as exc:  # UnicodeDecodeError included
            raise HTTPException(400, f"the body is not valid JSON: {exc}") from None
        if not isinstance(parsed, (dict, list)):
            raise HTTPException(400, "the body must be a JSON object")
        return parsed

    async def get_context(self, request, response) -> GraphQLContext:
        return GraphQLContext(request=request)

    async def parse_http_body(self, request):
        parsed = await super().parse_http_body(request)
        for one in parsed if isinstance(parsed, list) else [parsed]:
            if not isinstance(one.operation_name, str | None):
                raise HTTPException(400, "The GraphQL operation's `operationName` must be a string or null.")
        return parsed

    async def render_graphql_ide(self, request):
        """A browser's GET without a query: GraphiQL, from our own static files, when the playground is on."""
        if not playground_on():
            return error_response(404, "not_found", "GraphiQL is off: set GRAPHQL_PLAYGROUND=1 (or DEBUG=1)")
        return render(request, "graphql/graphiql.html")

    async def dispatch(self, request, *args, **kwargs):
        try:
            return await self.run(request=request)
        except HTTPException as exc:  # a malformed request, before any GraphQL: Turbo's error shape
            code = getattr(exc, "code", None) or HTTP_CODES.get(exc.status_code, "bad_request")
            response = error_response(exc.status_code, code, str(exc.reason))
            if exc.status_code == 405:
                response["Allow"] = "GET, POST"  # as RFC 9110 asks of a 405
            return response


graphql_view = csrf_exempt(GraphQLView.as_view(schema=schema))


class FrameRefused:
    """A frame that could not be read as JSON (decode_json's answer, so the handler closes 4400)."""

    def __init__(self, reason: str):
        self.reason = reason


_OPTIONAL_OBJECT = (dict, type(None))


def frame_problem(frame) -> str | None:
    """Why a graphql-transport-ws frame breaks the protocol, or None. Strawberry's handler assumes the
    shapes checked here (and raised on anything else, leaving the socket open and deaf)."""
    if isinstance(frame, FrameRefused):
        return frame.reason
    if not isinstance(frame, dict) or not isinstance(frame.get("type"), str):
        return "a message must be a JSON object with a string `type`"
    kind = frame["type"]
    if kind in ("subscribe", "complete") and not (isinstance(frame.get("id"), str) and frame["id"]):
        return f"a {kind} message needs a non-empty string `id`"
    if kind in ("connection_init", "ping", "pong") and not isinstance(frame.get("payload"), _OPTIONAL_OBJECT):
        return f"a {kind} message's payload must be an object"
    if kind == "subscribe":
        payload = frame.get("payload")
        if not isinstance(payload, dict) or not isinstance(payload.get("query"), str):
            return "a subscribe message's payload must be an object with a string `query`"
        if not isinstance(payload.get("variables"), _OPTIONAL_OBJECT):
            return "`variables` must be an object"
        if not isinstance(payload.get("operationName"), (str, type(None))):
            return "`operationName` must be a string"
        if not isinstance(payload.get("extensions"), _OPTIONAL_OBJECT):
            return "`extensions` must be an object"
    return None


class TransportHandler(BaseGraphQLTransportWSHandler):
    """graphql-transport-ws, with every frame checked before strawberry reads it."""

    async def handle_message(self, message) -> None:
        problem = frame_problem(message)
        if problem is not None:
            await self.handle_invalid_message(problem)
            return
        try:
            await super().handle_message(message)
        except Exception:  # a fault of ours: the socket is closed, never left without a reader
            logger.exception("a GraphQL socket frame failed")
            await self.websocket.close(code=1011, reason="internal error")


class GraphQLConsumer(GraphQLWSConsumer):
    # No channel layer: events come through chats.stream, so a Redis outage cannot kill the consumer.
    channel_layer_alias = "turbo-no-channel-layer"

    graphql_transport_ws_handler_class = TransportHandler
    watch = None

    def decode_json(self, data: str | bytes):
        try:
            return client_json_loads(data)
        except ValueError as exc:  # JSONTooDeep, NaN, not JSON at all
            return FrameRefused(f"not a JSON message: {str(exc)[:100]}")

    async def connect(self) -> None:
        if not websocket_origin_allowed(self.scope):
            await self.close()  # before accept: the handshake is refused (HTTP 403)
            return
        await super().connect()

    async def get_context(self, request, response) -> GraphQLContext:
        return GraphQLContext(scope=self.scope, consumer=self)

    async def on_ws_connect(self, context: GraphQLContext):
        authorization = context.connection_params.get("authorization")
        if authorization is not None and not isinstance(authorization, str):
            raise ConnectionRejectionError()
        try:
            session = await aauthenticate("graphql.socket", scope_credentials(self.scope, authorization=authorization))
        except AuthRefused:
            raise ConnectionRejectionError() from None
        watch = session_watch(session.session_id, session.expires_at, self._session_ended)
        try:
            await watch.__aenter__()
        except StreamUnavailable:
            raise ConnectionRejectionError() from None
        self.watch = watch
        context.session = session
        return UNSET

    def _session_ended(self, reason: str) -> None:
        asyncio.get_running_loop().create_task(self.close(code=4401, reason="the session has ended"))

    async def receive(self, text_data=None, bytes_data=None) -> None:
        if text_data is not None and len(text_data) > settings.WS_MAX_FRAME_BYTES:
            await self.close(code=1009, reason=f"frames may be at most {settings.WS_MAX_FRAME_BYTES} bytes")
            return
        await super().receive(text_data=text_data, bytes_data=bytes_data)

    async def disconnect(self, code: int) -> None:
        try:
            if self.run_task is not None:
                await super().disconnect(code)
        finally:
            watch, self.watch = self.watch, None
            if watch is not None:
                await watch.__aexit__(None, None, None)


websocket_urlpatterns = [
    path(
        "graphql",
        GraphQLConsumer.as_asgi(
            schema=schema,
            subscription_protocols=(GRAPHQL_TRANSPORT_WS_PROTOCOL,),
            connection_init_wait_timeout=timedelta(seconds=30),
        ),
    ),
]


def add_graphql_path(result, generator, request, public):
    """drf-spectacular postprocessing hook: /graphql (its own contract is schema.graphql)."""
    error = {"application/json": {"schema": {"type": "object", "properties": {"error": {"type": "object"}}}}}
    body = {
        "type": "object",
        "required": ["query"],
        "properties": {
            "query": {"type": "string", "minLength": 1},
            "variables": {"type": "object", "nullable": True},
            "operationName": {"type": "string", "nullable": True},
        },
    }
    answer = {
        "application/json": {
            "schema": {
                "type": "object",
                "properties": {"data": {"type": "object", "nullable": True}, "errors": {"type": "array"}},
            }
        }
    }
    result.setdefault("paths", {})["/graphql"] = {
        "post": {
            "operationId": "graphql",
            "tags": ["graphql"],
            "summary": "GraphQL queries and mutations (schema.graphql); subscriptions: a WebSocket on this path",
            "requestBody": {"required": True, "content": {"application/json": {"schema": body}}},
            "responses": {
                "200": {"description": "the result; errors carry extensions.code", "content": answer},
                "400": {
                    "description": "not a GraphQL request (not a JSON object, or JSON nested too deep)",
                    "content": error,
                },
                "413": {"description": "the body is too large", "content": error},
            },
        },
        "get": {
            "operationId": "graphql_page",
            "tags": ["graphql"],
            "summary": "GraphiQL (only with DEBUG=1 or GRAPHQL_PLAYGROUND=1; otherwise 404)",
            "responses": {
                "200": {"description": "the page", "content": {"text/html": {"schema": {"type": "string"}}}},
                "404": {"description": "the playground is off", "content": error},
            },
        },
    }
    return result
