"""Read settings from the environment (and an optional .env file) with one-line errors."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


class ConfigError(Exception):
    """A setting from the environment has a value we cannot use."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"{name}: {message}")
        self.name = name


def load_dotenv_file(path: Path) -> None:
    """Load KEY=VALUE pairs from `path` without overriding the real environment."""
    if not path.is_file():
        return
    from dotenv import dotenv_values

    for key, value in dotenv_values(path).items():
        if value is not None:
            os.environ.setdefault(key, value)


def _raw(name: str) -> str | None:
    value = os.environ.get(name)
    return None if value is None else value.strip()


def env_str(name: str, default: str) -> str:
    value = _raw(name)
    return default if value is None or value == "" else value


def env_bool(name: str, default: bool) -> bool:
    value = _raw(name)
    if value is None:
        return default
    lowered = value.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ConfigError(name, f"{value!r} is not a boolean (use true or false)")


def env_int(name: str, default: int, *, minimum: int | None = None, maximum: int | None = None) -> int:
    value = _raw(name)
    if value is None or value == "":
        return default
    try:
        number = int(value)
    except ValueError:
        raise ConfigError(name, f"{value!r} is not a whole number") from None
    if minimum is not None and number < minimum:
        raise ConfigError(name, f"{number} is below the minimum of {minimum}")
    if maximum is not None and number > maximum:
        raise ConfigError(name, f"{number} is above the maximum of {maximum}")
    return number


def env_list(name: str, default: list[str]) -> list[str]:
    value = _raw(name)
    if value is None or value == "":
        return list(default)
    return [item.strip() for item in value.split(",") if item.strip()]


def env_choice(name: str, default: str, choices: tuple[str, ...]) -> str:
    value = env_str(name, default)
    normalised = value.lower()
    if normalised not in choices:
        raise ConfigError(name, f"{value!r} is not one of {', '.join(choices)}")
    return normalised


def env_timezone(name: str, default: str) -> str:
    from jobs.schedule import CronError, validate_timezone  # pure cron maths: no Django needed

    value = env_str(name, default)
    try:
        return validate_timezone(value)
    except CronError:
        raise ConfigError(name, f"{value!r} is not an IANA time zone (for example Europe/Berlin)") from None


def redact_password(value: str) -> str:
    """Hide the password of a URL such as postgres://user:secret@host/db, for error messages."""
    return _URL_PASSWORD.sub(r"\1***@", value)


_URL_PASSWORD = re.compile(r"(://[^:/@\s]*:)\S*@")  # greedy: a raw @ in a password stays hidden


def env_parsed(name: str, default: str, parse: Callable[[str], T], what: str) -> T:
    """Parse a value with a library function and turn its errors into a ConfigError."""
    value = env_str(name, default)
    try:
        return parse(value)
    except Exception as exc:  # noqa: BLE001 - libraries raise anything from ValueError to KeyError
        # The message goes to stderr and logs: never show a password from the URL.
        reason = redact_password(str(exc)).replace(value, redact_password(value))
        raise ConfigError(name, f"{redact_password(value)!r} is not a valid {what} ({reason})") from None


def database_from_url(url: str, *, base_dir: Path) -> dict[str, Any]:
    """Build Django's DATABASES['default'] from a URL, tuned for SQLite or PostgreSQL."""
    import dj_database_url

    if url.split(":", 1)[0] not in {"sqlite", "postgres", "postgresql", "pgsql", "postgis"}:
        raise ValueError("use sqlite:///path or postgres://user@host:port/name")
    config: dict[str, Any] = dict(dj_database_url.parse(url, conn_max_age=0))
    engine = config.get("ENGINE", "")
    if engine.endswith("sqlite3"):
        name = str(config.get("NAME") or "")
        if name and name != ":memory:" and not Path(name).is_absolute():
            name = str(base_dir / name)
        config["NAME"] = name or str(base_dir / "db.sqlite3")
        # WAL lets the web process read while the scheduler writes; IMMEDIATE takes the write
        # lock at BEGIN so two writers queue on the busy timeout instead of failing mid-way.
        config["OPTIONS"] = {
            "timeout": 20,
            "transaction_mode": "IMMEDIATE",
            "init_command": ("PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA busy_timeout=20000;"),
        }
        # Tests that start real scheduler processes need a file they can open too.
        config["TEST"] = {"NAME": str(Path(config["NAME"]).with_name("test_" + Path(config["NAME"]).name))}
    elif not config.get("NAME"):
        raise ValueError("the URL names no database")
    else:
        # A server that stops answering must not hang a connect for good (a scheduler asked to
        # stop would wait on it); `?connect_timeout=N` in the URL overrides this.
        config.setdefault("OPTIONS", {}).setdefault("connect_timeout", 10)
    return config


def email_from_url(url: str) -> dict[str, Any]:
    """Parse EMAIL_URL (smtp://, submission://, console:, file:///path, ...) into EMAIL_* settings."""
    import dj_email_url

    scheme = url.split(":", 1)[0].lower()
    if ":" not in url or scheme not in dj_email_url.SCHEMES:
        raise ValueError(f"use one of the schemes {', '.join(sorted(dj_email_url.SCHEMES))}")
    return dict(dj_email_url.parse(url))


def throttle_rate(value: str) -> str:
    """Check a DRF throttle rate such as 30/minute; DRF itself would only fail at request time."""
    if not re.fullmatch(r"[0-9]+/(s|sec|second|m|min|minute|h|hour|d|day)", value):
        raise ValueError("use a number of requests per second, minute, hour or day, e.g. 30/minute")
    return value
