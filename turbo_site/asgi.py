"""ASGI entry point: HTTP goes to Django, WebSockets to Channels consumers."""

import gc
import os
import sys

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "turbo_site.settings")

# The event loop shares the GIL with the event-log writer and the database threads. CPython lets a
# busy thread keep the GIL for 5 ms before it must hand over; 1 ms bounds how long a batch write or a
# query can hold up the loop (and so every request in flight) at a small cost in switches.
sys.setswitchinterval(0.001)

from channels.routing import ProtocolTypeRouter  # noqa: E402
from django.core.asgi import get_asgi_application  # noqa: E402

from turbo_site.core.staticfiles import StaticFiles  # noqa: E402

# /static/ is answered from WhiteNoise's index (collected, compressed, hashed names once STATIC_ROOT is
# set); every other path goes straight to Django, so the async views never pass through sync-only code.
django_application = StaticFiles(get_asgi_application())

from turbo_site.core.startup import process_start  # noqa: E402

# Log redaction, tracing (when OTEL_EXPORTER_OTLP_ENDPOINT is set) and metrics, as in every Turbo process;
# after Django's logging setup, so that the filters sit on the loggers the server configured.
process_start("asgi")

from proxy.usage.tokens import encodings_warm  # noqa: E402

# The token counts' encodings (~0.2 s each), built in a thread from now on: no request waits for them.
encodings_warm()

from chats.routing import websocket_urlpatterns as chat_websockets  # noqa: E402
from proxy.fast import ProxyFastPath  # noqa: E402
from proxy.routing import websocket_urlpatterns as rpc_websockets  # noqa: E402
from turbo_site.core.tracing import TracedHTTP  # noqa: E402
from turbo_site.core.websockets import WebSocketRouter  # noqa: E402
from turbo_site.graphql_server import websocket_urlpatterns as graphql_websockets  # noqa: E402
from turbo_site.lifespan import lifespan  # noqa: E402

# Consumers check the Origin themselves (accounts.auth's policy table): this server, or
# CORS_ALLOWED_ORIGINS; a client that sends none (not a browser) is judged by its token alone.
application = ProtocolTypeRouter(
    {
        # /v1/ calls from API clients skip Django's middleware (proxy.fast); the rest is Django's.
        "http": TracedHTTP(ProxyFastPath(django_application)),  # a span per request when tracing is on
        "websocket": WebSocketRouter(chat_websockets + rpc_websockets + graphql_websockets),  # 4404, 1013
        "lifespan": lifespan,
    }
)

from turbo_site.core.metrics import asgi_middleware as metered  # noqa: E402

application = metered(application)  # HTTP and WebSocket requests by route group, while /metrics is on

# What is loaded by now (Django, the apps, the SDKs) lives as long as the process: move it out of the
# garbage collector's sight, so that its full collections (the longest pauses) no longer walk it.
gc.freeze()
