import uuid

from django.contrib.auth.models import AbstractUser
from django.db import models
from django.db.models.functions import Lower


class User(AbstractUser):
    """A Turbo user. Usernames are unique regardless of case."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)

    class Meta:
        db_table = "users"
        constraints = [models.UniqueConstraint(Lower("username"), name="users_username_ci_unique")]

    def __str__(self) -> str:
        return self.username


class Session(models.Model):
    """One login. Only a SHA-256 hash of its token is stored; the token itself is shown once."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    user = models.ForeignKey(User, on_delete=models.CASCADE, related_name="login_sessions")
    token_hash = models.CharField(max_length=64, unique=True, editable=False)
    kind = models.CharField(
        max_length=8,
        choices=[("token", "opaque token"), ("jwt", "JWT")],
        default="token",
    )
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField()
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    client_ip = models.GenericIPAddressField(null=True, blank=True)
    user_agent = models.CharField(max_length=256, blank=True, default="")

    class Meta:
        db_table = "sessions"
        indexes = [models.Index(fields=["user", "revoked_at"], name="sessions_user_active_idx")]

    def __str__(self) -> str:
        return f"session of {self.user_id} from {self.created_at:%Y-%m-%d %H:%M}"


# Every API key starts so, which tells it from a session token at a glance (and in a secret scanner).
API_KEY_PREFIX = "tk-"


class ApiKey(models.Model):
    """A named key for programs: works on /v1 and /ws like a session token, nowhere else.

    Only a SHA-256 hash of the key is stored; `prefix` (its first characters) tells keys apart in lists.
    A group key (`group` set) is made by the group's owner and acts for them, limited to what the
    group allows; `models` narrows any key further (empty: whatever its user may use).
    """

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    user = models.ForeignKey(User, on_delete=models.CASCADE, related_name="api_keys")
    group = models.ForeignKey("groups.Group", null=True, blank=True, on_delete=models.CASCADE, related_name="api_keys")
    name = models.CharField(max_length=100)
    prefix = models.CharField(max_length=12, db_index=True, editable=False)
    key_hash = models.CharField(max_length=64, unique=True, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField(null=True, blank=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    # The key's own rate limits (proxy.usage.ratelimits); null: RATE_LIMIT_KEY_RPM / _TPM, 0: none.
    rpm = models.PositiveIntegerField(null=True, blank=True, help_text="Requests per minute; empty: the default.")
    tpm = models.PositiveIntegerField(null=True, blank=True, help_text="Tokens per minute; empty: the default.")
    # Last: from here on `models` in this class body is the field, not django.db.models.
    models = models.JSONField(default=list, blank=True, help_text="Public model names; empty: no limit of its own.")

    class Meta:
        db_table = "api_keys"
        indexes = [models.Index(fields=["user", "revoked_at"], name="api_keys_user_active_idx")]

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}...)"
