"""Serializer fields with the strictness an API needs (no silent type coercion)."""

import uuid

from rest_framework import serializers


class StrictCharField(serializers.CharField):
    """A CharField that refuses numbers, booleans and objects instead of stringifying them."""

    default_error_messages = {"not_a_string": "must be a string"}

    def to_internal_value(self, data):
        if not isinstance(data, str):
            self.fail("not_a_string")
        return super().to_internal_value(data)


def request_input(request) -> dict:
    """The request's fields: the query string, overlaid by a form or JSON body.

    Form bodies and query strings become a plain dict (repeated keys become lists), so one serializer
    validates input whichever way it arrived.
    """
    merged: dict = {}
    for source in (request.query_params, request.data):
        if hasattr(source, "lists"):
            for key, values in source.lists():
                merged[key] = values if len(values) > 1 else values[0]
        elif isinstance(source, dict):
            merged.update(source)
        else:
            raise serializers.ValidationError({"request": "the body must be a JSON object"})
    return merged


class StrictUUIDField(serializers.UUIDField):
    """A UUID given as text: DRF's UUIDField also takes an integer or a boolean (0 and false become
    00000000-...), an id no client means. A nullable one takes "null" too: a form has no other null."""

    def to_internal_value(self, data):
        if data == "null" and self.allow_null:
            return None
        if not isinstance(data, str | uuid.UUID):
            self.fail("invalid", value=data)
        return super().to_internal_value(data)


class IdListField(serializers.ListField):
    """A list of UUIDs given as a JSON array, repeated form fields, or one comma-separated string."""

    def __init__(self, **kwargs):
        kwargs.setdefault("child", StrictUUIDField())
        kwargs.setdefault("max_length", 100)
        kwargs.setdefault("allow_empty", False)
        kwargs.setdefault("min_length", 1)  # the same rule, in the schema (minItems)
        super().__init__(**kwargs)

    def to_internal_value(self, data):
        if isinstance(data, str):
            data = [item.strip() for item in data.split(",") if item.strip()]
        if isinstance(data, list):
            flattened = []
            for item in data:
                if isinstance(item, str) and "," in item:
                    flattened.extend(part.strip() for part in item.split(",") if part.strip())
                else:
                    flattened.append(item)
            data = flattened
            if self.max_length is not None and len(data) > self.max_length:  # before duplicates go
                self.fail("max_length", max_length=self.max_length)
        ids = super().to_internal_value(data)
        return list(dict.fromkeys(ids))  # de-duplicated, order kept


def plain_request_input(request) -> dict:
    """request_input for plain (non-DRF) Django views, such as the async ones: query string + body."""
    from turbo_site.core.errors import TurboError
    from turbo_site.core.parsers import JSONTooDeep, client_json_loads

    merged: dict = {}
    for key, values in request.GET.lists():
        merged[key] = values if len(values) > 1 else values[0]
    body = request.body
    if not body:
        return merged
    content_type = request.META.get("CONTENT_TYPE", "").split(";")[0].strip().lower()
    if content_type == "application/json" or (
        content_type in ("", "application/x-www-form-urlencoded") and body.lstrip().startswith(b"{")
    ):
        try:
            data = client_json_loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            code = "invalid_json" if isinstance(exc, JSONTooDeep) else "malformed_body"
            raise TurboError(f"malformed JSON body: {exc}", code=code) from exc
        if not isinstance(data, dict):
            raise TurboError("the body must be a JSON object", code="malformed_body")
        merged.update(data)
    elif content_type in ("application/x-www-form-urlencoded", "multipart/form-data"):
        for key, values in request.POST.lists():
            merged[key] = values if len(values) > 1 else values[0]
    else:
        error = TurboError(f"unsupported content type {content_type!r}", code="unsupported_media_type")
        error.status_code = 415
        raise error
    return merged
