from django.urls import path

from groups import api

urlpatterns = [
    path("group/create", api.GroupCreateView.as_view()),
    path("group/read", api.GroupReadView.as_view()),
    path("group/update", api.GroupUpdateView.as_view()),
    path("group/delete", api.GroupDeleteView.as_view()),
    path("group/index", api.GroupIndexView.as_view()),
    path("group/members", api.GroupMembersView.as_view()),
    path("group/members/add", api.GroupMembersAddView.as_view()),
    path("group/members/remove", api.GroupMembersRemoveView.as_view()),
]
