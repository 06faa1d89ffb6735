"""The user API: the /user/* paths, API keys (/user/keys/*) and the JWT flavour's /api/users/* paths."""

from dataclasses import replace

from django.conf import settings
from django.contrib.auth.validators import UnicodeUsernameValidator
from django.core.exceptions import ObjectDoesNotExist
from django.db import transaction
from drf_spectacular.utils import extend_schema, extend_schema_field, inline_serializer
from rest_framework import serializers
from rest_framework.permissions import AllowAny
from rest_framework.response import Response
from rest_framework.views import APIView

from accounts import keys, selectors, services
from accounts.auth import (
    COOKIE_NAME,
    CROSS_SITE_MESSAGE,
    AuthRefused,
    authenticate,
    carries_credential,
    request_credentials,
    request_origin_allowed,
)
from accounts.model_path import key_budget_set
from accounts.models import User
from turbo_site.core.errors import Conflict, Invalid
from turbo_site.core.http import client_ip, mark_event
from turbo_site.core.schema import EmptyResponse, errors, get_and_post
from turbo_site.core.serializers import StrictCharField, request_input

USERNAME_FIELD = {"max_length": 150, "validators": [UnicodeUsernameValidator()]}
PASSWORD_FIELD = {"max_length": 1024, "trim_whitespace": False}
# A password being set: its length rule (the services check it too) stated where the schema shows it.
NEW_PASSWORD_FIELD = {**PASSWORD_FIELD, "min_length": settings.PASSWORD_MIN_LENGTH}
NAME_FIELD = {"max_length": 150, "required": False, "allow_blank": True}


# --- output shapes --------------------------------------------------------------------------------


class GroupBriefOutput(serializers.Serializer):
    id = serializers.UUIDField()
    name = serializers.CharField()
    description = serializers.CharField()
    owner_id = serializers.UUIDField()


class UserBriefOutput(serializers.Serializer):
    """A user as other users see them (in member lists)."""

    id = serializers.UUIDField()
    username = serializers.CharField()
    first_name = serializers.CharField()
    last_name = serializers.CharField()


class UserOutput(UserBriefOutput):
    groups = serializers.SerializerMethodField()

    @extend_schema_field(GroupBriefOutput(many=True))
    def get_groups(self, user) -> list[dict]:
        return GroupBriefOutput(selectors.user_groups(user=user), many=True).data


class SessionOutput(serializers.Serializer):
    id = serializers.UUIDField()
    kind = serializers.CharField()
    created_at = serializers.DateTimeField()
    expires_at = serializers.DateTimeField()
    last_used_at = serializers.DateTimeField(allow_null=True)
    client_ip = serializers.IPAddressField(allow_null=True)
    user_agent = serializers.CharField()


TokenUserOutput = inline_serializer("TokenUser", {"token": serializers.CharField(), "user": UserOutput()})
UserEnvelope = inline_serializer("UserEnvelope", {"user": UserOutput()})
Empty = EmptyResponse


def user_payload(user: User) -> dict:
    return UserOutput(user).data


def _start_session(request, user: User, *, kind: str = "token") -> str:
    _, token = services.session_create(
        user=user, kind=kind, client_ip=client_ip(request), user_agent=request.META.get("HTTP_USER_AGENT", "")
    )
    return token


def _with_cookie(request, response: Response, token: str) -> Response:
    response.set_cookie(
        COOKIE_NAME,
        token,
        max_age=int(settings.SESSION_TTL.total_seconds()),
        path="/",
        httponly=True,
        samesite="Lax",
        secure=request.is_secure(),
    )
    return response


def _refuse_cross_site(request) -> None:
    """Login CSRF: a foreign page must not sign a browser in or out."""
    if not request_origin_allowed(request):
        raise AuthRefused(CROSS_SITE_MESSAGE, status=403)


class PublicAPIView(APIView):
    """Endpoints reachable without a session (a stale cookie must not stand in the way)."""

    authentication_classes: list = []
    permission_classes = [AllowAny]


# --- /user/* --------------------------------------------------------------------------------------


class SignupInput(serializers.Serializer):
    username = StrictCharField(**USERNAME_FIELD)
    password = StrictCharField(**NEW_PASSWORD_FIELD)
    first_name = StrictCharField(**NAME_FIELD)
    last_name = StrictCharField(**NAME_FIELD)
    group_name = StrictCharField(max_length=100, required=False, allow_blank=True)


class LoginInput(serializers.Serializer):
    username = StrictCharField(max_length=150)
    password = StrictCharField(**PASSWORD_FIELD)


def _log_in(request) -> User:
    """Check the credentials of a login request (either flavour); the login is logged as an event."""
    mark_event(request, event_type="login")
    _refuse_cross_site(request)
    data = LoginInput(data=request_input(request))
    data.is_valid(raise_exception=True)
    user = services.user_authenticate(**data.validated_data, client_ip=client_ip(request))
    mark_event(request, user_id=user.pk)
    return user


class SignupView(PublicAPIView):
    @extend_schema(
        request=SignupInput,
        responses={200: TokenUserOutput, **errors(400, 409, 413, 415)},
        summary="Create an account and its first group; signs in",
    )
    def post(self, request):
        mark_event(request, event_type="signup")
        _refuse_cross_site(request)
        data = SignupInput(data=request_input(request))
        data.is_valid(raise_exception=True)
        user = services.user_create(**data.validated_data)
        mark_event(request, user_id=user.pk)
        token = _start_session(request, user)
        return _with_cookie(request, Response({"token": token, "user": user_payload(user)}), token)


class LoginView(PublicAPIView):
    @extend_schema(
        request=LoginInput,
        responses={200: TokenUserOutput, **errors(400, 401, 429)},
        summary="Sign in with username and password; sets the sess cookie",
    )
    def post(self, request):
        user = _log_in(request)
        token = _start_session(request, user)
        return _with_cookie(request, Response({"token": token, "user": user_payload(user)}), token)


class LogoutInput(serializers.Serializer):
    token = StrictCharField(max_length=4096, required=False)


@get_and_post(request=LogoutInput, responses={200: Empty, **errors(400, 401)}, summary="Sign out one session")
class LogoutView(PublicAPIView):
    """Revokes the session of the token sent (header, cookie, or a `token` field) and clears the cookie."""

    def post(self, request):
        mark_event(request, event_type="logout")
        data = LogoutInput(data=request_input(request))
        data.is_valid(raise_exception=True)
        credentials = replace(
            request_credentials(request._request, "logout"), parameter=data.validated_data.get("token")
        )
        response = Response({})
        response.delete_cookie(COOKIE_NAME, path="/", samesite="Lax")
        try:
            found = authenticate("logout", credentials)  # a key is revoked through /user/keys/revoke: 403
        except AuthRefused as refused:
            if refused.status_code != 401 or not carries_credential("logout", credentials):
                raise
            # A token that no longer works: the browser may forget it.
            response.status_code = 401
            response.data = {"error": {"code": refused.code, "message": refused.message}}
            for name, value in refused.headers.items():
                response[name] = value
            return response
        mark_event(request, user_id=found.user.pk)
        services.session_revoke(session_id=found.session_id)
        return response


@get_and_post(
    responses={
        200: inline_serializer("UserSession", {"user": UserOutput(), "session": SessionOutput()}),
        **errors(401),
    },
    summary="The caller's user and session",
)
class SessionView(APIView):
    def post(self, request):
        session = selectors.session_get(session_id=request.auth.session_id)
        return Response({"user": user_payload(request.user), "session": SessionOutput(session).data})


class UserIdInput(serializers.Serializer):
    id = serializers.UUIDField()


@get_and_post(request=UserIdInput, responses={200: UserEnvelope, **errors(400, 401, 404)}, summary="Read your own user")
class UserReadView(APIView):
    def post(self, request):
        data = UserIdInput(data=request_input(request))
        data.is_valid(raise_exception=True)
        user = selectors.user_visible(viewer=request.user, user_id=data.validated_data["id"])
        return Response({"user": user_payload(user)})


class UserUpdateInput(serializers.Serializer):
    id = serializers.UUIDField()
    first_name = StrictCharField(max_length=150, required=False, allow_blank=True)
    last_name = StrictCharField(max_length=150, required=False, allow_blank=True)
    username = StrictCharField(**USERNAME_FIELD, required=False)


class UserUpdateView(APIView):
    @extend_schema(
        request=UserUpdateInput,
        responses={200: UserEnvelope, **errors(400, 401, 404, 409)},
        summary="Update your own profile (only the fields given change)",
    )
    def post(self, request):
        data = UserUpdateInput(data=request_input(request))
        data.is_valid(raise_exception=True)
        fields = dict(data.validated_data)
        user = selectors.user_visible(viewer=request.user, user_id=fields.pop("id"))
        user = services.user_update(user=user, **fields)
        return Response({"user": user_payload(user)})


class PasswordUpdateInput(serializers.Serializer):
    old_password = StrictCharField(**PASSWORD_FIELD)
    new_password = StrictCharField(**NEW_PASSWORD_FIELD)


class PasswordUpdateView(APIView):
    @extend_schema(
        request=PasswordUpdateInput,
        responses={200: Empty, **errors(400, 401, 429)},
        summary="Change your password; every other session is signed out",
    )
    def post(self, request):
        mark_event(request, event_type="password_change")
        data = PasswordUpdateInput(data=request_input(request))
        data.is_valid(raise_exception=True)
        services.user_password_change(
            user=request.user,
            session_id=request.auth.session_id,
            client_ip=client_ip(request),
            **data.validated_data,
        )
        return Response({})


# --- /api/users/* (JWT) --------------------------------------------------------------------------


class RegisterInput(serializers.Serializer):
    username = StrictCharField(**USERNAME_FIELD)
    password = StrictCharField(**NEW_PASSWORD_FIELD)


class RegisterView(PublicAPIView):
    @extend_schema(
        request=RegisterInput,
        responses={201: inline_serializer("Registered", {"message": serializers.CharField()}), **errors(400)},
        summary="Register (the JWT flavour); a taken username is a 400",
    )
    def post(self, request):
        mark_event(request, event_type="signup")
        _refuse_cross_site(request)
        data = RegisterInput(data=request_input(request))
        data.is_valid(raise_exception=True)
        try:
            user = services.user_create(**data.validated_data)
        except Conflict as exc:
            raise Invalid("username already exists", code="username_taken") from exc
        mark_event(request, user_id=user.pk)
        return Response({"message": "User registered successfully"}, status=201)


class JwtLoginView(PublicAPIView):
    @extend_schema(
        request=LoginInput,
        responses={200: inline_serializer("JwtToken", {"token": serializers.CharField()}), **errors(400, 401, 429)},
        summary="Sign in for a JWT (HS256, 24 h), usable wherever a token is",
    )
    def post(self, request):
        return Response({"token": _start_session(request, _log_in(request), kind="jwt")})


# --- /user/keys/* ---------------------------------------------------------------------------------


class ModelNameListField(serializers.ListField):
    """Public model names: a JSON array, repeated form fields, or one comma-separated string."""

    def __init__(self, **kwargs):
        kwargs.setdefault("child", StrictCharField(max_length=keys.MODEL_NAME_MAX_CHARS))
        kwargs.setdefault("max_length", keys.MODELS_MAX)
        super().__init__(**kwargs)

    def to_internal_value(self, data):
        if isinstance(data, str):
            data = [name.strip() for name in data.split(",") if name.strip()]
        return super().to_internal_value(data)


class ApiKeyCreateInput(serializers.Serializer):
    name = StrictCharField(max_length=keys.NAME_MAX_CHARS)
    expires_at = serializers.DateTimeField(required=False, allow_null=True, help_text="omitted or null: never")
    models = ModelNameListField(required=False, help_text="public model names the key may use; empty: any you may")
    group_id = serializers.UUIDField(
        required=False, allow_null=True, help_text="a group you own: the key is limited to what it allows"
    )
    rpm = serializers.IntegerField(
        required=False,
        allow_null=True,
        min_value=1,
        max_value=keys.LIMIT_PER_MINUTE_MAX,
        help_text="the key's requests per minute; omitted: the default",
    )
    tpm = serializers.IntegerField(
        required=False,
        allow_null=True,
        min_value=1,
        max_value=keys.LIMIT_PER_MINUTE_MAX,
        help_text="the key's tokens per minute; omitted: the default",
    )
    budget_usd = serializers.DecimalField(
        max_digits=14,
        decimal_places=6,
        min_value=0,
        required=False,
        allow_null=True,
        help_text="the key's budget in USD per budget_period; omitted: none of its own",
    )
    budget_period = serializers.ChoiceField(
        choices=["day", "week", "month", "total"], required=False, default="month", help_text="default: month"
    )


class ApiKeyIdInput(serializers.Serializer):
    id = serializers.UUIDField()


class ApiKeyOutput(serializers.Serializer):
    """A key as lists show it: never the key itself, nor its hash."""

    id = serializers.UUIDField()
    name = serializers.CharField()
    prefix = serializers.CharField(help_text="the key's first characters, to tell keys apart")
    created_at = serializers.DateTimeField()
    expires_at = serializers.DateTimeField(allow_null=True)
    last_used_at = serializers.DateTimeField(allow_null=True)
    models = serializers.ListField(child=serializers.CharField())
    group_id = serializers.UUIDField(allow_null=True)
    rpm = serializers.IntegerField(allow_null=True, help_text="requests per minute; null: the default")
    tpm = serializers.IntegerField(allow_null=True, help_text="tokens per minute; null: the default")
    budget_usd = serializers.SerializerMethodField(help_text="the key's own budget in USD (a string); null: none")
    budget_period = serializers.SerializerMethodField(help_text="day, week, month or total; null: no budget")

    def _budget(self, api_key):
        try:
            return api_key.budget  # the reverse side of proxy's Budget.key (selected with the key)
        except ObjectDoesNotExist:
            return None

    def get_budget_usd(self, api_key) -> str | None:
        budget = self._budget(api_key)
        return f"{budget.limit_usd.normalize():f}" if budget else None

    def get_budget_period(self, api_key) -> str | None:
        budget = self._budget(api_key)
        return budget.period if budget else None


class ApiKeyCreatedOutput(serializers.Serializer):
    key = serializers.CharField(help_text="the key (`tk-...`): shown only this once")
    id = serializers.UUIDField()
    name = serializers.CharField()
    prefix = serializers.CharField()
    created_at = serializers.DateTimeField()
    expires_at = serializers.DateTimeField(allow_null=True)
    models = serializers.ListField(child=serializers.CharField())
    group_id = serializers.UUIDField(allow_null=True)
    rpm = serializers.IntegerField(allow_null=True)
    tpm = serializers.IntegerField(allow_null=True)
    budget_usd = serializers.CharField(allow_null=True)
    budget_period = serializers.CharField(allow_null=True)


class ApiKeyCreateView(APIView):
    @extend_schema(
        request=ApiKeyCreateInput,
        responses={200: ApiKeyCreatedOutput, **errors(400, 401, 403, 404, 409)},
        summary="Create an API key for /v1/* and /ws; the key is shown only in this answer",
    )
    def post(self, request):
        data = ApiKeyCreateInput(data=request_input(request))
        data.is_valid(raise_exception=True)
        fields = dict(data.validated_data)
        budget_usd, budget_period = fields.pop("budget_usd", None), fields.pop("budget_period")
        with transaction.atomic():
            api_key, key = keys.api_key_create(user=request.user, **fields)
            if budget_usd is not None:  # proxy's, lent to accounts (accounts.model_path)
                key_budget_set(key_id=api_key.pk, usd=budget_usd, period=budget_period)
        api_key = keys.api_keys_of(request.user).get(pk=api_key.pk)
        return Response(ApiKeyCreatedOutput({"key": key, **ApiKeyOutput(api_key).data}).data)


@get_and_post(
    responses={200: inline_serializer("ApiKeyList", {"keys": ApiKeyOutput(many=True)}), **errors(401, 403)},
    summary="Your API keys that are not revoked, newest first (never the keys themselves)",
)
class ApiKeyListView(APIView):
    def post(self, request):
        return Response({"keys": ApiKeyOutput(keys.api_keys_of(request.user), many=True).data})


class ApiKeyRevokeView(APIView):
    @extend_schema(
        request=ApiKeyIdInput,
        responses={200: Empty, **errors(400, 401, 403, 404)},
        summary="Revoke one of your API keys, at once everywhere",
    )
    def post(self, request):
        data = ApiKeyIdInput(data=request_input(request))
        data.is_valid(raise_exception=True)
        keys.api_key_revoke(user=request.user, key_id=data.validated_data["id"])
        return Response({})
