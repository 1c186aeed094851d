"""data_processing runs end near their deadline (RunTimedOut), leaving no partial file, whatever their source does."""

from __future__ import annotations

import io
import itertools
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.db import connection, connections
from django.test import override_settings

from jobs.executors import get_executor
from jobs.executors.base import RunTimedOut
from jobs.executors.data_processing import database_backup, model_export
from jobs.executors.data_processing.outputs import HashingWriter
from jobs.models import JobRun

MakeRun = Callable[..., JobRun]
TIMEOUT = 1
# How long after the deadline a run may still be busy: a slow row, a killed child being reaped.
SLACK = 1.0


@pytest.fixture
def dirs(tmp_path: Path) -> Iterator[dict[str, Path]]:
    paths = {"BACKUP_DIR": tmp_path / "backups", "EXPORT_DIR": tmp_path / "exports"}
    with override_settings(JOBS={**settings.JOBS, **{name: str(path) for name, path in paths.items()}}):
        yield paths


def files_in(directory: Path) -> list[str]:
    """Every entry under `directory`, hidden temporary files included."""
    return sorted(str(path.relative_to(directory)) for path in directory.rglob("*")) if directory.exists() else []


def timed_out_within(run: JobRun, seconds: float) -> float:
    """Execute `run`, expecting RunTimedOut; return how long it took."""
    started = time.monotonic()
    with pytest.raises(RunTimedOut):
        get_executor("data_processing").execute(run)
    elapsed = time.monotonic() - started
    assert elapsed < seconds, f"the run went on {elapsed - TIMEOUT:.2f}s past its deadline"
    return elapsed


@pytest.mark.django_db
@pytest.mark.parametrize("compress", [False, True])
def test_an_export_of_a_slow_source_stops_at_the_deadline_and_leaves_no_file(
    compress: bool, make_run: MakeRun, dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    def endless_slow_rows(queryset: Any) -> Iterator[tuple[Any, ...]]:
        for number in itertools.count():
            time.sleep(0.05)
            yield (number,)

    monkeypatch.setattr(model_export, "query_rows", endless_slow_rows)
    run = make_run(
        "data_processing",
        {"dataset": "model_export", "model": "jobs.JobRun", "fields": ["id"], "compress": compress},
        timeout_seconds=TIMEOUT,
    )

    timed_out_within(run, TIMEOUT + SLACK)

    assert files_in(dirs["EXPORT_DIR"]) == []


def fake_pg_dump(tmp_path: Path) -> tuple[Path, Path]:
    """A pg_dump that prints a line, then hangs (as one waiting for a lock would); return it and its pid file."""
    pid_file = tmp_path / "pg_dump.pid"
    script = tmp_path / "pg_dump"
    script.write_text(f'#!/bin/sh\necho $$ > "{pid_file}"\necho "-- PostgreSQL database dump"\nexec sleep 60\n')
    script.chmod(0o755)
    return script, pid_file


def assert_gone(pid_file: Path) -> None:
    pid = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


@pytest.mark.postgres
@pytest.mark.django_db
def test_a_hanging_pg_dump_is_killed_at_the_deadline_and_leaves_no_file(
    make_run: MakeRun, dirs: dict[str, Path], tmp_path: Path
) -> None:
    script, pid_file = fake_pg_dump(tmp_path)
    run = make_run("data_processing", {"dataset": "database_backup"}, timeout_seconds=TIMEOUT)

    with override_settings(JOBS={**settings.JOBS, "PG_DUMP": str(script), **{k: str(v) for k, v in dirs.items()}}):
        timed_out_within(run, TIMEOUT + SLACK)

    assert files_in(dirs["BACKUP_DIR"]) == []
    assert_gone(pid_file)


@pytest.mark.django_db
def test_backup_postgresql_stops_a_hanging_pg_dump_at_the_run_deadline(make_run: MakeRun, tmp_path: Path) -> None:
    script, pid_file = fake_pg_dump(tmp_path)
    run = make_run("test_noop", {}, timeout_seconds=TIMEOUT)
    sink = io.BytesIO()

    started = time.monotonic()
    with (
        override_settings(JOBS={**settings.JOBS, "PG_DUMP": str(script)}),
        pytest.raises(RunTimedOut, match="pg_dump was stopped at the job's timeout of 1s"),
    ):
        database_backup.backup_postgresql("default", HashingWriter(sink), run=run)

    assert time.monotonic() - started < TIMEOUT + SLACK
    assert_gone(pid_file)


@pytest.mark.sqlite
@pytest.mark.django_db(transaction=True)
def test_a_sqlite_backup_blocked_by_a_lock_stops_at_the_deadline_and_leaves_no_file(
    make_run: MakeRun, dirs: dict[str, Path]
) -> None:
    run = make_run("data_processing", {"dataset": "database_backup"}, timeout_seconds=TIMEOUT)
    # Another process holds the database exclusively (as a long write would); no reader gets in.
    connection.close()
    locker = sqlite3.connect(connection.settings_dict["NAME"], isolation_level=None)
    try:
        locker.execute("PRAGMA locking_mode=EXCLUSIVE")
        locker.execute("BEGIN EXCLUSIVE")
        locker.execute("UPDATE jobs_job SET name = name")

        timed_out_within(run, TIMEOUT + SLACK)
    finally:
        locker.execute("ROLLBACK")
        locker.close()

    assert files_in(dirs["BACKUP_DIR"]) == []


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_an_export_blocked_by_a_table_lock_stops_at_the_deadline(make_run: MakeRun, dirs: dict[str, Path]) -> None:
    run = make_run("data_processing", {"dataset": "model_export", "model": "jobs.Job"}, timeout_seconds=TIMEOUT)
    # A migration (say) holds the table: the export's query waits for it.
    other = connections.create_connection("default")
    try:
        other.ensure_connection()
        other.set_autocommit(False)
        with other.cursor() as cursor:
            cursor.execute("LOCK TABLE jobs_job IN ACCESS EXCLUSIVE MODE")

        timed_out_within(run, TIMEOUT + SLACK)
    finally:
        other.rollback()
        other.close()

    assert files_in(dirs["EXPORT_DIR"]) == []
    run.deadline = None  # a new attempt, on the same connection: it is usable again
    assert get_executor("data_processing").execute(run)["rows"] == 1
