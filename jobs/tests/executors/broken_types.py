"""Job types and processors that are broken in the ways the system checks must catch."""

from __future__ import annotations

from typing import Any

from jobs.executors import Executor
from jobs.executors.data_processing import DataProcessor


class NoExecute(Executor):
    name = "no_execute"


class Nameless(Executor):
    def execute(self, run: Any) -> None:
        return None


class BadName(Nameless):
    name = "Bad Name"


class TakesEmailsName(Nameless):
    name = "email_notification"


class NotASerializer(Nameless):
    name = "not_a_serializer"
    parameters_serializer = dict  # type: ignore[assignment]


class ExplodesOnCreate(Nameless):
    name = "explodes"

    def __init__(self) -> None:
        raise RuntimeError("needs a setting that is missing")


class NoProcess(DataProcessor):
    name = "no_process"


class TakesBackupName(DataProcessor):
    name = "database_backup"

    def process(self, run: Any, params: dict[str, Any]) -> None:
        return None
