"""JSON Schema for a DRF serializer, used to describe each job type's parameters."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

from rest_framework import serializers


def field_schema(field: serializers.Field) -> dict[str, Any]:
    """Return the JSON Schema of one serializer field."""
    schema: dict[str, Any]
    if isinstance(field, serializers.Serializer):
        return serializer_schema(field)
    if isinstance(field, serializers.ListSerializer):
        # DRF refuses to build a ListSerializer without a child; the stubs allow None.
        schema = {"type": "array", "items": field_schema(cast(serializers.Field, field.child))}
    elif isinstance(field, serializers.ListField):
        schema = {"type": "array", "items": field_schema(field.child)}
        if getattr(field, "child", None) is not None and isinstance(field.child, serializers.EmailField):
            # Our address lists also take a single address.
            schema = {"oneOf": [field_schema(field.child), schema]}
        if field.min_length is not None:
            (schema["oneOf"][1] if "oneOf" in schema else schema)["minItems"] = field.min_length
    elif isinstance(field, serializers.BooleanField):
        schema = {"type": "boolean"}
    elif isinstance(field, serializers.IntegerField):
        schema = {"type": "integer", **_bounds(minimum=field.min_value, maximum=field.max_value)}
    elif isinstance(field, (serializers.FloatField, serializers.DecimalField)):
        schema = {"type": "number", **_bounds(minimum=field.min_value, maximum=field.max_value, convert=float)}
    elif isinstance(field, serializers.ChoiceField):
        schema = {"enum": list(field.choices)}
    elif isinstance(field, serializers.DictField):
        schema = {"type": "object", "additionalProperties": field_schema(field.child) if field.child else True}
    elif isinstance(field, serializers.JSONField):
        schema = {}
    elif isinstance(field, serializers.EmailField):
        schema = {"type": "string", "format": "email"}
    elif isinstance(field, serializers.URLField):
        schema = {"type": "string", "format": "uri"}
    elif isinstance(field, serializers.DateTimeField):
        schema = {"type": "string", "format": "date-time"}
    elif isinstance(field, serializers.CharField):
        schema = {"type": "string", **_bounds(maxLength=field.max_length, minLength=field.min_length)}
    else:
        schema = {}
    if field.help_text:
        schema["description"] = str(field.help_text)
    if not field.required and field.default is not serializers.empty and not callable(field.default):
        schema["default"] = field.default
    return schema


def _bounds(convert: Callable[[Any], Any] = lambda value: value, **limits: Any) -> dict[str, Any]:
    """Return the limits that are set (not None), converted, keyed by their JSON Schema keyword."""
    return {keyword: convert(limit) for keyword, limit in limits.items() if limit is not None}


def serializer_schema(serializer: serializers.Serializer) -> dict[str, Any]:
    """Return the JSON Schema of a serializer's writable fields."""
    properties = {}
    required = []
    for name, field in serializer.fields.items():
        if field.read_only:
            continue
        properties[name] = field_schema(field)
        if field.required:
            required.append(name)
    schema: dict[str, Any] = {"type": "object", "properties": properties, "additionalProperties": False}
    if required:
        schema["required"] = required
    return schema
