"""data_processing and the shipped processors, run end to end on real rows and real files."""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import shutil
import sqlite3
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.contrib.auth.models import User
from django.db import transaction
from django.test import override_settings
from rest_framework import serializers

from jobs import services
from jobs.executors import ExecutorError, get_executor
from jobs.executors.data_processing import all_processors
from jobs.models import Job, JobRun

MakeRun = Callable[..., JobRun]
FIRE = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
WORD_COUNT = "jobs.tests.executors.sample_processors.WordCount"


@pytest.fixture
def dirs(tmp_path: Path) -> Iterator[dict[str, Path]]:
    """Point BACKUP_DIR and EXPORT_DIR at a temporary directory for the test."""
    paths = {"BACKUP_DIR": tmp_path / "backups", "EXPORT_DIR": tmp_path / "exports"}
    with override_settings(JOBS={**settings.JOBS, **{name: str(path) for name, path in paths.items()}}):
        yield paths


def flat(detail: Any) -> str:
    """Join the messages of a DRF error detail into one string."""
    if isinstance(detail, dict):
        return " | ".join(flat(value) for value in detail.values())
    if isinstance(detail, list):
        return " | ".join(flat(value) for value in detail)
    return str(detail)


def run_processor(run: JobRun) -> Any:
    return get_executor("data_processing").execute(run)


def gunzip_to(source: Path, target: Path) -> Path:
    with gzip.open(source, "rb") as compressed, target.open("wb") as plain:
        shutil.copyfileobj(compressed, plain)
    return target


# --- database_backup ---------------------------------------------------------------------------


@pytest.mark.sqlite
@pytest.mark.django_db(transaction=True)
def test_sqlite_backup_is_a_gzip_of_a_database_that_opens_and_has_the_rows(
    make_run: MakeRun, dirs: dict[str, Path], tmp_path: Path
) -> None:
    run = make_run("data_processing", {"dataset": "database_backup"}, name="Nightly backup")
    services.job_create(
        name="Second job",
        cron_expression="@daily",
        job_type="data_processing",
        parameters={"dataset": "database_backup"},
    )

    result = run_processor(run)

    path = Path(result["path"])
    assert path.parent == dirs["BACKUP_DIR"]
    assert path.name.startswith("backup-default-") and path.name.endswith(".sqlite3.gz")
    data = path.read_bytes()
    assert result["size_bytes"] == len(data)
    assert result["sha256"] == hashlib.sha256(data).hexdigest()
    assert result["deleted"] == []
    copy = sqlite3.connect(gunzip_to(path, tmp_path / "restored.sqlite3"))
    try:
        names = [row[0] for row in copy.execute("SELECT name FROM jobs_job ORDER BY id")]
        assert names == ["Nightly backup", "Second job"]
        assert copy.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        copy.close()
    assert [entry.name for entry in dirs["BACKUP_DIR"].iterdir()] == [path.name]  # no scratch files left


@pytest.mark.sqlite
@pytest.mark.django_db(transaction=True)
def test_sqlite_backup_inside_a_transaction_fails_instead_of_hanging(make_run: MakeRun, dirs: dict[str, Path]) -> None:
    run = make_run("data_processing", {"dataset": "database_backup"})

    with transaction.atomic(), pytest.raises(ExecutorError, match="inside a transaction"):
        run_processor(run)
    assert list(dirs["BACKUP_DIR"].iterdir()) == []


@pytest.mark.django_db(transaction=True)
def test_backup_retention_keeps_the_newest_files_of_its_own_series(
    make_run: MakeRun, dirs: dict[str, Path], vendor: str
) -> None:
    suffix = ".sqlite3.gz" if vendor == "sqlite" else ".sql.gz"
    backups = dirs["BACKUP_DIR"]
    backups.mkdir(parents=True)
    old = [f"backup-default-2026010{day}T030000Z{suffix}" for day in (1, 2, 3)]
    bystanders = ["notes.txt", f"backup-other-20200101T000000Z{suffix}", "backup-default-latest.sqlite3.gz"]
    for name in old + bystanders:
        (backups / name).write_bytes(b"old")
    run = make_run("data_processing", {"dataset": "database_backup", "keep": 2})

    result = run_processor(run)

    assert result["deleted"] == old[:2]
    assert sorted(entry.name for entry in backups.iterdir()) == sorted([old[2], Path(result["path"]).name, *bystanders])


@pytest.mark.django_db(transaction=True)
def test_backup_into_a_directory_parameter_relative_to_backup_dir(make_run: MakeRun, dirs: dict[str, Path]) -> None:
    run = make_run("data_processing", {"dataset": "database_backup", "directory": "nightly"})

    result = run_processor(run)

    assert Path(result["path"]).parent == dirs["BACKUP_DIR"] / "nightly"
    assert Path(result["path"]).stat().st_size == result["size_bytes"]


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_postgresql_backup_is_a_gzipped_sql_dump_of_the_database(make_run: MakeRun, dirs: dict[str, Path]) -> None:
    run = make_run("data_processing", {"dataset": "database_backup", "keep": 3}, name="PG backup")

    result = run_processor(run)

    path = Path(result["path"])
    assert path.name.startswith("backup-default-") and path.name.endswith(".sql.gz")
    assert result["vendor"] == "postgresql"
    assert result["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    dump = gzip.decompress(path.read_bytes()).decode()
    assert "CREATE TABLE public.jobs_job" in dump
    assert "PG backup" in dump  # the rows are there too


@pytest.mark.postgres
@pytest.mark.django_db
def test_postgresql_backup_without_pg_dump_fails_clearly(make_run: MakeRun, dirs: dict[str, Path]) -> None:
    run = make_run("data_processing", {"dataset": "database_backup"})

    with (
        override_settings(JOBS={**settings.JOBS, "PG_DUMP": "/nonexistent/pg_dump"}),
        pytest.raises(ExecutorError, match="pg_dump not found"),
    ):
        run_processor(run)


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("parameters", "field", "message"),
    [
        ({"keep": 0}, "keep", "greater than or equal to 1"),
        ({"database": "replica"}, "database", "unknown database alias 'replica'; configured: default"),
        ({"directory": "../../etc"}, "directory", "must not climb out"),
        ({"keep": 3, "compress": True}, "compress", "unknown parameter for dataset 'database_backup'"),
    ],
)
def test_backup_parameters_are_checked(parameters: dict[str, Any], field: str, message: str) -> None:
    with pytest.raises(serializers.ValidationError) as refused:
        get_executor("data_processing").validate_parameters({"dataset": "database_backup", **parameters})
    detail = refused.value.detail
    assert isinstance(detail, dict)
    assert message in flat(detail[field])


# --- model_export --------------------------------------------------------------------------------


@pytest.fixture
def history(db: None) -> list[JobRun]:
    """Three jobs and a few runs with awkward values (commas, quotes, line breaks, JSON)."""
    jobs = [
        Job.objects.create(
            name=name,
            cron_expression="@daily",
            job_type="email_notification",
            enabled=False,
            parameters={"recipient": "a@example.com", "subject": name},
        )
        for name in ('Export, "quoted"', "Export\nmultiline", "Other")
    ]
    runs = []
    for hours, status in ((1, "failed"), (2, "succeeded"), (5, "failed"), (30, "failed")):
        at = FIRE - timedelta(hours=hours)
        runs.append(
            JobRun.objects.create(job=jobs[0], scheduled_for=at, not_before=at, status=status, result={"hours": hours})
        )
    return runs


@pytest.mark.django_db
def test_export_to_csv_with_fields_and_filters(make_run: MakeRun, dirs: dict[str, Path], history: list[JobRun]) -> None:
    run = make_run(
        "data_processing",
        {
            "dataset": "model_export",
            "model": "jobs.Job",
            "format": "csv",
            "fields": ["id", "name", "parameters", "enabled"],
            "filters": {"name__startswith": "Export"},
        },
    )

    result = run_processor(run)

    path = Path(result["path"])
    assert path.parent == dirs["EXPORT_DIR"]
    assert path.name.startswith("jobs.job-") and path.name.endswith(".csv")
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert rows == [
        {
            "id": str(job.pk),
            "name": job.name,
            "parameters": json.dumps(job.parameters, sort_keys=True),
            "enabled": "false",
        }
        for job in Job.objects.filter(name__startswith="Export").order_by("pk")
    ]
    assert result["rows"] == 2
    assert result["bytes"] == path.stat().st_size
    assert result["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.django_db
@pytest.mark.parametrize("escape", [True, False])
def test_csv_export_defuses_spreadsheet_formulas_unless_told_not_to(
    make_run: MakeRun, dirs: dict[str, Path], escape: bool
) -> None:
    names = ['=HYPERLINK("http://evil.example","x")', "+1", "-2", "@SUM(A1)", "\tcmd", "plain -> fine"]
    for name in names:
        Job.objects.create(name=name, cron_expression="0 0 1 1 *", job_type="email_notification")
    run = make_run(
        "data_processing",
        {
            "dataset": "model_export",
            "model": "jobs.Job",
            "fields": ["name", "misfire_grace_seconds"],
            "filters": {"job_type": "email_notification"},
            "escape_formulas": escape,
        },
    )

    with Path(run_processor(run)["path"]).open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))

    assert [row["name"] for row in rows] == [("'" + name if escape and name[0] in "=+-@\t" else name) for name in names]
    assert {row["misfire_grace_seconds"] for row in rows} == {"60"}  # numbers are left alone


@pytest.mark.django_db
def test_export_to_gzipped_json_lines_with_foreign_keys_and_dates(
    make_run: MakeRun, dirs: dict[str, Path], history: list[JobRun]
) -> None:
    run = make_run(
        "data_processing",
        {
            "dataset": "model_export",
            "model": "jobs.JobRun",
            "format": "jsonl",
            "compress": True,
            "fields": ["id", "job", "status", "scheduled_for", "result"],
            "filters": {"status": "failed", "job__name__icontains": "quoted"},
        },
    )

    result = run_processor(run)

    path = Path(result["path"])
    assert path.name.endswith(".jsonl.gz")
    lines = gzip.decompress(path.read_bytes()).decode().splitlines()
    records = [json.loads(line) for line in lines]
    failed = [r for r in history if r.status == "failed"]
    assert records == [
        {
            "id": r.pk,
            "job": r.job_id,
            "status": "failed",
            "scheduled_for": r.scheduled_for.isoformat(),
            "result": r.result,
        }
        for r in failed
    ]
    assert result["rows"] == 3


@pytest.mark.django_db
def test_export_a_time_window_before_the_fire_time(
    make_run: MakeRun, dirs: dict[str, Path], history: list[JobRun]
) -> None:
    run = make_run(
        "data_processing",
        {
            "dataset": "model_export",
            "model": "jobs.JobRun",
            "format": "jsonl",
            "fields": ["id"],
            "time_field": "scheduled_for",
            "window_seconds": 6 * 3600,
            "filters": {"job__name__startswith": "Export"},
        },
    )

    result = run_processor(run)

    ids = [json.loads(line)["id"] for line in Path(result["path"]).read_text().splitlines()]
    assert ids == [r.pk for r in history if FIRE - timedelta(hours=6) <= r.scheduled_for < FIRE]
    assert len(ids) == 3


@pytest.mark.django_db
def test_export_by_default_writes_every_field_but_secrets(make_run: MakeRun, dirs: dict[str, Path]) -> None:
    User.objects.create_user("ann", "ann@example.com", "a-secret-password")
    run = make_run("data_processing", {"dataset": "model_export", "model": "auth.User"})

    result = run_processor(run)

    with Path(result["path"]).open(newline="") as handle:
        [row] = list(csv.DictReader(handle))
    assert row["username"] == "ann"
    assert "password" not in row
    assert "a-secret-password" not in Path(result["path"]).read_text()


@pytest.mark.django_db
def test_export_retention_keeps_the_newest(make_run: MakeRun, dirs: dict[str, Path], history: list[JobRun]) -> None:
    exports = dirs["EXPORT_DIR"]
    exports.mkdir(parents=True)
    for day in (1, 2):
        (exports / f"jobs.jobrun-2026010{day}T000000Z.csv").write_text("old")
    (exports / "jobs.jobrun-20260101T000000Z.jsonl").write_text("other format, other series")
    run = make_run("data_processing", {"dataset": "model_export", "model": "jobs.JobRun", "keep": 2})

    first = run_processor(run)
    second = run_processor(run)  # same second: a second file, not an overwrite

    assert first["deleted"] == ["jobs.jobrun-20260101T000000Z.csv"]
    assert second["deleted"] == ["jobs.jobrun-20260102T000000Z.csv"]
    assert sorted(p.name for p in exports.iterdir()) == sorted(
        [Path(first["path"]).name, Path(second["path"]).name, "jobs.jobrun-20260101T000000Z.jsonl"]
    )


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("parameters", "field", "message"),
    [
        ({"model": "nope.Nope"}, "model", "'nope.Nope' is not an installed model"),
        ({"model": "jobs"}, "model", "is not an installed model"),
        ({"model": "sessions.Session"}, "model", "holds secrets and is never exported"),
        ({"model": "authtoken.Token"}, "model", "holds secrets and is never exported"),
        ({"format": "xml"}, "format", "not a valid choice"),
        ({"fields": ["id", "colour"]}, "fields", "has no field 'colour'"),
        ({"model": "auth.User", "fields": ["username", "password"]}, "fields", "password is secret"),
        ({"model": "auth.User", "filters": {"password__startswith": "pbkdf2"}}, "filters", "secret"),
        ({"filters": {"job__name__regex": ".*"}}, "filters", "'regex' is not a field of jobs.Job"),
        ({"filters": {"colour": "red"}}, "filters", "jobs.JobRun has no field 'colour'"),
        ({"filters": {"_state": 1}}, "filters", "is not a field lookup"),
        ({"filters": {"job___name": 1}}, "filters", "is not a field lookup"),
        ({"filters": {"id": {"gt": 1}}}, "filters", "the value must be"),
        ({"filters": {"id__in": [[1]]}}, "filters", "a list value holds"),
        ({"filters": {"id": "abc"}}, "filters", "expected a number"),
        ({"filters": {"job__runs__job__runs__id": 1}}, "filters", "more than 2 relations"),
        ({"model": "auth.Group", "filters": {"user__password": "x"}}, "filters", "secret"),
        ({"time_field": "scheduled_for"}, "window_seconds", "go together"),
        ({"time_field": "status", "window_seconds": 60}, "time_field", "not a date-time field"),
        ({"time_field": "job", "window_seconds": 60}, "time_field", "not a date-time field"),
        ({"fields": ["id", "status", "id"]}, "fields", "a column is listed twice"),
        ({"fields": ["job", "job_id"]}, "fields", "a column is listed twice"),
        ({"filters": {f"id{number}": 1 for number in range(51)}}, "filters", "at most 50 filters"),
        ({"filters": {"id": 1.5, "status__in": "failed"}}, "filters", "'status__in': in takes a list of values"),
    ],
)
def test_export_parameters_are_checked(parameters: dict[str, Any], field: str, message: str) -> None:
    body = {"dataset": "model_export", "model": "jobs.JobRun", **parameters}

    with pytest.raises(serializers.ValidationError) as refused:
        get_executor("data_processing").validate_parameters(body)
    detail = refused.value.detail
    assert isinstance(detail, dict)
    assert message in flat(detail[field])


# --- the registry --------------------------------------------------------------------------------


@pytest.mark.django_db
def test_unknown_dataset_is_refused_with_the_known_ones() -> None:
    with pytest.raises(services.JobValidationError) as refused:
        services.job_create(
            name="x", cron_expression="@daily", job_type="data_processing", parameters={"dataset": "user_events"}
        )

    [message] = refused.value.errors["parameters"]["dataset"]
    assert message == "unknown dataset 'user_events'; known datasets: database_backup, model_export"
    assert Job.objects.count() == 0


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        ({}, "this field is required"),
        ({"keep": 3}, "this field is required"),
        ({"dataset": None}, "this field may not be null"),
        ({"dataset": ""}, "this field may not be blank"),
        ({"dataset": ["model_export"]}, "not a valid string"),
    ],
)
def test_a_job_without_a_dataset_is_refused_with_the_known_ones(parameters: dict[str, Any], message: str) -> None:
    # The seed's "Weekly backup" was saved like this once: the answer must say what to put there.
    with pytest.raises(services.JobValidationError) as refused:
        services.job_create(
            name="Weekly backup", cron_expression="@weekly", job_type="data_processing", parameters=parameters
        )

    [answer] = refused.value.errors["parameters"]["dataset"]
    assert answer == f"{message}; known datasets: database_backup, model_export"


@pytest.mark.django_db
def test_a_run_whose_saved_parameters_are_no_longer_valid_fails_with_the_reason(make_run: MakeRun) -> None:
    run = make_run("data_processing", {"dataset": "database_backup"})
    run.job.parameters = {"dataset": "database_backup", "keep": 0}

    with pytest.raises(ExecutorError, match="the job's parameters are no longer accepted: keep: .*greater than"):
        run_processor(run)


@pytest.fixture
def word_count() -> Iterator[None]:
    with override_settings(JOBS={**settings.JOBS, "DATA_PROCESSORS": [WORD_COUNT]}):
        yield


@pytest.mark.django_db
def test_a_processor_registered_in_settings_runs_and_checks_its_own_parameters(
    word_count: None, make_run: MakeRun
) -> None:
    assert sorted(all_processors()) == ["database_backup", "model_export", "word_count"]
    with pytest.raises(serializers.ValidationError) as refused:
        get_executor("data_processing").validate_parameters({"dataset": "word_count", "top": 99})
    assert "top" in refused.value.detail
    services.job_create(
        name="Weekly report",
        cron_expression="@daily",
        job_type="email_notification",
        parameters={"recipient": "a@example.com", "subject": "s"},
    )
    run = make_run("data_processing", {"dataset": "word_count", "top": 1}, name="Weekly weekly sync")

    assert run_processor(run) == {"words": 5, "top": [("weekly", 3)]}


@pytest.mark.django_db
def test_unknown_dataset_message_lists_registered_processors_too(word_count: None) -> None:
    with pytest.raises(serializers.ValidationError) as refused:
        get_executor("data_processing").validate_parameters({"dataset": "nope"})
    detail = refused.value.detail
    assert isinstance(detail, dict)
    assert "known datasets: database_backup, model_export, word_count" in flat(detail["dataset"])


@pytest.mark.django_db
def test_job_types_lists_each_dataset_with_its_parameters(api: Any, word_count: None) -> None:
    response = api.get("/job-types")

    [data_processing] = [t for t in response.json() if t["name"] == "data_processing"]
    variants = {v["properties"]["dataset"]["const"]: v for v in data_processing["parameters_schema"]["oneOf"]}
    assert sorted(variants) == ["database_backup", "model_export", "word_count"]
    assert variants["model_export"]["required"] == ["dataset", "model"]
    assert variants["database_backup"]["properties"]["keep"]["default"] == 7
    assert data_processing["safe_to_repeat"] is True
