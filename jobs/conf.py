"""The JOBS settings dict, merged with defaults each time it is read, and checked at start-up."""

from __future__ import annotations

import difflib
import math
import os
import re
from collections.abc import Callable
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
    # Environment variables and settings that http_request headers may name ({"from_env": NAME}):
    # only these, or anyone who may create a job could send SECRET_KEY to a URL of theirs.
    "HTTP_HEADER_SECRETS": [],
    # A PEM file of extra certificate authorities http_request trusts (an internal CA).
    "HTTP_CA_BUNDLE": None,
    "BACKUP_DIR": "backups",
    "EXPORT_DIR": "exports",
    # Further folders (absolute) that backup and export jobs may write into.
    "ALLOWED_OUTPUT_DIRS": [],
    "PG_DUMP": "pg_dump",
}


def jobs_settings() -> dict[str, Any]:
    """Return the JOBS settings merged over the defaults."""
    return {**DEFAULTS, **getattr(settings, "JOBS", {})}


def get(name: str) -> Any:
    """Return one JOBS setting."""
    return jobs_settings()[name]


def _whole(minimum: int) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, int):
            return f"{value!r} is not a whole number"
        return None if value >= minimum else f"{value} is below the minimum of {minimum}"

    return check


def _seconds(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"{value!r} is not a number of seconds"
    if not math.isfinite(value) or value <= 0:
        return f"{value!r} is not a finite number of seconds above 0"
    return None


def _paths(value: Any) -> str | None:
    if isinstance(value, str) or not isinstance(value, list | tuple):
        return "must be a list"
    if not all(isinstance(item, str) and item for item in value):
        return "must hold only non-empty strings"
    return None


def _absolute_dirs(value: Any) -> str | None:
    problem = _paths(value)
    if problem is None:
        relative = [item for item in value if not os.path.isabs(item)]
        problem = f"{relative[0]!r} is not an absolute path" if relative else None
    return problem


def _names(value: Any) -> str | None:
    problem = _paths(value)
    if problem is None:
        bad = [item for item in value if not re.fullmatch(r"[A-Z_][A-Z0-9_]*", item)]
        problem = f"{bad[0]!r} is not an environment variable or setting name" if bad else None
    return problem


def _folder(value: Any) -> str | None:
    if not isinstance(value, str | os.PathLike) or not str(value):
        return f"{value!r} is not a folder path"
    return None


def _ca_bundle(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str | os.PathLike) or not os.path.isfile(value) or not os.access(value, os.R_OK):
        return f"{value!r} is not a readable file"
    return None


def _command(value: Any) -> str | None:
    return None if isinstance(value, str) and value else f"{value!r} is not a command name or path"


def _anything(value: Any) -> str | None:
    return None  # checked where it is understood (HTTP_ALLOWED_HOSTS: checks.check_http_allowlist)


_RULES: dict[str, Callable[[Any], str | None]] = {
    "MAX_CONCURRENT_JOBS": _whole(1),
    "EXECUTORS": _paths,
    "DATA_PROCESSORS": _paths,
    "MAX_SLEEP_SECONDS": _seconds,
    "HEARTBEAT_SECONDS": _seconds,
    "LOST_AFTER_SECONDS": _seconds,
    "SHUTDOWN_GRACE_SECONDS": _seconds,
    "RUN_RETENTION_DAYS": _whole(1),
    "RUN_RETENTION_PER_JOB": _whole(1),
    "RESULT_MAX_BYTES": _whole(1024),
    "ERROR_MAX_CHARS": _whole(200),
    "HTTP_ALLOWED_HOSTS": _anything,
    "HTTP_HEADER_SECRETS": _names,
    "HTTP_CA_BUNDLE": _ca_bundle,
    "BACKUP_DIR": _folder,
    "EXPORT_DIR": _folder,
    "ALLOWED_OUTPUT_DIRS": _absolute_dirs,
    "PG_DUMP": _command,
}


def problems() -> list[str]:
    """Return one line per JOBS setting that cannot be used, each naming the setting."""
    given = getattr(settings, "JOBS", {})
    if not isinstance(given, dict):
        return ["JOBS must be a dict"]
    found = []
    for name in given:
        if name not in DEFAULTS:
            close = difflib.get_close_matches(str(name), DEFAULTS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(DEFAULTS)}"
            found.append(f"JOBS[{name!r}] is not a setting of this app{hint}")
    merged = jobs_settings()
    for name, rule in _RULES.items():
        if problem := rule(merged[name]):
            found.append(f"JOBS[{name!r}]: {problem}")
    heartbeat, lost_after = merged["HEARTBEAT_SECONDS"], merged["LOST_AFTER_SECONDS"]
    if not _seconds(heartbeat) and not _seconds(lost_after) and heartbeat * 2 > lost_after:
        # Others would presume a scheduler dead between its heartbeats, and its claims need
        # a heartbeat younger than half of the lost-after time.
        found.append(
            f"JOBS['HEARTBEAT_SECONDS'] ({heartbeat:g}s) must be at most half of "
            f"JOBS['LOST_AFTER_SECONDS'] ({lost_after:g}s)"
        )
    return found
