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
