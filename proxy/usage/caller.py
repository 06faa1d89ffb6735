"""Who a model call is for: the user, the group it counts against, and the API key it came with."""

import uuid
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Caller:
    user_id: uuid.UUID | None
    group_id: uuid.UUID | None = None  # a group key's group, or the group of the chat the call is for
    key_id: uuid.UUID | None = None

    @classmethod
    def of(cls, session, *, group_id: uuid.UUID | None = None) -> "Caller":
        """The caller behind an AuthSession (a token or an API key); `group_id`: the chat's group."""
        return cls(session.user.pk, session.group_id or group_id, session.key_id)
