from django.urls import path, re_path

from proxy.usage.api import UsageView
from proxy.views import proxy_view

urlpatterns = [
    re_path(r"^v1/(?P<path>.*)$", proxy_view, name="proxy"),
    path("usage", UsageView.as_view()),
]
