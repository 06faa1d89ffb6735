"""The group API: the /group/* paths."""

from drf_spectacular.utils import extend_schema, inline_serializer
from rest_framework import serializers
from rest_framework.response import Response
from rest_framework.views import APIView

from accounts.api import UserBriefOutput
from groups import selectors, services
from turbo_site.core.errors import Invalid
from turbo_site.core.schema import EmptyResponse, errors, get_and_post, one_of_required, schema_extra
from turbo_site.core.serializers import IdListField, StrictCharField, StrictUUIDField, request_input


class GroupOutput(serializers.Serializer):
    id = serializers.UUIDField()
    name = serializers.CharField()
    description = serializers.CharField()
    owner_id = serializers.UUIDField()
    created_at = serializers.DateTimeField()
    updated_at = serializers.DateTimeField()


class GroupIdInput(serializers.Serializer):
    id = serializers.UUIDField()


class GroupCreateInput(serializers.Serializer):
    name = StrictCharField(max_length=100)
    description = StrictCharField(max_length=1000, required=False, allow_blank=True)


class GroupUpdateInput(GroupIdInput):
    name = StrictCharField(max_length=100, required=False)
    description = StrictCharField(max_length=1000, required=False, allow_blank=True)


@schema_extra(**one_of_required("group_id", "id"))
class GroupMembersInput(serializers.Serializer):
    group_id = StrictUUIDField(required=False)
    id = StrictUUIDField(required=False)
    user_ids = IdListField()

    def validate(self, data):
        if not data.get("group_id") and not data.get("id"):
            raise Invalid("group_id: this field is required (or send it as id)")
        return data


def _parse(serializer_class, request) -> dict:
    data = serializer_class(data=request_input(request))
    data.is_valid(raise_exception=True)
    return dict(data.validated_data)


def _group_of_member(request, group_id):
    return selectors.group_get_for_member(user=request.user, group_id=group_id)


class GroupCreateView(APIView):
    @extend_schema(request=GroupCreateInput, responses={200: GroupOutput, **errors(400, 401)}, summary="Create a group")
    def post(self, request):
        fields = _parse(GroupCreateInput, request)
        group = services.group_create(owner=request.user, **fields)
        return Response(GroupOutput(group).data)


@get_and_post(request=GroupIdInput, responses={200: GroupOutput, **errors(400, 401, 404)}, summary="Read a group")
class GroupReadView(APIView):
    def post(self, request):
        group = _group_of_member(request, _parse(GroupIdInput, request)["id"])
        return Response(GroupOutput(group).data)


class GroupUpdateView(APIView):
    @extend_schema(
        request=GroupUpdateInput,
        responses={200: GroupOutput, **errors(400, 401, 403, 404)},
        summary="Update a group (owner); only the fields given change",
    )
    def post(self, request):
        fields = _parse(GroupUpdateInput, request)
        group = _group_of_member(request, fields.pop("id"))
        group = services.group_update(group=group, user=request.user, **fields)
        return Response(GroupOutput(group).data)


class GroupDeleteView(APIView):
    @extend_schema(
        request=GroupIdInput, responses={200: EmptyResponse, **errors(400, 401, 403, 404)}, summary="Delete a group"
    )
    def post(self, request):
        group = _group_of_member(request, _parse(GroupIdInput, request)["id"])
        services.group_delete(group=group, user=request.user)
        return Response({})


@get_and_post(
    responses={200: inline_serializer("GroupIndex", {"groups": GroupOutput(many=True)}), **errors(401)},
    summary="The groups you are a member of",
)
class GroupIndexView(APIView):
    def post(self, request):
        return Response({"groups": GroupOutput(selectors.groups_visible_to(user=request.user), many=True).data})


@get_and_post(
    request=GroupIdInput,
    responses={200: inline_serializer("GroupMembers", {"users": UserBriefOutput(many=True)}), **errors(400, 401, 404)},
    summary="A group's members (members only)",
)
class GroupMembersView(APIView):
    def post(self, request):
        group = _group_of_member(request, _parse(GroupIdInput, request)["id"])
        return Response({"users": UserBriefOutput(selectors.group_members(group=group), many=True).data})


class GroupMembersAddView(APIView):
    @extend_schema(
        request=GroupMembersInput,
        responses={200: EmptyResponse, **errors(400, 401, 403, 404)},
        summary="Add members (owner); adding a member twice is a no-op",
    )
    def post(self, request):
        fields = _parse(GroupMembersInput, request)
        group = _group_of_member(request, fields.get("group_id") or fields["id"])
        services.group_members_add(group=group, user=request.user, user_ids=fields["user_ids"])
        return Response({})


class GroupMembersRemoveView(APIView):
    @extend_schema(
        request=GroupMembersInput,
        responses={200: EmptyResponse, **errors(400, 401, 403, 404)},
        summary="Remove members (owner), or leave (yourself); the owner cannot be removed",
    )
    def post(self, request):
        fields = _parse(GroupMembersInput, request)
        group = _group_of_member(request, fields.get("group_id") or fields["id"])
        services.group_members_remove(group=group, user=request.user, user_ids=fields["user_ids"])
        return Response({})
