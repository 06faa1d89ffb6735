"""The web app's group pages: a new group (`/groups/new`), and the forms of a group's page: its owner
renames it and adds and removes members, a member leaves (`INTENTS`).

The group's page itself (`/groups/<id>`: its members and chats) is chats.web's, since it lists chats
(groups imports no app above it); every form on it posts back to it, naming what it does in `intent`.
The rules (only the owner manages, the owner cannot leave) are the services'; a refused request is a
403 page.
"""

from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.views.decorators.csrf import csrf_protect
from django.views.decorators.http import require_http_methods
from rest_framework import serializers

from accounts.selectors import user_find
from accounts.web import form_error, page, sentence, signed_in, web_page
from groups import services
from groups.api import GroupCreateInput
from groups.models import Group
from turbo_site.core.errors import Forbidden, Invalid, NotFound
from turbo_site.core.serializers import StrictCharField


class GroupRenameInput(serializers.Serializer):
    name = StrictCharField(max_length=100)


class MemberAddInput(serializers.Serializer):
    username = StrictCharField(max_length=150)


class MemberRemoveInput(serializers.Serializer):
    user_id = serializers.UUIDField()


@web_page
@csrf_protect
@require_http_methods(["GET", "POST"])
@signed_in
def group_new_page(request: HttpRequest) -> HttpResponse:
    """The new-group form (also on the index page): the same input and service as POST /group/create."""
    if request.method == "GET":
        return page(request, "web/group_new.html")
    data = GroupCreateInput(data={"name": request.POST.get("name", "")})
    if not data.is_valid():
        context = {"error": form_error(data.errors), "name": request.POST.get("name", "")}
        return page(request, "web/group_new.html", context)
    group = services.group_create(owner=request.user, **data.validated_data)
    return HttpResponseRedirect(f"/groups/{group.pk}")


def _parsed(serializer_class, request: HttpRequest, *names: str) -> tuple[dict | None, str]:
    data = serializer_class(data={name: request.POST.get(name, "") for name in names})
    if data.is_valid():
        return dict(data.validated_data), ""
    return None, form_error(data.errors)


def _rename(request: HttpRequest, group: Group) -> dict:
    if group.owner_id != request.user.pk:  # refused whatever the name: a member never sees this form
        raise Forbidden("only the group's owner may rename it")
    fields, error = _parsed(GroupRenameInput, request, "name")
    if fields is None:
        return {"rename": error}
    services.group_update(group=group, user=request.user, name=fields["name"])
    return {}


def _add(request: HttpRequest, group: Group) -> dict:
    if group.owner_id != request.user.pk:
        # Before the name is looked up: only the owner may learn whether a username exists.
        raise Forbidden("only the group's owner may add members")
    fields, error = _parsed(MemberAddInput, request, "username")
    if fields is None:
        return {"add": error}
    try:
        user = user_find(username=fields["username"])
    except NotFound as exc:
        return {"add": sentence(exc.message)}
    services.group_members_add(group=group, user=request.user, user_ids=[user.pk])
    return {}


def _remove(request: HttpRequest, group: Group) -> dict:
    fields, error = _parsed(MemberRemoveInput, request, "user_id")
    if fields is None:
        return {"members": error}
    if group.owner_id != request.user.pk and fields["user_id"] != request.user.pk:
        raise Forbidden("only the group's owner may remove other members")  # the owner included
    try:
        services.group_members_remove(group=group, user=request.user, user_ids=[fields["user_id"]])
    except Invalid as exc:  # the owner cannot be removed
        return {"members": sentence(exc.message)}
    return {"left": True} if fields["user_id"] == request.user.pk else {}


def _leave(request: HttpRequest, group: Group) -> dict:
    try:
        services.group_members_remove(group=group, user=request.user, user_ids=[request.user.pk])
    except Invalid as exc:  # the owner cannot leave their group (their page has no leave form)
        return {"members": sentence(exc.message)}
    return {"left": True}


INTENTS = {"rename": _rename, "add": _add, "remove": _remove, "leave": _leave}
