"""System checks: a broken job type or setting stops start-up early with a clear message."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from operator import methodcaller
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from django.core import checks
from django.db import connections

if TYPE_CHECKING:
    from .executors.data_processing import DataProcessor

Entry = TypeVar("Entry")
Check = Callable[..., list[checks.CheckMessage]]


def needs_settings(check: Check) -> Check:
    """A check that reads the JOBS settings is skipped while they are unusable (jobs.E006 says why)."""

    @functools.wraps(check)
    def checked(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
        from .conf import problems

        return [] if problems() else check(app_configs, **kwargs)

    return checked


@checks.register("jobs")
def check_settings(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    from .conf import problems

    return [checks.Error(problem, hint="Fix JOBS in settings.", id="jobs.E006") for problem in problems()]


def database_driver_problems() -> list[str]:
    """Return one line per PostgreSQL database that Django would reach through psycopg 3."""
    aliases = [alias for alias in connections if connections[alias].vendor == "postgresql"]
    if not aliases:
        return []
    # Decided as Django decides: psycopg 3 whenever `import psycopg` succeeds, even with psycopg2
    # installed too. The scheduler's LISTEN thread, prepared statements and error codes use
    # psycopg2's API.
    import django.db.backends.postgresql.psycopg_any as psycopg_any

    if not psycopg_any.is_psycopg3:
        return []
    return [
        f"DATABASES[{alias!r}]: PostgreSQL through psycopg 3 is not supported; the scheduler needs psycopg2 "
        "(install psycopg2-binary and uninstall psycopg)"
        for alias in aliases
    ]


@checks.register("jobs")
def check_database_driver(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    return [checks.Error(problem, id="jobs.E007") for problem in database_driver_problems()]


def registry_problems(
    setting: str,
    load: Callable[[], Mapping[str, Entry]],
    describe: Callable[[Entry], object],
    *,
    kind: str,
    ids: tuple[str, str],
) -> list[checks.CheckMessage]:
    """Check that the registry JOBS[setting] loads and that each of its entries can describe its parameters.

    `ids` are the check ids for a registry that does not load and for an entry that cannot describe itself.
    """
    from .executors import RegistryError

    broken_id, undescribable_id = ids
    try:
        entries = load()
    except RegistryError as exc:
        return [checks.Error(str(exc), hint=f"Fix JOBS[{setting!r}] in settings.", id=broken_id)]
    errors: list[checks.CheckMessage] = []
    for name, entry in entries.items():
        try:
            describe(entry)
        except Exception as exc:  # noqa: BLE001 - any failure here means the entry is broken
            errors.append(checks.Error(f"{kind} {name!r} cannot describe its parameters: {exc}", id=undescribable_id))
    return errors


@checks.register("jobs")
@needs_settings
def check_executors(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    from .executors import all_executors

    describe = methodcaller("parameters_schema")
    return registry_problems("EXECUTORS", all_executors, describe, kind="job type", ids=("jobs.E001", "jobs.E002"))


@checks.register("jobs")
@needs_settings
def check_processors(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    from .executors.data_processing import all_processors
    from .json_schema import serializer_schema

    def describe(processor: DataProcessor) -> object:
        return serializer_schema(processor.parameters_serializer())

    return registry_problems(
        "DATA_PROCESSORS", all_processors, describe, kind="dataset", ids=("jobs.E003", "jobs.E005")
    )


@checks.register("jobs")
@needs_settings
def check_http_allowlist(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    from .conf import config
    from .net.guard import Allowlist

    try:
        Allowlist.parse(config().http_allowed_hosts)
    except ValueError as exc:
        return [
            checks.Error(
                f"JOBS['HTTP_ALLOWED_HOSTS'] {exc}",
                hint="List host names, '.example.com' for a domain, IP addresses or networks like 10.0.0.0/8.",
                id="jobs.E004",
            )
        ]
    return []


@checks.register("jobs")
@needs_settings
def check_output_dirs(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    from .conf import config

    jobs = config()
    warnings: list[checks.CheckMessage] = []
    for setting, folder in (("BACKUP_DIR", jobs.backup_dir), ("EXPORT_DIR", jobs.export_dir)):
        path = Path(folder)
        existing = next((p for p in (path, *path.parents) if p.exists()), None)
        if existing is not None and not existing.is_dir():
            warnings.append(
                checks.Warning(f"JOBS['{setting}'] ({path}) is inside a file, not a directory", id="jobs.W001")
            )
    return warnings
