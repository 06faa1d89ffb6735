"""Cached token lookups carry a copy of the user; any save of a user drops those copies. A deleted API
key (with its user or its group) is forgotten and announced like a revoked one."""

from django.db.models.signals import post_delete, post_save, pre_delete
from django.dispatch import receiver

from accounts.models import ApiKey, User


@receiver(post_save, sender=User)
@receiver(pre_delete, sender=User)
def forget_cached_sessions(sender, instance: User, **kwargs) -> None:
    from accounts.tokens import session_cache_forget_user

    deleted = kwargs.get("signal") is pre_delete
    session_cache_forget_user(user_id=instance.pk, is_active=instance.is_active and not deleted)


@receiver(post_delete, sender=ApiKey)
def forget_deleted_key(sender, instance: ApiKey, **kwargs) -> None:
    from accounts.live import sessions_revoked_announce
    from accounts.tokens import token_lookups_forget

    token_lookups_forget([instance.key_hash])
    sessions_revoked_announce([instance.pk])
