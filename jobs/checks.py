"""System checks: a broken job type or setting stops start-up early with a clear message."""

from __future__ import annotations

from typing import Any

from django.core import checks


@checks.register()
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


@checks.register()
def check_processors(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    from .executors.data_processing import all_processors

    try:
        all_processors()
    except (ImportError, TypeError) as exc:
        return [checks.Error(str(exc), hint="Fix JOBS['DATA_PROCESSORS'] in settings.", id="jobs.E003")]
    return []
