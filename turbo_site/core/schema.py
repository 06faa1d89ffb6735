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
