"""Small job types the engine tests register through JOBS["EXECUTORS"], like any other app."""

from __future__ import annotations

import os
import time
from typing import Any

from rest_framework import serializers

from jobs.executors import Executor, ExecutorError


class NoopExecutor(Executor):
    name = "test_noop"
    description = "Does nothing."
    safe_to_repeat = True

    def execute(self, run: Any) -> dict[str, Any]:
        return {"ok": True}


class SleepParameters(serializers.Serializer):
    seconds = serializers.FloatField(min_value=0, max_value=3600, default=1.0)


class SleepExecutor(Executor):
    name = "test_sleep"
    description = "Sleeps for `seconds`; safe to repeat."
    parameters_serializer = SleepParameters
    safe_to_repeat = True

    def execute(self, run: Any) -> dict[str, Any]:
        seconds = self.parameters_for(run)["seconds"]
        time.sleep(seconds)
        return {"slept": seconds}


class UnsafeSleepExecutor(SleepExecutor):
    name = "test_sleep_unsafe"
    description = "Sleeps for `seconds`; not safe to repeat."
    safe_to_repeat = False


class FailExecutor(Executor):
    name = "test_fail"
    description = "Always fails."
    safe_to_repeat = True

    def execute(self, run: Any) -> None:
        raise ExecutorError("boom")


class FlakyParameters(serializers.Serializer):
    succeed_on_attempt = serializers.IntegerField(min_value=1, default=2)


class FlakyExecutor(Executor):
    name = "test_flaky"
    description = "Fails until the given attempt."
    parameters_serializer = FlakyParameters
    safe_to_repeat = True

    def execute(self, run: Any) -> dict[str, Any]:
        if run.attempt < self.parameters_for(run)["succeed_on_attempt"]:
            raise ExecutorError(f"attempt {run.attempt} fails")
        return {"attempt": run.attempt}


class HangExecutor(Executor):
    name = "test_hang"
    description = "Never returns (well, after an hour)."
    safe_to_repeat = False

    def execute(self, run: Any) -> None:
        time.sleep(3600)


class OddResultExecutor(Executor):
    name = "test_odd_result"
    description = "Returns what JSON or PostgreSQL cannot hold (NaN, NUL), or raises with a NUL in the message."
    safe_to_repeat = True

    def execute(self, run: Any) -> dict[str, Any]:
        if run.job.parameters.get("raise"):
            raise ExecutorError("bad\x00byte")
        return {"ratio": float("nan"), "body": "binary\x00body", "key\x00": 1}


class AppendParameters(serializers.Serializer):
    path = serializers.CharField()
    seconds = serializers.FloatField(min_value=0, max_value=60, default=0.0)


class AppendExecutor(Executor):
    """Leave one line per execution in a file, so fault tests can count what really ran."""

    name = "test_append"
    description = "Sleeps for `seconds`, then appends one line (job, fire, attempt, run, pid) to `path`."
    parameters_serializer = AppendParameters
    parameters_example = {"path": "/tmp/test-append.txt", "seconds": 0}
    safe_to_repeat = True

    def execute(self, run: Any) -> dict[str, Any]:
        parameters = self.parameters_for(run)
        time.sleep(parameters["seconds"])
        line = f"{run.job_id} {run.scheduled_for.isoformat()} {run.attempt} {run.pk} {os.getpid()}\n"
        # One write on an O_APPEND descriptor: lines from several processes never interleave.
        fd = os.open(parameters["path"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)
        return {"ok": True}


class UnsafeAppendExecutor(AppendExecutor):
    name = "test_append_unsafe"
    description = "Appends one line like test_append; not safe to repeat."
    safe_to_repeat = False
