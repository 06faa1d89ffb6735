"""What every GraphQL type module shares, imports no app: per-operation dataloaders and the limits.

Limits (read from settings on every operation, so an operator's change needs no new schema):
GRAPHQL_MAX_DEPTH (strawberry's QueryDepthLimiter), GRAPHQL_MAX_COST (QueryCost below), and
introspection only with DEBUG=1 or GRAPHQL_PLAYGROUND=1.
"""

import contextvars
import functools
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, NewType

import strawberry
from django.conf import settings
from graphql import (
    FieldNode,
    FragmentSpreadNode,
    GraphQLError,
    GraphQLList,
    GraphQLNonNull,
    GraphQLObjectType,
    InlineFragmentNode,
    IntValueNode,
    OperationDefinitionNode,
    SelectionSetNode,
    ValidationRule,
    VariableNode,
    get_named_type,
)
from graphql.validation import NoSchemaIntrospectionCustomRule
from strawberry.dataloader import DataLoader
from strawberry.extensions import SchemaExtension
from strawberry.extensions.query_depth_limiter import create_validator


class GraphQLContext:
    """`info.context` on both transports: the HTTP request, or the socket's scope and the session its
    connection_init authenticated (accounts.graphql reads it)."""

    def __init__(self, *, request=None, scope=None, consumer=None):
        self.request = request
        self.scope = scope
        self.consumer = consumer
        self.connection_params: dict = {}
        self.session = None  # a socket's AuthSession, from its connection_init


def _whole_number(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"not a whole number: {value!r}")
    return value


# A stream's seq is a microsecond clock reading: past GraphQL's 32-bit Int, within JSON's exact 2^53.
BigInt = NewType("BigInt", int)
SCALARS = {
    BigInt: strawberry.scalar(
        name="BigInt",
        description="A whole number beyond Int's 32 bits (a stream's seq), exact up to 2^53",
        serialize=int,
        parse_value=_whole_number,
    )
}


# --- dataloaders, one set per operation -----------------------------------------------------------

# Set afresh by OperationScope for each operation (HTTP request, or one operation on a socket, which
# runs in its own task): what a loader cached never outlives the operation that read it.
_loaders: contextvars.ContextVar[dict | None] = contextvars.ContextVar("graphql_loaders", default=None)


def operation_memo() -> dict:
    """A dict that lives as long as the current operation (loaders, the caller's session)."""
    memo = _loaders.get()
    if memo is None:
        memo = {}
        _loaders.set(memo)
    return memo


def loader(name: str, load: Callable[[list], Awaitable[list]]) -> DataLoader:
    """The operation's DataLoader called `name` (made with `load` the first time it is asked for)."""
    memo = operation_memo()
    found = memo.get(("loader", name))
    if found is None:
        found = memo[("loader", name)] = DataLoader(load_fn=load)
    return found


class OperationScope(SchemaExtension):
    """Gives each operation its own memo (see operation_memo)."""

    def on_operation(self) -> Iterator[None]:
        # Set, never reset: a subscription's operation may end in another context than it began in.
        _loaders.set({})
        yield
        _loaders.set(None)


# --- limits ---------------------------------------------------------------------------------------

# How many items a list field without a size argument is assumed to hold when costing a query.
ASSUMED_LIST_SIZE = 10
# Arguments that bound a list field's size; a variable counts as the largest value it may take.
SIZE_ARGUMENTS = ("first", "last", "limit")
SIZE_OF_A_VARIABLE = 100


def _size_argument(node: FieldNode) -> int | None:
    for argument in node.arguments or ():
        if argument.name.value in SIZE_ARGUMENTS:
            if isinstance(argument.value, IntValueNode):
                return max(0, int(argument.value.value))
            if isinstance(argument.value, VariableNode):
                return SIZE_OF_A_VARIABLE
    return None


def _is_list(field_type) -> bool:
    if isinstance(field_type, GraphQLNonNull):
        field_type = field_type.of_type
    return isinstance(field_type, GraphQLList)


def query_cost(context, selection_set: SelectionSetNode | None, parent_type, *, sized: bool = False) -> int:
    """Fields counted once each, times the size of every list they sit in.

    A field with a size argument (`first`/`last`/`limit`) multiplies what is under it by that size; a
    list field under no size argument by ASSUMED_LIST_SIZE. Introspection fields cost nothing.
    """
    if selection_set is None:
        return 0
    total = 0
    for selection in selection_set.selections:
        if isinstance(selection, FieldNode):
            name = selection.name.value
            if name.startswith("__"):
                continue
            definition = parent_type.fields.get(name) if isinstance(parent_type, GraphQLObjectType) else None
            if definition is None:
                continue  # an unknown field: validation reports it
            size = _size_argument(selection)
            if size is not None:
                multiplier, children_sized = size, True
            elif _is_list(definition.type) and not sized:
                multiplier, children_sized = ASSUMED_LIST_SIZE, False
            else:
                multiplier, children_sized = 1, False
            inner = query_cost(context, selection.selection_set, get_named_type(definition.type), sized=children_sized)
            total += multiplier * (1 + inner)
        elif isinstance(selection, InlineFragmentNode):
            fragment_type = parent_type
            if selection.type_condition is not None:
                fragment_type = context.schema.get_type(selection.type_condition.name.value) or parent_type
            total += query_cost(context, selection.selection_set, fragment_type, sized=sized)
        elif isinstance(selection, FragmentSpreadNode):
            fragment = context.get_fragment(selection.name.value)
            if fragment is not None:
                fragment_type = context.schema.get_type(fragment.type_condition.name.value) or parent_type
                total += query_cost(context, fragment.selection_set, fragment_type, sized=sized)
    return total


def cost_rule(max_cost: int) -> type[ValidationRule]:
    class QueryCost(ValidationRule):
        def enter_operation_definition(self, node: OperationDefinitionNode, *_args) -> None:
            root = self.context.schema.get_root_type(node.operation)
            cost = query_cost(self.context, node.selection_set, root)
            if cost > max_cost:
                self.report_error(
                    GraphQLError(
                        f"the query's cost is {cost}, more than the maximum cost of {max_cost}: ask for fewer "
                        f"fields or smaller pages (first/last/limit)",
                        node,
                        extensions={"code": "query_too_costly"},
                    )
                )

    return QueryCost


@functools.lru_cache(maxsize=8)
def _rules(max_depth: int, max_cost: int, introspection: bool) -> tuple[Any, ...]:
    rules: list[Any] = [create_validator(max_depth, None, None), cost_rule(max_cost)]
    if not introspection:
        rules.append(NoSchemaIntrospectionCustomRule)
    return tuple(rules)


class Limits(SchemaExtension):
    """Depth, cost and introspection rules for this operation, as the settings say now."""

    def on_operation(self) -> Iterator[None]:
        introspection = bool(settings.DEBUG or settings.GRAPHQL_PLAYGROUND)
        rules = _rules(settings.GRAPHQL_MAX_DEPTH, settings.GRAPHQL_MAX_COST, introspection)
        self.execution_context.validation_rules = self.execution_context.validation_rules + rules
        yield
