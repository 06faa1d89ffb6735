"""Records every authenticated request, and every account event, in the event log."""

import time

from django.conf import settings

from proxy.events import capture_body, event_record
from turbo_site.core.http import client_ip
from turbo_site.core.middleware import TurboMiddleware


def _event_type(request, status: int) -> str | None:
    """login/signup/logout/password_change as marked by the view; "request" for any other signed-in call."""
    marked = getattr(request, "turbo_event_type", None)
    user_id = getattr(request, "turbo_user_id", None)
    if marked == "login" and status >= 400:
        return "login_failed"
    if marked and (status < 400 or user_id is not None):
        return marked
    if user_id is not None:
        return "request"
    return None


class event_log(TurboMiddleware):
    """Outermost: times the whole request; the log write itself happens later, in batches."""

    def before(self, request):
        request.turbo_started = time.perf_counter()
        if settings.EVENT_CAPTURE_BODIES and request.method not in ("GET", "HEAD", "OPTIONS"):
            request.body  # noqa: B018 - read now, so it can still be captured after DRF parsed it
        return None

    def after(self, request, response):
        if getattr(request, "turbo_event_handled", False):
            return response  # the proxy logs its own, once the stream has ended
        event_type = _event_type(request, response.status_code)
        if event_type is None:
            return response
        capture = settings.EVENT_CAPTURE_BODIES
        event_record(
            type=event_type,
            user_id=getattr(request, "turbo_user_id", None),
            method=request.method,
            path=request.path,
            query=request.META.get("QUERY_STRING", ""),
            status=response.status_code,
            duration_ms=(time.perf_counter() - request.turbo_started) * 1000,
            client_ip=client_ip(request),
            request_body=capture_body(request.body, request.content_type) if capture else "",
            response_body=(
                capture_body(response.content, response.get("Content-Type", ""))
                if capture and not response.streaming
                else ""
            ),
        )
        return response
