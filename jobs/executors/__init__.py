"""The registry of job types: built-in executors plus any named in JOBS['EXECUTORS']."""

from __future__ import annotations

from .base import Executor, ExecutorError, RegistryError
from .registry import Registry, load_class

__all__ = [
    "Executor",
    "ExecutorError",
    "RegistryError",
    "UnknownJobType",
    "all_executors",
    "get_executor",
    "job_type_names",
    "load_class",
]

BUILTIN_EXECUTORS = [
    "jobs.executors.email.EmailNotificationExecutor",
    "jobs.executors.data_processing.DataProcessingExecutor",
    "jobs.executors.http_request.HttpRequestExecutor",
]

EXECUTORS: Registry[Executor] = Registry(
    Executor, "execute", "EXECUTORS", BUILTIN_EXECUTORS, kind="executor", name_label="job type name"
)


class UnknownJobType(LookupError):
    """No executor is registered under that name."""


def all_executors() -> dict[str, Executor]:
    """Return every registered executor by name, built-ins first; raise RegistryError when one is broken."""
    return EXECUTORS.all()


def get_executor(name: str) -> Executor:
    """Return the executor for a job type, or raise UnknownJobType."""
    try:
        return all_executors()[name]
    except KeyError:
        raise UnknownJobType(name) from None


def job_type_names() -> list[str]:
    return sorted(all_executors())
