"""Users, their login sessions and API keys in the Django admin.

A session's token hash (or a key's) never appears on any admin page, nor may a changelist be filtered on
it (that would let anyone with admin access guess it a character at a time). Sessions and keys end only
through the revocation services, which also drop the cached token lookups; so they cannot be added,
edited or deleted here, only revoked.
"""

from django.contrib import admin, messages
from django.contrib.admin.exceptions import NotRegistered
from django.contrib.auth.admin import UserAdmin as DjangoUserAdmin
from django.contrib.auth.forms import AdminPasswordChangeForm, UserCreationForm
from django.contrib.auth.models import Group as AuthGroup
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils.translation import ngettext

from accounts.keys import api_key_revoke
from accounts.models import ApiKey, Session, User
from accounts.services import session_revoke, sessions_revoke_all, user_create

# Turbo's own groups (the `groups` app) take the place of Django's permission groups.
try:
    admin.site.unregister(AuthGroup)
except NotRegistered:
    pass

SECRET_LOOKUPS = ("token_hash", "login_sessions__token_hash", "key_hash", "api_keys__key_hash")


class PasswordChangeEndsSessions(AdminPasswordChangeForm):
    """An operator's password change ends every session of the user, as `users reset` does."""

    def save(self, commit: bool = True) -> User:
        user = super().save(commit=commit)
        if commit:
            sessions_revoke_all(user_id=user.pk)
        return user


@admin.register(User)
class UserAdmin(DjangoUserAdmin):
    list_display = ("username", "first_name", "last_name", "is_staff", "is_active", "date_joined")
    list_filter = ("is_staff", "is_superuser", "is_active", "date_joined")
    search_fields = ("username", "first_name", "last_name")
    ordering = ("username",)
    date_hierarchy = "date_joined"
    actions = ["revoke_all_sessions"]
    # Without Django's permission groups: Turbo's groups are managed under "Groups".
    fieldsets = (
        (None, {"fields": ("username", "password")}),
        ("Personal info", {"fields": ("first_name", "last_name", "email")}),
        ("Permissions", {"fields": ("is_active", "is_staff", "is_superuser", "user_permissions")}),
        ("Important dates", {"fields": ("last_login", "date_joined")}),
    )
    filter_horizontal = ("user_permissions",)
    # A new user always gets a usable password: user_create requires one.
    add_form = UserCreationForm
    add_fieldsets = (
        (
            None,
            {
                "classes": ("wide",),
                "fields": ("username", "first_name", "last_name", "password1", "password2"),
            },
        ),
    )
    change_password_form = PasswordChangeEndsSessions

    def save_form(self, request, form, change):
        user = super().save_form(request, form, change)
        if change:
            return user
        # Through the one creation path, so the new user gets their "Personal" group like at signup.
        return user_create(
            username=form.cleaned_data["username"],
            password=form.cleaned_data["password1"],
            first_name=form.cleaned_data.get("first_name", ""),
            last_name=form.cleaned_data.get("last_name", ""),
        )

    def save_model(self, request, obj, form, change):
        if change:
            super().save_model(request, obj, form, change)
        # On add, save_form has already saved the user through user_create.

    def lookup_allowed(self, lookup, value, request=None):
        return not lookup.startswith(SECRET_LOOKUPS) and super().lookup_allowed(lookup, value, request)

    def has_revoke_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("accounts.change_session")

    @admin.action(description="Revoke all sessions", permissions=["revoke"])
    def revoke_all_sessions(self, request: HttpRequest, queryset: QuerySet[User]) -> None:
        users = list(queryset.values_list("pk", flat=True))
        ended = sum(sessions_revoke_all(user_id=user_id) for user_id in users)
        self.message_user(
            request,
            ngettext("Revoked %(ended)d session", "Revoked %(ended)d sessions", ended) % {"ended": ended}
            + ngettext(" of %(users)d user.", " of %(users)d users.", len(users)) % {"users": len(users)},
            messages.SUCCESS,
        )


class RevokedFilter(admin.SimpleListFilter):
    title = "revoked"
    parameter_name = "revoked"

    def lookups(self, request, model_admin):
        return [("yes", "Yes"), ("no", "No")]

    def queryset(self, request, queryset):
        if self.value() == "yes":
            return queryset.filter(revoked_at__isnull=False)
        if self.value() == "no":
            return queryset.filter(revoked_at__isnull=True)
        return queryset


SESSION_FIELDS = (
    "user",
    "kind",
    "created_at",
    "expires_at",
    "last_used_at",
    "revoked_at",
    "client_ip",
    "user_agent",
)


class CredentialAdmin(admin.ModelAdmin):
    """Sessions and API keys: read only, never filtered on their hashes, and revoked rather than deleted
    (a deleted row's cached lookup would stay valid for a while; revoking also ends open sockets)."""

    revoke_permission = ""

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj=None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj=None) -> bool:
        return False

    def has_revoke_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm(self.revoke_permission)

    def lookup_allowed(self, lookup, value, request=None):
        return not lookup.startswith(SECRET_LOOKUPS) and super().lookup_allowed(lookup, value, request)


@admin.register(Session)
class SessionAdmin(CredentialAdmin):
    # Listed field by field, and token_hash excluded as well, so no later change can bring it onto a page.
    fields = SESSION_FIELDS
    exclude = ("token_hash",)
    readonly_fields = SESSION_FIELDS
    list_display = SESSION_FIELDS
    list_filter = ("kind", RevokedFilter, "created_at")
    list_select_related = ("user",)
    search_fields = ("user__username", "client_ip")
    ordering = ("-created_at",)
    date_hierarchy = "created_at"
    actions = ["revoke_selected_sessions"]

    revoke_permission = "accounts.change_session"

    @admin.action(description="Revoke selected sessions", permissions=["revoke"])
    def revoke_selected_sessions(self, request: HttpRequest, queryset: QuerySet[Session]) -> None:
        active = list(queryset.filter(revoked_at__isnull=True).values_list("pk", flat=True))
        for session_id in active:
            session_revoke(session_id=session_id)
        self.message_user(
            request,
            ngettext("Revoked %(count)d session.", "Revoked %(count)d sessions.", len(active)) % {"count": len(active)},
            messages.SUCCESS,
        )


API_KEY_FIELDS = (
    "name",
    "prefix",
    "user",
    "group",
    "models",
    "rpm",
    "tpm",
    "created_at",
    "expires_at",
    "last_used_at",
    "revoked_at",
)


@admin.register(ApiKey)
class ApiKeyAdmin(CredentialAdmin):
    # Listed field by field, and key_hash excluded as well, so no later change can bring it onto a page.
    fields = API_KEY_FIELDS
    exclude = ("key_hash",)
    readonly_fields = API_KEY_FIELDS
    list_display = API_KEY_FIELDS
    list_filter = (RevokedFilter, "created_at")
    list_select_related = ("user", "group")
    search_fields = ("prefix", "name", "user__username")
    ordering = ("-created_at",)
    date_hierarchy = "created_at"
    actions = ["revoke_selected_keys"]

    revoke_permission = "accounts.change_apikey"

    @admin.action(description="Revoke selected API keys", permissions=["revoke"])
    def revoke_selected_keys(self, request: HttpRequest, queryset: QuerySet[ApiKey]) -> None:
        active = list(queryset.filter(revoked_at__isnull=True).values_list("pk", flat=True))
        for key_id in active:
            api_key_revoke(key_id=key_id)
        self.message_user(
            request,
            ngettext("Revoked %(count)d API key.", "Revoked %(count)d API keys.", len(active)) % {"count": len(active)},
            messages.SUCCESS,
        )
