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
    # The request's OpenTelemetry trace (32 hex digits) when tracing is on: the way to its spans.
    trace_id = models.CharField(max_length=32, blank=True, default="")
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


class Budget(models.Model):
    """A spending limit in USD for a user, a group or an API key, per period (UTC-aligned).

    Enforced before every model call by proxy.usage.budgets, which reserves what the call may cost.
    """

    class Scope(models.TextChoices):
        USER = "user"
        GROUP = "group"
        KEY = "key"

    class Period(models.TextChoices):
        DAY = "day"
        WEEK = "week"
        MONTH = "month"
        TOTAL = "total"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    scope = models.CharField(max_length=8, choices=Scope.choices)
    user = models.OneToOneField(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, null=True, blank=True, related_name="budget"
    )
    group = models.OneToOneField("groups.Group", on_delete=models.CASCADE, null=True, blank=True, related_name="budget")
    key = models.OneToOneField(
        "accounts.ApiKey", on_delete=models.CASCADE, null=True, blank=True, related_name="budget"
    )
    limit_usd = models.DecimalField(max_digits=14, decimal_places=6)
    period = models.CharField(max_length=8, choices=Period.choices, default=Period.MONTH)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        db_table = "budgets"
        constraints = [
            models.CheckConstraint(
                condition=(
                    models.Q(scope="user", user__isnull=False, group__isnull=True, key__isnull=True)
                    | models.Q(scope="group", user__isnull=True, group__isnull=False, key__isnull=True)
                    | models.Q(scope="key", user__isnull=True, group__isnull=True, key__isnull=False)
                ),
                name="budgets_one_target",
            ),
            models.CheckConstraint(condition=models.Q(limit_usd__gte=0), name="budgets_limit_not_negative"),
        ]

    def __str__(self) -> str:
        return f"{self.scope} budget ${self.limit_usd} per {self.period}"


class RateLimit(models.Model):
    """A user's or a group's own requests and tokens per minute, in place of the RATE_LIMIT_* defaults.

    Read by proxy.usage.ratelimits through a short per-process cache (RATE_LIMIT_CACHE_SECONDS).
    """

    class Scope(models.TextChoices):
        USER = "user"
        GROUP = "group"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    scope = models.CharField(max_length=8, choices=Scope.choices)
    user = models.OneToOneField(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, null=True, blank=True, related_name="rate_limit"
    )
    group = models.OneToOneField(
        "groups.Group", on_delete=models.CASCADE, null=True, blank=True, related_name="rate_limit"
    )
    rpm = models.PositiveIntegerField(
        null=True, blank=True, help_text="Requests per minute; empty: the default for the scope, 0: no limit."
    )
    tpm = models.PositiveIntegerField(
        null=True, blank=True, help_text="Tokens per minute; empty: the default for the scope, 0: no limit."
    )
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        db_table = "rate_limits"
        constraints = [
            models.CheckConstraint(
                condition=(
                    models.Q(scope="user", user__isnull=False, group__isnull=True)
                    | models.Q(scope="group", user__isnull=True, group__isnull=False)
                ),
                name="rate_limits_one_target",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.scope} rate limit: {self.rpm if self.rpm is not None else 'default'} rpm, " + (
            f"{self.tpm if self.tpm is not None else 'default'} tpm"
        )

    def clean(self) -> None:
        from django.core.exceptions import ValidationError

        if self.scope == self.Scope.USER and (self.user_id is None or self.group_id is not None):
            raise ValidationError("a user's rate limit names a user and no group")
        if self.scope == self.Scope.GROUP and (self.group_id is None or self.user_id is not None):
            raise ValidationError("a group's rate limit names a group and no user")


class UsageRollup(models.Model):
    """What model calls used and cost, summed per hour (UTC), model, deployment, user, group and API key.

    Written only by proxy.usage.records (upserts that add to the counters, in the event writer's
    batches); read by usage reports and budget checks, which never scan the event log.
    """

    id = models.BigAutoField(primary_key=True)
    # The row's identity, (hour, model, deployment, user, group, key) hashed: NULLs never conflict in a
    # unique constraint, so the columns themselves cannot be the upsert's conflict target.
    slot = models.CharField(max_length=40, unique=True)
    hour = models.DateTimeField()
    model = models.CharField(max_length=100)
    deployment = models.CharField(max_length=200, blank=True, default="")
    # Plain ids, like Event.user: usage outlives users, groups and keys, and proxy imports no app above it.
    user_id = models.UUIDField(null=True, blank=True)
    group_id = models.UUIDField(null=True, blank=True)
    key_id = models.UUIDField(null=True, blank=True)
    requests = models.BigIntegerField(default=0)
    input_tokens = models.BigIntegerField(default=0)  # cached ones included, as OpenAI counts them
    output_tokens = models.BigIntegerField(default=0)
    cached_tokens = models.BigIntegerField(default=0)
    cost_usd = models.DecimalField(max_digits=20, decimal_places=10, default=0)
    estimated_requests = models.BigIntegerField(default=0)  # counted offline: no usage from the upstream

    class Meta:
        db_table = "usage_rollups"
        indexes = [
            models.Index(fields=["user_id", "hour"], name="usage_user_hour_idx"),
            models.Index(fields=["group_id", "hour"], name="usage_group_hour_idx"),
            models.Index(fields=["key_id", "hour"], name="usage_key_hour_idx"),
            models.Index(fields=["hour"], name="usage_hour_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.hour:%Y-%m-%d %H}:00 {self.model} {self.requests} requests ${self.cost_usd}"


class StoredObject(models.Model):
    """An object the upstream stores under the server's key (a chat completion, a response, a file...),
    and the user whose call through Turbo created it: the only user the proxy lets reach it.

    Written only by proxy.owners (in the event writer's batches); read by the proxy on `/v1/<collection>/<id>`.
    """

    id = models.BigAutoField(primary_key=True)
    collection = models.CharField(max_length=50)  # the path it lives under: "chat/completions", "responses"
    object_id = models.CharField(max_length=200)
    # A plain id, like UsageRollup.user_id: proxy imports no app above it, and the record outlives the user.
    user_id = models.UUIDField()
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        db_table = "stored_objects"
        constraints = [
            models.UniqueConstraint(fields=["collection", "object_id"], name="stored_objects_one_owner"),
        ]

    def __str__(self) -> str:
        return f"{self.collection}/{self.object_id}"
