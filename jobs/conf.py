"""The JOBS settings dict, merged with defaults each time it is read."""

from __future__ import annotations

from typing import Any

from django.conf import settings

DEFAULTS: dict[str, Any] = {
    # Runs at once per scheduler process (MAX_CONCURRENT_JOBS in the environment).
    "MAX_CONCURRENT_JOBS": 5,
    # Dotted paths to extra executor classes from other apps.
    "EXECUTORS": [],
    # Dotted paths to extra data processors for the data_processing job type.
    "DATA_PROCESSORS": [],
    # Longest sleep between passes when nothing is due (PostgreSQL NOTIFY wakes it sooner).
    "MAX_SLEEP_SECONDS": 5.0,
    "HEARTBEAT_SECONDS": 5.0,
    # A scheduler silent for this long is presumed dead and its runs are marked lost.
    "LOST_AFTER_SECONDS": 30.0,
    "SHUTDOWN_GRACE_SECONDS": 30.0,
    # Run history kept: runs older than this many days, and beyond this many per job, are pruned.
    "RUN_RETENTION_DAYS": 30,
    "RUN_RETENTION_PER_JOB": 1000,
    "RESULT_MAX_BYTES": 64 * 1024,
    "ERROR_MAX_CHARS": 8000,
    # Hosts (names or IPs) that http_request jobs may reach even on private addresses.
    "HTTP_ALLOWED_HOSTS": [],
    "BACKUP_DIR": "backups",
    "EXPORT_DIR": "exports",
}


def jobs_settings() -> dict[str, Any]:
    """Return the JOBS settings merged over the defaults."""
    return {**DEFAULTS, **getattr(settings, "JOBS", {})}


def get(name: str) -> Any:
    """Return one JOBS setting."""
    return jobs_settings()[name]
