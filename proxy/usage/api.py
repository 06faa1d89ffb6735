"""`GET /usage`: what a user's model calls (or, for its owner, a group's) used and cost."""

from datetime import timedelta

from django.utils import timezone
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import serializers
from rest_framework.response import Response
from rest_framework.views import APIView

from proxy.usage.selectors import moment_parse, usage_report_for
from turbo_site.core.schema import errors

DEFAULT_SPAN = timedelta(days=30)


class MomentField(serializers.CharField):
    """`7d`, `24h`, `2w`, an ISO date or an ISO date-time."""

    def to_internal_value(self, data):
        text = super().to_internal_value(data)
        if len(text) > 40:
            raise serializers.ValidationError("is too long")
        try:
            return moment_parse(text)
        except ValueError as exc:
            raise serializers.ValidationError(str(exc)) from None


class UsageInput(serializers.Serializer):
    group_id = serializers.UUIDField(required=False, help_text="a group's usage instead of your own (owners only)")
    since = MomentField(required=False, help_text="start: 7d, 24h, 2w, a date or a date-time (30d)")
    until = MomentField(required=False, help_text="end, excluded: same forms (now)")
    by = serializers.ChoiceField(
        choices=["day", "model", "key"], required=False, help_text="rows per day, model or key"
    )

    def validate(self, data):
        if data.get("since") and data.get("until") and data["since"] >= data["until"]:
            raise serializers.ValidationError({"since": "must be before until"})
        return data


class UsageTotals(serializers.Serializer):
    requests = serializers.IntegerField()
    input_tokens = serializers.IntegerField(help_text="cached input tokens included")
    output_tokens = serializers.IntegerField()
    cached_tokens = serializers.IntegerField()
    cost_usd = serializers.CharField(help_text="USD, exact decimal text")
    estimated_requests = serializers.IntegerField(help_text="calls counted offline: the upstream gave no usage")


class UsageRow(UsageTotals):
    day = serializers.DateField(required=False, help_text="by=day (UTC)")
    model = serializers.CharField(required=False, help_text="by=model")
    key_id = serializers.UUIDField(required=False, allow_null=True, help_text="by=key; null: calls without a key")


class UsageOutput(serializers.Serializer):
    total = UsageTotals()
    rows = UsageRow(many=True)


class UsageView(APIView):
    @extend_schema(
        parameters=[
            OpenApiParameter("group_id", str, description="a group's usage instead of your own (owners only)"),
            OpenApiParameter("since", str, description="start: 7d, 24h, 2w, a date or an ISO date-time (default 30d)"),
            OpenApiParameter("until", str, description="end, excluded: the same forms (default now)"),
            OpenApiParameter("by", str, enum=["day", "model", "key"], description="rows per day, model or API key"),
        ],
        responses={200: UsageOutput, **errors(400, 401, 403, 404)},
        summary="Usage and cost of your model calls, or of a group's (owners only), from hourly rollups",
    )
    def get(self, request):
        parsed = UsageInput(data=request.query_params)
        parsed.is_valid(raise_exception=True)
        fields = parsed.validated_data
        until = fields.get("until") or timezone.now()
        report = usage_report_for(
            user=request.user,
            since=fields.get("since") or until - DEFAULT_SPAN,
            until=until,
            by=fields.get("by"),
            group_id=fields.get("group_id"),
        )
        return Response(report)  # shaped by the selector (UsageOutput documents it: rows carry only their column)
