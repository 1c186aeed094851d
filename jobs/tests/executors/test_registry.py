"""The job type registry and the system checks that stop start-up when a registered type is broken."""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.core.management import call_command
from django.core.management.base import SystemCheckError
from django.test import override_settings
from rest_framework.test import APIClient

from jobs.executors import get_executor, job_type_names
from jobs.models import JobRun

BROKEN = "jobs.tests.executors.broken_types"
SAMPLE_EXECUTOR = "jobs.tests.executors.sample_executor.LogMessageExecutor"


def jobs_settings(**overrides: Any) -> override_settings:
    return override_settings(JOBS={**settings.JOBS, **overrides})


def test_the_shipped_configuration_passes_the_checks() -> None:
    out = io.StringIO()
    call_command("check", stdout=out)

    assert "System check identified no issues" in out.getvalue()
    assert {"email_notification", "data_processing", "http_request"} <= set(job_type_names())


@pytest.mark.parametrize(
    ("executors", "message"),
    [
        (["jobs.nope.Missing"], "jobs.E001) cannot import executor 'jobs.nope.Missing': ModuleNotFoundError"),
        (["jobs.executors.NoSuchClass"], "cannot import executor 'jobs.executors.NoSuchClass'"),
        (["jobs.models.Job"], "'jobs.models.Job' is not a subclass of jobs.executors.base.Executor"),
        ([f"{BROKEN}.NoExecute"], "NoExecute' does not implement execute()"),
        ([f"{BROKEN}.Nameless"], "Nameless' needs a `name` of lower-case letters"),
        ([f"{BROKEN}.BadName"], "not 'Bad Name'"),
        ([f"{BROKEN}.TakesEmailsName"], "reuses the job type name 'email_notification'"),
        ([f"{BROKEN}.NotASerializer"], "parameters_serializer must be a rest_framework Serializer class"),
        ([f"{BROKEN}.ExplodesOnCreate"], "cannot create 'jobs.tests.executors.broken_types.ExplodesOnCreate'"),
        ("jobs.tests.executors.sample_executor.LogMessageExecutor", "(jobs.E006) JOBS['EXECUTORS']: must be a list"),
    ],
)
def test_a_broken_job_type_stops_start_up(executors: Any, message: str) -> None:
    with jobs_settings(EXECUTORS=executors), pytest.raises(SystemCheckError) as stopped:
        call_command("check")

    assert message in str(stopped.value)


@pytest.mark.parametrize(
    ("processors", "message"),
    [
        (["jobs.nope.Missing"], "jobs.E003) cannot import data processor 'jobs.nope.Missing'"),
        ([f"{BROKEN}.NoProcess"], "NoProcess' does not implement process()"),
        ([f"{BROKEN}.TakesBackupName"], "reuses the dataset name 'database_backup'"),
        ([SAMPLE_EXECUTOR], "is not a subclass of jobs.executors.data_processing.DataProcessor"),
    ],
)
def test_a_broken_data_processor_stops_start_up(processors: list[str], message: str) -> None:
    with jobs_settings(DATA_PROCESSORS=processors), pytest.raises(SystemCheckError) as stopped:
        call_command("check")

    assert message in str(stopped.value)


@pytest.mark.django_db
def test_a_job_type_from_settings_is_created_listed_and_run(
    api: APIClient, make_run: Callable[..., JobRun], caplog: pytest.LogCaptureFixture
) -> None:
    with jobs_settings(EXECUTORS=[*settings.JOBS["EXECUTORS"], SAMPLE_EXECUTOR]):
        out = io.StringIO()
        call_command("check", stdout=out)
        assert "no issues" in out.getvalue()
        types = {t["name"]: t for t in api.get("/job-types").json()}
        bad = api.post(
            "/jobs",
            {"name": "x", "cron_expression": "@hourly", "job_type": "log_message", "parameters": {"level": "loud"}},
            format="json",
        )
        run = make_run("log_message", {"message": "still alive", "level": "warning"})
        with caplog.at_level(logging.INFO, logger="jobs.sample"):
            result = get_executor("log_message").execute(run)

    assert types["log_message"]["parameters_schema"]["required"] == ["message"]
    assert bad.status_code == 400
    assert set(bad.json()["parameters"]) == {"message", "level"}
    assert result == {"logged": "still alive", "level": "warning"}
    logged = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "jobs.sample"]
    assert logged == [("WARNING", f"still alive (job {run.job_id})")]


def test_an_output_directory_inside_a_file_is_reported(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")

    with jobs_settings(BACKUP_DIR=str(blocker / "backups")), pytest.raises(SystemCheckError) as stopped:
        call_command("check", fail_level="WARNING")

    assert "jobs.W001) JOBS['BACKUP_DIR']" in str(stopped.value)
