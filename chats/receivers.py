"""What chats do when other apps change things (connected at module level: a receiver defined inside
a function and connected by weak reference would be garbage-collected, and with it the access check)."""

from django.dispatch import receiver

from groups.signals import group_members_removed


@receiver(group_members_removed, dispatch_uid="chats.group_members_removed")
def on_group_members_removed(sender, group_id, user_ids, **kwargs) -> None:
    """Users left a group (removed, left, or the group was deleted): their open streams re-check access."""
    from chats.services import group_access_changed

    group_access_changed(group_id=group_id, user_ids=user_ids)
