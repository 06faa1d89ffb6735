import uuid

from django.conf import settings
from django.db import models


class Group(models.Model):
    """An organisation with an owner and members; chats can belong to it."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    name = models.CharField(max_length=100)
    description = models.CharField(max_length=1000, blank=True, default="")
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="owned_groups")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        db_table = "groups"

    def __str__(self) -> str:
        return self.name


class GroupMember(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    group = models.ForeignKey(Group, on_delete=models.CASCADE, related_name="memberships")
    # `user.groups` is Django's auth groups; ours are `user.group_memberships`.
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="group_memberships")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        db_table = "group_members"
        constraints = [models.UniqueConstraint(fields=["group", "user"], name="group_members_unique")]
        indexes = [models.Index(fields=["user", "group"], name="group_members_user_idx")]

    def __str__(self) -> str:
        return f"{self.user_id} in {self.group_id}"
