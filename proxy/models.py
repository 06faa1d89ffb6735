import uuid

from django.conf import settings
from django.db import models
from django.utils import timezone


class Event(models.Model):
    """The request and event log: one row per authenticated request or account event."""

    class Type(models.TextChoices):
        REQUEST = "request"
        PROXY = "proxy"
        SIGNUP = "signup"
        LOGIN = "login"
        LOGIN_FAILED = "login_failed"
        LOGOUT = "logout"
        PASSWORD_CHANGE = "password_change"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    type = models.CharField(max_length=32, choices=Type.choices, default=Type.REQUEST)
    # Kept as a plain id so that events outlive the user and never block a delete.
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="events",
        db_constraint=False,
    )
    method = models.CharField(max_length=10, blank=True, default="")
    path = models.CharField(max_length=2000, blank=True, default="")
    query = models.CharField(max_length=2000, blank=True, default="")
    status = models.PositiveSmallIntegerField(null=True, blank=True)
    duration_ms = models.FloatField(null=True, blank=True)
    client_ip = models.GenericIPAddressField(null=True, blank=True)
    model = models.CharField(max_length=100, blank=True, default="")
    prompt_tokens = models.PositiveIntegerField(null=True, blank=True)
    completion_tokens = models.PositiveIntegerField(null=True, blank=True)
    total_tokens = models.PositiveIntegerField(null=True, blank=True)
    # The model gateway: the deployment that answered, and every deployment tried with why it failed.
    upstream = models.CharField(max_length=200, blank=True, default="")
    attempts = models.JSONField(default=list, blank=True)
    request_body = models.TextField(blank=True, default="")
    response_body = models.TextField(blank=True, default="")
    created_at = models.DateTimeField(default=timezone.now, db_index=True)

    class Meta:
        db_table = "events"
        indexes = [
            models.Index(fields=["user", "created_at"], name="events_user_time_idx"),
            models.Index(fields=["type", "created_at"], name="events_type_time_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.type} {self.method} {self.path} {self.status}"


class UpstreamHealth(models.Model):
    """Not a table: the admin's read-only "Upstream health" page (proxy/admin.py) hangs on this model, so
    that it is listed under its app like any other. What it shows comes from proxy/upstreams.py."""

    class Meta:
        managed = False
        default_permissions = ("view",)
        verbose_name = "upstream health"
        verbose_name_plural = "upstream health"

    def __str__(self) -> str:
        return "upstream health"
