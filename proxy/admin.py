"""The event log in the Django admin: read-only, and only superusers may delete from it."""

import uuid

from django.contrib import admin
from django.contrib.admin.options import IncorrectLookupParameters
from django.contrib.auth import get_user_model
from django.http import HttpRequest
from django.urls import reverse
from django.utils.html import format_html

from proxy.models import Event


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
    search_fields = ("path", "user__username", "model")
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
