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
            "the server's key, if its path is under PROXY_ALLOWED_PATHS (or, for staff, PROXY_ADMIN_PATHS) and "
            "the table of paths and methods allows it (README: stored objects such as chat/completions/{id} "
            "and responses/{id} are their creator's only, a 404 to anyone else; account-wide listings and "
            "model deletion are staff's); any other path is a 403, any other method a 405. "
            "The upstream's status, headers and body (server-sent events "
            "chunk by chunk) come back as they arrive. Authenticate with any Turbo token, e.g. the openai "
            "SDK with base_url=<turbo>/v1 and api_key=<token>. X-Turbo-Overhead-Ms tells the time Turbo added."
        ),
        "security": [{"bearerAuth": []}, {"cookieAuth": []}],
        "responses": {
            "200": {"description": "the upstream's response, passed through"},
            "default": {"description": "any other status of the upstream's, passed through with its body"},
            "400": {
                "description": "a model call whose model cannot be read (invalid_json, invalid, "
                "malformed_body), a '.' or '..' segment, JSON nested too deep, or an "
                "ambiguous body",
                "content": error,
            },
            "401": {"description": "missing or invalid token", "content": error},
            "403": {"description": "a path this server does not proxy, or one for staff only", "content": error},
            "404": {"description": "a stored object that is not the caller's (or does not exist)", "content": error},
            "405": {"description": "a method this path does not take", "content": error},
            "413": {"description": "body over PROXY_MAX_BODY_BYTES", "content": error},
            "429": {"description": "a rate limit or budget of the caller's (see Retry-After)", "content": error},
            "502": {"description": "the upstream could not be reached", "content": error},
            "503": {"description": "no upstream configured", "content": error},
            "504": {"description": "the upstream timed out", "content": error},
        },
    }
    # An example each method takes (proxy.paths.ROUTES): one that needs no body, and no object of anyone's.
    examples = {"get": "models", "post": "responses/resp_example/cancel", "delete": "responses/resp_example"}
    result.setdefault("paths", {})["/v1/{path}"] = {
        method: {
            **operation,
            "operationId": f"proxy_{method}",
            "parameters": [
                {"name": "path", "in": "path", "required": True, "schema": {"type": "string"}, "example": example}
            ],
        }
        for method, example in examples.items()
    }
    return result
