"""Registries of plug-in classes: built-in dotted paths plus those a JOBS setting adds, loaded once."""

from __future__ import annotations

import inspect
import re
from typing import Any, ClassVar, Generic, Protocol, TypeVar

from django.core.signals import setting_changed
from django.utils.module_loading import import_string
from rest_framework import serializers

from .base import RegistryError

NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,99}$")


class Named(Protocol):
    name: ClassVar[str]


T = TypeVar("T")
N = TypeVar("N", bound=Named)


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


class Registry(Generic[N]):
    """One instance of each subclass of `base` listed in `builtin` and in JOBS[setting], by its `name`.

    Each class must implement `method`. They are loaded and checked on first use, and again
    after JOBS changes (in tests). `kind` ("executor") and `name_label` ("job type name") word
    the RegistryError messages.
    """

    def __init__(
        self, base: type[N], method: str, setting: str, builtin: list[str], *, kind: str, name_label: str
    ) -> None:
        self.base = base
        self.method = method
        self.kind = kind
        self.name_label = name_label
        self.setting = setting
        self.builtin = builtin
        self._loaded: dict[str, N] | None = None
        setting_changed.connect(self._reset)

    def all(self) -> dict[str, N]:
        """Return every registered instance by name, built-ins first; raise RegistryError when one is broken."""
        if self._loaded is None:
            self._loaded = self._load()
        return self._loaded

    def _load(self) -> dict[str, N]:
        from jobs.conf import config

        paths = getattr(config(), self.setting.lower())  # a tuple of strings (jobs.conf)
        registry: dict[str, N] = {}
        for path in [*self.builtin, *paths]:
            cls = load_class(path, self.base, self.method, self.kind)
            if cls.name in registry:
                raise RegistryError(f"{path!r} reuses the {self.name_label} {cls.name!r}")
            registry[cls.name] = _instantiate(cls, path)
        return registry

    def _reset(self, setting: str, **kwargs: Any) -> None:
        if setting == "JOBS":
            self._loaded = None
