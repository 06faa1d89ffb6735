"""`/health` and `/info`: no authentication, no secrets."""

import asyncio
import time
import uuid
from urllib.parse import urlsplit

from asgiref.sync import sync_to_async
from channels.layers import get_channel_layer
from django.conf import settings
from django.core.cache import cache
from django.db import connection
from django.http import JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET

from proxy import consumers, events, tools
from proxy.gateway import GatewayError, gateway_config
from turbo_site.core.errors import error_response

CHECK_TIMEOUT_SECONDS = 3


def _database_check() -> None:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
            cursor.fetchone()
    finally:
        connection.close()  # a health probe holds no connection


def _cache_check() -> None:
    key = f"health:{uuid.uuid4().hex}"
    cache.set(key, 1, 10)
    if cache.get(key) != 1:
        raise RuntimeError("the cache did not return what was stored")
    cache.delete(key)


async def _channel_layer_check() -> None:
    layer = get_channel_layer()
    channel = await layer.new_channel("health.")
    await layer.send(channel, {"type": "health.ping"})
    message = await layer.receive(channel)
    if message.get("type") != "health.ping":
        raise RuntimeError("the channel layer returned something else")


async def _timed(check) -> dict:
    started = time.perf_counter()
    try:
        await asyncio.wait_for(check(), CHECK_TIMEOUT_SECONDS)
    except TimeoutError:
        return {"ok": False, "error": "timed out"}
    except Exception as exc:  # the kind of failure, never its details (they may hold addresses)
        return {"ok": False, "error": type(exc).__name__}
    return {"ok": True, "ms": round((time.perf_counter() - started) * 1000, 2)}


def _upstream_state() -> dict:
    try:
        problems = [upstream.problem for upstream in gateway_config().upstreams if upstream.problem]
    except GatewayError as exc:
        return {"configured": False, "message": exc.message}
    if problems:
        return {"configured": False, "message": problems[0]}
    return {"configured": True}


# GET-only, changing nothing: no CSRF check, so that any other method is the 405 (with Allow) it is.
@csrf_exempt
@require_GET
async def health(request):
    database, cache_state, layer = await asyncio.gather(
        _timed(sync_to_async(_database_check, thread_sensitive=False)),
        _timed(sync_to_async(_cache_check, thread_sensitive=False)),
        _timed(_channel_layer_check),
    )
    checks = {"database": database, "cache": cache_state, "channel_layer": layer, "upstream": _upstream_state()}
    healthy = all(check["ok"] for check in (database, cache_state, layer))
    return JsonResponse(
        {
            "status": "ok" if healthy else "unavailable",
            "checks": checks,
            "websocket_clients": consumers.connected_clients,
            # This process's event log: waiting to be written, and refused by the database (dropped).
            "events": events.events_state(),
        },
        status=200 if healthy else 503,
    )


def _public_url(url: str) -> str:
    """scheme://host[:port]/path without credentials."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return f"{parts.scheme}://{host}{parts.path}" if parts.scheme else ""


@csrf_exempt
@require_GET
def info(request):
    from chats.programs.registry import programs

    database = connection.vendor
    return JsonResponse(
        {
            "name": "Turbo",
            "version": settings.VERSION,
            "default_model": settings.DEFAULT_MODEL,
            "model_aliases": settings.MODEL_ALIASES,
            "database": database,
            "cache": "redis" if settings.REDIS_ADDRESS else "in-memory",
            "channel_layer": "redis" if settings.REDIS_ADDRESS else "in-memory",
            "upstream": {"url": _public_url(settings.OPENAI_API_URL), **_upstream_state()},
            "limits": {
                "max_body_bytes": settings.MAX_BODY_BYTES,
                "proxy_max_body_bytes": settings.PROXY_MAX_BODY_BYTES,
                "max_context": settings.MAX_CONTEXT,
                "ws_max_in_flight": settings.WS_MAX_IN_FLIGHT,
            },
            "tools": sorted(tools.tool_names()),
            "programs": sorted(programs()),
        }
    )


@csrf_exempt
def websocket_only(request):
    """/ws over plain HTTP: the socket is served only as a WebSocket (426 names the upgrade to ask for)."""
    if request.method != "GET":
        response = error_response(405, "method_not_allowed", f"method {request.method} is not allowed here")
        response["Allow"] = "GET"
        return response
    response = error_response(426, "upgrade_required", "/ws is a WebSocket: connect with Upgrade: websocket")
    response["Upgrade"] = "websocket"
    return response


def add_health_paths(result, generator, request, public):
    """drf-spectacular postprocessing hook: /health, /info and the /ws RPC socket."""
    check = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}, "ms": {"type": "number"}, "error": {"type": "string"}},
    }
    paths = result.setdefault("paths", {})
    paths["/health"] = {
        "get": {
            "operationId": "health",
            "tags": ["operations"],
            "summary": "Database, cache, channel layer and upstream configuration; 503 when a required part is down",
            "security": [],
            "responses": {
                code: {
                    "description": text,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "properties": {
                                    "status": {"type": "string", "enum": ["ok", "unavailable"]},
                                    "checks": {
                                        "type": "object",
                                        "properties": {
                                            "database": check,
                                            "cache": check,
                                            "channel_layer": check,
                                            "upstream": {"type": "object"},
                                        },
                                    },
                                    "websocket_clients": {"type": "integer"},
                                    "events": {
                                        "type": "object",
                                        "properties": {
                                            "queued": {"type": "integer"},
                                            "dropped": {"type": "integer"},
                                            "writer": {"type": "string", "enum": ["loop", "thread", "none"]},
                                        },
                                    },
                                },
                            }
                        }
                    },
                }
                for code, text in (("200", "healthy"), ("503", "a required part is down"))
            },
        }
    }
    paths["/info"] = {
        "get": {
            "operationId": "info",
            "tags": ["operations"],
            "summary": "Version and non-secret configuration",
            "security": [],
            "responses": {
                "200": {"description": "info", "content": {"application/json": {"schema": {"type": "object"}}}}
            },
        }
    }
    paths["/ws"] = {
        "get": {
            "operationId": "ws_rpc",
            "tags": ["operations"],
            "summary": "WebSocket RPC: {type, request_id, payload} in; {type, request_id, data} or an error out",
            "description": (
                "Types: chat_completion, chat_completion_stream (chat_completion_chunk frames, then "
                "chat_completion_done), embedding, ping (pong), tools_list, tool_execute, cancel. "
                "Authenticate with ?token=<token> or the sess cookie."
            ),
            "parameters": [{"name": "token", "in": "query", "required": False, "schema": {"type": "string"}}],
            "responses": {
                "101": {"description": "switching protocols"},
                "426": {
                    "description": "a plain HTTP request: ask for Upgrade: websocket",
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}},
                    "headers": {"Upgrade": {"schema": {"type": "string", "enum": ["websocket"]}}},
                },
            },
        }
    }
    return result
