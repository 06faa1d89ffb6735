"""The web app's sign-in pages (/login, /signup, /logout) and what every page view shares.

A page signs a browser in exactly as the API's /user/login does: the same session service, the same
`sess` cookie. Page forms are CSRF-protected by Django (the JSON API relies on its Origin check instead);
every page goes out with a strict Content-Security-Policy, as no page has inline script or style.
"""

import functools
from urllib.parse import urlencode

from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.middleware.csrf import rotate_token
from django.shortcuts import render
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.csrf import csrf_protect
from django.views.decorators.http import require_http_methods

from accounts import services
from accounts.api import LoginInput, SignupInput, _start_session, _with_cookie
from accounts.auth import COOKIE_NAME, AuthRefused, authenticate, request_credentials
from accounts.models import User
from turbo_site.core.errors import Forbidden, NotFound, TurboError
from turbo_site.core.http import client_ip, mark_event

# --- what every page shares -----------------------------------------------------------------------


def web_page(view):
    """Marks a view as a page of the web app: HTML for people, not an endpoint of the API's schema."""
    view.is_web_page = True
    return view


def _content_security_policy(request: HttpRequest) -> str:
    socket_origin = ("wss://" if request.is_secure() else "ws://") + request.get_host()
    return (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        f"connect-src 'self' {socket_origin}; form-action 'self'; frame-ancestors 'none'; "
        "base-uri 'none'; object-src 'none'"
    )


def page(request: HttpRequest, template: str, context: dict | None = None, *, status: int = 200) -> HttpResponse:
    """Render a page of the web app; `me` (the signed-in user, if any) is in every template's context."""
    session = getattr(request, "turbo_session", None)
    response = render(request, template, {"me": session.user if session else None, **(context or {})}, status=status)
    response.is_page = True  # error statuses stay HTML (turbo_site.core.middleware.json_errors)
    response["Content-Security-Policy"] = _content_security_policy(request)
    response["Cache-Control"] = "no-store"  # pages show private chats: never from a shared or back cache
    return response


def error_page(request: HttpRequest, status: int, title: str, message: str) -> HttpResponse:
    return page(request, "web/error.html", {"title": title, "message": sentence(message)}, status=status)


def sentence(text: str) -> str:
    """A service's message ("chat not found") as a sentence for a page ("Chat not found.")."""
    text = text.strip()
    if not text:
        return text
    text = text[0].upper() + text[1:]
    return text if text.endswith((".", "!", "?")) else text + "."


def form_error(errors: dict) -> str:
    """The first of a serializer's errors, as one line naming its field."""
    for field, messages in errors.items():
        message = messages[0] if isinstance(messages, list) and messages else str(messages)
        if isinstance(message, dict):  # a nested field: say which field, not its inner structure
            message = "is not valid"
        message = str(message)
        if field in ("non_field_errors", "request"):
            return sentence(message)
        label = field.replace("_", " ").capitalize()
        return f"{label}: {message[:1].lower()}{message[1:]}"
    return "The form is not valid."


def _login_url(request: HttpRequest) -> str:
    if request.method == "GET" and request.path != "/":
        return "/login?" + urlencode({"next": request.get_full_path()})
    return "/login"


def signed_in(view):
    """A page for signed-in browsers: the `sess` cookie's session becomes request.user and
    request.turbo_session; without one, a redirect to /login. A NotFound or Forbidden from a service
    or selector becomes a 404 or 403 page."""

    @functools.wraps(view)
    def wrapper(request: HttpRequest, *args, **kwargs):
        try:
            session = authenticate("web", request_credentials(request, "web"))
        except AuthRefused:
            response = HttpResponseRedirect(_login_url(request))
            if request.COOKIES.get(COOKIE_NAME):  # expired, revoked or a key: the browser may forget it
                response.delete_cookie(COOKIE_NAME, path="/", samesite="Lax")
            return response
        request.user = session.user
        request.turbo_session = session
        mark_event(request, user_id=session.user.pk)
        try:
            return view(request, *args, **kwargs)
        except NotFound as exc:
            return error_page(request, 404, "Not found", exc.message)
        except Forbidden as exc:
            return error_page(request, 403, "Not allowed", exc.message)

    return wrapper


def csrf_failure(request: HttpRequest, reason: str = "") -> HttpResponse:
    """CSRF_FAILURE_VIEW: a page form sent without a valid token (an old page, or another site's)."""
    return error_page(
        request,
        403,
        "This form has expired",
        "The form was sent without a valid security token (it may be from an old page, or from another site). "
        "Go back, reload the page and try again",
    )


# --- /login, /signup, /logout ---------------------------------------------------------------------


def _safe_next(url: str | None) -> str:
    """`next` if it is a path on this site (never another host, never a scheme)."""
    if not url or not url.startswith("/") or url.startswith(("//", "/\\")):
        return ""
    if not url_has_allowed_host_and_scheme(url, allowed_hosts=None):
        return ""
    return url


def _sign_in(request: HttpRequest, user: User, next_url: str) -> HttpResponse:
    """Start a session as /user/login does (same service, same cookie) and go on to `next_url`."""
    token = _start_session(request, user)
    rotate_token(request)  # a CSRF token seen before signing in is not trusted after
    mark_event(request, user_id=user.pk)
    return _with_cookie(request, HttpResponseRedirect(next_url or "/"), token)


def _credentials(request: HttpRequest) -> dict:
    return {"username": request.POST.get("username", ""), "password": request.POST.get("password", "")}


@web_page
@csrf_protect
@require_http_methods(["GET", "POST"])
def login_page(request: HttpRequest) -> HttpResponse:
    next_url = _safe_next(request.POST.get("next") or request.GET.get("next"))
    if request.method == "GET":
        return page(request, "web/login.html", {"next": next_url})
    mark_event(request, event_type="login")
    data = LoginInput(data=_credentials(request))
    if not data.is_valid():
        error = form_error(data.errors)
    else:
        try:
            user = services.user_authenticate(**data.validated_data, client_ip=client_ip(request))
        except TurboError as exc:  # wrong credentials, or too many failures (rate limited)
            error = sentence(exc.message)
        else:
            return _sign_in(request, user, next_url)
    mark_event(request, event_type="login_failed")
    context = {"next": next_url, "error": error, "username": request.POST.get("username", "")}
    return page(request, "web/login.html", context)


@web_page
@csrf_protect
@require_http_methods(["GET", "POST"])
def signup_page(request: HttpRequest) -> HttpResponse:
    if request.method == "GET":
        return page(request, "web/signup.html")
    mark_event(request, event_type="signup")
    data = SignupInput(data=_credentials(request))
    if not data.is_valid():
        error = form_error(data.errors)
    else:
        try:
            user = services.user_create(**data.validated_data)
        except TurboError as exc:  # a taken username, a weak password
            error = sentence(exc.message)
        else:
            mark_event(request, user_id=user.pk)
            return _sign_in(request, user, "/")
    return page(request, "web/signup.html", {"error": error, "username": request.POST.get("username", "")})


@web_page
@csrf_protect
@require_http_methods(["GET", "POST"])
def logout_page(request: HttpRequest) -> HttpResponse:
    """POST ends this browser's session (as /user/logout does) and clears the cookie; GET asks first."""
    if request.method == "GET":
        return page(request, "web/logout.html")
    mark_event(request, event_type="logout")
    try:
        found = authenticate("web", request_credentials(request, "web"))
    except AuthRefused:
        found = None
    if found is not None:
        mark_event(request, user_id=found.user.pk)
        services.session_revoke(session_id=found.session_id)
    response = HttpResponseRedirect("/login")
    response.delete_cookie(COOKIE_NAME, path="/", samesite="Lax")
    return response
