"""Where a request's token comes from, and the one authentication path for HTTP and WebSocket.

Sources, first match wins: `Authorization: Bearer <token>`, HTTP Basic whose password is the token,
the `sess` cookie, and (WebSocket handshakes and the SSE /chat/stream only) a `token` parameter. A
cookie is sent by browsers on their own, so unsafe requests it authenticates must come from an allowed
origin.

An API key (accounts.keys) is a token too, but only the fronts that say `keys=True` take it: the model
calls (/v1/*, /ws, GraphQL's me/models/usage/complete/completionStream, gRPC Completions). Everywhere
else it is a 403 `key_not_allowed_here`, so a key can neither sign in nor change the account.
"""

import base64
import binascii
from urllib.parse import urlsplit

from django.conf import settings
from rest_framework import authentication, exceptions

from accounts.services import AuthSession, asession_lookup, session_lookup
from turbo_site.core.errors import Forbidden
from turbo_site.core.http import mark_event, scope_headers

COOKIE_NAME = "sess"
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
KEY_NOT_ALLOWED_HERE = "key_not_allowed_here"
KEY_NOT_ALLOWED_MESSAGE = (
    "an API key works only for model calls (/v1/*, /ws, GraphQL's complete and completionStream, gRPC "
    "Completions); sign in (/user/login) and use a session token for this endpoint"
)


def token_from_headers(authorization: str, cookies: dict) -> tuple[str | None, str | None]:
    """(token, source) from an Authorization header value and the cookies; source names where it came from."""
    scheme, _, credentials = authorization.strip().partition(" ")
    scheme = scheme.lower()
    credentials = credentials.strip()
    if scheme == "bearer" and credentials:
        return credentials, "bearer"
    if scheme == "basic" and credentials:
        try:
            decoded = base64.b64decode(credentials, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return None, None
        _, _, password = decoded.partition(":")  # the username part is not used
        if password:
            return password, "basic"
        return None, None
    cookie = cookies.get(COOKIE_NAME, "")
    if cookie:
        return cookie, "cookie"
    return None, None


def token_from_request(request) -> tuple[str | None, str | None]:
    return token_from_headers(request.META.get("HTTP_AUTHORIZATION", ""), request.COOKIES)


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


class CrossSiteRefused(exceptions.PermissionDenied):
    default_detail = "cross-site request refused: the Origin is not allowed"


class TokenAuthentication(authentication.BaseAuthentication):
    """DRF authentication over Turbo sessions; `request.auth` is the AuthSession. No DRF view takes an
    API key."""

    def authenticate(self, request) -> tuple | None:
        token, source = token_from_request(request._request)
        if token is None:
            return None
        found: AuthSession | None = session_lookup(token, keys=True)
        if found is None:
            raise exceptions.AuthenticationFailed("invalid, expired or revoked token")
        if source == "cookie" and request.method not in SAFE_METHODS and not request_origin_allowed(request):
            raise CrossSiteRefused()
        mark_event(request, user_id=found.user.pk)
        if found.kind == "key":
            raise Forbidden(KEY_NOT_ALLOWED_MESSAGE, code=KEY_NOT_ALLOWED_HERE)
        return found.user, found

    def authenticate_header(self, request) -> str:
        return 'Bearer realm="turbo"'


class AuthRefused(Exception):
    """Why a request may not proceed, for views outside DRF (the proxy, async chat views)."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def token_from_parameter(request) -> str | None:
    """A `token` query or form parameter: how seed 000's SSE clients (EventSource sends no headers) sign in."""
    token = request.GET.get("token") or (request.POST.get("token") if request.method == "POST" else None)
    if not isinstance(token, str):
        return None
    return token.strip() or None


async def _alookup(token: str, *, keys: bool) -> AuthSession:
    """The live session (or, with `keys`, API key) of `token`; AuthRefused otherwise."""
    found = await asession_lookup(token, keys=True)
    if found is None:
        raise AuthRefused(401, "unauthorized", "invalid, expired or revoked token")
    if found.kind == "key" and not keys:
        raise AuthRefused(403, KEY_NOT_ALLOWED_HERE, KEY_NOT_ALLOWED_MESSAGE)
    return found


async def aauthenticate(request, *, token_parameter: bool = False, keys: bool = False) -> AuthSession:
    """The caller's session, for async views; the same rules as TokenAuthentication.

    With `token_parameter` (only for endpoints an EventSource opens), a `token` query or form parameter
    also counts: after the Authorization header, before the cookie. With `keys` (only /v1/*), an API
    key counts too.
    """
    token, source = token_from_request(request)
    if token_parameter and source in (None, "cookie"):
        parameter = token_from_parameter(request)
        if parameter is not None:
            token, source = parameter, "parameter"
    if token is None:
        raise AuthRefused(401, "unauthorized", "no token: send Authorization: Bearer <token> or the sess cookie")
    found = await _alookup(token, keys=keys)
    if source == "cookie" and request.method not in SAFE_METHODS and not request_origin_allowed(request):
        raise AuthRefused(403, "forbidden", "cross-site request refused: the Origin is not allowed")
    request.turbo_user_id = found.user.pk
    return found


def websocket_origin_allowed(scope) -> bool:
    """Is a WebSocket handshake's Origin this server or an allowed origin (none: not a browser)?"""
    headers = scope_headers(scope)
    scheme = "https" if scope.get("scheme") in ("wss", "https") else "http"
    return origin_allowed(headers.get("origin"), f"{scheme}://{headers.get('host', '')}".lower())


async def aauthenticate_websocket(scope, *, keys: bool = False, authorization: str | None = None) -> AuthSession:
    """The session of a WebSocket handshake: `token` query parameter, Authorization header or cookie.
    With `keys` (only /ws), an API key counts too. `authorization` is an Authorization value the client
    sent after the handshake (GraphQL's connection_init payload); given, it is the only token looked at.

    A browser always sends Origin on a WebSocket handshake; it must be this server or an allowed origin,
    so that a foreign page cannot ride on the cookie (cross-site WebSocket hijacking).
    """
    from http.cookies import SimpleCookie
    from urllib.parse import parse_qs

    headers = scope_headers(scope)
    if not websocket_origin_allowed(scope):
        raise AuthRefused(403, "forbidden", "cross-site WebSocket refused: the Origin is not allowed")
    if authorization is not None:
        token, _ = token_from_headers(authorization, {})
        if not token:
            raise AuthRefused(401, "unauthorized", "authorization must be 'Bearer <token>'")
        return await _alookup(token, keys=keys)
    query = parse_qs(scope.get("query_string", b"").decode("latin1"))
    token = (query.get("token") or [""])[0].strip()
    if not token:
        cookies = SimpleCookie()
        try:
            cookies.load(headers.get("cookie", ""))
        except Exception:
            cookies = SimpleCookie()
        token, _ = token_from_headers(
            headers.get("authorization", ""), {key: morsel.value for key, morsel in cookies.items()}
        )
    if not token:
        raise AuthRefused(401, "unauthorized", "no token: pass ?token=<token> or the sess cookie")
    return await _alookup(token, keys=keys)


async def aauthenticate_grpc(metadata, *, keys: bool = False) -> AuthSession:
    """The session of a gRPC call, from its `authorization: Bearer <token>` metadata (Basic as on HTTP).
    With `keys` (only the Completions service, a model-call front like /v1 and /ws), an API key counts too.
    """
    authorization = next((str(value) for name, value in metadata or () if name.lower() == "authorization"), "")
    token, _ = token_from_headers(authorization, {})
    if token is None:
        raise AuthRefused(401, "unauthorized", "no token: send `authorization: Bearer <token>` metadata")
    return await _alookup(token, keys=keys)
