from django.urls import path

from chats import api, conversations, web

urlpatterns = [
    path("chat/create", api.ChatCreateView.as_view()),
    path("chat/read", api.ChatReadView.as_view()),
    path("chat/update", api.ChatUpdateView.as_view()),
    path("chat/delete", api.ChatDeleteView.as_view()),
    path("chat/index", api.ChatIndexView.as_view()),
    path("chat/prompt", api.chat_prompt),
    path("chat/stream", api.chat_stream),
    path("chat/stop", api.chat_stop),
    path("chat/user/add", api.ChatUserAddView.as_view()),
    path("chat/user/remove", api.ChatUserRemoveView.as_view()),
    path("chat/message/delete", api.MessageDeleteView.as_view()),
    # the conversation API
    path("api/conversations/create", conversations.ConversationCreateView.as_view()),
    path("api/conversations/list", conversations.ConversationListView.as_view()),
    path("api/conversations/history/<int:number>", conversations.ConversationHistoryView.as_view()),
    path("api/conversations/del/<int:number>", conversations.ConversationDeleteView.as_view()),
    path("api/chat/<int:number>", conversations.conversation_chat),
    path("api/chat/<int:number>/", conversations.conversation_chat),
    # the web app's pages
    path("", web.index_page),
    path("chats/<uuid:chat_id>", web.chat_page),
    path("groups/<uuid:group_id>", web.group_page),
]
