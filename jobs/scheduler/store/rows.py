"""What every store shares: table and column names taken from the models, and model instances
built from raw rows the way the ORM builds them."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, connection, connections
from django.db.models import Model
from django.utils.dateparse import parse_datetime

from jobs.models import Job, JobRun, RunCount, SchedulerProcess

ModelT = TypeVar("ModelT", bound=Model)


def quoted(name: str) -> str:
    """An identifier quoted for both databases (PostgreSQL and SQLite both use double quotes)."""
    return '"' + name.replace('"', '""') + '"'


JOBS = quoted(Job._meta.db_table)
RUNS = quoted(JobRun._meta.db_table)
PROCESSES = quoted(SchedulerProcess._meta.db_table)
COUNTS = quoted(RunCount._meta.db_table)

# Status, trigger and policy values as SQL literals, taken from the models' choices. Literals
# (not parameters) so that the planners can match the partial indexes' conditions.
S = {status.name: f"'{status.value}'" for status in JobRun.Status}
TRIGGER = {trigger.name: f"'{trigger.value}'" for trigger in JobRun.Trigger}
ACTIVE = ", ".join(f"'{status.value}'" for status in JobRun.ACTIVE)
MISFIRE_SKIP = f"'{Job.MisfirePolicy.SKIP.value}'"
# The partial index on queued runs by (not_before, id) that claiming reads (see JobRun.Meta).
QUEUE_INDEX = "jobrun_queue_idx"


def columns(model: type[Model]) -> list[str]:
    return [field.column for field in model._meta.concrete_fields]


def placeholders(count: int) -> str:
    return ", ".join(["%s"] * count)


def values_rows(rows: Sequence[Sequence[Any]]) -> tuple[str, list[Any]]:
    """The placeholder rows of a `VALUES` list for `rows` (all of one width), and their
    parameters in order."""
    width = len(rows[0])
    return ", ".join([f"({placeholders(width)})"] * len(rows)), [value for row in rows for value in row]


def run_insert(values: dict[str, str]) -> tuple[str, str, tuple[str, ...]]:
    """The column list and value list of an INSERT of one JobRun, and the fields whose values
    are parameters, in their order.

    `values` maps field names to SQL (a literal, `%s`, or an expression); every other column
    gets its model default, so that a field added to JobRun cannot be left out by a hand-typed
    column list.
    """
    names, exprs, params = [], [], []
    for field in JobRun._meta.concrete_fields:
        if field.primary_key:
            continue
        names.append(field.column)
        if field.name in values:
            exprs.append(values[field.name])
            if values[field.name] == "%s":
                params.append(field.name)
        elif field.null:
            exprs.append("NULL")
        else:
            default = getattr(field.get_default(), "value", field.get_default())  # a choice's value
            assert isinstance(default, int | str) and not isinstance(default, bool), field.name
            exprs.append(f"'{default}'" if isinstance(default, str) else str(default))
    unknown = set(values) - {field.name for field in JobRun._meta.concrete_fields}
    assert not unknown, unknown
    return ", ".join(names), ", ".join(exprs), tuple(params)


def aware(value: datetime | str | None, tz: Any = UTC) -> datetime | None:
    """A datetime read by raw SQL, made aware (SQLite gives naive values or text, in `tz`)."""
    if isinstance(value, str):
        value = parse_datetime(value)
    if value is not None and value.tzinfo is None:
        value = value.replace(tzinfo=tz)
    return value


def _aware_datetime(tz: Any) -> Callable[[Any, Any, Any], Any]:
    """SQLite's datetime converter for claimed rows, without Django's per-value lookups.

    The driver has already parsed the value (Django registers that), so all that is left is
    to attach the connection's time zone, as `DatabaseOperations.convert_datetimefield_value`
    does.
    """
    return lambda value, expression, wrapper: aware(value, tz)


@functools.cache
def _loader(model: type[Model], vendor: str) -> tuple[list[str], list[tuple[int, Any, list[Any]]]]:
    """The attribute names of `columns(model)` and, per column that needs any, its converters."""
    cols = [field.get_col(model._meta.db_table) for field in model._meta.concrete_fields]
    converters = []
    for index, column in enumerate(cols):
        # django-stubs does not declare Field.get_db_converters (Django has it since 1.8).
        functions = [*connection.ops.get_db_converters(column), *column.field.get_db_converters(connection)]  # type: ignore[attr-defined]
        sqlite_datetime = getattr(connection.ops, "convert_datetimefield_value", None)  # SQLite's ops have it
        if vendor == "sqlite" and settings.USE_TZ and functions == [sqlite_datetime]:
            functions = [_aware_datetime(connection.timezone)]
        if functions:
            converters.append((index, column, functions))
    return [field.attname for field in model._meta.concrete_fields], converters


def instances(model: type[ModelT], rows: list[tuple[Any, ...]], offset: int = 0) -> list[ModelT]:
    """Build model instances from raw rows whose columns, from `offset`, are `columns(model)`.

    Values go through the same converters the ORM applies (aware datetimes, decoded JSON).
    """
    wrapper = connections[DEFAULT_DB_ALIAS]
    names, converters = _loader(model, wrapper.vendor)
    built = []
    for row in rows:
        values = list(row[offset : offset + len(names)])
        for index, column, functions in converters:
            for convert in functions:
                values[index] = convert(values[index], column, wrapper)
        built.append(model.from_db(DEFAULT_DB_ALIAS, names, values))
    return built


def with_jobs(runs: list[JobRun], jobs: list[Job]) -> list[JobRun]:
    """Attach each run's job, and order the runs as the queue does."""
    by_id = {job.pk: job for job in jobs}
    for run in runs:
        run.job = by_id[run.job_id]
    runs.sort(key=lambda run: (run.not_before, run.pk))
    return runs
