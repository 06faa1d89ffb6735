"""Groups and their members in the Django admin.

Groups are created by users (signup, POST /group/create), which makes the owner the first member, so
the admin does not add them. Removals go through the services, so that open chat streams of removed
members re-check their access; an owner's own membership is never removed. A group's model limit is
set here only (owners cannot lift it); it and member changes go through the services, which make
them apply to the members' next request.
"""

import re
from collections import defaultdict

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.utils import quote, unquote
from django.core.exceptions import ValidationError
from django.db import transaction
from django.db.models import QuerySet
from django.forms.models import BaseInlineFormSet
from django.http import HttpRequest, HttpResponseRedirect
from django.urls import reverse
from django.utils.translation import ngettext

from accounts.models import User
from groups.models import MODEL_NAMES_MAX, Group, GroupMember, model_names_clean
from groups.services import (
    group_allowed_models_set,
    group_delete,
    group_members_add,
    group_members_remove,
    group_update,
)

# Only active users can be added, as the services' add paths require.
ACTIVE_USERS = User.objects.filter(is_active=True)


class MembershipFormSet(BaseInlineFormSet):
    """Inline members of a group or chat: the owner stays, and a row is never re-pointed at another user."""

    def clean(self):
        super().clean()
        for form in self.initial_forms:
            cleaned = getattr(form, "cleaned_data", {})
            if cleaned.get("DELETE"):
                if form.initial.get("user") == self.instance.owner_id:
                    raise ValidationError("The owner cannot be removed.")
            elif "user" in form.changed_data:
                raise ValidationError("A membership cannot be moved to another user: remove it and add the new member.")


class MembershipInline(admin.TabularInline):
    formset = MembershipFormSet
    fields = ("user", "created_at")
    readonly_fields = ("created_at",)
    autocomplete_fields = ("user",)
    extra = 0

    def formfield_for_foreignkey(self, db_field, request, **kwargs):
        if db_field.name == "user":
            kwargs["queryset"] = ACTIVE_USERS
        return super().formfield_for_foreignkey(db_field, request, **kwargs)


class MembershipAdmin(admin.ModelAdmin):
    """A membership list where rows are added or removed, never edited; `parent` names the group or chat field."""

    parent: str
    list_filter = ("created_at",)
    date_hierarchy = "created_at"
    ordering = ("-created_at",)
    readonly_fields = ("created_at",)
    actions = ["remove_selected"]

    # Subclasses define `members_remove(self, parent, user_ids)`: remove these users through the parent
    # app's service, as its owner would (checked when the subclass is defined).

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if not callable(getattr(cls, "members_remove", None)):
            raise TypeError(f"{cls.__name__} must define members_remove(self, parent, user_ids)")

    def _is_owner(self, member) -> bool:
        return member.user_id == getattr(member, self.parent).owner_id

    def formfield_for_foreignkey(self, db_field, request, **kwargs):
        if db_field.name == "user":
            kwargs["queryset"] = ACTIVE_USERS
        return super().formfield_for_foreignkey(db_field, request, **kwargs)

    def has_change_permission(self, request: HttpRequest, obj=None) -> bool:
        return False

    def get_actions(self, request):
        actions = super().get_actions(request)
        # Replaced by remove_selected, which goes through the service and keeps owners.
        actions.pop("delete_selected", None)
        return actions

    def delete_view(self, request, object_id, extra_context=None):
        member = self.get_object(request, unquote(object_id))
        if member is not None and self._is_owner(member):
            self.message_user(request, f"The {self.parent}'s owner cannot be removed.", messages.ERROR)
            opts = self.model._meta
            return HttpResponseRedirect(
                reverse(f"admin:{opts.app_label}_{opts.model_name}_change", args=[quote(member.pk)])
            )
        return super().delete_view(request, object_id, extra_context)

    def delete_model(self, request, obj) -> None:
        self.members_remove(getattr(obj, self.parent), [obj.user_id])

    @admin.action(description="Remove selected members", permissions=["delete"])
    def remove_selected(self, request: HttpRequest, queryset: QuerySet) -> None:
        parents = {}
        removals = defaultdict(list)
        owners = 0
        for member in queryset.select_related(self.parent):
            if self._is_owner(member):
                owners += 1
                continue
            parent = getattr(member, self.parent)
            parents[parent.pk] = parent
            removals[parent.pk].append(member.user_id)
        with transaction.atomic():
            for parent_id, user_ids in removals.items():
                self.members_remove(parents[parent_id], user_ids)
        removed = sum(len(user_ids) for user_ids in removals.values())
        self.message_user(
            request,
            ngettext("Removed %(count)d member.", "Removed %(count)d members.", removed) % {"count": removed},
            messages.SUCCESS,
        )
        if owners:
            self.message_user(
                request,
                ngettext(
                    "Kept %(count)d owner's membership: an owner cannot be removed.",
                    "Kept %(count)d owners' memberships: an owner cannot be removed.",
                    owners,
                )
                % {"count": owners},
                messages.WARNING,
            )


class GroupMemberInline(MembershipInline):
    model = GroupMember


class ModelNamesField(forms.CharField):
    """A group's model list as one comma-separated line (stored as a JSON list of names)."""

    widget = forms.TextInput(attrs={"size": 100})

    def prepare_value(self, value):
        return ", ".join(value) if isinstance(value, list) else value

    def to_python(self, value) -> list[str]:
        return model_names_clean(re.split(r"[,\n]", super().to_python(value)))


class GroupAdminForm(forms.ModelForm):
    allowed_models = ModelNamesField(
        required=False,
        label="Allowed models",
        help_text=(
            f"Public model names the members may use, separated by commas (at most {MODEL_NAMES_MAX}); "
            "empty: any model. A member of several limited groups may use the models all of them list."
        ),
    )

    class Meta:
        model = Group
        fields = ("name", "description", "allowed_models")


@admin.register(Group)
class GroupAdmin(admin.ModelAdmin):
    list_display = ("name", "owner", "created_at")
    list_filter = ("created_at",)
    list_select_related = ("owner",)
    search_fields = ("name", "owner__username")
    ordering = ("-created_at",)
    date_hierarchy = "created_at"
    form = GroupAdminForm
    fields = ("name", "description", "allowed_models", "owner", "created_at", "updated_at")
    readonly_fields = ("owner", "created_at", "updated_at")
    inlines = [GroupMemberInline]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def save_model(self, request, obj: Group, form, change) -> None:
        if "allowed_models" in form.changed_data:
            group_allowed_models_set(group=obj, allowed_models=obj.allowed_models)
        group_update(group=obj, user=obj.owner, name=obj.name, description=obj.description)

    def save_formset(self, request, form, formset, change) -> None:
        if formset.model is not GroupMember:
            return super().save_formset(request, form, formset, change)
        group = form.instance
        formset.save(commit=False)
        removed = [member.user_id for member in formset.deleted_objects]
        if removed:
            group_members_remove(group=group, user=group.owner, user_ids=removed)
        added = [member.user_id for member in formset.new_objects]
        if added:
            group_members_add(group=group, user=group.owner, user_ids=added)
        formset.save_m2m()

    def delete_model(self, request, obj: Group) -> None:
        group_delete(group=obj, user=obj.owner)

    def delete_queryset(self, request, queryset: QuerySet[Group]) -> None:
        with transaction.atomic():
            for group in queryset.select_related("owner"):
                group_delete(group=group, user=group.owner)


@admin.register(GroupMember)
class GroupMemberAdmin(MembershipAdmin):
    parent = "group"
    list_display = ("group", "user", "created_at")
    list_select_related = ("group", "user")
    search_fields = ("group__name", "user__username")
    autocomplete_fields = ("group", "user")

    def save_model(self, request, obj: GroupMember, form, change) -> None:
        # Through the service, so that a limited group's list applies to the new member at once.
        group_members_add(group=obj.group, user=obj.group.owner, user_ids=[obj.user_id])
        obj.pk = GroupMember.objects.values_list("pk", flat=True).get(group=obj.group, user_id=obj.user_id)

    def members_remove(self, parent: Group, user_ids: list) -> None:
        group_members_remove(group=parent, user=parent.owner, user_ids=user_ids)
