"""Chats, their members and messages in the Django admin.

Chats are created by users (POST /chat/create makes the owner the first member), so the admin does not
add them. Changes and removals go through the services, which tell open streams and drop the cached
context; a message's text is never edited here, only deleted.
"""

from django import forms
from django.contrib import admin
from django.db import transaction
from django.db.models import QuerySet
from django.http import HttpRequest

from chats.models import Chat, ChatMember, ChatProgram, Message
from chats.options import settings_validate
from chats.services import chat_delete, chat_update, chat_user_remove, message_delete
from groups.admin import MembershipAdmin, MembershipInline


class ChatMemberInline(MembershipInline):
    model = ChatMember


class ChatForm(forms.ModelForm):
    class Meta:
        model = Chat
        fields = ("name", "model", "system_prompt", "settings")

    def clean_settings(self):
        from rest_framework import serializers

        try:
            return settings_validate(self.cleaned_data.get("settings") or {})
        except serializers.ValidationError as exc:
            raise forms.ValidationError(exc.detail[0] if isinstance(exc.detail, list) else str(exc.detail)) from None


@admin.register(Chat)
class ChatAdmin(admin.ModelAdmin):
    form = ChatForm
    list_display = ("name", "model", "owner", "group", "created_at", "updated_at")
    list_filter = ("model", "created_at")
    list_select_related = ("owner", "group")
    search_fields = ("name", "owner__username", "group__name")
    ordering = ("-updated_at",)
    date_hierarchy = "created_at"
    fields = (
        "name",
        "model",
        "system_prompt",
        "settings",
        "owner",
        "group",
        "tools",
        "program",
        "created_at",
        "updated_at",
    )
    # Owner and group decide who may see the chat; they change only through the API's rules.
    readonly_fields = ("owner", "group", "tools", "program", "created_at", "updated_at")
    inlines = [ChatMemberInline]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def save_model(self, request, obj: Chat, form, change) -> None:
        chat_update(
            chat=obj,
            user=obj.owner,
            name=obj.name,
            model=obj.model,
            system_prompt=obj.system_prompt,
            settings=obj.settings,
        )

    def save_formset(self, request, form, formset, change) -> None:
        if formset.model is not ChatMember:
            return super().save_formset(request, form, formset, change)
        chat = form.instance
        added = formset.save(commit=False)
        for member in formset.deleted_objects:
            chat_user_remove(chat=chat, user=chat.owner, user_id=member.user_id)
        for member in added:
            member.save()
        formset.save_m2m()

    def delete_model(self, request, obj: Chat) -> None:
        chat_delete(chat=obj, user=obj.owner)

    def delete_queryset(self, request, queryset: QuerySet[Chat]) -> None:
        with transaction.atomic():
            for chat in queryset.select_related("owner"):
                chat_delete(chat=chat, user=chat.owner)


@admin.register(ChatMember)
class ChatMemberAdmin(MembershipAdmin):
    parent = "chat"
    list_display = ("chat", "user", "created_at")
    list_select_related = ("chat", "user")
    search_fields = ("chat__name", "user__username")
    autocomplete_fields = ("chat", "user")

    def members_remove(self, parent: Chat, user_ids: list) -> None:
        for user_id in user_ids:
            chat_user_remove(chat=parent, user=parent.owner, user_id=user_id)


@admin.register(Message)
class MessageAdmin(admin.ModelAdmin):
    list_display = ("id", "chat", "author", "status", "is_otr", "model", "created_at")
    list_filter = ("status", "is_otr", "model", "created_at")
    list_select_related = ("chat", "author")
    search_fields = ("prompt", "reply", "chat__name", "author__username")
    ordering = ("-created_at",)
    date_hierarchy = "created_at"
    # Searching prompts and replies scans the table; one count per page is enough.
    show_full_result_count = False

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj=None) -> bool:
        return False

    def delete_model(self, request, obj: Message) -> None:
        message_delete(message_id=obj.pk)

    def delete_queryset(self, request, queryset: QuerySet[Message]) -> None:
        with transaction.atomic():
            for message_id in queryset.values_list("pk", flat=True):
                message_delete(message_id=message_id)


@admin.register(ChatProgram)
class ChatProgramAdmin(admin.ModelAdmin):
    """Where each chat's program stands (read only: a program's state changes only by its turns)."""

    list_display = ("chat", "name", "status", "asking", "recorded_steps", "updated_at")
    list_filter = ("name", "status")
    list_select_related = ("chat",)
    search_fields = ("chat__name", "name")
    ordering = ("-updated_at",)
    fields = (
        "chat",
        "name",
        "status",
        "asking",
        "context",
        "steps",
        "memory",
        "memory_steps",
        "lease_until",
        "updated_at",
    )
    readonly_fields = fields

    @admin.display(description="recorded steps")
    def recorded_steps(self, obj: ChatProgram) -> int:
        return len(obj.steps)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj=None) -> bool:
        return False
