"""What every GraphQL type module shares, imports no app: per-operation dataloaders and the limits.

Limits (read from settings on every operation, so an operator's change needs no new schema), each
bounded by the one before it so that no document can hold the event loop:
GRAPHQL_MAX_QUERY_BYTES and GRAPHQL_MAX_VARIABLE_VALUES (before parsing: turbo_site.graphql.Schema),
GRAPHQL_MAX_TOKENS (while
parsing), GRAPHQL_MAX_FIELDS (selections, before validation), then GRAPHQL_MAX_DEPTH, GRAPHQL_MAX_COST and
GRAPHQL_MAX_MODEL_CALLS (OperationLimits, one walk per operation), and introspection only with
DEBUG=1 or GRAPHQL_PLAYGROUND=1.
"""

import collections
import contextvars
import functools
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, NamedTuple, NewType

import strawberry
from django.conf import settings
from graphql import (
    DocumentNode,
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

# A field whose resolver calls a model (`complete`, `completionStream`, `prompt`) says so with
# `metadata=MODEL_CALL`; an operation may hold at most GRAPHQL_MAX_MODEL_CALLS of them.
MODEL_CALL = {"turbo_model_call": True}


def document_refusal(query: str | None) -> GraphQLError | None:
    """The error for a document over GRAPHQL_MAX_QUERY_BYTES, checked before it is parsed (lexing is
    Python: a megabyte costs a tenth of a second of the event loop)."""
    limit = settings.GRAPHQL_MAX_QUERY_BYTES
    if not isinstance(query, str) or len(query) * 4 <= limit:  # UTF-8 takes at most 4 bytes a character
        return None
    if len(query) <= limit and len(query.encode("utf-8", "surrogatepass")) <= limit:
        return None
    return GraphQLError(
        f"the query is larger than {limit} bytes (GRAPHQL_MAX_QUERY_BYTES): pass values as variables",
        extensions={"code": "invalid_query"},
    )


def variables_refusal(variables) -> GraphQLError | None:
    """The error for variables holding more than GRAPHQL_MAX_VARIABLE_VALUES values (objects, lists and
    scalars), counted before they are coerced: strawberry turns each input object into its class at
    some 50-100 microseconds apiece, so a megabyte of `messages` would hold the event loop for seconds."""
    limit = settings.GRAPHQL_MAX_VARIABLE_VALUES
    count, pending = 0, [variables]
    while pending:
        value = pending.pop()
        count += 1
        if count > limit:
            return GraphQLError(
                f"the variables hold more than {limit} values (GRAPHQL_MAX_VARIABLE_VALUES)",
                extensions={"code": "invalid_query"},
            )
        if isinstance(value, dict):
            pending.extend(value.values())
        elif isinstance(value, list):
            pending.extend(value)
    return None


def fields_over(document: DocumentNode, limit: int) -> bool:
    """Does the document hold more than `limit` selections: fields (aliases included, each fragment's
    once) and fragment spreads and inline fragments?

    Counted before validation: graphql-core's rule that fields may merge compares fields pairwise, and
    each field with the fragments spread beside it (not remembered per pair), so a thousand repetitions
    of one field, or forty of a field spreading twenty fragments, cost a large part of a second of the
    event loop each.
    """
    count = 0
    pending = [definition.selection_set for definition in document.definitions if hasattr(definition, "selection_set")]
    while pending:
        selection_set = pending.pop()
        for selection in selection_set.selections if selection_set is not None else ():
            count += 1
            if count > limit:
                return True
            if getattr(selection, "selection_set", None) is not None:
                pending.append(selection.selection_set)
    return False


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


def _calls_a_model(definition) -> bool:
    field = (definition.extensions or {}).get("strawberry-definition")
    return bool(field is not None and field.metadata.get("turbo_model_call"))


class Measure(NamedTuple):
    """What a selection set asks for: its cost, its depth and the model calls in it."""

    cost: int = 0
    depth: int = 0
    model_calls: int = 0


class OperationMeasure:
    """Measures an operation in one walk, each fragment once (remembered per fragment and list
    context), so a document whose fragments spread fragments costs what it is long, not what it
    expands to; a fragment that spreads itself counts nothing (NoFragmentCyclesRule reports it)."""

    def __init__(self, context):
        self.context = context
        self.fragments: dict[tuple[str, bool], Measure] = {}
        self.entered: set[tuple[str, bool]] = set()

    def selection_set(self, selection_set: SelectionSetNode | None, parent_type, *, sized: bool = False) -> Measure:
        """Cost: fields counted once each, times the size of every list they sit in (a field with a
        size argument `first`/`last`/`limit` multiplies what is under it by that size; a list field
        under no size argument by ASSUMED_LIST_SIZE). Depth: field levels below this set. Model calls:
        fields marked MODEL_CALL, times the lists they sit in. Introspection fields count nothing."""
        if selection_set is None:
            return Measure()
        cost = depth = model_calls = 0
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
                inner = self.selection_set(
                    selection.selection_set, get_named_type(definition.type), sized=children_sized
                )
                cost += multiplier * (1 + inner.cost)
                model_calls += multiplier * (_calls_a_model(definition) + inner.model_calls)
                if selection.selection_set is not None:
                    depth = max(depth, 1 + inner.depth)
                continue
            if isinstance(selection, InlineFragmentNode):
                fragment_type = parent_type
                if selection.type_condition is not None:
                    fragment_type = self.context.schema.get_type(selection.type_condition.name.value) or parent_type
                inner = self.selection_set(selection.selection_set, fragment_type, sized=sized)
            elif isinstance(selection, FragmentSpreadNode):
                inner = self.fragment(selection.name.value, parent_type, sized=sized)
            else:
                continue
            cost, model_calls = cost + inner.cost, model_calls + inner.model_calls
            depth = max(depth, inner.depth)
        return Measure(cost, depth, model_calls)

    def fragment(self, name: str, parent_type, *, sized: bool) -> Measure:
        key = (name, sized)
        if key in self.fragments:
            return self.fragments[key]
        fragment = self.context.get_fragment(name)
        if fragment is None or key in self.entered:
            return Measure()  # unknown, or a cycle: validation reports both
        self.entered.add(key)
        fragment_type = self.context.schema.get_type(fragment.type_condition.name.value) or parent_type
        found = self.fragments[key] = self.selection_set(fragment.selection_set, fragment_type, sized=sized)
        return found


def limits_rule(max_depth: int, max_cost: int, max_model_calls: int) -> type[ValidationRule]:
    class OperationLimits(ValidationRule):
        """GRAPHQL_MAX_DEPTH, GRAPHQL_MAX_COST and GRAPHQL_MAX_MODEL_CALLS, each operation measured once."""

        def enter_document(self, *_args) -> None:
            self.measure = OperationMeasure(self.context)

        def enter_operation_definition(self, node: OperationDefinitionNode, *_args) -> None:
            root = self.context.schema.get_root_type(node.operation)
            measured = self.measure.selection_set(node.selection_set, root)
            name = node.name.value if node.name else "anonymous"
            if measured.depth > max_depth:
                self.report_error(GraphQLError(f"'{name}' exceeds maximum operation depth of {max_depth}", node))
            if measured.cost > max_cost:
                self.report_error(
                    GraphQLError(
                        f"the query's cost is {measured.cost}, more than the maximum cost of {max_cost}: ask for "
                        f"fewer fields or smaller pages (first/last/limit)",
                        node,
                        extensions={"code": "query_too_costly"},
                    )
                )
            if measured.model_calls > max_model_calls:
                self.report_error(
                    GraphQLError(
                        f"the operation would call a model {measured.model_calls} times; at most "
                        f"{max_model_calls} (GRAPHQL_MAX_MODEL_CALLS): send one operation per model call",
                        node,
                        extensions={"code": "query_too_costly"},
                    )
                )

    return OperationLimits


@functools.lru_cache(maxsize=8)  # one class per limit: the validation cache keys on the rules
def fields_refusal_rule(max_fields: int) -> type[ValidationRule]:
    class TooManyFields(ValidationRule):
        def enter_document(self, node: DocumentNode, *_args) -> None:
            self.report_error(
                GraphQLError(
                    f"the document holds more than {max_fields} fields (GRAPHQL_MAX_FIELDS)",
                    extensions={"code": "query_too_costly"},
                )
            )

    return TooManyFields


@functools.lru_cache(maxsize=8)
def _rules(max_depth: int, max_cost: int, max_model_calls: int, introspection: bool) -> tuple[Any, ...]:
    rules: list[Any] = [limits_rule(max_depth, max_cost, max_model_calls)]
    if not introspection:
        rules.append(NoSchemaIntrospectionCustomRule)
    return tuple(rules)


# Parsed documents by (query, token limit), most recently used last (strawberry's ParserCache parses
# in its hook, where a syntax error escapes the socket's error handling; here strawberry parses).
_documents: collections.OrderedDict[tuple[str, int], DocumentNode] = collections.OrderedDict()
DOCUMENTS_CACHED = 128


class Limits(SchemaExtension):
    """The limits of this operation, as the settings say now: tokens while parsing, fields before
    validation, then depth, cost, model calls and introspection as validation rules."""

    def on_operation(self) -> Iterator[None]:
        context = self.execution_context
        context.parse_options["max_lexical_tokens"] = settings.GRAPHQL_MAX_TOKENS
        introspection = bool(settings.DEBUG or settings.GRAPHQL_PLAYGROUND)
        rules = _rules(
            settings.GRAPHQL_MAX_DEPTH, settings.GRAPHQL_MAX_COST, settings.GRAPHQL_MAX_MODEL_CALLS, introspection
        )
        context.validation_rules = context.validation_rules + rules
        yield

    def on_parse(self) -> Iterator[None]:
        context = self.execution_context
        key = (context.query, settings.GRAPHQL_MAX_TOKENS)
        cached = _documents.get(key) if isinstance(context.query, str) else None
        if cached is not None:
            _documents.move_to_end(key)
            context.graphql_document = cached
        yield
        if cached is None and context.graphql_document is not None and isinstance(context.query, str):
            _documents[key] = context.graphql_document
            if len(_documents) > DOCUMENTS_CACHED:
                _documents.popitem(last=False)

    def on_validate(self) -> Iterator[None]:
        context = self.execution_context
        if context.graphql_document is not None and fields_over(context.graphql_document, settings.GRAPHQL_MAX_FIELDS):
            context.validation_rules = (fields_refusal_rule(settings.GRAPHQL_MAX_FIELDS),)  # nothing else runs
        yield
