"""Cached token lookups carry a copy of the user; any save of a user drops those copies."""

from django.db.models.signals import post_save, pre_delete
from django.dispatch import receiver

from accounts.models import User


@receiver(post_save, sender=User)
@receiver(pre_delete, sender=User)
def forget_cached_sessions(sender, instance: User, **kwargs) -> None:
    from accounts.services import session_cache_forget_user

    deleted = kwargs.get("signal") is pre_delete
    session_cache_forget_user(user_id=instance.pk, is_active=instance.is_active and not deleted)
