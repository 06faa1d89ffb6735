from django.urls import path, re_path

from proxy.usage.api import UsageView
from proxy.views import proxy_view

urlpatterns = [
    re_path(r"^v1/(?P<path>.*)$", proxy_view, name="proxy"),
    # Requests reach this through chats.web.usage (listed first in turbo_site/urls.py), which serves the
    # web page to browsers at the same path; the route stays here so the API and its schema are this app's.
    path("usage", UsageView.as_view()),
]
