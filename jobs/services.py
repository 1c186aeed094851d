"""Every write with rules: the API, the admin and the scheduler command all come through here."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from typing import Any

from django.db import IntegrityError, transaction
from rest_framework import serializers

from . import schedule
from .executors import UnknownJobType, get_executor, job_type_names
from .models import Job, JobRun
from .scheduler.clock import database_now
from .scheduler.notify import notify_schedulers

SCHEDULE_FIELDS = frozenset({"cron_expression", "timezone", "enabled"})
SCHEDULER_OWNED = frozenset({"id", "last_run_at", "last_run_status", "created_at"})
MAX_PARAMETERS_BYTES = 64 * 1024
MAX_PARAMETERS_DEPTH = 32


class JobValidationError(Exception):
    """Field-by-field problems with a job; nothing was written."""

    def __init__(self, errors: dict[str, Any]) -> None:
        super().__init__(errors)
        self.errors = errors


def _flatten(detail: Any) -> Any:
    if isinstance(detail, dict):
        return {key: _flatten(value) for key, value in detail.items()}
    if isinstance(detail, list):
        return [_flatten(item) for item in detail]
    return str(detail)


def parameters_problem(parameters: Any) -> str | None:
    """Return why `parameters` cannot be stored on a job, or None when they can."""
    if not isinstance(parameters, dict):
        return "must be a JSON object"
    # Iterative, so a deeply nested document is refused instead of exhausting the stack.
    stack: list[tuple[Any, int]] = [(parameters, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            if "\x00" in value:
                # PostgreSQL's jsonb cannot store U+0000.
                return "must not contain NUL characters"
        elif isinstance(value, dict | list):
            if depth > MAX_PARAMETERS_DEPTH:
                return f"must not be nested more than {MAX_PARAMETERS_DEPTH} levels deep"
            items = [item for pair in value.items() for item in pair] if isinstance(value, dict) else value
            stack.extend((item, depth + 1) for item in items)
    if len(json.dumps(parameters)) > MAX_PARAMETERS_BYTES:
        return f"must be at most {MAX_PARAMETERS_BYTES} bytes of JSON"
    return None


def job_clean(
    *, cron_expression: str, timezone: str, job_type: str, parameters: Any, user: Any = None
) -> dict[str, Any]:
    """Check the fields that depend on each other; return normalised values or raise JobValidationError.

    With a `user` (a person writing through the API or the admin), the job type also checks
    that this user may schedule these parameters (a model export needs view permission on the
    model, a backup a permission of its own).
    """
    errors: dict[str, Any] = {}
    cleaned: dict[str, Any] = {}
    try:
        cleaned["cron_expression"] = schedule.validate_cron(cron_expression)
    except schedule.CronError as exc:
        errors["cron_expression"] = [str(exc)]
    try:
        cleaned["timezone"] = schedule.validate_timezone(timezone)
    except schedule.CronError as exc:
        errors["timezone"] = [str(exc)]
    try:
        executor = get_executor(job_type)
    except UnknownJobType:
        errors["job_type"] = [f"unknown job type {job_type!r}; known types: {', '.join(job_type_names())}"]
    else:
        cleaned["job_type"] = job_type
        parameters = {} if parameters is None else parameters
        problem = parameters_problem(parameters)
        if problem:
            errors["parameters"] = [problem]
        else:
            try:
                validated = executor.validate_parameters(parameters)
                if user is not None:
                    executor.check_permission(user, validated)
            except serializers.ValidationError as exc:
                errors["parameters"] = _flatten(exc.detail)
        cleaned["parameters"] = parameters
    if errors:
        raise JobValidationError(errors)
    return cleaned


def _apply_clean(job: Job) -> None:
    cleaned = job_clean(
        cron_expression=job.cron_expression,
        timezone=job.timezone,
        job_type=job.job_type,
        parameters=job.parameters,
    )
    for name, value in cleaned.items():
        setattr(job, name, value)


def _next_run_at(job: Job, now: datetime) -> datetime | None:
    if not job.enabled:
        return None
    return schedule.next_fire_after(job.cron_expression, job.timezone, now)


def job_create(*, now: datetime | None = None, **fields: Any) -> Job:
    """Create a job with its first fire time computed."""
    now = now or database_now()  # the schedulers' clock, not this host's
    job = Job(**fields)
    _apply_clean(job)
    job.next_run_at = _next_run_at(job, now)
    with transaction.atomic():
        job.save()
        transaction.on_commit(notify_schedulers)
    return job


def job_update(job: Job, *, now: datetime | None = None, **fields: Any) -> Job:
    """Change a job; its next fire time is recomputed when the schedule, zone or enabled flag changes."""
    now = now or database_now()  # the schedulers' clock, not this host's
    for name, value in fields.items():
        setattr(job, name, value)
    _apply_clean(job)
    with transaction.atomic():
        current = Job.objects.select_for_update().filter(pk=job.pk).values(*SCHEDULE_FIELDS, "next_run_at").first()
        if current is None:
            raise Job.DoesNotExist(f"job {job.pk} no longer exists")
        if any(current[name] != getattr(job, name) for name in SCHEDULE_FIELDS):
            job.next_run_at = _next_run_at(job, now)
        else:
            # The scheduler may have advanced it since this copy was read.
            job.next_run_at = current["next_run_at"]
        # The scheduler owns last_run_*; a copy read before a run ended must not undo them.
        job.save(update_fields=[f.name for f in Job._meta.concrete_fields if f.name not in SCHEDULER_OWNED])
        transaction.on_commit(notify_schedulers)
    return job


def job_pause(job: Job, *, now: datetime | None = None) -> Job:
    """Disable a job; it keeps its runs but fires no more."""
    return job_update(job, enabled=False, now=now)


def job_resume(job: Job, *, now: datetime | None = None) -> Job:
    """Enable a job from now on; fires missed while it was paused are not caught up."""
    return job_update(job, enabled=True, now=now)


def job_delete(job: Job) -> None:
    """Delete a job and its run history."""
    job.delete()


def job_trigger(job: Job, *, now: datetime | None = None) -> JobRun:
    """Queue a manual run to start as soon as a scheduler has a free slot."""
    now = now or database_now()  # the schedulers' clock, not this host's
    for _ in range(5):
        try:
            with transaction.atomic():
                run = JobRun.objects.create(job=job, scheduled_for=now, not_before=now, trigger=JobRun.Trigger.MANUAL)
                transaction.on_commit(notify_schedulers)
            return run
        except IntegrityError:
            if not Job.objects.filter(pk=job.pk).exists():
                raise Job.DoesNotExist(f"job {job.pk} no longer exists") from None
            # Two manual runs in the same microsecond: keep both, one a microsecond later.
            now = now + timedelta(microseconds=1)
    raise RuntimeError("could not queue a manual run")
