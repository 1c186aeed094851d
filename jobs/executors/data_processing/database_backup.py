"""database_backup: a gzip-compressed backup of a Django database, keeping the newest N files."""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import shutil
import sqlite3
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, cast

from django.conf import settings
from django.db import connections
from django.utils import timezone
from rest_framework import serializers

from jobs.conf import config
from jobs.executors import ExecutorError
from jobs.executors.base import RunTimedOut, seconds_left
from jobs.executors.data_processing import DataProcessor

from .outputs import HashingWriter, OutputDirectory, SeriesNames, atomic_output, directory_param, open_output_directory

if TYPE_CHECKING:
    from django.db.backends.sqlite3.base import DatabaseWrapper as SQLiteDatabaseWrapper

    from jobs.models import JobRun

SUPPORTED_VENDORS = ("sqlite", "postgresql")
CHUNK = 1024 * 1024

# Connection OPTIONS that libpq also reads from the environment, so pg_dump connects exactly as Django does.
LIBPQ_ENV = {
    "sslmode": "PGSSLMODE",
    "sslrootcert": "PGSSLROOTCERT",
    "sslcert": "PGSSLCERT",
    "sslkey": "PGSSLKEY",
    "sslcrl": "PGSSLCRL",
    "passfile": "PGPASSFILE",
    "service": "PGSERVICE",
    "connect_timeout": "PGCONNECT_TIMEOUT",
    "options": "PGOPTIONS",
    "target_session_attrs": "PGTARGETSESSIONATTRS",
    "application_name": "PGAPPNAME",
}


BACKUP_PERMISSION = "jobs.schedule_database_backup"
# Pages copied per step of SQLite's online backup: the run's clock is read between steps.
SQLITE_BACKUP_PAGES = 1024
# SQLite virtual-machine steps between two looks at the clock during the copy's quick_check.
SQLITE_PROGRESS_STEPS = 10_000


class DatabaseBackupParameters(serializers.Serializer):
    keep = serializers.IntegerField(
        min_value=1, max_value=10_000, default=7, help_text="Backups of this database to keep; older ones are deleted."
    )
    directory = directory_param(
        "BACKUP_DIR",
        "Where to write: relative to JOBS['BACKUP_DIR'] (the default), or an absolute path inside it or inside "
        "a folder listed in JOBS['ALLOWED_OUTPUT_DIRS'].",
    )
    database = serializers.CharField(
        default="default", max_length=100, help_text="The Django database alias to back up."
    )

    def validate_database(self, value: str) -> str:
        if value not in settings.DATABASES:
            raise serializers.ValidationError(
                f"unknown database alias {value!r}; configured: {', '.join(sorted(settings.DATABASES))}"
            )
        vendor = connections[value].vendor
        if vendor not in SUPPORTED_VENDORS:
            raise serializers.ValidationError(f"{vendor} databases are not supported; use SQLite or PostgreSQL")
        return value


class DatabaseBackup(DataProcessor):
    name = "database_backup"
    description = (
        "Back up the database to a gzip file named with the UTC time (SQLite: online backup API; "
        "PostgreSQL: pg_dump, plain SQL), then delete all but the newest `keep` backups. "
        f"Scheduling one needs the permission {BACKUP_PERMISSION}."
    )
    parameters_serializer = DatabaseBackupParameters
    safe_to_repeat = True  # a second backup of the same fire is only a spare copy

    def check_permission(self, user: Any, params: dict[str, Any]) -> None:
        """Refuse a user without the backup permission: a backup holds every secret in the database."""
        if not user.has_perm(BACKUP_PERMISSION):
            raise serializers.ValidationError(
                {
                    "dataset": [
                        f"scheduling database backups needs the permission {BACKUP_PERMISSION} "
                        "(a backup holds every password hash and token in the database)"
                    ]
                }
            )

    def process(self, run: JobRun, params: dict[str, Any]) -> dict[str, Any]:
        alias = params["database"]
        connection = connections[alias]
        kind = "sqlite3" if connection.vendor == "sqlite" else "sql"
        with open_output_directory("BACKUP_DIR", params.get("directory")) as directory:
            names = SeriesNames(directory=directory, prefix=f"backup-{alias}", suffix=f".{kind}.gz")
            with atomic_output(names, timezone.now()) as (writer, written):
                if connection.vendor == "sqlite":
                    backup_sqlite(alias, writer, scratch=directory, run=run)
                else:
                    backup_postgresql(alias, writer, run=run)
            deleted = names.prune(params["keep"])
        output = written[0]
        return {
            "path": str(output.path),
            "size_bytes": output.size_bytes,
            "sha256": output.sha256,
            "database": alias,
            "vendor": connection.vendor,
            "deleted": deleted,
        }


def _gzip_into(writer: HashingWriter, name: str) -> gzip.GzipFile:
    return gzip.GzipFile(filename=name, mode="wb", fileobj=writer, compresslevel=6)


def _copy_until_deadline(source: IO[bytes], target: io.BufferedIOBase, run: JobRun) -> None:
    while chunk := source.read(CHUNK):
        seconds_left(run)
        target.write(chunk)


@contextlib.contextmanager
def _sqlite_source(alias: str, run: JobRun) -> Iterator[sqlite3.Connection]:
    """Yield a connection to back up from, holding a read transaction: a consistent snapshot.

    A connection of its own, read-only, whose wait for a lock is bounded by the run's time
    (Django's waits 20 s and more); only an in-memory database is read through Django's.
    """
    connection = cast("SQLiteDatabaseWrapper", connections[alias])
    if connection.is_in_memory_db():
        connection.ensure_connection()
        yield connection.connection
        return
    uri = f"{Path(connection.settings_dict['NAME']).absolute().as_uri()}?mode=ro"
    source = sqlite3.connect(uri, uri=True, timeout=seconds_left(run), isolation_level=None)
    try:
        # Without a read transaction held across the steps, every write by another connection
        # between two steps would restart the backup, which on a busy database never ends.
        source.execute("BEGIN")
        source.execute("SELECT count(*) FROM sqlite_master").fetchone()
        yield source
    finally:
        source.close()


def backup_sqlite(alias: str, writer: HashingWriter, *, scratch: OutputDirectory, run: JobRun) -> None:
    """Copy the SQLite database with the online backup API, check the copy, and gzip it into `writer`.

    The copy goes step by step so that the run's deadline is checked between steps, and the
    copy's check is interrupted at the deadline; either raises RunTimedOut.
    """
    connection = connections[alias]
    if connection.in_atomic_block:
        # The backup would not hold this transaction's rows, nor, on an in-memory database, ever finish.
        raise ExecutorError("cannot back up SQLite from inside a transaction")

    def out_of_time() -> int:
        return int(time.monotonic() >= deadline)

    deadline = time.monotonic() + seconds_left(run)
    try:
        with scratch.scratch() as space:
            copy_name = space / "copy.sqlite3"
            with _sqlite_source(alias, run) as source, contextlib.closing(sqlite3.connect(copy_name)) as target:
                # The progress callback raising RunTimedOut aborts the backup (CPython stops and re-raises).
                source.backup(target, pages=SQLITE_BACKUP_PAGES, progress=lambda *_: seconds_left(run))
            # The source's snapshot is released: checkpoints need not wait for the check and the gzip.
            with contextlib.closing(sqlite3.connect(copy_name)) as target:
                target.set_progress_handler(out_of_time, SQLITE_PROGRESS_STEPS)
                status = target.execute("PRAGMA quick_check").fetchone()[0]
            if status != "ok":
                raise ExecutorError(f"the backup copy failed SQLite's quick_check: {status}")
            with open(copy_name, "rb") as copy, _gzip_into(writer, f"backup-{alias}.sqlite3") as compressed:
                _copy_until_deadline(copy, compressed, run)
    except sqlite3.Error as exc:
        if time.monotonic() >= deadline:
            raise RunTimedOut(f"the SQLite backup was stopped at the job's timeout: {exc}") from exc
        raise ExecutorError(f"SQLite backup failed: {exc}") from exc


def pg_dump_command(alias: str) -> tuple[list[str], dict[str, str]]:
    """Return the pg_dump argv and environment that connect as Django's `alias` connection does."""
    executable = config().pg_dump
    found = shutil.which(executable)
    if found is None:
        raise ExecutorError(
            f"pg_dump not found ({executable!r} is not on PATH); install the PostgreSQL client tools "
            "matching your server, or set JOBS['PG_DUMP'] to its full path"
        )
    params = connections[alias].settings_dict
    env = dict(os.environ)
    # Passwords go through the environment, never argv, where `ps` would show them.
    for key, variable in (("HOST", "PGHOST"), ("PORT", "PGPORT"), ("USER", "PGUSER"), ("PASSWORD", "PGPASSWORD")):
        if params.get(key):
            env[variable] = str(params[key])
    for option, variable in LIBPQ_ENV.items():
        if params.get("OPTIONS", {}).get(option) not in (None, ""):
            env[variable] = str(params["OPTIONS"][option])
    env.setdefault("PGAPPNAME", "job-scheduler database_backup")
    argv = [found, "--no-password", "--format=plain", "--encoding=UTF8"]
    if params.get("NAME"):
        argv.append(f"--dbname={params['NAME']}")
    return argv, env


def backup_postgresql(alias: str, writer: HashingWriter, *, run: JobRun) -> None:
    """Stream `pg_dump` output through gzip into `writer`; kill it and raise RunTimedOut at the run's deadline."""
    argv, env = pg_dump_command(alias)
    budget = seconds_left(run)  # before the child starts: nothing may raise between its start and the try
    with tempfile.TemporaryFile() as stderr:
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=stderr, stdin=subprocess.DEVNULL, env=env)
        stopped = threading.Event()

        def stop() -> None:
            stopped.set()
            process.kill()

        # A read blocked on a silent pg_dump (waiting for a lock, say) ends when it is killed.
        killer = threading.Timer(budget, stop)
        killer.daemon = True
        killer.start()
        try:
            assert process.stdout is not None
            with _gzip_into(writer, f"backup-{alias}.sql") as compressed:
                _copy_until_deadline(process.stdout, compressed, run)
            returncode = process.wait(timeout=seconds_left(run))
        except (RunTimedOut, subprocess.TimeoutExpired) as exc:
            how = "was stopped at" if stopped.is_set() else "did not finish within"
            raise RunTimedOut(f"pg_dump {how} the job's timeout of {run.job.timeout_seconds}s") from exc
        finally:
            killer.cancel()
            if process.poll() is None:
                process.kill()
                process.wait()
            if process.stdout is not None:
                process.stdout.close()
        if stopped.is_set():
            # Killed as it was ending: its output may be cut short.
            raise RunTimedOut(f"pg_dump was stopped at the job's timeout of {run.job.timeout_seconds}s")
        if returncode != 0:
            stderr.seek(0)
            detail = stderr.read()[-2000:].decode("utf-8", "replace").strip()
            raise ExecutorError(f"pg_dump exited with status {returncode}: {detail}")
