"""Who may call what under `/v1/`: one table of paths AND methods, read by both front doors.

Every call upstream carries the server's key, so the upstream sees one account: whatever it stores
(chat completions with `store`, responses, files, batches) or lists belongs to that account, not to the
user who asked. The proxy therefore decides before the upstream hears of a request:

1. the method is one an OpenAI endpoint uses (GET, POST, DELETE), else 405;
2. the path is under PROXY_ALLOWED_PATHS (anyone) or PROXY_ADMIN_PATHS (staff), else 403;
3. the path and method are a row of ROUTES: `open` to any signed-in user, `creates` (open, and the id
   of the object in the answer is recorded as the caller's: proxy.owners), `owner` (only the user whose
   call created the `{id}`: anyone else gets a 404, as if it did not exist), `staff` (account-wide
   listings, model deletion, fine-tuning). A path under a prefix the table knows but no row matches is
   a 403, a row's path with another method a 405. Prefixes the table does not know at all (an operator's
   own addition to PROXY_ALLOWED_PATHS) are governed by step 2 alone: account-wide, as configured.
"""

import enum
from dataclasses import dataclass, field

from django.conf import settings


class Access(enum.StrEnum):
    OPEN = "open"
    CREATES = "creates"
    OWNER = "owner"
    STAFF = "staff"


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    pattern: str  # segments; `{id}` one object id, `{rest}` the rest of the path (a model name may hold "/")
    access: Access
    # `creates`: the answer's object is stored upstream when the body's `store` is true, or absent and this.
    store_default: bool = True
    # `creates`: body fields that name an object of the caller's, by the collection it belongs to.
    refers: dict[str, str] = field(default_factory=dict)

    @property
    def collection(self) -> str:
        """Where the objects this row creates or reaches live: the pattern up to its `{id}`."""
        return self.pattern.split("/{id}")[0]


OPEN, CREATES, OWNER, STAFF = Access.OPEN, Access.CREATES, Access.OWNER, Access.STAFF
ROUTES = [
    Route("GET", "models", OPEN),
    Route("GET", "models/{rest}", OPEN),
    Route("DELETE", "models/{rest}", STAFF),  # a fine-tuned model of the account
    Route("POST", "chat/completions", CREATES, store_default=False),
    Route("GET", "chat/completions", STAFF),  # every user's stored completions
    Route("GET", "chat/completions/{id}", OWNER),
    Route("POST", "chat/completions/{id}", OWNER),  # its metadata
    Route("DELETE", "chat/completions/{id}", OWNER),
    Route("GET", "chat/completions/{id}/messages", OWNER),
    Route("POST", "completions", OPEN),
    Route("POST", "embeddings", OPEN),
    Route("POST", "moderations", OPEN),
    Route("POST", "responses", CREATES, refers={"previous_response_id": "responses"}),
    Route("POST", "responses/input_tokens", OPEN),
    Route("GET", "responses/{id}", OWNER),
    Route("DELETE", "responses/{id}", OWNER),
    Route("GET", "responses/{id}/input_items", OWNER),
    Route("POST", "responses/{id}/cancel", OWNER),
    Route("POST", "audio/speech", OPEN),
    Route("POST", "audio/transcriptions", OPEN),
    Route("POST", "audio/translations", OPEN),
    Route("POST", "images/generations", OPEN),
    Route("POST", "images/edits", OPEN),
    Route("POST", "images/variations", OPEN),
    # Opt-in (PROXY_ALLOWED_PATHS), each user's own all the same.
    Route("POST", "files", CREATES),
    Route("GET", "files", STAFF),
    Route("GET", "files/{id}", OWNER),
    Route("DELETE", "files/{id}", OWNER),
    Route("GET", "files/{id}/content", OWNER),
    Route("POST", "batches", CREATES, refers={"input_file_id": "files"}),
    Route("GET", "batches", STAFF),
    Route("GET", "batches/{id}", OWNER),
    Route("POST", "batches/{id}/cancel", OWNER),
    # The account's own: staff only, and only once opened (PROXY_ADMIN_PATHS or PROXY_ALLOWED_PATHS).
    *(
        Route(method, f"{prefix}/{{rest}}", STAFF)
        for prefix in ("fine_tuning", "organization")
        for method in "GET POST DELETE".split()
    ),
]
METHODS = ("GET", "POST", "DELETE")
KNOWN_PREFIXES = frozenset(route.pattern.split("/")[0] for route in ROUTES)


@dataclass(frozen=True, slots=True)
class Decision:
    """What the table says of one request: a refusal (status, code, message, headers), or the route
    it may take and, for an `owner` route, the object it reaches."""

    route: Route | None = None
    object_id: str = ""  # `owner`: the `{id}` of the path
    status: int = 0
    code: str = ""
    message: str = ""
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def refused(self) -> bool:
        return self.status != 0


def _under_any(path: str, prefixes: list[str]) -> bool:
    """Is `path` (after /v1/) one of `prefixes` or below one, whole segments only (`models` ≠ `modelsx`)?"""
    for prefix in prefixes:
        prefix = prefix.strip("/")
        if prefix and (path == prefix or path.startswith(prefix + "/")):
            return True
    return False


def _match(pattern: str, segments: list[str]) -> str | None:
    """The `{id}` (or "") if `segments` fit `pattern`, else None."""
    parts = pattern.split("/")
    object_id = ""
    for index, part in enumerate(parts):
        if part == "{rest}":
            return object_id if len(segments) > index and all(segments[index:]) else None
        if index >= len(segments):
            return None
        if part == "{id}":
            if not segments[index]:
                return None
            object_id = segments[index]
        elif part != segments[index]:
            return None
    return object_id if len(segments) == len(parts) else None


def _refusal(status: int, code: str, message: str, **headers: str) -> Decision:
    return Decision(status=status, code=code, message=message, headers=headers)


def path_decision(method: str, path: str, *, is_staff: bool) -> Decision:
    """May this user call `method` /v1/`path` (percent-decoded), and how: see the module's docstring."""
    if method not in METHODS:
        return _refusal(
            405, "method_not_allowed", f"this server does not proxy {method} requests", Allow=", ".join(METHODS)
        )
    path = path.strip("/")
    if _under_any(path, settings.PROXY_ALLOWED_PATHS):
        pass
    elif _under_any(path, settings.PROXY_ADMIN_PATHS):
        if not is_staff:
            return _refusal(403, "staff_only", f"/v1/{path} is for staff users only")
    else:
        return _refusal(403, "path_not_allowed", f"this server does not proxy /v1/{path}")

    segments = path.split("/")
    if segments[0] not in KNOWN_PREFIXES:
        return Decision()  # the operator's own prefix: account-wide, as configured
    allowed = []
    for route in ROUTES:
        object_id = _match(route.pattern, segments)
        if object_id is None:
            continue
        if route.method != method:
            allowed.append(route.method)
            continue
        if route.access is Access.STAFF and not is_staff:
            return _refusal(403, "staff_only", f"{method} /v1/{path} is for staff users only")
        return Decision(route=route, object_id=object_id)
    if allowed:
        return _refusal(
            405, "method_not_allowed", f"/v1/{path} does not take {method}", Allow=", ".join(sorted(set(allowed)))
        )
    return _refusal(403, "path_not_allowed", f"this server does not proxy {method} /v1/{path}")
