"""model_export filters: whatever create time accepts, a run can execute, on either database.

Table tests over every field of real models (and a model holding the remaining field types)
crossed with every allowed lookup, stacked transforms and values of right and wrong shape and
type: each case is either refused at create time with a ValidationError naming its key, or
exported for real on rows in the database. Anything else (an exception other than a
ValidationError at create time, or a run that fails after it was accepted) is a defect.
"""

from __future__ import annotations

import datetime
import decimal
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from django.apps import apps
from django.conf import settings
from django.contrib.admin.models import LogEntry
from django.contrib.auth.models import Group, User
from django.contrib.contenttypes.models import ContentType
from django.db import connection, models, transaction
from django.test import override_settings
from rest_framework import serializers

from jobs.executors import get_executor
from jobs.executors.data_processing.model_export import ALLOWED_LOOKUPS
from jobs.models import Job, JobRun

from .test_data_processing import flat

# Date strings for date-time fields are accepted, read in the current time zone, with Django's warning.
pytestmark = pytest.mark.filterwarnings("ignore:DateTimeField .* received a naive datetime:RuntimeWarning")

MakeRun = Callable[..., JobRun]
FIRE = datetime.datetime(2026, 6, 1, 12, 0, tzinfo=datetime.UTC)
TRANSFORMS = ("date", "year", "hour")
STACKED_LOOKUPS = ("exact", "gt", "in", "range", "isnull", "year")

# Right and wrong shapes and types: scalars of each JSON type, dates, lists of every length,
# a number too large for SQLite, text PostgreSQL refuses (NUL) and text no database takes.
VALUES: list[Any] = [
    "abc",
    1,
    10**20,
    True,
    None,
    "2026-01-01T00:00:00Z",
    [1, 2],
    [1],
    [1, 2, 3],
    ["2026-01-01", "2026-12-31"],
    "a\x00b",
    "\ud800",
]
STACKED_VALUES: list[Any] = [2026, "abc", None, [2025, 2026], "2026-01-01"]


@pytest.fixture
def dirs(tmp_path: Path) -> Iterator[Path]:
    with override_settings(
        JOBS={**settings.JOBS, "EXPORT_DIR": str(tmp_path / "exports"), "BACKUP_DIR": str(tmp_path / "backups")}
    ):
        yield tmp_path / "exports"


def fields_of_each_kind(model: type[models.Model]) -> list[Any]:
    """Return one field of `model` per kind (class and nullability): the others would only repeat the cases."""
    kinds: dict[tuple[str, bool], Any] = {}
    for field in model._meta.get_fields():
        kinds.setdefault((type(field).__name__, bool(getattr(field, "null", False))), field)
    return list(kinds.values())


def filter_cases(model: type[models.Model]) -> Iterator[tuple[str, Any]]:
    """Yield (key, value) for each kind of field × lookup × value, and stacked transforms on each."""
    for field in fields_of_each_kind(model):
        name = field.name
        for value in VALUES:
            yield name, value
            for lookup in sorted(ALLOWED_LOOKUPS):
                yield f"{name}__{lookup}", value
        for transform in TRANSFORMS:
            for lookup in STACKED_LOOKUPS:
                for value in STACKED_VALUES:
                    yield f"{name}__{transform}__{lookup}", value


Problem = tuple[str, str, str]  # (case, kind, detail)


def check_every_filter(model: type[models.Model], run: JobRun, export_dir: Path) -> list[Problem]:
    """Return the cases that break the rule: refused with a ValidationError naming the key, or exported."""
    executor = get_executor("data_processing")
    label = model._meta.label
    problems: list[Problem] = []
    accepted = 0
    for key, value in filter_cases(model):
        params = {"dataset": "model_export", "model": label, "format": "jsonl", "filters": {key: value}}
        case = f"{label} {key}={value!r}"
        try:
            executor.validate_parameters(params)
        except serializers.ValidationError as exc:
            if repr(key) not in flat(exc.detail):
                problems.append((case, "refused without naming the key", flat(exc.detail)))
            continue
        except Exception as exc:  # noqa: BLE001 - the defect under test is any other exception
            problems.append((case, f"create raised {type(exc).__name__}", str(exc)))
            continue
        accepted += 1
        run.job.parameters = params
        try:
            # A savepoint, so that a failed run leaves PostgreSQL's transaction usable for the next case.
            with transaction.atomic():
                executor.execute(run)
        except Exception as exc:  # noqa: BLE001
            problems.append((case, f"accepted, then the run raised {type(exc).__name__}", str(exc)))
    # The table must have exercised real exports, not refused everything.
    assert accepted > 20, f"only {accepted} cases of {label} were accepted"
    assert any(export_dir.iterdir())
    return problems


def report(problems: list[Problem]) -> str:
    """Summarise the broken cases by kind, then list the first ones."""
    kinds = Counter(kind for _, kind, _ in problems)
    summary = "\n".join(f"{count:6} {kind}" for kind, count in kinds.most_common())
    cases = "\n".join(f"{case}: {kind}: {detail}" for case, kind, detail in problems[:60])
    return f"{len(problems)} cases broke the rule:\n{summary}\n{cases}"


@pytest.fixture
def rows(db: None) -> JobRun:
    """A few rows in every table the table tests export, with JSON, dates and relations filled in."""
    job = Job.objects.create(
        name="Export me",
        cron_expression="@daily",
        job_type="email_notification",
        enabled=False,
        parameters={"recipient": "a@example.com", "subject": "x", "nested": {"list": [1, 2]}},
    )
    for hours, result in ((1, {"x": 1}), (2, None), (3, [1, "x"]), (4, "x")):
        at = FIRE - datetime.timedelta(hours=hours)
        JobRun.objects.create(job=job, scheduled_for=at, not_before=at, status="failed", result=result)
    user = User.objects.create_user("ann", "ann@example.com", "pw-ann-123", last_login=FIRE)
    user.groups.add(Group.objects.create(name="operators"))
    LogEntry.objects.create(
        user=user,
        content_type=ContentType.objects.get_for_model(Job),
        object_id=str(job.pk),
        object_repr="Export me",
        action_flag=1,
        change_message="[]",
    )
    return JobRun.objects.create(job=job, scheduled_for=FIRE, not_before=FIRE)


@pytest.mark.django_db
@pytest.mark.parametrize(
    "label", ["jobs.JobRun", "jobs.Job", "jobs.SchedulerProcess", "auth.User", "auth.Group", "contenttypes.ContentType"]
)
def test_every_filter_is_refused_at_create_time_or_runs(label: str, rows: JobRun, dirs: Path) -> None:
    problems = check_every_filter(apps.get_model(label), rows, dirs)

    assert problems == [], report(problems)


@pytest.mark.django_db
def test_every_filter_on_the_admin_log_is_refused_at_create_time_or_runs(rows: JobRun, dirs: Path) -> None:
    problems = check_every_filter(LogEntry, rows, dirs)

    assert problems == [], report(problems)


@pytest.fixture
def field_zoo(transactional_db: None) -> Iterator[type[models.Model]]:
    """A model with the field types the project's models lack, its table and two rows; removed afterwards."""

    class FieldZoo(models.Model):
        day = models.DateField(null=True)
        at = models.TimeField(null=True)
        amount = models.DecimalField(max_digits=8, decimal_places=2, null=True)
        ratio = models.FloatField(null=True)
        token = models.UUIDField(default=uuid.uuid4)
        span = models.DurationField(null=True)
        address = models.GenericIPAddressField(null=True)
        blob = models.BinaryField(null=True)
        small = models.PositiveSmallIntegerField(null=True)
        flag = models.BooleanField(null=True)
        colour = models.CharField(max_length=10, choices=[("red", "Red"), ("blue", "Blue")], default="red")
        data = models.JSONField(null=True)

        class Meta:
            app_label = "jobs"
            db_table = "jobs_test_field_zoo"

    with connection.schema_editor() as editor:
        editor.create_model(FieldZoo)
    try:
        FieldZoo._default_manager.create(
            day=datetime.date(2026, 1, 2),
            at=datetime.time(12, 30),
            amount=decimal.Decimal("12.50"),
            ratio=0.5,
            span=datetime.timedelta(hours=1),
            address="192.0.2.1",
            blob=b"\x00\x01",
            small=3,
            flag=True,
            data={"a": [1, 2]},
        )
        FieldZoo._default_manager.create()
        yield FieldZoo
    finally:
        with connection.schema_editor() as editor:
            editor.delete_model(FieldZoo)
        del apps.all_models["jobs"]["fieldzoo"]
        apps.clear_cache()


@pytest.mark.django_db(transaction=True)
def test_every_filter_on_every_other_field_type_is_refused_at_create_time_or_runs(
    field_zoo: type[models.Model], make_run: MakeRun, dirs: Path
) -> None:
    run = make_run("data_processing", {"dataset": "model_export", "model": "jobs.Job"})

    problems = check_every_filter(field_zoo, run, dirs)

    assert problems == [], report(problems)


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("filters", "message"),
    [
        ({"result__contains": "x"}, "'result__contains'"),
        ({"id__range": [1]}, "'id__range': range takes a list of two values"),
        ({"id__range": [1, 2, 3]}, "'id__range': range takes a list of two values"),
        ({"id__in": 5}, "'id__in': in takes a list"),
        ({"status__isnull": "yes"}, "'status__isnull': isnull takes true or false"),
        ({"id": [1, 2]}, "'id': exact takes a single value"),
        ({"id": "abc"}, "'id'"),
        ({"scheduled_for__gte": "yesterday"}, "'scheduled_for__gte'"),
        ({"scheduled_for__date": "2026-13-45"}, "'scheduled_for__date'"),
        ({"status__year": 2026}, "'status__year'"),
        ({"scheduled_for__date__hour": 1}, "'scheduled_for__date__hour'"),
        ({"status": "a\x00b"}, "'status': text must not contain NUL characters"),
    ],
)
def test_issue_cases_are_refused_naming_the_key(filters: dict[str, Any], message: str, vendor: str) -> None:
    if "result__contains" in filters and vendor != "sqlite":
        pytest.skip("PostgreSQL supports contains on JSON")
    body = {"dataset": "model_export", "model": "jobs.JobRun", "filters": filters}

    with pytest.raises(serializers.ValidationError) as refused:
        get_executor("data_processing").validate_parameters(body)

    detail = refused.value.detail
    assert isinstance(detail, dict)
    assert message in flat(detail["filters"])


@pytest.mark.django_db
@pytest.mark.parametrize(
    "filters",
    [
        {"id__range": [1, 2]},
        {"id__in": []},
        {"scheduled_for__date__year": 2026},
        {"scheduled_for__year__gte": 2026},
        {"result__isnull": True},
        {"job__name__icontains": "export"},
        {"status__in": ["failed", "succeeded"]},
        {"id__gt": 10**20},
    ],
)
def test_good_filters_are_accepted_and_run(
    filters: dict[str, Any], make_run: MakeRun, rows: JobRun, dirs: Path
) -> None:
    run = make_run("data_processing", {"dataset": "model_export", "model": "jobs.JobRun", "filters": filters})

    result = get_executor("data_processing").execute(run)

    assert Path(result["path"]).is_file()


@pytest.fixture
def model_without_table(db: None) -> Iterator[type[models.Model]]:
    """An installed model whose migration has not run: its table does not exist."""

    class Unmigrated(models.Model):
        name = models.CharField(max_length=10)

        class Meta:
            app_label = "jobs"
            db_table = "jobs_test_unmigrated"

    try:
        yield Unmigrated
    finally:
        del apps.all_models["jobs"]["unmigrated"]
        apps.clear_cache()


@pytest.mark.django_db
@pytest.mark.parametrize("filters", [{}, {"name": "x"}])
def test_a_model_whose_table_is_missing_is_refused_when_saved(
    model_without_table: type[models.Model], filters: dict[str, Any]
) -> None:
    body = {"dataset": "model_export", "model": "jobs.Unmigrated", "filters": filters}

    with pytest.raises(serializers.ValidationError) as refused:
        get_executor("data_processing").validate_parameters(body)

    detail = refused.value.detail
    assert isinstance(detail, dict)
    assert "the database refused to read jobs.Unmigrated" in flat(detail["model"])
    assert Job.objects.count() == 0  # the transaction is usable: the refusal was rolled back alone
