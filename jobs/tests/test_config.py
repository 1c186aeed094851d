"""The JOBS settings as one frozen, typed JobsConfig: built once, refused at start-up when unusable."""

from __future__ import annotations

import dataclasses
import io
from typing import Any

import django.db.backends.postgresql.psycopg_any as psycopg_any
import pytest
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.management import CommandError, call_command
from django.core.management.base import SystemCheckError
from django.db.utils import ConnectionHandler
from django.test import override_settings

from jobs.conf import InvalidConfig, JobsConfig, config
from jobs.models import SchedulerProcess


def jobs_settings(**overrides: Any) -> override_settings:
    return override_settings(JOBS={**settings.JOBS, **overrides})


def test_the_config_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        config().heartbeat_seconds = 1.0  # type: ignore[misc]


def test_the_config_is_built_once_until_jobs_changes() -> None:
    first = config()
    assert config() is first

    with jobs_settings(MAX_CONCURRENT_JOBS=12):
        assert config().max_concurrent_jobs == 12

    assert config().max_concurrent_jobs == first.max_concurrent_jobs


def test_values_are_typed() -> None:
    with jobs_settings(
        EXECUTORS=["jobs.tests.job_types.NoopExecutor"], HEARTBEAT_SECONDS=2, LOST_AFTER_SECONDS=10, PG_DUMP="pg_dump16"
    ):
        built = config()

    assert built.executors == ("jobs.tests.job_types.NoopExecutor",)
    assert isinstance(built.heartbeat_seconds, float) and built.heartbeat_seconds == 2.0
    assert isinstance(built.lost_after_seconds, float) and built.lost_after_seconds == 10.0
    assert built.pg_dump == "pg_dump16"


def test_keys_left_out_take_their_defaults() -> None:
    with override_settings(JOBS={}):
        built = config()

    assert built == JobsConfig()
    assert (built.max_concurrent_jobs, built.heartbeat_seconds, built.lost_after_seconds) == (5, 5.0, 30.0)
    assert (built.result_max_bytes, built.http_ca_bundle, built.pg_dump) == (64 * 1024, None, "pg_dump")
    assert built.allowed_output_dirs == built.http_allowed_hosts == ()


REFUSED = [
    (
        {"LOST_AFTER_SECOND": 30},
        "JOBS['LOST_AFTER_SECOND'] is not a setting of this app; did you mean 'LOST_AFTER_SECONDS'?",
    ),
    ({"HEARTBEAT_SECONDS": float("nan")}, "JOBS['HEARTBEAT_SECONDS']: nan is not a finite number of seconds above 0"),
    ({"LOST_AFTER_SECONDS": float("inf")}, "JOBS['LOST_AFTER_SECONDS']: inf is not a finite number of seconds above 0"),
    ({"SHUTDOWN_GRACE_SECONDS": 0}, "JOBS['SHUTDOWN_GRACE_SECONDS']: 0 is not a finite number of seconds above 0"),
    ({"MAX_SLEEP_SECONDS": -1.5}, "JOBS['MAX_SLEEP_SECONDS']: -1.5 is not a finite number of seconds above 0"),
    ({"MAX_CONCURRENT_JOBS": -2}, "JOBS['MAX_CONCURRENT_JOBS']: -2 is below the minimum of 1"),
    ({"RUN_RETENTION_PER_JOB": 0}, "JOBS['RUN_RETENTION_PER_JOB']: 0 is below the minimum of 1"),
    ({"ERROR_MAX_CHARS": 10.0}, "JOBS['ERROR_MAX_CHARS']: 10.0 is not a whole number"),
    ({"HTTP_ALLOWED_HOSTS": "example.com"}, "JOBS['HTTP_ALLOWED_HOSTS']: must be a list"),
    ({"PG_DUMP": None}, "JOBS['PG_DUMP']: None is not a command name or path"),
    (
        {"HEARTBEAT_SECONDS": 10, "LOST_AFTER_SECONDS": 15},
        "JOBS['HEARTBEAT_SECONDS'] (10s) must be at most half of JOBS['LOST_AFTER_SECONDS'] (15s)",
    ),
    (
        {"LOST_AFTER_SECONDS": 8},  # the default heartbeat, 5s, is then too slow
        "JOBS['HEARTBEAT_SECONDS'] (5s) must be at most half of JOBS['LOST_AFTER_SECONDS'] (8s)",
    ),
]


@pytest.mark.parametrize(("jobs", "line"), REFUSED)
def test_the_system_check_refuses_an_unusable_setting_naming_it(jobs: dict[str, Any], line: str) -> None:
    with jobs_settings(**jobs), pytest.raises(SystemCheckError) as stopped:
        call_command("check", "--tag", "jobs")

    assert f"(jobs.E006) {line}" in str(stopped.value)


@pytest.mark.parametrize(("jobs", "line"), REFUSED)
def test_config_refuses_an_unusable_setting_in_one_line(jobs: dict[str, Any], line: str) -> None:
    with jobs_settings(**jobs), pytest.raises(ImproperlyConfigured) as refused:
        config()

    assert str(refused.value) == line


def test_every_value_wrong_is_reported_not_only_the_first() -> None:
    with (
        jobs_settings(HEARTBEAT_SECONDS=0, RESULT_MAX_BYTES=10, EXPORTS_DIR="/tmp"),
        pytest.raises(SystemCheckError) as stopped,
    ):
        call_command("check", "--tag", "jobs")

    for key in ("HEARTBEAT_SECONDS", "RESULT_MAX_BYTES", "EXPORTS_DIR"):
        assert f"(jobs.E006) JOBS['{key}']" in str(stopped.value)


def test_half_the_lost_after_time_is_accepted() -> None:
    with jobs_settings(HEARTBEAT_SECONDS=7.5, LOST_AFTER_SECONDS=15):
        assert (config().heartbeat_seconds, config().lost_after_seconds) == (7.5, 15.0)


def test_replace_returns_a_checked_typed_copy() -> None:
    base = config()

    changed = base.replace(heartbeat_seconds=2, lost_after_seconds=4)

    assert (changed.heartbeat_seconds, changed.lost_after_seconds) == (2.0, 4.0)
    assert isinstance(changed.heartbeat_seconds, float)
    assert changed.executors == base.executors
    assert (base.heartbeat_seconds, base.lost_after_seconds) == (5.0, 30.0)  # the original is untouched


@pytest.mark.parametrize(
    ("overrides", "fields", "line"),
    [
        (
            {"shutdown_grace_seconds": float("nan")},
            ("shutdown_grace_seconds",),
            "JOBS['SHUTDOWN_GRACE_SECONDS']: nan is not a finite number of seconds above 0",
        ),
        (
            {"max_concurrent_jobs": 0},
            ("max_concurrent_jobs",),
            "JOBS['MAX_CONCURRENT_JOBS']: 0 is below the minimum of 1",
        ),
        (
            {"heartbeat_seconds": 16.0},
            ("heartbeat_seconds", "lost_after_seconds"),
            "JOBS['HEARTBEAT_SECONDS'] (16s) must be at most half of JOBS['LOST_AFTER_SECONDS'] (30s)",
        ),
    ],
)
def test_replace_refuses_what_the_settings_would(overrides: dict[str, Any], fields: tuple[str, ...], line: str) -> None:
    with pytest.raises(InvalidConfig) as refused:
        config().replace(**overrides)

    assert refused.value.problem.fields == fields
    assert str(refused.value) == line


def test_a_config_cannot_be_built_invalid() -> None:
    with pytest.raises(InvalidConfig, match=r"^JOBS\['LOST_AFTER_SECONDS'\]: -1 is not a finite"):
        JobsConfig(lost_after_seconds=-1)


# --- the database driver: psycopg2 only -------------------------------------------------------


@pytest.fixture
def two_databases(monkeypatch: pytest.MonkeyPatch) -> None:
    """A PostgreSQL database and a SQLite one, as the checks see them (no connection is made)."""
    handler = ConnectionHandler(
        {
            "default": {"ENGINE": "django.db.backends.postgresql", "NAME": "scheduler"},
            "archive": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"},
        }
    )
    handler["default"]  # loads the backend while psycopg_any still tells the truth: psycopg2
    monkeypatch.setattr("jobs.checks.connections", handler)


PSYCOPG3_REFUSED = (
    "DATABASES['default']: PostgreSQL through psycopg 3 is not supported; the scheduler needs psycopg2 "
    "(install psycopg2-binary and uninstall psycopg)"
)


def test_postgresql_through_psycopg_3_is_refused_naming_the_database(
    two_databases: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(psycopg_any, "is_psycopg3", True)

    with pytest.raises(SystemCheckError) as stopped:
        call_command("check", "--tag", "jobs")

    assert f"(jobs.E007) {PSYCOPG3_REFUSED}" in str(stopped.value)
    assert "DATABASES['archive']" not in str(stopped.value)  # SQLite needs no driver


def test_postgresql_through_psycopg2_passes(two_databases: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(psycopg_any, "is_psycopg3", False)
    out = io.StringIO()

    call_command("check", "--tag", "jobs", stdout=out)

    assert "System check identified no issues" in out.getvalue()


@pytest.mark.django_db
def test_the_scheduler_refuses_psycopg_3_in_one_line(two_databases: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(psycopg_any, "is_psycopg3", True)

    with pytest.raises(CommandError) as refused:
        call_command("runscheduler", "--once")

    assert str(refused.value) == PSYCOPG3_REFUSED
    assert refused.value.returncode == 2
    assert not SchedulerProcess.objects.exists()
