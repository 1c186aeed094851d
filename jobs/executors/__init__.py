"""The registry of job types: built-in executors plus any named in JOBS['EXECUTORS']."""

from __future__ import annotations

import inspect
import re
from functools import cache
from typing import TypeVar

from django.core.signals import setting_changed
from django.dispatch import receiver
from django.utils.module_loading import import_string
from rest_framework import serializers

from .base import Executor, ExecutorError, RegistryError

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

NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,99}$")

T = TypeVar("T")


class UnknownJobType(LookupError):
    """No executor is registered under that name."""


def load_class(path: str, base: type[T], method: str, kind: str) -> type[T]:
    """Import `path` and check it is a usable subclass of `base` overriding `method`; raise RegistryError."""
    if not isinstance(path, str):
        raise RegistryError(f"{path!r} is not a dotted path string")
    try:
        cls = import_string(path)
    except Exception as exc:
        raise RegistryError(f"cannot import {kind} {path!r}: {type(exc).__name__}: {exc}") from exc
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise RegistryError(f"{path!r} is not a subclass of {base.__module__}.{base.__qualname__}")
    name = getattr(cls, "name", "")
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise RegistryError(f"{path!r} needs a `name` of lower-case letters, digits and underscores, not {name!r}")
    if getattr(cls, method) is getattr(base, method):
        raise RegistryError(f"{path!r} does not implement {method}()")
    if inspect.isabstract(cls):
        raise RegistryError(f"{path!r} is abstract")
    params = getattr(cls, "parameters_serializer", None)
    if not (isinstance(params, type) and issubclass(params, serializers.Serializer)):
        raise RegistryError(f"{path!r}: parameters_serializer must be a rest_framework Serializer class")
    if not isinstance(getattr(cls, "safe_to_repeat", None), bool):
        raise RegistryError(f"{path!r}: safe_to_repeat must be True or False")
    return cls


def _instantiate(cls: type[T], path: str) -> T:
    try:
        return cls()
    except Exception as exc:
        raise RegistryError(f"cannot create {path!r}: {type(exc).__name__}: {exc}") from exc


@cache
def all_executors() -> dict[str, Executor]:
    """Return every registered executor by name, built-ins first; raise RegistryError when one is broken."""
    from jobs.conf import get

    paths = get("EXECUTORS")
    if isinstance(paths, str) or not isinstance(paths, (list, tuple)):
        raise RegistryError("JOBS['EXECUTORS'] must be a list of dotted paths")
    registry: dict[str, Executor] = {}
    for path in [*BUILTIN_EXECUTORS, *paths]:
        cls = load_class(path, Executor, "execute", "executor")
        if cls.name in registry:
            raise RegistryError(f"{path!r} reuses the job type name {cls.name!r}")
        registry[cls.name] = _instantiate(cls, path)
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
