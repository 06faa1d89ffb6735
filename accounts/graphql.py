"""GraphQL: who is asking (the one adapter over accounts.auth for both transports), users, and `me`.

Over HTTP the caller is authenticated as every async view is (accounts.auth, front "graphql": Bearer,
Basic or the `sess` cookie, whose unsafe requests must come from an allowed Origin). On the socket, the
connection_init payload's `authorization` is checked once (front "graphql.socket", with its Origin
rule), and each operation then sees the session as it stands (revoked: refused).

API keys work only where a key may act elsewhere (model calls): resolvers that allow them say
`keys=True`; any other field is front "graphql.account", where a key answers `key_not_allowed_here`.
"""

import uuid
from datetime import datetime

import strawberry
from channels.db import database_sync_to_async
from strawberry.types import Info

from accounts.auth import FRONTS, AuthRefused, admit, arequest_authenticate
from accounts.models import User
from accounts.services import asession_refresh
from accounts.tokens import AuthSession
from turbo_site.core.graphql import GraphQLContext, loader, operation_memo


async def _authenticate(context: GraphQLContext) -> AuthSession:
    if context.request is not None:
        return await arequest_authenticate(context.request, "graphql")
    if context.session is None:
        raise AuthRefused(FRONTS["graphql.socket"].missing_message())
    session = await asession_refresh(context.session)  # its model limit as it is now, or ended
    if session is None:
        raise AuthRefused("the session has ended", code="session_ended")
    context.session = session
    return session


async def viewer(info: Info, *, keys: bool = False) -> AuthSession:
    """The caller's session for this operation; AuthRefused: unauthenticated, or an API key on a field
    that is not a model call ("graphql.account" in accounts.auth.FRONTS: `key_not_allowed_here`)."""
    memo = operation_memo()
    found = memo.get("viewer")
    if found is None:
        try:
            found = await _authenticate(info.context)
        except AuthRefused as refused:
            found = (refused.message, refused.status_code, refused.code)
        memo["viewer"] = found
    if isinstance(found, tuple):
        message, status, code = found
        raise AuthRefused(message, status=status, code=code)
    return found if keys else admit("graphql.account", found)


@strawberry.type(name="User", description="A user as other users see them.")
class UserType:
    id: strawberry.ID
    username: str
    first_name: str
    last_name: str


@strawberry.type(name="Viewer", description="Who is asking: the user and how they signed in.")
class ViewerType:
    user: UserType
    session_kind: str = strawberry.field(description='"token" or "jwt" for a sign-in, "key" for an API key')
    expires_at: datetime | None


def _users_by_id(ids: list) -> list[User | None]:
    found = User.objects.in_bulk([uuid.UUID(str(user_id)) for user_id in ids])
    return [found.get(uuid.UUID(str(user_id))) for user_id in ids]


async def user_load(user_id) -> User | None:
    """A user by id, batched with the other users this operation asks for (one query)."""
    return await loader("users", database_sync_to_async(_users_by_id)).load(str(user_id))


@strawberry.type
class Query:
    @strawberry.field(description="The caller: an API key may ask.")
    async def me(self, info: Info) -> ViewerType:
        session = await viewer(info, keys=True)
        return ViewerType(user=session.user, session_kind=session.kind, expires_at=session.expires_at)
