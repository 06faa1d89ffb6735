from django.urls import path, re_path

from proxy.usage import web as usage_web
from proxy.usage.api import UsageView
from proxy.views import proxy_view

urlpatterns = [
    re_path(r"^v1/(?P<path>.*)$", proxy_view, name="proxy"),
    path("usage", usage_web.usage),  # the page for browsers; otherwise the API's GET /usage (below)
    # Never reached (the line above answers /usage first): the API's GET /usage, named for the schema.
    path("usage", UsageView.as_view()),
]
