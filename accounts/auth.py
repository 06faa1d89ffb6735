"""Who is calling: ONE authenticate for every front, and the policy table of what each front accepts.

A front only extracts credentials (`Credentials`: an Authorization value, a `token` parameter, the
`sess` cookie, and whether a foreign browser origin is asking) with one of the extractors below
(`request_credentials` for Django requests, `scope_credentials` for WebSocket handshakes and GraphQL's
connection_init, `metadata_credentials` for gRPC), and hands them to `authenticate` / `aauthenticate`
with its name in `FRONTS`. That returns the caller (`AuthSession`: the user, the session kind, an API
key with its allowed models and group) or raises `AuthRefused`, a TurboError every front renders.

The rules, once:
- a front looks only at the credential kinds its row in `FRONTS` lists, in that order; the first one
  present is the one used (a malformed Authorization counts as absent);
- a cookie rides along with a browser's every request, so a cross-site request may not use it for an
  unsafe method (403 `forbidden`); a WebSocket handshake from a foreign origin is refused whatever it
  carries (cross-site WebSocket hijacking); the origin is checked before any token is looked up;
- an unknown, expired or revoked token is 401 `unauthorized`; no token at all is 401 `unauthorized`;
- an API key (accounts.keys) is a token too, but only fronts whose row says `keys` take it: the model
  calls (/v1/*, /ws, GraphQL's model fields, gRPC Completions). Everywhere else it is 403
  `key_not_allowed_here`, so a key can neither sign in nor change the account.
"""

import base64
import binascii
from dataclasses import dataclass
from http.cookies import SimpleCookie
from urllib.parse import parse_qs, urlsplit

from django.conf import settings
from rest_framework import authentication

from accounts.services import asession_lookup, asession_lookup_unconfirmed, session_lookup
from accounts.tokens import AuthSession
from turbo_site.core.acache import CachedCheck
from turbo_site.core.errors import TurboError
from turbo_site.core.http import mark_event, scope_headers

COOKIE_NAME = "sess"
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
KEY_NOT_ALLOWED_HERE = "key_not_allowed_here"
KEY_NOT_ALLOWED_MESSAGE = (
    "an API key works only for model calls (/v1/*, /ws, GraphQL's complete and completionStream, gRPC "
    "Completions); sign in (/user/login) and use a session token for this endpoint"
)
WWW_AUTHENTICATE = 'Bearer realm="turbo"'
CROSS_SITE_MESSAGE = "cross-site request refused: the Origin is not allowed"

# The kinds of credential a front may accept.
HEADER = "header"  # an Authorization value (Bearer, or Basic whose password is the token): HTTP, gRPC metadata
PARAMETER = "parameter"  # a `token` query (or form) parameter: for clients that cannot send headers
COOKIE = "cookie"  # the `sess` cookie a browser sends on its own
# What a browser on a foreign origin is refused (403), as a front's `origin`.
COOKIE_UNSAFE = "cookie on unsafe methods"  # HTTP: the cookie may not authenticate POST & co.
COOKIE_ALWAYS = "cookie on any method"  # the cookie may not authenticate at all (a GET that changes state)
ANY_CREDENTIAL = "any credential"  # WebSocket handshakes: refused whatever they carry
CSRF_TOKEN = "left to Django's CSRF token"  # the web pages: their forms are csrf_protect'ed


@dataclass(frozen=True)
class Front:
    """What one front accepts: credential kinds in the order they are looked at, and API keys or not."""

    kinds: tuple[str, ...]
    keys: bool = False
    origin: str = COOKIE_UNSAFE  # what a browser on a foreign origin may not do here
    hint: str = ""  # how to send a token here, for the "no token" refusal

    def missing_message(self) -> str:
        if self.hint:
            return f"no token: {self.hint}"
        ways = {HEADER: "Authorization: Bearer <token>", PARAMETER: "a token parameter", COOKIE: "the sess cookie"}
        named = [ways[kind] for kind in self.kinds]
        listed = named[0] if len(named) == 1 else ", ".join(named[:-1]) + " or " + named[-1]
        return f"no token: send {listed}"


# The policy table: every front by name, what it accepts. A new front adds its row here.
FRONTS: dict[str, Front] = {
    "rest": Front((HEADER, COOKIE)),  # the DRF views (/user/*, /chat/*, /group/*, ...)
    # /user/logout: a `token` field names the session to end; its GET ends one too
    "logout": Front(
        (PARAMETER, HEADER, COOKIE),
        origin=COOKIE_ALWAYS,
        hint="send Authorization: Bearer <token>, the sess cookie or a token field",
    ),
    "web": Front((COOKIE,), origin=CSRF_TOKEN),  # the web pages
    "chat": Front((HEADER, COOKIE)),  # the async chat views (prompt, ...)
    "chat.stream": Front((HEADER, PARAMETER, COOKIE)),  # SSE: an EventSource cannot send headers
    "chat.socket": Front((HEADER, PARAMETER, COOKIE), origin=ANY_CREDENTIAL),  # /chat/stream as a WebSocket
    "proxy": Front((HEADER, COOKIE), keys=True),  # /v1/* through Django (browsers)
    "proxy.fast": Front((HEADER,), keys=True),  # /v1/* on the hot path (programs)
    "rpc.socket": Front((HEADER, PARAMETER, COOKIE), keys=True, origin=ANY_CREDENTIAL),  # /ws
    "graphql": Front((HEADER, COOKIE), keys=True),  # /graphql over HTTP (a key: only on the model fields)
    "graphql.socket": Front(  # /graphql over a WebSocket: connection_init's authorization, else the handshake's
        (HEADER, PARAMETER, COOKIE),
        keys=True,
        origin=ANY_CREDENTIAL,
        hint="send connection_init with {authorization: Bearer <token>}",
    ),
    # GraphQL's account fields (everything but the model fields), checked per field on a caller already
    # authenticated as "graphql" or "graphql.socket".
    "graphql.account": Front((HEADER, COOKIE)),
    "grpc.chats": Front((HEADER,), hint="send `authorization: Bearer <token>` metadata"),
    "grpc.completions": Front((HEADER,), keys=True, hint="send `authorization: Bearer <token>` metadata"),
}


class AuthRefused(TurboError):
    """The one refusal of authentication: 401 (no, or no live, credential) or 403 (not here)."""

    status_code = 401
    code = "unauthorized"

    def __init__(self, message: str, *, status: int = 401, code: str | None = None):
        super().__init__(
            message,
            code=code or ("unauthorized" if status == 401 else "forbidden"),
            headers={"WWW-Authenticate": WWW_AUTHENTICATE} if status == 401 else None,
        )
        self.status_code = status

    @property
    def close_code(self) -> int:
        """The WebSocket close code for it: 4401 or 4403, like a socket whose session ends."""
        return 4000 + self.status_code


@dataclass(frozen=True)
class Credentials:
    """What a request carried, as its front extracted it; a front leaves out what it does not read."""

    authorization: str = ""  # an Authorization value: HTTP header, gRPC metadata, connection_init payload
    parameter: str | None = None  # a `token` query or form parameter
    cookie: str = ""  # the `sess` cookie
    cross_site: bool = False  # sent by a browser on a foreign origin
    safe_method: bool = False  # an HTTP GET, HEAD or OPTIONS


def token_from_authorization(authorization: str) -> str | None:
    """The token of an Authorization value: `Bearer <token>`, or Basic whose password is the token."""
    scheme, _, credentials = authorization.strip().partition(" ")
    scheme = scheme.lower()
    credentials = credentials.strip()
    if scheme == "bearer" and credentials:
        return credentials
    if scheme == "basic" and credentials:
        try:
            decoded = base64.b64decode(credentials, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return None
        _, _, password = decoded.partition(":")  # the username part is not used
        return password or None
    return None


def _first_token(policy: Front, credentials: Credentials) -> tuple[str, str] | None:
    """(kind, token) of the first credential kind of `policy` that `credentials` carry."""
    for kind in policy.kinds:
        if kind == HEADER:
            token = token_from_authorization(credentials.authorization)
        elif kind == PARAMETER:
            token = (credentials.parameter or "").strip()
        else:
            token = credentials.cookie
        if token:
            return kind, token
    return None


def carries_credential(front: str, credentials: Credentials) -> bool:
    """Do `credentials` hold anything `front` would look up?"""
    return _first_token(FRONTS[front], credentials) is not None


def _cookie_guarded(policy: Front, credentials: Credentials) -> bool:
    """May a foreign origin's request not use the cookie on this front?"""
    return policy.origin == COOKIE_ALWAYS or (policy.origin == COOKIE_UNSAFE and not credentials.safe_method)


def _chosen(front: str, credentials: Credentials) -> str:
    """The token to look up for `front`, by its row's order; AuthRefused if none may serve."""
    policy = FRONTS[front]
    if credentials.cross_site and policy.origin == ANY_CREDENTIAL:
        raise AuthRefused("cross-site WebSocket refused: the Origin is not allowed", status=403)
    found = _first_token(policy, credentials)
    if found is None:
        raise AuthRefused(policy.missing_message())
    kind, token = found
    if kind == COOKIE and credentials.cross_site and _cookie_guarded(policy, credentials):
        raise AuthRefused(CROSS_SITE_MESSAGE, status=403)
    return token


def admit(front: str, found: AuthSession | None) -> AuthSession:
    """`found` (a looked-up session, None: unknown, expired or revoked) if it may act on `front`."""
    if found is None:
        raise AuthRefused("invalid, expired or revoked token")
    if found.kind == "key" and not FRONTS[front].keys:
        raise AuthRefused(KEY_NOT_ALLOWED_MESSAGE, status=403, code=KEY_NOT_ALLOWED_HERE)
    return found


async def aauthenticate(front: str, credentials: Credentials, *, shared: bool = False) -> AuthSession:
    """Who is calling on `front` (a name in FRONTS) with `credentials`; AuthRefused otherwise.
    `shared`: the caller never changes the session or its user (see asession_lookup)."""
    token = _chosen(front, credentials)
    return admit(front, await asession_lookup(token, keys=True, shared=shared))


async def aauthenticate_unconfirmed(front: str, credentials: Credentials) -> tuple[AuthSession, CachedCheck | None]:
    """`aauthenticate(shared=True)` with no Redis round trip for a token this process looked up before:
    the caller, and None or a check the caller MUST confirm on Redis before it answers or acts (the
    proxy's hot path folds it into its admission script). CacheChanged from the check: the token's
    lookup changed (revoked, the user or their groups changed): authenticate again with `aauthenticate`."""
    token = _chosen(front, credentials)
    found, check = await asession_lookup_unconfirmed(token, keys=True)
    return admit(front, found), check


def authenticate(front: str, credentials: Credentials) -> AuthSession:
    """`aauthenticate` for sync code (DRF views, the web pages): the same rules, the sync lookup."""
    token = _chosen(front, credentials)
    return admit(front, session_lookup(token, keys=True))


# --- extractors: what each transport carries, as Credentials ---------------------------------------


def _origin_of(url: str) -> str | None:
    parts = urlsplit(url)
    if not parts.scheme or not parts.netloc:
        return None
    return f"{parts.scheme}://{parts.netloc}".lower()


def origin_allowed(origin: str | None, host_origin: str | None) -> bool:
    """Is a browser origin this server itself or on the CORS allow-list? No origin means no browser."""
    if origin is None:
        return True
    origin = origin.strip().lower()
    if not origin or origin == "null":
        return False
    allowed = {o.lower().rstrip("/") for o in settings.CORS_ALLOWED_ORIGINS}
    return origin == host_origin or origin in allowed


def request_origin_allowed(request) -> bool:
    """The CSRF rule for cookie-authenticated requests: Origin (or Referer) must be ours or allowed."""
    origin = request.META.get("HTTP_ORIGIN")
    if origin is None and request.META.get("HTTP_REFERER"):
        origin = _origin_of(request.META["HTTP_REFERER"]) or "null"
    if origin is None and request.META.get("HTTP_SEC_FETCH_SITE") == "cross-site":
        return False
    try:
        host_origin = f"{request.scheme}://{request.get_host()}".lower()
    except Exception:  # DisallowedHost: no origin can match it
        host_origin = None
    return origin_allowed(origin, host_origin)


def request_credentials(request, front: str) -> Credentials:
    """The credentials of a Django request that `front` reads (a form is parsed only where a parameter
    counts); a request with the `sess` cookie is marked cross-site unless its Origin is allowed."""
    kinds = FRONTS[front].kinds
    parameter = None
    if PARAMETER in kinds:
        parameter = request.GET.get("token") or (request.POST.get("token") if request.method == "POST" else None)
    cookie = request.COOKIES.get(COOKIE_NAME, "") if COOKIE in kinds else ""
    return Credentials(
        authorization=request.META.get("HTTP_AUTHORIZATION", "") if HEADER in kinds else "",
        parameter=parameter if isinstance(parameter, str) else None,
        cookie=cookie,
        cross_site=bool(cookie) and not request_origin_allowed(request),
        safe_method=request.method in SAFE_METHODS,
    )


async def arequest_authenticate(request, front: str) -> AuthSession:
    """The caller of an async Django view on `front`; marks the request's event with the user."""
    found = await aauthenticate(front, request_credentials(request, front))
    mark_event(request, user_id=found.user.pk)
    return found


def websocket_origin_allowed(scope) -> bool:
    """Is a WebSocket handshake's Origin this server or an allowed origin (none: not a browser)?"""
    headers = scope_headers(scope)
    scheme = "https" if scope.get("scheme") in ("wss", "https") else "http"
    return origin_allowed(headers.get("origin"), f"{scheme}://{headers.get('host', '')}".lower())


def scope_credentials(scope, *, authorization: str | None = None) -> Credentials:
    """The credentials of a WebSocket handshake: `token` query parameter, Authorization header, cookie.
    `authorization` is a value the client sent after the handshake (GraphQL's connection_init payload);
    given, it is the only credential. A browser always sends Origin on a handshake; a foreign one is
    marked cross-site."""
    cross_site = not websocket_origin_allowed(scope)
    if authorization is not None:
        return Credentials(authorization=authorization, cross_site=cross_site)
    headers = scope_headers(scope)
    query = parse_qs(scope.get("query_string", b"").decode("latin1"))
    cookies = SimpleCookie()
    try:
        cookies.load(headers.get("cookie", ""))
    except Exception:
        cookies = SimpleCookie()
    morsel = cookies.get(COOKIE_NAME)
    return Credentials(
        authorization=headers.get("authorization", ""),
        parameter=(query.get("token") or [None])[0],
        cookie=morsel.value if morsel is not None else "",
        cross_site=cross_site,
    )


def metadata_credentials(metadata) -> Credentials:
    """The credentials of a gRPC call: its `authorization` metadata."""
    authorization = next((str(value) for name, value in metadata or () if name.lower() == "authorization"), "")
    return Credentials(authorization=authorization)


class TokenAuthentication(authentication.BaseAuthentication):
    """DRF's adapter ("rest" in FRONTS); `request.auth` is the AuthSession. Without any credential it
    leaves the request anonymous, so that DRF's permission answers (401) and public views stay public."""

    front = "rest"

    def authenticate(self, request) -> tuple | None:
        credentials = request_credentials(request._request, self.front)
        if not carries_credential(self.front, credentials):
            return None
        found = authenticate(self.front, credentials)
        mark_event(request, user_id=found.user.pk)
        return found.user, found

    def authenticate_header(self, request) -> str:
        return WWW_AUTHENTICATE
