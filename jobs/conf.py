"""The JOBS settings: checked once and frozen into a typed `JobsConfig` (see `config()`).

Every rule about a JOBS value, alone or against another, lives here: the system checks
(`problems()`), `config()` and the command-line overrides of `runscheduler` (`JobsConfig.replace`)
all apply the same ones, each wording the values it names in its own terms.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache
from typing import Any, NamedTuple

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.signals import setting_changed


class _Rule(NamedTuple):
    check: Callable[[Any], str | None]  # why a value cannot be used, naming the value; None when it can
    convert: Callable[[Any], Any]  # the typed value, once `check` passed


def _whole(minimum: int) -> _Rule:
    def check(value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, int):
            return f"{value!r} is not a whole number"
        return None if value >= minimum else f"{value} is below the minimum of {minimum}"

    return _Rule(check, int)


def _check_seconds(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"{value!r} is not a number of seconds"
    if not math.isfinite(value) or value <= 0:
        return f"{value!r} is not a finite number of seconds above 0"
    return None


def _check_strings(value: Any) -> str | None:
    if isinstance(value, str) or not isinstance(value, list | tuple):
        return "must be a list"
    if not all(isinstance(item, str) and item for item in value):
        return "must hold only non-empty strings"
    return None


def _check_absolute_dirs(value: Any) -> str | None:
    problem = _check_strings(value)
    if problem is None:
        relative = [item for item in value if not os.path.isabs(item)]
        problem = f"{relative[0]!r} is not an absolute path" if relative else None
    return problem


def _check_names(value: Any) -> str | None:
    problem = _check_strings(value)
    if problem is None:
        bad = [item for item in value if not re.fullmatch(r"[A-Z_][A-Z0-9_]*", item)]
        problem = f"{bad[0]!r} is not an environment variable or setting name" if bad else None
    return problem


def _check_folder(value: Any) -> str | None:
    if not isinstance(value, str | os.PathLike) or not str(value):
        return f"{value!r} is not a folder path"
    return None


def _check_ca_bundle(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str | os.PathLike) or not os.path.isfile(value) or not os.access(value, os.R_OK):
        return f"{value!r} is not a readable file"
    return None


def _check_command(value: Any) -> str | None:
    return None if isinstance(value, str) and value else f"{value!r} is not a command name or path"


def _optional_path(value: Any) -> str | None:
    return None if value is None else os.fspath(value)


_SECONDS = _Rule(_check_seconds, float)
# What the entries mean (a dotted path, a host) is checked where it is understood: the registries'
# and the HTTP allowlist's own checks.
_STRINGS = _Rule(_check_strings, tuple)
_FOLDER = _Rule(_check_folder, os.fspath)


@dataclass(frozen=True, slots=True)
class Problem:
    """A value, or values that do not go together, that cannot be used.

    `template` names the fields as {0}, {1}...; `describe` fills in labels for them, so each
    caller words them as its user knows them (a JOBS key, a command-line flag).
    """

    fields: tuple[str, ...]
    template: str
    value: Any = None  # the value at fault, when the problem is about one field

    def describe(self, label: Callable[[str], str] | None = None) -> str:
        return self.template.format(*map(label or setting_label, self.fields))


class InvalidConfig(ImproperlyConfigured):
    """The values given for a JobsConfig cannot be used; `problem` says which and why."""

    def __init__(self, problem: Problem) -> None:
        super().__init__(problem.describe())
        self.problem = problem


def setting_label(name: str) -> str:
    """Return how JOBS names a JobsConfig field: JOBS['HEARTBEAT_SECONDS']."""
    return f"JOBS[{name.upper()!r}]"


# A claim needs a heartbeat younger than this fraction of the lost-after time, so that nobody can
# presume the claiming scheduler dead while it starts what it claimed (jobs.scheduler.store).
CLAIM_FRESHNESS = 0.5


def _heartbeat_within_half_lost_after(heartbeat: float, lost_after: float) -> str | None:
    # Others would presume a scheduler dead between its heartbeats, and its claims need a
    # heartbeat younger than half of the lost-after time.
    if heartbeat > lost_after * CLAIM_FRESHNESS:
        return f"{{0}} ({heartbeat:g}s) must be at most half of {{1}} ({lost_after:g}s)"
    return None


# Values valid alone that must agree: the fields, and a check of their values returning the
# problem's template (naming the fields {0}, {1}) or None.
_RELATIONS: list[tuple[tuple[str, ...], Callable[..., str | None]]] = [
    (("heartbeat_seconds", "lost_after_seconds"), _heartbeat_within_half_lost_after),
]


def _problems(given: Mapping[str, Any]) -> list[Problem]:
    """Return what is wrong with these values: each field alone, then the relations between valid ones."""
    found = []
    for name, rule in _FIELDS.items():
        if (reason := rule.check(given[name])) is not None:
            escaped = reason.replace("{", "{{").replace("}", "}}")
            found.append(Problem((name,), f"{{0}}: {escaped}", given[name]))
    invalid = {name for problem in found for name in problem.fields}
    for names, relation in _RELATIONS:
        if invalid.isdisjoint(names) and (template := relation(*(given[name] for name in names))) is not None:
            found.append(Problem(names, template))
    return found


def _setting(default: Any, rule: _Rule) -> Any:
    return field(default=default, metadata={"rule": rule})


@dataclass(frozen=True, slots=True, kw_only=True)
class JobsConfig:
    """The JOBS settings, checked and typed: one field per key, named in lower case.

    Any instance is valid: building one (or `replace`) raises InvalidConfig otherwise.
    """

    # Runs at once per scheduler process (MAX_CONCURRENT_JOBS in the environment).
    max_concurrent_jobs: int = _setting(5, _whole(1))
    # Dotted paths to extra executor classes from other apps.
    executors: tuple[str, ...] = _setting((), _STRINGS)
    # Dotted paths to extra data processors for the data_processing job type.
    data_processors: tuple[str, ...] = _setting((), _STRINGS)
    # Longest sleep between passes when nothing is due (PostgreSQL NOTIFY wakes it sooner).
    max_sleep_seconds: float = _setting(5.0, _SECONDS)
    heartbeat_seconds: float = _setting(5.0, _SECONDS)
    # A scheduler silent for this long is presumed dead and its runs are marked lost.
    lost_after_seconds: float = _setting(30.0, _SECONDS)
    shutdown_grace_seconds: float = _setting(30.0, _SECONDS)
    # Run history kept: runs older than this many days, and beyond this many per job, are pruned.
    run_retention_days: int = _setting(30, _whole(1))
    run_retention_per_job: int = _setting(1000, _whole(1))
    result_max_bytes: int = _setting(64 * 1024, _whole(1024))
    error_max_chars: int = _setting(8000, _whole(200))
    # Hosts (names or IPs) that http_request jobs may reach even on private addresses.
    http_allowed_hosts: tuple[str, ...] = _setting((), _STRINGS)
    # Environment variables and settings that http_request headers may name ({"from_env": NAME}):
    # only these, or anyone who may create a job could send SECRET_KEY to a URL of theirs.
    http_header_secrets: tuple[str, ...] = _setting((), _Rule(_check_names, tuple))
    # A PEM file of extra certificate authorities http_request trusts (an internal CA).
    http_ca_bundle: str | None = _setting(None, _Rule(_check_ca_bundle, _optional_path))
    backup_dir: str = _setting("backups", _FOLDER)
    export_dir: str = _setting("exports", _FOLDER)
    # Further folders (absolute) that backup and export jobs may write into.
    allowed_output_dirs: tuple[str, ...] = _setting((), _Rule(_check_absolute_dirs, tuple))
    pg_dump: str = _setting("pg_dump", _Rule(_check_command, str))

    def __post_init__(self) -> None:
        given = {name: getattr(self, name) for name in _FIELDS}
        if found := _problems(given):
            raise InvalidConfig(found[0])
        for name, rule in _FIELDS.items():
            # Frozen: set once, through object, to the typed value (a list becomes a tuple, 5 becomes 5.0).
            object.__setattr__(self, name, rule.convert(given[name]))

    def replace(self, **overrides: Any) -> JobsConfig:
        """Return a copy with some fields changed; raise InvalidConfig if it cannot be used."""
        return dataclasses.replace(self, **overrides)


_FIELDS: dict[str, _Rule] = {each.name: each.metadata["rule"] for each in dataclasses.fields(JobsConfig)}
_DEFAULT = JobsConfig()


def problems(given: Any = None) -> list[str]:
    """Return one line per JOBS setting that cannot be used (settings.JOBS unless given), each naming it."""
    if given is None:
        given = getattr(settings, "JOBS", {})
    if not isinstance(given, Mapping):
        return ["JOBS must be a dict"]
    keys = [name.upper() for name in _FIELDS]
    found = []
    for key in given:
        if key not in keys:
            close = difflib.get_close_matches(str(key), keys, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(keys)}"
            found.append(f"JOBS[{key!r}] is not a setting of this app{hint}")
    defaults = {name: getattr(_DEFAULT, name) for name in _FIELDS}
    merged = {**defaults, **{key.lower(): value for key, value in given.items() if key in keys}}
    return found + [problem.describe() for problem in _problems(merged)]


@cache
def config() -> JobsConfig:
    """Return the JobsConfig built from settings.JOBS; raise ImproperlyConfigured naming the first problem."""
    given = getattr(settings, "JOBS", {})
    if found := problems(given):
        raise ImproperlyConfigured(found[0])
    return JobsConfig(**{key.lower(): value for key, value in given.items()})


def _forget_config(*, setting: str, **kwargs: Any) -> None:
    if setting == "JOBS":
        config.cache_clear()


setting_changed.connect(_forget_config)
