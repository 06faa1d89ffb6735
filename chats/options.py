"""A chat's model settings (temperature, max_tokens, ...): validated once, sent with every request.

The same validation serves `/chat/create` and `/chat/update` (`settings`), and chat programs
(`Generate(settings=...)`, `@turbo(temperature=...)`).
"""

import json

from django.conf import settings as django_settings
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from proxy.requests import MAX_TOKENS_MAX, MAX_TOKENS_MIN, TEMPERATURE_RANGE
from turbo_site.core.schema import schema_extra
from turbo_site.core.text import unstorable_text

STOP_MAX = 4  # OpenAI's limit on stop sequences
STOP_MAX_CHARS = 200


_STOP_SEQUENCE = {"type": "string", "minLength": 1, "maxLength": STOP_MAX_CHARS}


@extend_schema_field({"oneOf": [_STOP_SEQUENCE, {"type": "array", "items": _STOP_SEQUENCE, "maxItems": STOP_MAX}]})
class StopField(serializers.Field):
    """`stop`: one string or a list of at most four."""

    def to_internal_value(self, data):
        items = [data] if isinstance(data, str) else data
        if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
            raise serializers.ValidationError("must be a string or a list of strings")
        if len(items) > STOP_MAX:
            raise serializers.ValidationError(f"may hold at most {STOP_MAX} sequences")
        if any(not item or len(item) > STOP_MAX_CHARS for item in items):
            raise serializers.ValidationError(f"each sequence must have 1 to {STOP_MAX_CHARS} characters")
        return data

    def to_representation(self, value):
        return value


class StrictFloatField(serializers.FloatField):
    """A number: refuses strings and booleans rather than converting them."""

    def to_internal_value(self, data):
        if isinstance(data, bool) or not isinstance(data, int | float):
            self.fail("invalid")
        return super().to_internal_value(data)


class StrictIntegerField(serializers.IntegerField):
    def to_internal_value(self, data):
        if isinstance(data, bool) or not isinstance(data, int):
            self.fail("invalid")
        return super().to_internal_value(data)


@schema_extra(additionalProperties=False)
class ModelSettings(serializers.Serializer):
    """The model settings a chat (or a program's Generate) may set; any other key is refused."""

    temperature = StrictFloatField(required=False, min_value=TEMPERATURE_RANGE[0], max_value=TEMPERATURE_RANGE[1])
    top_p = StrictFloatField(required=False, min_value=0, max_value=1)
    max_tokens = StrictIntegerField(required=False, min_value=MAX_TOKENS_MIN, max_value=MAX_TOKENS_MAX)
    presence_penalty = StrictFloatField(required=False, min_value=-2, max_value=2)
    frequency_penalty = StrictFloatField(required=False, min_value=-2, max_value=2)
    stop = StopField(required=False)
    seed = StrictIntegerField(required=False, min_value=-(2**63), max_value=2**63 - 1)

    def validate(self, data):
        unknown = sorted(set(self.initial_data) - set(self.fields))
        if unknown:
            raise serializers.ValidationError(
                f"unknown setting(s): {', '.join(unknown)}; allowed: {', '.join(self.fields)}"
            )
        return data


def settings_validate(value) -> dict:
    """Validated model settings from a JSON object (or its text, as form fields carry it).

    Raises serializers.ValidationError with one readable message.
    """
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except ValueError:
            raise serializers.ValidationError("must be a JSON object") from None
    if not isinstance(value, dict):
        raise serializers.ValidationError("must be a JSON object")
    if problem := unstorable_text(value):  # kept with the chat: Postgres's jsonb refuses NUL
        raise serializers.ValidationError(f"may not hold {problem}")
    parsed = ModelSettings(data=value)
    if not parsed.is_valid():
        problems = []
        for name, errors in parsed.errors.items():
            text = "; ".join(str(error) for error in errors)
            problems.append(text if name == "non_field_errors" else f"{name}: {text}")
        raise serializers.ValidationError(", ".join(problems))
    return dict(parsed.validated_data)


@extend_schema_field(ModelSettings)
class ModelSettingsField(serializers.Field):
    """The `settings` field of the chat API."""

    def to_internal_value(self, data):
        return settings_validate(data)

    def to_representation(self, value):
        return value


def settings_apply(request: dict, *layers: dict) -> dict:
    """`request` with the settings layers applied in order (later ones win), and max_tokens capped by
    DEFAULT_MAX_TOKENS when no layer set it (0 turns the cap off)."""
    merged: dict = {}
    for layer in layers:
        merged.update(layer or {})
    if "max_tokens" not in merged and django_settings.DEFAULT_MAX_TOKENS:
        merged["max_tokens"] = django_settings.DEFAULT_MAX_TOKENS
    return {**request, **merged}
