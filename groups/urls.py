from django.urls import path

from groups import api, web

urlpatterns = [
    path("group/create", api.GroupCreateView.as_view()),
    path("group/read", api.GroupReadView.as_view()),
    path("group/update", api.GroupUpdateView.as_view()),
    path("group/delete", api.GroupDeleteView.as_view()),
    path("group/index", api.GroupIndexView.as_view()),
    path("group/members", api.GroupMembersView.as_view()),
    path("group/members/add", api.GroupMembersAddView.as_view()),
    path("group/members/remove", api.GroupMembersRemoveView.as_view()),
    # the web app's pages
    path("groups/new", web.group_new_page),
    # /groups/<id>, the group's page, is chats.urls' (it lists the group's chats)
]
