"""The whole URL map at a glance."""

from django.contrib import admin
from django.templatetags.static import static
from django.urls import include, path
from django.utils.functional import lazy
from django.views.generic import RedirectView
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from accounts.web import web_page
from proxy.dashboard import usage_dashboard
from turbo_site import health
from turbo_site.graphql_server import graphql_view
from turbo_site.metrics_view import metrics_view

urlpatterns = [
    path("admin/usage/", usage_dashboard, name="admin_usage"),  # before the admin's own catch-all
    path("admin/", admin.site.urls),
    # Browsers ask for /favicon.ico on any page (the admin, Swagger, JSON): the web app's icon. Its (hashed)
    # name is looked up per request: in production it exists only once the static files are collected.
    path("favicon.ico", web_page(RedirectView.as_view(url=lazy(static, str)("turbo/favicon.svg"), permanent=True))),
    path("health", health.health),
    path("info", health.info),
    path("ws", health.websocket_only),  # the WebSocket itself is routed in asgi.py
    path("graphql", graphql_view),
    path("metrics", metrics_view),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="docs"),
    path("", include("accounts.urls")),
    path("", include("groups.urls")),
    path("", include("chats.urls")),
    path("", include("proxy.urls")),
]

handler400 = "turbo_site.core.errors.bad_request"
handler403 = "turbo_site.core.errors.permission_denied"
handler404 = "turbo_site.core.errors.page_not_found"
handler500 = "turbo_site.core.errors.server_error"
