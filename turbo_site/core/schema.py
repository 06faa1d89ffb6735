"""OpenAPI pieces every app uses: the error shape and its documented statuses."""

from drf_spectacular.utils import OpenApiResponse
from rest_framework import serializers


class ErrorBody(serializers.Serializer):
    code = serializers.CharField()
    message = serializers.CharField()


class ErrorResponse(serializers.Serializer):
    error = ErrorBody()


class EmptyResponse(serializers.Serializer):
    """`{}`"""


_DESCRIPTIONS = {
    400: "invalid input (the message names the field)",
    401: "missing, invalid, expired or revoked token",
    403: "not allowed",
    404: "not found",
    405: "method not allowed",
    409: "conflict",
    413: "body too large",
    415: "unsupported content type",
    429: "rate limited (see Retry-After)",
    502: "the upstream failed",
    503: "no upstream configured",
    504: "the upstream timed out",
}


def errors(*codes: int) -> dict:
    """`responses=` entries for the given error statuses, all in the one error shape."""
    return {code: OpenApiResponse(ErrorResponse, description=_DESCRIPTIONS[code]) for code in codes}


def get_and_post(*, request=None, responses: dict, summary: str):
    """Class decorator for reads that answer GET (query string) and POST (body) alike, documented both ways."""
    from drf_spectacular.utils import extend_schema

    def decorate(view_class):
        def get(self, http_request, *args, **kwargs):
            return self.post(http_request, *args, **kwargs)

        view_class.get = extend_schema(parameters=[request] if request else None, responses=responses, summary=summary)(
            get
        )
        view_class.post = extend_schema(request=request, responses=responses, summary=summary)(view_class.post)
        return view_class

    return decorate


# Serializer -> what its component adds to what drf-spectacular makes of its fields (see schema_extra).
_EXTRAS: dict[type, dict] = {}


def schema_extra(**extra):
    """Class decorator for a serializer whose rules its fields cannot say: `anyOf` (one of several
    fields required, e.g. `id` or its older name `chat_id`), `additionalProperties: False` (unknown keys
    refused). Applied to its components, and its subclasses', by `add_schema_extras`."""

    def decorate(serializer_class):
        _EXTRAS[serializer_class] = extra
        return serializer_class

    return decorate


def one_of_required(*names: str) -> dict:
    """`anyOf` for schema_extra: at least one of the fields `names`."""
    return {"anyOf": [{"required": [name]} for name in names]}


def add_schema_extras(result, generator, request, public):
    """drf-spectacular postprocessing hook: schema_extra's additions, on the request and response
    components of each serializer (`Name` and, split for requests, `NameRequest`)."""
    components = result.get("components", {}).get("schemas", {})

    def family(cls: type) -> list[type]:
        return [cls, *(kin for sub in cls.__subclasses__() for kin in family(sub))]

    alternatives = []  # field names of which one is required, e.g. ["id", "chat_id"]
    for serializer_class, extra in _EXTRAS.items():
        for cls in family(serializer_class):
            for component in (cls.__name__, f"{cls.__name__}Request"):
                if component in components:
                    components[component].update(extra)
        group = [name for choice in extra.get("anyOf", []) for name in choice.get("required", [])]
        if group and not any(set(group) == set(known) for known in alternatives):
            alternatives.append(group)
    for operations in result.get("paths", {}).values():
        for operation in operations.values():
            _require_one(operation, components, alternatives)
    return result


def _require_one(operation: dict, components: dict, alternatives: list[list[str]]) -> None:
    """A body whose schema requires one of several fields is itself required; a query string (which
    cannot say "one of") documents the first name only, as required (the others are aliases)."""
    for media in (operation.get("requestBody") or {}).get("content", {}).values():
        reference = media.get("schema", {}).get("$ref", "")
        if "anyOf" in components.get(reference.rsplit("/", 1)[-1], {}):
            operation["requestBody"]["required"] = True
    parameters = operation.get("parameters") or []
    names = {parameter["name"] for parameter in parameters if parameter.get("in") == "query"}
    for group in alternatives:
        if set(group) <= names:
            first, aliases = group[0], set(group[1:])
            operation["parameters"] = parameters = [
                {**parameter, "required": True} if parameter["name"] == first else parameter
                for parameter in parameters
                if not (parameter.get("in") == "query" and parameter["name"] in aliases)
            ]
