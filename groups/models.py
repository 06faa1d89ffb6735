import uuid

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import models

# Limits of a group's model list (public model names, as clients ask for them).
MODEL_NAME_MAX_CHARS = 100
MODEL_NAMES_MAX = 200


def model_names_validate(value) -> None:
    """A group's `allowed_models`: a list of at most MODEL_NAMES_MAX distinct, non-empty names without
    surrounding spaces, of at most MODEL_NAME_MAX_CHARS characters each."""
    if not isinstance(value, list):
        raise ValidationError("must be a list of model names")
    if len(value) > MODEL_NAMES_MAX:
        raise ValidationError(f"at most {MODEL_NAMES_MAX} model names, not {len(value)}")
    for name in value:
        if not isinstance(name, str) or not name or name != name.strip():
            raise ValidationError("each model name must be a non-empty string without surrounding spaces")
        if len(name) > MODEL_NAME_MAX_CHARS:
            raise ValidationError(f"a model name may be at most {MODEL_NAME_MAX_CHARS} characters: {name[:40]!r}...")
    if len(set(value)) != len(value):
        raise ValidationError("a model name is listed twice")


def model_names_clean(value) -> list[str]:
    """`value` as a group's `allowed_models`: names stripped, blanks and repeats dropped, then validated."""
    if isinstance(value, list) and all(isinstance(name, str) for name in value):
        value = list(dict.fromkeys(name.strip() for name in value if name.strip()))
    model_names_validate(value)
    return value


class Group(models.Model):
    """An organisation with an owner and members; chats can belong to it."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    name = models.CharField(max_length=100)
    description = models.CharField(max_length=1000, blank=True, default="")
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="owned_groups")
    # The public model names members may use (an operator's setting, in the admin); empty: any model.
    # A user in several limited groups may use the models every one of them lists.
    allowed_models = models.JSONField(
        default=list,
        blank=True,
        validators=[model_names_validate],
        help_text="Public model names the members may use; empty: any model.",
    )
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
