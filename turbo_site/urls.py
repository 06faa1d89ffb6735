"""The whole URL map at a glance."""

from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from turbo_site import health

urlpatterns = [
    path("admin/", admin.site.urls),
    path("health", health.health),
    path("info", health.info),
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
