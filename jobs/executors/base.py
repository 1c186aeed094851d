"""The contract every job type implements."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, ClassVar

from rest_framework import serializers

if TYPE_CHECKING:
    from jobs.models import Job, JobRun


class ExecutorError(Exception):
    """A run failed for a reason the executor understands; the message is shown to people."""


class RunTimedOut(ExecutorError):
    """The run's time (its job's `timeout_seconds`) ran out while the executor worked or waited.

    The runner records the run `timed_out`, exactly as when the engine's own clock stops it.
    """


class OutcomeUnknown(ExecutorError):
    """The work may have been done before the failure (a request sent, its answer lost).

    A run failing this way is retried only when its job type is safe to repeat.
    """


class RegistryError(Exception):
    """A configured job type or data processor cannot be loaded."""


def seconds_left(run: JobRun, *, at_most: float | None = None) -> float:
    """Return the seconds before `run` times out (at most `at_most`); raise RunTimedOut when none are left.

    Executors bound every wait (connect, send, read, a child process) by this, so that the
    thread of a run ends near its deadline instead of running on after its slot was freed.
    The runner sets `run.deadline`; a run executed without one (in a test, a shell) gets its
    job's timeout from the first call.
    """
    deadline = run.deadline
    if deadline is None:
        deadline = run.deadline = time.monotonic() + run.job.timeout_seconds
    left = deadline - time.monotonic()
    if left <= 0:
        raise RunTimedOut(f"the job's timeout of {run.job.timeout_seconds}s ran out")
    return left if at_most is None else min(left, at_most)


class Executor:
    """A job type: how to validate its parameters and how to run it.

    Subclasses set `name`, `parameters_serializer` and `safe_to_repeat`, and implement
    `execute`. Executors never change a run's status: the runner owns the lifecycle. Raise
    (ExecutorError for expected failures) to fail the run; return JSON-serialisable data to
    record as its result.
    """

    name: ClassVar[str]
    label: ClassVar[str] = ""
    description: ClassVar[str] = ""
    parameters_serializer: ClassVar[type[serializers.Serializer]] = serializers.Serializer
    # Whether a run lost in a crash may be run again without harm.
    safe_to_repeat: ClassVar[bool] = False
    # Parameters that validate, shown where a person starts a job of this type (the admin's
    # form, the API docs' examples, GET /job-types).
    parameters_example: ClassVar[dict[str, Any]] = {}

    def validate_parameters(self, parameters: Any) -> dict[str, Any]:
        """Return cleaned parameters or raise serializers.ValidationError."""
        if parameters is None:
            parameters = {}
        if not isinstance(parameters, dict):
            raise serializers.ValidationError("must be a JSON object")
        serializer = self.parameters_serializer(data=parameters)
        serializer.is_valid(raise_exception=True)
        unknown = sorted(set(parameters) - set(serializer.fields))
        if unknown:
            # A misspelt optional parameter would otherwise be dropped without a word.
            raise serializers.ValidationError(dict.fromkeys(unknown, "unknown parameter for this job type"))
        return dict(serializer.validated_data)

    def parameters_schema(self) -> dict[str, Any]:
        """Return the JSON Schema of the parameters, shown by GET /job-types."""
        from jobs.json_schema import serializer_schema

        return serializer_schema(self.parameters_serializer())

    def parameters_for(self, run: JobRun) -> dict[str, Any]:
        """Return the run's job parameters, validated again in case code changed since saving."""
        return self.validate_parameters(run.job.parameters)

    def is_safe_to_repeat(self, job: Job) -> bool:
        """Whether a run of `job` lost in a crash may be run again (types may decide per job)."""
        return self.safe_to_repeat

    def check_permission(self, user: Any, parameters: dict[str, Any]) -> None:
        """Refuse (serializers.ValidationError) cleaned `parameters` that `user` may not schedule.

        Called when a person creates or changes a job (API or admin), with the validated
        parameters; jobs written by code (commands, tests) pass no user and are not checked.
        """

    def execute(self, run: JobRun) -> Any:
        """Do the job's work for `run` and return its result."""
        raise NotImplementedError
