"""The proxy in the Django admin: the event log (read-only; only superusers may delete from it) and the
gateway's upstream health (a read-only page for every staff member)."""

import uuid

from asgiref.sync import async_to_sync
from django.contrib import admin
from django.contrib.admin.options import IncorrectLookupParameters
from django.contrib.auth import get_user_model
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils import timezone
from django.utils.html import format_html

from proxy.gateway import GatewayError, gateway_config
from proxy.models import Budget, Event, RateLimit, UpstreamHealth
from proxy.upstreams import deployments_health, health_is_shared, shared_health_problem


class UserIdFilter(admin.SimpleListFilter):
    """Events of one user, by id (`?user_id=<uuid>`, as linked from the user column).

    Listing every user who has events would scan the whole log on each page, so this filter offers no
    choices of its own; it shows the user picked and a way back to all.
    """

    title = "user"
    parameter_name = "user_id"

    def user_id(self) -> uuid.UUID | None:
        value = self.value()
        if not value:
            return None
        try:
            return uuid.UUID(value)
        except ValueError:
            raise IncorrectLookupParameters(f"user_id {value!r} is not a UUID") from None

    def lookups(self, request, model_admin):
        user_id = self.user_id()
        if user_id is None:
            return []
        username = get_user_model().objects.filter(pk=user_id).values_list("username", flat=True).first()
        return [(str(user_id), username or str(user_id))]

    def queryset(self, request, queryset):
        user_id = self.user_id()
        return queryset if user_id is None else queryset.filter(user_id=user_id)


@admin.register(Event)
class EventAdmin(admin.ModelAdmin):
    list_display = (
        "type",
        "user_link",
        "method",
        "path",
        "status",
        "duration_ms",
        "model",
        "upstream",
        "total_tokens",
        "client_ip",
        "created_at",
    )
    list_filter = ("type", "status", "method", "created_at", UserIdFilter)
    list_select_related = ("user",)
    search_fields = ("path", "user__username", "model", "=trace_id")  # a trace id from X-Turbo-Trace-Id
    date_hierarchy = "created_at"
    ordering = ("-created_at",)
    # The log grows large: skip counting the whole table on every filtered page.
    show_full_result_count = False

    @admin.display(description="user", ordering="user__username")
    def user_link(self, event: Event) -> str:
        if event.user_id is None:
            return "-"
        url = reverse("admin:proxy_event_changelist") + f"?user_id={event.user_id}"
        name = event.user.username if event.user else str(event.user_id)
        return format_html('<a href="{}" title="events of this user">{}</a>', url, name)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj=None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj=None) -> bool:
        return request.user.is_superuser


@admin.register(UpstreamHealth)
class UpstreamHealthAdmin(admin.ModelAdmin):
    """Every deployment of the model gateway and its live health, as `manage.py upstreams list` shows it.

    UpstreamHealth has no table: the one URL is this page, so there is nothing to add, change or delete.
    """

    def get_urls(self):
        name = f"{self.opts.app_label}_{self.opts.model_name}_changelist"
        return [path("", self.admin_site.admin_view(self.changelist_view), name=name)]

    def has_module_permission(self, request: HttpRequest) -> bool:
        return request.user.is_active and request.user.is_staff

    def has_view_permission(self, request: HttpRequest, obj=None) -> bool:
        return request.user.is_active and request.user.is_staff

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj=None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj=None) -> bool:
        return False

    def changelist_view(self, request: HttpRequest, extra_context=None) -> TemplateResponse:
        if not self.has_view_permission(request):
            raise PermissionDenied
        problem, deployments, source = "", [], ""
        try:
            source = gateway_config().source
            # Health is read on the server's event loop, where its Redis client lives.
            if shared := async_to_sync(shared_health_problem)():
                problem = f"The shared health cannot be read from Redis ({shared}): this is the process's own."
            deployments = async_to_sync(deployments_health)()
        except GatewayError as exc:
            problem = exc.message
        context = {
            **self.admin_site.each_context(request),
            "title": "Upstream health",
            "opts": self.opts,
            "deployments": deployments,
            "problem": problem,
            "source": source,
            "is_shared": health_is_shared(),
            "as_of": timezone.localtime(),
            **(extra_context or {}),
        }
        request.current_app = self.admin_site.name
        return TemplateResponse(request, "admin/proxy/upstream_health.html", context)


@admin.register(Budget)
class BudgetAdmin(admin.ModelAdmin):
    """Spending limits of users, groups and API keys; enforced by proxy.usage.budgets."""

    list_display = ("scope", "target", "limit_usd", "period", "spent_this_period", "updated_at")
    list_filter = ("scope", "period")
    list_select_related = ("user", "group", "key")
    search_fields = ("user__username", "group__name", "key__prefix", "key__name")
    autocomplete_fields = ("user", "group", "key")
    fields = ("scope", "user", "group", "key", "limit_usd", "period")

    @admin.display(description="for")
    def target(self, obj: Budget) -> str:
        return str(obj.user or obj.group or obj.key)

    @admin.display(description="spent this period")
    def spent_this_period(self, obj: Budget) -> str:
        from proxy.usage.budgets import budget_spent

        spent, _ = budget_spent(obj)
        return f"${spent.normalize():f}"

    def save_model(self, request, obj: Budget, form, change) -> None:
        from django.db import transaction

        from proxy.usage.budgets import budget_rules_forget

        super().save_model(request, obj, form, change)
        transaction.on_commit(budget_rules_forget)


@admin.register(RateLimit)
class RateLimitAdmin(admin.ModelAdmin):
    """A user's or a group's own requests and tokens per minute (empty: the RATE_LIMIT_* default, 0: none)."""

    list_display = ("scope", "target", "rpm", "tpm", "updated_at")
    list_filter = ("scope",)
    list_select_related = ("user", "group")
    search_fields = ("user__username", "group__name")
    autocomplete_fields = ("user", "group")
    fields = ("scope", "user", "group", "rpm", "tpm")

    @admin.display(description="for")
    def target(self, obj: RateLimit) -> str:
        return str(obj.user or obj.group)

    def save_model(self, request, obj: RateLimit, form, change) -> None:
        from django.db import transaction

        from proxy.usage.ratelimits import ratelimit_overrides_forget

        super().save_model(request, obj, form, change)
        transaction.on_commit(ratelimit_overrides_forget)

    def delete_model(self, request, obj: RateLimit) -> None:
        from proxy.usage.ratelimits import ratelimit_overrides_forget

        super().delete_model(request, obj)
        ratelimit_overrides_forget()
