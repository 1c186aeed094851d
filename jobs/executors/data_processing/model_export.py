"""model_export: stream a model's rows to CSV or JSON Lines, optionally filtered and compressed."""

from __future__ import annotations

import base64
import contextlib
import csv
import datetime
import decimal
import gzip
import io
import json
import logging
import re
import time
import uuid
from collections.abc import Generator, Iterable, Iterator
from datetime import timedelta
from typing import IO, TYPE_CHECKING, Any, cast

from django.apps import apps
from django.contrib.auth import get_permission_codename
from django.core.exceptions import EmptyResultSet, FieldDoesNotExist, FullResultSet
from django.db import DatabaseError, connections, models, transaction
from django.utils import timezone
from django.utils.duration import duration_iso_string
from rest_framework import serializers

from jobs.executors.base import RunTimedOut, seconds_left
from jobs.executors.data_processing import DataProcessor

from .outputs import SeriesNames, atomic_output, directory_param, open_output_directory

if TYPE_CHECKING:
    from jobs.models import JobRun

logger = logging.getLogger(__name__)

# Never exported, nor filterable (a filter on a secret leaks it one row count at a time).
REFUSED_MODELS = frozenset({"sessions.session", "authtoken.token", "authtoken.tokenproxy"})
SECRET_FIELD_NAMES = frozenset({"password"})

# Transforms (a date part of a date or date-time) that may stand before a comparison.
TRANSFORMS = frozenset({"date", "year", "month", "day", "week_day", "hour"})
# Comparisons and date parts only: no regex (slow on big tables), no raw SQL, no expressions.
ALLOWED_LOOKUPS = TRANSFORMS | {
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
}
MAX_RELATION_DEPTH = 2
MAX_FILTERS = 50
MAX_LIST_ITEMS = 1000
_KEY = re.compile(r"^[A-Za-z][A-Za-z0-9]*(?:_[A-Za-z0-9]+)*(?:__[A-Za-z][A-Za-z0-9]*(?:_[A-Za-z0-9]+)*)*$")
_SCALARS = (str, int, float, bool, type(None))
CHUNK_ROWS = 2000
# Seconds a create-time EXPLAIN may wait (for a lock, say) before the filters are refused.
EXPLAIN_TIMEOUT = 5.0
# SQLite virtual-machine steps between two looks at the clock while a query runs.
SQLITE_PROGRESS_STEPS = 10_000


def model_label(model: type[models.Model]) -> str:
    return f"{model._meta.app_label}.{model._meta.object_name}"


def _refused_model(model: type[models.Model]) -> bool:
    return model._meta.label_lower in REFUSED_MODELS


def _secret(field: Any) -> bool:
    return getattr(field, "name", "") in SECRET_FIELD_NAMES


def exportable_fields(model: type[models.Model]) -> list[models.Field]:
    return [field for field in model._meta.concrete_fields if not _secret(field)]


def check_filter_key(model: type[models.Model], key: Any) -> tuple[list[type[models.Model]], list[str]]:
    """Refuse a filter key that is not a plain path of fields ending in allowed lookups.

    Return the models the key reaches through relations and the lookups after its last field.
    """
    if not isinstance(key, str) or not _KEY.fullmatch(key):
        raise serializers.ValidationError(f"{key!r} is not a field lookup (letters, digits and single '_' per name)")
    parts = key.split("__")
    current = model
    reached: list[type[models.Model]] = []
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
            if len(reached) >= MAX_RELATION_DEPTH:
                raise serializers.ValidationError(f"{key!r} follows more than {MAX_RELATION_DEPTH} relations")
            reached.append(related)
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
    return reached, parts[index:]


def _check_text(key: str, value: Any) -> None:
    if not isinstance(value, str):
        return
    if "\x00" in value:
        # PostgreSQL refuses NUL in text when the query runs; refuse it everywhere, at once.
        raise serializers.ValidationError(f"{key!r}: text must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise serializers.ValidationError(f"{key!r}: text must be valid Unicode (no lone surrogates)") from exc


def check_filter_value(key: str, lookups: list[str], value: Any) -> None:
    """Refuse a value whose shape does not fit the key's final lookup (a list for `in`, two items for `range`...)."""
    # A key ending in a field or a transform compares with `exact`.
    final = lookups[-1] if lookups and lookups[-1] not in TRANSFORMS else "exact"
    if isinstance(value, list):
        if final not in ("in", "range"):
            raise serializers.ValidationError(f"{key!r}: {final} takes a single value, not a list")
        if len(value) > MAX_LIST_ITEMS or not all(isinstance(item, _SCALARS) for item in value):
            raise serializers.ValidationError(f"{key!r}: a list value holds at most {MAX_LIST_ITEMS} plain values")
        for item in value:
            _check_text(key, item)
    elif not isinstance(value, _SCALARS):
        raise serializers.ValidationError(f"{key!r}: the value must be a string, number, boolean, null or list")
    _check_text(key, value)
    if final == "in" and not isinstance(value, list):
        raise serializers.ValidationError(f"{key!r}: in takes a list of values")
    if final == "range" and not (isinstance(value, list) and len(value) == 2):
        raise serializers.ValidationError(f"{key!r}: range takes a list of two values, [low, high]")
    if final == "isnull" and not isinstance(value, bool):
        raise serializers.ValidationError(f"{key!r}: isnull takes true or false")


def _reason(exc: BaseException) -> str:
    """Return an exception's first line, short enough for an error message."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__


def check_filter_query(model: type[models.Model], key: str, value: Any) -> None:
    """Refuse a filter that Django cannot build or compile for this field and database."""
    try:
        queryset = model._default_manager.filter(**{key: value})
        with contextlib.suppress(EmptyResultSet, FullResultSet):  # matches nothing, or everything: fine
            queryset.query.sql_with_params()
    # Django reports a bad lookup or value with FieldError, ValueError, TypeError, ValidationError,
    # NotSupportedError, and for some field types AttributeError or IndexError: all mean the same.
    except Exception as exc:
        raise serializers.ValidationError(f"{key!r}: {_reason(exc)}") from exc


def explain(queryset: models.QuerySet[Any]) -> None:
    """Have the database plan `queryset` without running it; raise what it raises.

    Some errors appear only then, never when Django compiles the SQL: a number too large for
    SQLite, text PostgreSQL cannot cast to the column's type, a missing table. EXPLAIN (SQLite:
    EXPLAIN QUERY PLAN) binds the values and plans the query but reads no rows, so it costs
    the same on a large table as on an empty one.
    """
    if not connections[queryset.db].features.supports_explaining_query_execution:
        return
    try:
        with bounded_read(queryset.db, time.monotonic() + EXPLAIN_TIMEOUT):
            queryset.explain()
    except RunTimedOut as exc:
        raise TimeoutError(f"the database did not plan the query within {EXPLAIN_TIMEOUT:g}s") from exc


def export_queryset(model: type[models.Model], params: dict[str, Any], *, end: datetime.datetime) -> Any:
    """Return the rows to export (a values_list queryset), exactly as a run with fire time `end` reads them."""
    columns = params.get("fields") or [field.name for field in exportable_fields(model)]
    attnames = [_attname(model, column) for column in columns]
    queryset = model._default_manager.filter(**params.get("filters", {}))
    if "time_field" in params:
        queryset = queryset.filter(
            **{
                f"{params['time_field']}__gte": end - timedelta(seconds=params["window_seconds"]),
                f"{params['time_field']}__lt": end,
            }
        )
    return queryset.order_by("pk").values_list(*attnames)


def _attname(model: type[models.Model], column: str) -> str:
    for field in model._meta.concrete_fields:
        if column in (field.name, field.attname):
            return field.attname
    raise FieldDoesNotExist(column)


class ModelExportParameters(serializers.Serializer):
    model = serializers.CharField(
        max_length=200, help_text='The model to export, as "app_label.ModelName", e.g. "jobs.JobRun".'
    )
    format = serializers.ChoiceField(choices=["csv", "jsonl"], default="csv", help_text="CSV or JSON Lines.")
    # DRF's metaclass moves declared fields off the class, so this does not replace Serializer.fields.
    fields = serializers.ListField(  # type: ignore[assignment]
        child=serializers.CharField(max_length=200),
        required=False,
        min_length=1,
        max_length=200,
        help_text="Columns, in order (concrete fields; foreign keys as 'job' or 'job_id'). Default: all.",
    )
    filters = serializers.DictField(
        required=False,
        default=dict,
        help_text=(
            'Passed to .filter(), e.g. {"status": "failed", "created_at__gte": "2026-01-01T00:00:00Z"}: '
            f"fields, relations (at most {MAX_RELATION_DEPTH}) and the lookups "
            f"{', '.join(sorted(ALLOWED_LOOKUPS))}; checked against each field and the database when saved."
        ),
    )
    time_field = serializers.CharField(
        required=False,
        max_length=200,
        help_text="With window_seconds: export rows whose date-time field lies in the window.",
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
    directory = directory_param(
        "EXPORT_DIR",
        "Where to write: relative to JOBS['EXPORT_DIR'] (the default), or an absolute path inside it or inside "
        "a folder listed in JOBS['ALLOWED_OUTPUT_DIRS'].",
    )

    def validate_model(self, value: str) -> str:
        try:
            model = apps.get_model(value)
        except (LookupError, ValueError) as exc:
            raise serializers.ValidationError(
                f'{value!r} is not an installed model; use "app_label.ModelName", e.g. "jobs.JobRun"'
            ) from exc
        if _refused_model(model):
            raise serializers.ValidationError(f"{model._meta.label} holds secrets and is never exported")
        if model._meta.swapped:
            # Its table does not exist; the model that replaced it is the one to export.
            raise serializers.ValidationError(f"{model._meta.label} is replaced by {model._meta.swapped}")
        return model_label(model)

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        model = apps.get_model(attrs["model"])
        if "fields" in attrs:
            attrs["fields"] = [self._field(model, name) for name in attrs["fields"]]
            if len({_attname(model, name) for name in attrs["fields"]}) != len(attrs["fields"]):
                raise serializers.ValidationError({"fields": "a column is listed twice"})
        filters = attrs.get("filters") or {}
        if len(filters) > MAX_FILTERS:
            raise serializers.ValidationError({"filters": f"at most {MAX_FILTERS} filters"})
        errors: list[str] = []
        for key, value in filters.items():
            try:
                _, lookups = check_filter_key(model, key)
                check_filter_value(key, lookups, value)
                check_filter_query(model, key, value)
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
            if not isinstance(field, models.DateTimeField) or not field.concrete or _secret(field):
                raise serializers.ValidationError({"time_field": f"not a date-time field of {attrs['model']}"})
        # A run reads the rows itself (and fails on what EXPLAIN would find); only a job being
        # saved has the database look at the query first.
        if "run" not in self.context:
            self._explain(model, attrs)
        return attrs

    @staticmethod
    def _explain(model: type[models.Model], attrs: dict[str, Any]) -> None:
        try:
            explain(export_queryset(model, attrs, end=timezone.now()))
        except (EmptyResultSet, FullResultSet):
            return
        except Exception as whole:
            raise serializers.ValidationError(_explain_culprits(model, attrs, whole)) from whole

    @staticmethod
    def _field(model: type[models.Model], name: str) -> str:
        for field in model._meta.concrete_fields:
            if name in (field.name, field.attname):
                if _secret(field):
                    raise serializers.ValidationError({"fields": f"{name} is secret and never exported"})
                return name
        names = ", ".join(field.name for field in exportable_fields(model))
        raise serializers.ValidationError({"fields": f"{model_label(model)} has no field {name!r}; fields: {names}"})


def _explain_culprits(model: type[models.Model], attrs: dict[str, Any], whole: Exception) -> dict[str, list[str]]:
    """Return the errors to show when the database refused the export `attrs`: the model, or the filters at fault."""
    filters = attrs.get("filters") or {}
    reason = f"the database refused to read {attrs['model']}"
    checks = [("model", None, {**attrs, "filters": {}})]
    checks += [("filters", key, {"model": attrs["model"], "filters": {key: value}}) for key, value in filters.items()]
    errors: dict[str, list[str]] = {}
    for field, key, params in checks:
        try:
            explain(export_queryset(model, params, end=timezone.now()))
        except (EmptyResultSet, FullResultSet):
            pass
        except Exception as exc:  # noqa: BLE001 - whatever the database says, it refuses this
            message = f"{reason}: {_reason(exc)}" if key is None else f"{key!r}: {reason} with it: {_reason(exc)}"
            errors.setdefault(field, []).append(message)
            if key is None:
                return errors  # the model itself cannot be read: no filter is to blame
    if not errors:
        # Each part alone is fine, together they are not.
        logger.warning("model_export: the database refused an export of %s: %s", attrs["model"], whole)
        keys = ", ".join(repr(key) for key in filters)
        errors["filters"] = [f"{reason} with the filters {keys} together: {_reason(whole)}"]
    return errors


@contextlib.contextmanager
def bounded_read(alias: str, deadline: float) -> Iterator[None]:
    """Run read-only queries that the database stops at `deadline` (time.monotonic()); raise RunTimedOut then.

    PostgreSQL: a statement_timeout inside a transaction (a savepoint when one is open) that is
    always rolled back, so the timeout ends with it and a refused query leaves a surrounding
    transaction usable. SQLite: a progress handler that interrupts the query; no transaction,
    since this project's SQLite transactions take the write lock (BEGIN IMMEDIATE).
    """
    connection = connections[alias]
    try:
        if connection.vendor == "postgresql":
            with transaction.atomic(using=alias):
                try:
                    milliseconds = max(1, int((deadline - time.monotonic()) * 1000))
                    with connection.cursor() as cursor:
                        cursor.execute("SELECT set_config('statement_timeout', %s, true)", [str(milliseconds)])
                    yield
                finally:
                    transaction.set_rollback(True, using=alias)
        elif connection.vendor == "sqlite":
            connection.ensure_connection()
            raw = connection.connection
            raw.set_progress_handler(lambda: int(time.monotonic() >= deadline), SQLITE_PROGRESS_STEPS)
            try:
                yield
            finally:
                raw.set_progress_handler(None, 0)
        else:
            yield
    except DatabaseError as exc:
        if time.monotonic() >= deadline or _cancelled(exc):
            raise RunTimedOut(f"the database query was stopped at the deadline: {_reason(exc)}") from exc
        raise


def _cancelled(exc: BaseException) -> bool:
    # 57014 query_canceled (PostgreSQL's statement_timeout); the message of SQLite's interrupt.
    cause = exc.__cause__
    code = getattr(cause, "sqlstate", None) or getattr(cause, "pgcode", None)
    return code == "57014" or str(exc) == "interrupted"


def query_rows(queryset: Any) -> Generator[tuple[Any, ...], None, None]:
    """Yield the queryset's rows, fetched CHUNK_ROWS at a time so memory stays flat."""
    yield from queryset.iterator(chunk_size=CHUNK_ROWS)


def until_deadline(rows: Iterable[tuple[Any, ...]], run: JobRun) -> Iterator[tuple[Any, ...]]:
    """Yield `rows` while the run has time left; raise RunTimedOut once it has none."""
    deadline = time.monotonic() + seconds_left(run)
    for row in rows:
        # A clock read per row costs well under a percent of writing the row, and catches a
        # slow source (a fetch of the next chunk, a slow disk) as soon as it hands over a row.
        if time.monotonic() >= deadline:
            seconds_left(run)
        yield row


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

    def check_permission(self, user: Any, params: dict[str, Any]) -> None:
        """Refuse a user without the `view` permission on the exported model, or on a model its filters reach."""
        model = apps.get_model(params["model"])
        if not user.has_perm(view_permission(model)):
            raise serializers.ValidationError(
                {"model": [f"exporting {model._meta.label} needs the permission {view_permission(model)}"]}
            )
        errors: list[str] = []
        for key in params.get("filters") or {}:
            reached, _ = check_filter_key(model, key)
            # A filter through a relation reveals the related rows one row count at a time.
            errors.extend(
                f"{key!r} reads {related._meta.label}, which needs the permission {view_permission(related)}"
                for related in reached
                if not user.has_perm(view_permission(related))
            )
        if errors:
            raise serializers.ValidationError({"filters": errors})

    def process(self, run: JobRun, params: dict[str, Any]) -> dict[str, Any]:
        model = apps.get_model(params["model"])
        columns = params.get("fields") or [field.name for field in exportable_fields(model)]
        queryset = export_queryset(model, params, end=run.scheduled_for)
        suffix = f".{params['format']}" + (".gz" if params["compress"] else "")
        with open_output_directory("EXPORT_DIR", params.get("directory")) as directory:
            names = SeriesNames(directory=directory, prefix=model._meta.label_lower, suffix=suffix)
            deadline = time.monotonic() + seconds_left(run)
            with bounded_read(queryset.db, deadline), atomic_output(names, timezone.now()) as (writer, written):
                # Closed inside the block: PostgreSQL's cursor must go before its transaction does.
                source = query_rows(queryset)
                rows = until_deadline(source, run)
                binary = gzip.GzipFile(fileobj=writer, mode="wb", compresslevel=6) if params["compress"] else writer
                # HashingWriter has no `name`, which TextIOWrapper only reads for its repr.
                text = io.TextIOWrapper(cast(IO[bytes], binary), encoding="utf-8", newline="")
                try:
                    if params["format"] == "csv":
                        count = write_csv(text, columns, rows, escape_formulas=params["escape_formulas"])
                    else:
                        count = write_jsonl(text, columns, rows)
                finally:
                    source.close()
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


def view_permission(model: type[models.Model]) -> str:
    """Return the "app_label.view_model" permission that lets a user see `model`'s rows."""
    opts = model._meta
    return f"{opts.app_label}.{get_permission_codename('view', opts)}"


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
