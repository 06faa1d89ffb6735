"""The GraphQL schema: each app's queries, mutations and subscriptions, one line per app (like urls.py).

Served at /graphql over HTTP (turbo_site.graphql_server.GraphQLView) and over a WebSocket speaking
graphql-transport-ws (GraphQLConsumer, routed in turbo_site/asgi.py). `manage.py graphql_schema`
writes it to schema.graphql.
"""

import re
from collections.abc import AsyncGenerator

import strawberry
from django.conf import settings
from graphql import GraphQLError
from strawberry.extensions import MaskErrors, ValidationCache
from strawberry.schema.config import StrawberryConfig
from strawberry.tools import merge_types
from strawberry.types.execution import PreExecutionError

import accounts.graphql
import chats.graphql
import groups.graphql
import proxy.graphql
from turbo_site.core import errors
from turbo_site.core.graphql import SCALARS, Limits, OperationScope, document_refusal, variables_refusal

Query = merge_types(
    "Query",
    (
        accounts.graphql.Query,
        groups.graphql.Query,
        chats.graphql.Query,
        proxy.graphql.Query,
    ),
)
Mutation = merge_types(
    "Mutation",
    (
        groups.graphql.Mutation,
        chats.graphql.Mutation,
        proxy.graphql.Mutation,
    ),
)
Subscription = merge_types(
    "Subscription",
    (
        chats.graphql.Subscription,
        proxy.graphql.Subscription,
    ),
)


def error_of(original: BaseException) -> tuple[str, str, dict]:
    """(code, message, more extensions) for an exception a resolver raised: its one outcome
    (turbo_site.core.errors), an unexpected one logged there and answered `internal_error`."""
    outcome = errors.outcome_of(original)
    more = {_camel(name): value for name, value in outcome.error().items() if name not in ("code", "message")}
    return outcome.code, outcome.message, more


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


# graphql-core ends a message with its guesses at what was meant ("Did you mean 'user'?"): they name
# the schema's fields, types and values, which introspection (off in production) would otherwise hide.
SUGGESTION = re.compile(r"\s*Did you mean\b.*\Z", re.S)


def _shown(message: str) -> str:
    return message if settings.DEBUG else SUGGESTION.sub("", message)


class ErrorCodes(MaskErrors):
    """Every error leaves with `extensions.code` (Turbo's codes) and never a stack trace; an unexpected
    one is logged and answered `internal_error`."""

    def __init__(self):
        super().__init__(should_mask_error=lambda error: True)

    def on_stream_result(self, result):
        # A subscription's events rarely carry errors: skip MaskErrors' protocol checks for those.
        self._stream_result_processed = True
        if getattr(result, "errors", None):
            self._process_stream_result(result)
        yield None

    def anonymise_error(self, error: GraphQLError) -> GraphQLError:
        original = error.original_error
        # A variable's value a scalar refused (no path: before execution) is the query's fault.
        coercion = error.path is None and isinstance(original, (ValueError, TypeError))
        if original is None or isinstance(original, GraphQLError) or coercion:
            extensions = dict(getattr(original or error, "extensions", None) or error.extensions or {})
            # before execution (no path): the query is at fault; during it, the server
            extensions.setdefault("code", "invalid_query" if error.path is None else "internal_error")
            return GraphQLError(
                _shown(error.message), error.nodes, error.source, error.positions, error.path, None, extensions
            )
        code, message, more = error_of(original)
        return GraphQLError(
            _shown(message), error.nodes, error.source, error.positions, error.path, None, {"code": code, **more}
        )


async def _refused(error: GraphQLError) -> AsyncGenerator[PreExecutionError, None]:
    yield PreExecutionError(data=None, errors=[error])


def _refusal(query, variables) -> GraphQLError | None:
    return document_refusal(query) or variables_refusal(variables)


class Schema(strawberry.Schema):
    """Documents over GRAPHQL_MAX_QUERY_BYTES and variables over GRAPHQL_MAX_VARIABLE_VALUES are
    refused here, before anything reads them, on both transports."""

    async def execute(self, query, variable_values=None, *args, **kwargs):
        refusal = _refusal(query, variable_values)
        if refusal is not None:
            return PreExecutionError(data=None, errors=[refusal])
        return await super().execute(query, variable_values, *args, **kwargs)

    async def stream(self, query, variable_values=None, *args, **kwargs):
        refusal = _refusal(query, variable_values)
        if refusal is not None:
            return _refused(refusal)
        return await super().stream(query, variable_values, *args, **kwargs)

    def process_errors(self, errors, execution_context=None) -> None:
        """ErrorCodes logs what needs logging (unexpected errors); expected ones are answers, not faults."""


schema = Schema(
    query=Query,
    mutation=Mutation,
    subscription=Subscription,
    # Limits caches parsed documents; the validation cache keys on the document and the rules (Limits sets
    # them first): a setting's change applies.
    extensions=[OperationScope, Limits, ValidationCache, ErrorCodes],
    config=StrawberryConfig(scalar_map=SCALARS),
)
