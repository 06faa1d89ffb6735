from django.urls import path

from proxy.consumers import RpcConsumer

websocket_urlpatterns = [
    path("ws", RpcConsumer.as_asgi()),
]
