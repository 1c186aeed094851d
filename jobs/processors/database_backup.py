"""database_backup: a gzip-compressed backup of a Django database, keeping the newest N files."""

from __future__ import annotations

import gzip
import os
import shutil
import sqlite3
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.db import connections
from django.utils import timezone
from rest_framework import serializers

from jobs.conf import jobs_settings
from jobs.executors import ExecutorError
from jobs.executors.data_processing import DataProcessor

from .outputs import HashingWriter, SeriesNames, atomic_output, directory_param, output_directory

if TYPE_CHECKING:
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


class DatabaseBackupParameters(serializers.Serializer):
    keep = serializers.IntegerField(
        min_value=1, max_value=10_000, default=7, help_text="Backups of this database to keep; older ones are deleted."
    )
    directory = directory_param("Where to write; absolute, or relative to JOBS['BACKUP_DIR'] (the default).")
    database = serializers.CharField(default="default", help_text="The Django database alias to back up.")

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
        "PostgreSQL: pg_dump, plain SQL), then delete all but the newest `keep` backups."
    )
    parameters_serializer = DatabaseBackupParameters
    safe_to_repeat = True  # a second backup of the same fire is only a spare copy

    def process(self, run: JobRun, params: dict[str, Any]) -> dict[str, Any]:
        alias = params["database"]
        connection = connections[alias]
        directory = output_directory("BACKUP_DIR", params.get("directory"))
        kind = "sqlite3" if connection.vendor == "sqlite" else "sql"
        names = SeriesNames(directory=directory, prefix=f"backup-{alias}", suffix=f".{kind}.gz")
        now = timezone.now()
        with atomic_output(names, now) as (writer, written):
            if connection.vendor == "sqlite":
                backup_sqlite(alias, writer, scratch_dir=directory)
            else:
                backup_postgresql(alias, writer, timeout=run.job.timeout_seconds)
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


def backup_sqlite(alias: str, writer: HashingWriter, *, scratch_dir: Path) -> None:
    """Copy the SQLite database with the online backup API, check the copy, and gzip it into `writer`."""
    connection = connections[alias]
    if connection.in_atomic_block:
        # SQLite's backup waits forever for the connection's own open write transaction.
        raise ExecutorError("cannot back up SQLite from inside a transaction")
    connection.ensure_connection()
    source = connection.connection
    fd, copy_name = tempfile.mkstemp(prefix=".sqlite-copy-", suffix=".sqlite3", dir=scratch_dir)
    os.close(fd)
    try:
        target = sqlite3.connect(copy_name)
        try:
            # One step: a consistent snapshot; in WAL mode writers carry on meanwhile.
            source.backup(target, pages=-1)
            status = target.execute("PRAGMA quick_check").fetchone()[0]
        finally:
            target.close()
        if status != "ok":
            raise ExecutorError(f"the backup copy failed SQLite's quick_check: {status}")
        with open(copy_name, "rb") as copy, _gzip_into(writer, f"backup-{alias}.sqlite3") as compressed:
            shutil.copyfileobj(copy, compressed, CHUNK)
    except sqlite3.Error as exc:
        raise ExecutorError(f"SQLite backup failed: {exc}") from exc
    finally:
        os.unlink(copy_name)


def pg_dump_command(alias: str) -> tuple[list[str], dict[str, str]]:
    """Return the pg_dump argv and environment that connect as Django's `alias` connection does."""
    executable = jobs_settings().get("PG_DUMP", "pg_dump")
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


def backup_postgresql(alias: str, writer: HashingWriter, *, timeout: float) -> None:
    """Stream `pg_dump` output through gzip into `writer`; kill it if it outlives `timeout` seconds."""
    argv, env = pg_dump_command(alias)
    with tempfile.TemporaryFile() as stderr:
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=stderr, stdin=subprocess.DEVNULL, env=env)
        # The runner abandons a timed-out run's thread; this keeps pg_dump from outliving it.
        killer = threading.Timer(timeout, process.kill)
        killer.daemon = True
        killer.start()
        try:
            assert process.stdout is not None
            with _gzip_into(writer, f"backup-{alias}.sql") as compressed:
                shutil.copyfileobj(process.stdout, compressed, CHUNK)
            returncode = process.wait()
        finally:
            killer.cancel()
            if process.poll() is None:
                process.kill()
                process.wait()
            if process.stdout is not None:
                process.stdout.close()
        if returncode != 0:
            stderr.seek(0)
            detail = stderr.read()[-2000:].decode("utf-8", "replace").strip()
            if returncode < 0 and not detail:
                detail = f"killed after {timeout}s"
            raise ExecutorError(f"pg_dump exited with status {returncode}: {detail}")
