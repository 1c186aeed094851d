"""System checks: a broken job type or setting stops start-up early with a clear message."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from django.core import checks


@checks.register("jobs")
def check_settings(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    from .conf import problems

    return [checks.Error(problem, hint="Fix JOBS in settings.", id="jobs.E006") for problem in problems()]


@checks.register("jobs")
def check_executors(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    from .executors import RegistryError, all_executors

    try:
        executors = all_executors()
    except RegistryError as exc:
        return [checks.Error(str(exc), hint="Fix JOBS['EXECUTORS'] in settings.", id="jobs.E001")]
    errors: list[checks.CheckMessage] = []
    for name, executor in executors.items():
        try:
            executor.parameters_schema()
        except Exception as exc:  # noqa: BLE001 - any failure here means the type is broken
            errors.append(checks.Error(f"job type {name!r} cannot describe its parameters: {exc}", id="jobs.E002"))
    return errors


@checks.register("jobs")
def check_processors(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    from .executors import RegistryError
    from .executors.data_processing import all_processors

    try:
        processors = all_processors()
    except RegistryError as exc:
        return [checks.Error(str(exc), hint="Fix JOBS['DATA_PROCESSORS'] in settings.", id="jobs.E003")]
    from .json_schema import serializer_schema

    errors: list[checks.CheckMessage] = []
    for name, processor in processors.items():
        try:
            serializer_schema(processor.parameters_serializer())
        except Exception as exc:  # noqa: BLE001 - any failure here means the processor is broken
            errors.append(checks.Error(f"dataset {name!r} cannot describe its parameters: {exc}", id="jobs.E005"))
    return errors


@checks.register("jobs")
def check_http_allowlist(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    from .conf import get
    from .executors.http_request import Allowlist

    try:
        Allowlist.parse(get("HTTP_ALLOWED_HOSTS"))
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
def check_output_dirs(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    from .conf import get

    warnings: list[checks.CheckMessage] = []
    for setting in ("BACKUP_DIR", "EXPORT_DIR"):
        path = Path(get(setting))
        existing = next((p for p in (path, *path.parents) if p.exists()), None)
        if existing is not None and not existing.is_dir():
            warnings.append(
                checks.Warning(f"JOBS['{setting}'] ({path}) is inside a file, not a directory", id="jobs.W001")
            )
    return warnings
