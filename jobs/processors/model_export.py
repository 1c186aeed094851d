"""model_export: stream a model's rows to CSV or JSON Lines, optionally filtered and compressed."""

from __future__ import annotations

import base64
import csv
import datetime
import decimal
import gzip
import io
import json
import re
import uuid
from collections.abc import Iterable
from datetime import timedelta
from typing import IO, TYPE_CHECKING, Any, cast

from django.apps import apps
from django.core.exceptions import EmptyResultSet, FieldDoesNotExist, FieldError, FullResultSet, ValidationError
from django.db import models
from django.utils import timezone
from django.utils.duration import duration_iso_string
from rest_framework import serializers

from jobs.executors.data_processing import DataProcessor

from .outputs import SeriesNames, atomic_output, directory_param, output_directory

if TYPE_CHECKING:
    from jobs.models import JobRun

# Never exported, nor filterable (a filter on a secret leaks it one row count at a time).
REFUSED_MODELS = frozenset({"sessions.session", "authtoken.token", "authtoken.tokenproxy"})
SECRET_FIELD_NAMES = frozenset({"password"})

# Comparisons and date parts only: no regex (slow on big tables), no raw SQL, no expressions.
ALLOWED_LOOKUPS = frozenset(
    {
        "exact",
        "iexact",
        "contains",
        "icontains",
        "in",
        "gt",
        "gte",
        "lt",
        "lte",
        "startswith",
        "istartswith",
        "endswith",
        "iendswith",
        "range",
        "isnull",
        "date",
        "year",
        "month",
        "day",
        "week_day",
        "hour",
    }
)
MAX_RELATION_DEPTH = 2
_KEY = re.compile(r"^[A-Za-z][A-Za-z0-9]*(?:_[A-Za-z0-9]+)*(?:__[A-Za-z][A-Za-z0-9]*(?:_[A-Za-z0-9]+)*)*$")
_SCALARS = (str, int, float, bool, type(None))
CHUNK_ROWS = 2000


def model_label(model: type[models.Model]) -> str:
    return f"{model._meta.app_label}.{model._meta.object_name}"


def _refused_model(model: type[models.Model]) -> bool:
    return model._meta.label_lower in REFUSED_MODELS


def _secret(field: Any) -> bool:
    return getattr(field, "name", "") in SECRET_FIELD_NAMES


def exportable_fields(model: type[models.Model]) -> list[models.Field]:
    return [field for field in model._meta.concrete_fields if not _secret(field)]


def check_filter_key(model: type[models.Model], key: Any) -> None:
    """Refuse a filter key that is not a plain path of fields ending in an allowed lookup."""
    if not isinstance(key, str) or not _KEY.fullmatch(key):
        raise serializers.ValidationError(f"{key!r} is not a field lookup (letters, digits and single '_' per name)")
    parts = key.split("__")
    current = model
    depth = 0
    index = 0
    while index < len(parts):
        try:
            field = current._meta.get_field(parts[index])
        except FieldDoesNotExist:
            break
        if _secret(field):
            raise serializers.ValidationError(f"{key!r}: {parts[index]} is secret and cannot be filtered on")
        index += 1
        # A relation's model is a class once the app registry is ready, never the string "self".
        related = cast("type[models.Model] | None", field.related_model) if field.is_relation else None
        if related is not None and index < len(parts) and parts[index] not in ALLOWED_LOOKUPS:
            if _refused_model(related):
                raise serializers.ValidationError(f"{key!r} reaches {related._meta.label}, which is never exported")
            depth += 1
            if depth > MAX_RELATION_DEPTH:
                raise serializers.ValidationError(f"{key!r} follows more than {MAX_RELATION_DEPTH} relations")
            current = related
    if index == 0:
        names = ", ".join(sorted(field.name for field in exportable_fields(model)))
        raise serializers.ValidationError(f"{key!r}: {model_label(model)} has no field {parts[0]!r}; fields: {names}")
    for lookup in parts[index:]:
        if lookup not in ALLOWED_LOOKUPS:
            raise serializers.ValidationError(
                f"{key!r}: {lookup!r} is not a field of {model_label(current)} nor an allowed lookup "
                f"({', '.join(sorted(ALLOWED_LOOKUPS))})"
            )


def check_filter_value(key: str, value: Any) -> None:
    if isinstance(value, list):
        if len(value) > 1000 or not all(isinstance(item, _SCALARS) for item in value):
            raise serializers.ValidationError(f"{key!r}: a list value holds at most 1000 plain values")
    elif not isinstance(value, _SCALARS):
        raise serializers.ValidationError(f"{key!r}: the value must be a string, number, boolean, null or list")


class ModelExportParameters(serializers.Serializer):
    model = serializers.CharField(help_text='The model to export, as "app_label.ModelName", e.g. "jobs.JobRun".')
    format = serializers.ChoiceField(choices=["csv", "jsonl"], default="csv", help_text="CSV or JSON Lines.")
    # DRF's metaclass moves declared fields off the class, so this does not replace Serializer.fields.
    fields = serializers.ListField(  # type: ignore[assignment]
        child=serializers.CharField(),
        required=False,
        min_length=1,
        max_length=200,
        help_text="Columns, in order (concrete fields; foreign keys as 'job' or 'job_id'). Default: all.",
    )
    filters = serializers.DictField(
        required=False,
        default=dict,
        help_text='Passed to .filter(), e.g. {"status": "failed", "created_at__gte": "2026-01-01T00:00:00Z"}.',
    )
    time_field = serializers.CharField(
        required=False, help_text="With window_seconds: export rows whose date-time field lies in the window."
    )
    window_seconds = serializers.IntegerField(
        required=False,
        min_value=1,
        max_value=366 * 24 * 3600,
        help_text="Export rows with scheduled_for - window <= time_field < scheduled_for (the run's fire time).",
    )
    compress = serializers.BooleanField(default=False, help_text="gzip the file (.csv.gz / .jsonl.gz).")
    escape_formulas = serializers.BooleanField(
        default=True,
        help_text="CSV: put ' before text starting with = + - @ tab or CR, so a spreadsheet shows it as text.",
    )
    keep = serializers.IntegerField(
        required=False, min_value=1, max_value=10_000, help_text="Keep only the newest N exports of this model."
    )
    directory = directory_param("Where to write; absolute, or relative to JOBS['EXPORT_DIR'] (the default).")

    def validate_model(self, value: str) -> str:
        try:
            model = apps.get_model(value)
        except (LookupError, ValueError) as exc:
            raise serializers.ValidationError(
                f'{value!r} is not an installed model; use "app_label.ModelName", e.g. "jobs.JobRun"'
            ) from exc
        if _refused_model(model):
            raise serializers.ValidationError(f"{model._meta.label} holds secrets and is never exported")
        return model_label(model)

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        model = apps.get_model(attrs["model"])
        if "fields" in attrs:
            attrs["fields"] = [self._field(model, name) for name in attrs["fields"]]
        filters = attrs.get("filters") or {}
        errors: list[str] = []
        for key, value in filters.items():
            try:
                check_filter_key(model, key)
                check_filter_value(key, value)
            except serializers.ValidationError as exc:
                errors.extend(str(detail) for detail in exc.detail)
        if errors:
            raise serializers.ValidationError({"filters": errors})
        if ("time_field" in attrs) != ("window_seconds" in attrs):
            raise serializers.ValidationError({"window_seconds": "time_field and window_seconds go together"})
        if "time_field" in attrs:
            try:
                field = model._meta.get_field(attrs["time_field"])
            except FieldDoesNotExist:
                field = None
            if not isinstance(field, models.DateTimeField):
                raise serializers.ValidationError({"time_field": f"not a date-time field of {attrs['model']}"})
        try:
            # Builds and compiles the query without running it: bad lookups and values fail here.
            model._default_manager.filter(**filters).query.sql_with_params()
        except (EmptyResultSet, FullResultSet):
            pass
        except (FieldError, ValidationError, ValueError, TypeError) as exc:
            raise serializers.ValidationError({"filters": [f"{type(exc).__name__}: {exc}"]}) from exc
        return attrs

    @staticmethod
    def _field(model: type[models.Model], name: str) -> str:
        for field in model._meta.concrete_fields:
            if name in (field.name, field.attname):
                if _secret(field):
                    raise serializers.ValidationError({"fields": f"{name} is secret and never exported"})
                return name
        names = ", ".join(field.name for field in exportable_fields(model))
        raise serializers.ValidationError({"fields": f"{model_label(model)} has no field {name!r}; fields: {names}"})


def _plain(value: Any) -> Any:
    """Return `value` as a JSON-native value."""
    if isinstance(value, datetime.datetime | datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, timedelta):
        return duration_iso_string(value)
    if isinstance(value, decimal.Decimal | uuid.UUID):
        return str(value)
    if isinstance(value, bytes | memoryview):
        return base64.b64encode(bytes(value)).decode("ascii")
    return value


# A cell starting with one of these is a formula to a spreadsheet (OWASP "CSV injection").
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def _csv_cell(value: Any, *, escape_formulas: bool = True) -> Any:
    value = _plain(value)
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict | list):
        return json.dumps(value, ensure_ascii=False, sort_keys=True)
    if escape_formulas and isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


class ModelExport(DataProcessor):
    name = "model_export"
    description = (
        "Export a model's rows (optionally filtered, or those in a time window before the fire time) "
        "to CSV or JSON Lines in JOBS['EXPORT_DIR'], streaming so memory stays flat."
    )
    parameters_serializer = ModelExportParameters
    safe_to_repeat = True

    def process(self, run: JobRun, params: dict[str, Any]) -> dict[str, Any]:
        model = apps.get_model(params["model"])
        columns = params.get("fields") or [field.name for field in exportable_fields(model)]
        attnames = [self._attname(model, column) for column in columns]
        queryset = model._default_manager.filter(**params["filters"])
        if "time_field" in params:
            end = run.scheduled_for
            queryset = queryset.filter(
                **{
                    f"{params['time_field']}__gte": end - timedelta(seconds=params["window_seconds"]),
                    f"{params['time_field']}__lt": end,
                }
            )
        rows = queryset.order_by("pk").values_list(*attnames).iterator(chunk_size=CHUNK_ROWS)

        directory = output_directory("EXPORT_DIR", params.get("directory"))
        suffix = f".{params['format']}" + (".gz" if params["compress"] else "")
        names = SeriesNames(directory=directory, prefix=model._meta.label_lower, suffix=suffix)
        with atomic_output(names, timezone.now()) as (writer, written):
            binary = gzip.GzipFile(fileobj=writer, mode="wb", compresslevel=6) if params["compress"] else writer
            # HashingWriter has no `name`, which TextIOWrapper only reads for its repr.
            text = io.TextIOWrapper(cast(IO[bytes], binary), encoding="utf-8", newline="")
            try:
                if params["format"] == "csv":
                    count = write_csv(text, columns, rows, escape_formulas=params["escape_formulas"])
                else:
                    count = write_jsonl(text, columns, rows)
            finally:
                text.flush()
                text.detach()
                if binary is not writer:
                    binary.close()
        deleted = names.prune(params["keep"]) if params.get("keep") else []
        output = written[0]
        return {
            "path": str(output.path),
            "rows": count,
            "bytes": output.size_bytes,
            "sha256": output.sha256,
            "model": params["model"],
            "format": params["format"],
            "deleted": deleted,
        }

    @staticmethod
    def _attname(model: type[models.Model], column: str) -> str:
        for field in model._meta.concrete_fields:
            if column in (field.name, field.attname):
                return field.attname
        raise FieldDoesNotExist(column)


def write_csv(
    out: io.TextIOWrapper, columns: list[str], rows: Iterable[tuple[Any, ...]], *, escape_formulas: bool = True
) -> int:
    writer = csv.writer(out)
    writer.writerow(columns)
    count = 0
    for row in rows:
        writer.writerow([_csv_cell(value, escape_formulas=escape_formulas) for value in row])
        count += 1
    return count


def write_jsonl(out: io.TextIOWrapper, columns: list[str], rows: Iterable[tuple[Any, ...]]) -> int:
    count = 0
    for row in rows:
        record = {column: _plain(value) for column, value in zip(columns, row, strict=True)}
        out.write(json.dumps(record, ensure_ascii=False, default=str))
        out.write("\n")
        count += 1
    return count
