"""Django's own middleware, in the event loop for async requests.

Under ASGI, Django runs each sync `process_request` / `process_response` of a MiddlewareMixin on a thread
(sync_to_async, thread-sensitive): thirteen thread hops for every async request here (a prompt, each SSE
subscribe), on a thread made for the request and kept until its response ends (an SSE stream's whole
life). The classes below do no I/O in those steps, or only in cases they check for (a session or messages
that were used): those still go to the thread. Sync requests run as Django runs them. CsrfViewMiddleware
stays Django's (with CSRF_USE_SESSIONS its request step reads the session). Imported by Django's
middleware loading only (MIDDLEWARE), once the apps are ready.
"""

from asgiref.sync import sync_to_async
from django.contrib.auth import middleware as django_auth
from django.contrib.messages import middleware as django_messages
from django.contrib.sessions import middleware as django_sessions
from django.middleware import clickjacking as django_clickjacking
from django.middleware import common as django_common
from django.middleware import security as django_security


def _loop_safe(base, *, response_on_loop=None):
    """`base` with its process_request, and its process_response when `response_on_loop(request)`
    says so (always, without it), run in the event loop for async requests; sync requests as before."""

    class LoopSafe(base):
        async def __acall__(self, request):
            response = None
            if hasattr(self, "process_request"):
                response = self.process_request(request)
            response = response or await self.get_response(request)
            if hasattr(self, "process_response"):
                if response_on_loop is None or response_on_loop(request):
                    response = self.process_response(request, response)
                else:
                    response = await sync_to_async(self.process_response, thread_sensitive=True)(request, response)
            return response

    LoopSafe.__name__ = LoopSafe.__qualname__ = base.__name__
    LoopSafe.__doc__ = f"Django's {base.__name__}, in the event loop for async requests (see the module)."
    return LoopSafe


def _session_unused(request) -> bool:
    # Never read nor written: process_response neither saves nor loads it.
    session = getattr(request, "session", None)
    return session is None or not session.accessed


def _messages_unused(request) -> bool:
    # Nothing read nor added: `update` stores nothing (storing may write the session).
    storage = getattr(request, "_messages", None)
    return storage is None or not (storage.used or storage.added_new)


SecurityMiddleware = _loop_safe(django_security.SecurityMiddleware)
SessionMiddleware = _loop_safe(django_sessions.SessionMiddleware, response_on_loop=_session_unused)
CommonMiddleware = _loop_safe(django_common.CommonMiddleware)
AuthenticationMiddleware = _loop_safe(django_auth.AuthenticationMiddleware)
MessageMiddleware = _loop_safe(django_messages.MessageMiddleware, response_on_loop=_messages_unused)
XFrameOptionsMiddleware = _loop_safe(django_clickjacking.XFrameOptionsMiddleware)
