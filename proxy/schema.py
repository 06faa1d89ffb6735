"""Adds the /v1/* passthrough, which is not a DRF view, to the OpenAPI schema."""

_ERROR = {
    "type": "object",
    "properties": {
        "error": {
            "type": "object",
            "properties": {"message": {"type": "string"}, "type": {"type": "string"}, "code": {"type": "string"}},
        }
    },
}


def add_proxy_paths(result, generator, request, public):
    """drf-spectacular postprocessing hook."""
    error = {"application/json": {"schema": _ERROR}}
    operation = {
        "tags": ["proxy"],
        "summary": "OpenAI-compatible passthrough",
        "description": (
            "Forwards a request under /v1/ to OPENAI_API_URL with the query string and body unchanged and "
            "the server's key, if its path is under PROXY_ALLOWED_PATHS (or, for staff, PROXY_ADMIN_PATHS); "
            "any other path is a 403. The upstream's status, headers and body (server-sent events "
            "chunk by chunk) come back as they arrive. Authenticate with any Turbo token, e.g. the openai "
            "SDK with base_url=<turbo>/v1 and api_key=<token>. X-Turbo-Overhead-Ms tells the time Turbo added."
        ),
        "parameters": [
            {"name": "path", "in": "path", "required": True, "schema": {"type": "string"}, "example": "models"}
        ],
        "security": [{"bearerAuth": []}, {"cookieAuth": []}],
        "responses": {
            "200": {"description": "the upstream's response, passed through"},
            "400": {
                "description": "a model call whose model cannot be read (invalid_json, model_required, "
                "invalid_model, invalid_request_body)",
                "content": error,
            },
            "401": {"description": "missing or invalid token", "content": error},
            "403": {"description": "a path this server does not proxy, or one for staff only", "content": error},
            "413": {"description": "body over PROXY_MAX_BODY_BYTES", "content": error},
            "502": {"description": "the upstream could not be reached", "content": error},
            "503": {"description": "no upstream configured", "content": error},
            "504": {"description": "the upstream timed out", "content": error},
        },
    }
    result.setdefault("paths", {})["/v1/{path}"] = {
        method: {**operation, "operationId": f"proxy_{method}"} for method in ("get", "post", "put", "patch", "delete")
    }
    return result
