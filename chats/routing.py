from django.urls import path

from chats.consumers import ChatStreamConsumer

websocket_urlpatterns = [
    path("chat/stream", ChatStreamConsumer.as_asgi()),
]
