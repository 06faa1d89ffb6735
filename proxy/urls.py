from django.urls import re_path

from proxy.views import proxy_view

urlpatterns = [
    re_path(r"^v1/(?P<path>.*)$", proxy_view, name="proxy"),
]
