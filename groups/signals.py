"""Signals other apps listen to (groups imports no app that depends on it)."""

from django.dispatch import Signal

# Sent after users leave a group (removed or left); kwargs: group_id, user_ids.
group_members_removed = Signal()
