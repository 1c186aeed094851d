"""The registry of job types: built-in executors plus any named in JOBS['EXECUTORS']."""

from __future__ import annotations

from functools import cache

from django.core.signals import setting_changed
from django.dispatch import receiver
from django.utils.module_loading import import_string

from .base import Executor, ExecutorError

__all__ = [
    "Executor",
    "ExecutorError",
    "RegistryError",
    "UnknownJobType",
    "all_executors",
    "get_executor",
    "job_type_names",
]

BUILTIN_EXECUTORS = [
    "jobs.executors.email.EmailNotificationExecutor",
    "jobs.executors.data_processing.DataProcessingExecutor",
]


class UnknownJobType(LookupError):
    """No executor is registered under that name."""


class RegistryError(Exception):
    """A configured executor cannot be loaded."""


@cache
def all_executors() -> dict[str, Executor]:
    """Return every registered executor by name, built-ins first."""
    from jobs.conf import get

    registry: dict[str, Executor] = {}
    for path in [*BUILTIN_EXECUTORS, *get("EXECUTORS")]:
        try:
            cls = import_string(path)
        except ImportError as exc:
            raise RegistryError(f"cannot import executor {path!r}: {exc}") from exc
        if not (isinstance(cls, type) and issubclass(cls, Executor)):
            raise RegistryError(f"{path!r} is not a subclass of jobs.executors.Executor")
        name = getattr(cls, "name", "")
        if not name or not isinstance(name, str):
            raise RegistryError(f"{path!r} has no name")
        if name in registry:
            raise RegistryError(f"{path!r} reuses the job type name {name!r}")
        registry[name] = cls()
    return registry


def get_executor(name: str) -> Executor:
    """Return the executor for a job type, or raise UnknownJobType."""
    try:
        return all_executors()[name]
    except KeyError:
        raise UnknownJobType(name) from None


def job_type_names() -> list[str]:
    return sorted(all_executors())


@receiver(setting_changed)
def _reset(setting: str, **kwargs: object) -> None:
    if setting == "JOBS":
        all_executors.cache_clear()
