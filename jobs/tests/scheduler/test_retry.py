"""The retry rule (jobs/scheduler/retry.py), row by row, with real jobs and runs built in memory."""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import NamedTuple

import pytest

from jobs.models import Job, JobRun
from jobs.scheduler.retry import MAX_BACKOFF_SECONDS, next_attempt, refused_as_unsafe, retry_run, safe_to_repeat

SAFE_TYPE = "test_noop"
UNSAFE_TYPE = "test_sleep_unsafe"
BACKOFF = 10  # the jobs' retry_backoff_seconds

MakeJob = Callable[..., Job]


class Row(NamedTuple):
    """One row of the table in retry.py's docstring."""

    status: str
    maybe_done: bool
    retried: bool  # whether the row retries at all
    needs_safe: bool  # retried only when its type is safe to repeat
    at_least: int  # retries allowed whatever max_retries says
    at_once: bool  # else after the back-off


ROWS = [
    Row("failed", False, retried=True, needs_safe=False, at_least=0, at_once=False),
    Row("failed", True, retried=True, needs_safe=True, at_least=0, at_once=False),
    # A timed-out or lost run may always have done its work, whatever the caller says.
    Row("timed_out", False, retried=True, needs_safe=True, at_least=0, at_once=False),
    Row("lost", False, retried=True, needs_safe=True, at_least=1, at_once=True),
    Row("succeeded", False, retried=False, needs_safe=False, at_least=0, at_once=False),
    Row("succeeded", True, retried=False, needs_safe=False, at_least=0, at_once=False),
    Row("skipped", False, retried=False, needs_safe=False, at_least=0, at_once=False),
]
CASES = [
    pytest.param(
        row,
        safe,
        max_retries,
        attempt,
        id=f"{row.status}{'-maybe_done' if row.maybe_done else ''}-{'safe' if safe else 'unsafe'}"
        f"-max_retries{max_retries}-attempt{attempt}",
    )
    for row, safe, max_retries, attempt in itertools.product(ROWS, (True, False), (0, 1, 2), (1, 2, 3))
]


def attempts_left(row: Row, max_retries: int, attempt: int) -> bool:
    # Attempt 1 is the first run, so attempt n is followed by retry number n.
    return row.retried and attempt <= max(max_retries, row.at_least)


def run_of(job: Job, now: datetime, attempt: int = 1) -> JobRun:
    return JobRun(job=job, scheduled_for=now, not_before=now, attempt=attempt)


def make(make_job: MakeJob, now: datetime, *, safe: bool = True, **fields: object) -> Job:
    fields.setdefault("retry_backoff_seconds", BACKOFF)
    return make_job(now=now, cron="0 0 1 1 *", job_type=SAFE_TYPE if safe else UNSAFE_TYPE, **fields)


@pytest.mark.parametrize(("row", "safe", "max_retries", "attempt"), CASES)
def test_next_attempt_follows_the_table(
    make_job: MakeJob, now: datetime, row: Row, safe: bool, max_retries: int, attempt: int
) -> None:
    job = make(make_job, now, safe=safe, max_retries=max_retries)
    ended_at = now + timedelta(minutes=5)
    when = next_attempt(
        run_of(job, now, attempt), row.status, ended_at=ended_at, maybe_done=row.maybe_done, rng=random.Random(attempt)
    )
    if not attempts_left(row, max_retries, attempt) or (row.needs_safe and not safe):
        assert when is None
    elif row.at_once:
        assert when == ended_at
    else:
        base = BACKOFF * 2 ** (attempt - 1)
        assert when is not None
        assert ended_at + timedelta(seconds=base / 2) <= when <= ended_at + timedelta(seconds=base)


@pytest.mark.parametrize(("row", "safe", "max_retries", "attempt"), CASES)
def test_refused_as_unsafe_exactly_when_attempts_are_left_but_the_work_may_be_done_twice(
    make_job: MakeJob, now: datetime, row: Row, safe: bool, max_retries: int, attempt: int
) -> None:
    job = make(make_job, now, safe=safe, max_retries=max_retries)
    refused = refused_as_unsafe(run_of(job, now, attempt), row.status, maybe_done=row.maybe_done)
    assert refused is (attempts_left(row, max_retries, attempt) and row.needs_safe and not safe)


@pytest.mark.parametrize("attempt", [1, 2, 3])
def test_backoff_doubles_per_attempt_with_jitter_on_the_upper_half(
    make_job: MakeJob, now: datetime, attempt: int
) -> None:
    job = make(make_job, now, max_retries=3)
    base = BACKOFF * 2 ** (attempt - 1)
    delays = [
        (next_attempt(run_of(job, now, attempt), "failed", ended_at=now, rng=random.Random(seed)) or now) - now
        for seed in range(50)
    ]
    assert all(timedelta(seconds=base / 2) <= delay <= timedelta(seconds=base) for delay in delays)
    # Jittered: spread over most of the upper half, not one fixed delay.
    assert max(delays) - min(delays) > timedelta(seconds=base / 4)


def test_backoff_comes_from_the_rng_given(make_job: MakeJob, now: datetime) -> None:
    job = make(make_job, now, max_retries=1)
    run = run_of(job, now)
    first = next_attempt(run, "failed", ended_at=now, rng=random.Random(7))
    again = next_attempt(run, "failed", ended_at=now, rng=random.Random(7))
    other = next_attempt(run, "failed", ended_at=now, rng=random.Random(8))
    assert first == again
    assert first != other


def test_backoff_is_capped(make_job: MakeJob, now: datetime) -> None:
    job = make(make_job, now, max_retries=5, retry_backoff_seconds=MAX_BACKOFF_SECONDS)
    when = next_attempt(run_of(job, now, 3), "failed", ended_at=now, rng=random.Random(1))
    assert when is not None
    assert now + timedelta(seconds=MAX_BACKOFF_SECONDS / 2) <= when <= now + timedelta(seconds=MAX_BACKOFF_SECONDS)


def test_a_lost_run_is_retried_at_once_and_once_even_without_retries(make_job: MakeJob, now: datetime) -> None:
    job = make(make_job, now, max_retries=0)
    ended_at = now + timedelta(minutes=5)
    first = run_of(job, now)
    assert next_attempt(first, "lost", ended_at=ended_at) == ended_at
    assert next_attempt(retry_run(first, ended_at), "lost", ended_at=ended_at) is None


def test_a_lost_run_gets_every_retry_the_job_allows(make_job: MakeJob, now: datetime) -> None:
    job = make(make_job, now, max_retries=2)
    ended_at = now + timedelta(minutes=5)
    assert next_attempt(run_of(job, now, 2), "lost", ended_at=ended_at) == ended_at
    assert next_attempt(run_of(job, now, 3), "lost", ended_at=ended_at) is None


def test_the_retry_is_the_next_attempt_of_the_same_fire(make_job: MakeJob, now: datetime) -> None:
    job = make(make_job, now, max_retries=2)
    fire = now - timedelta(minutes=1)
    run = JobRun.objects.create(
        job=job, scheduled_for=fire, not_before=fire, attempt=2, trigger=JobRun.Trigger.MANUAL, status="failed"
    )
    not_before = now + timedelta(seconds=42)
    retry = retry_run(run, not_before)
    assert (retry.job, retry.scheduled_for, retry.attempt) == (job, fire, 3)
    assert (retry.trigger, retry.status, retry.not_before) == ("retry", "queued", not_before)
    assert retry.pk is None
    # It fits the table's one-run-per-(job, fire, attempt) rule next to the attempt it follows.
    retry.save()
    assert list(JobRun.objects.filter(job=job).order_by("attempt").values_list("attempt", "trigger", "status")) == [
        (2, "manual", "failed"),
        (3, "retry", "queued"),
    ]


@pytest.mark.parametrize(("job_type", "safe"), [(SAFE_TYPE, True), (UNSAFE_TYPE, False), ("test_append_unsafe", False)])
def test_safe_to_repeat_is_what_the_type_says(job_type: str, safe: bool) -> None:
    assert safe_to_repeat(Job(job_type=job_type)) is safe


def test_an_unknown_job_type_is_not_safe_to_repeat() -> None:
    assert safe_to_repeat(Job(job_type="no_such_type")) is False


@pytest.mark.parametrize(("status", "retried"), [("failed", True), ("lost", False), ("timed_out", False)])
def test_a_run_of_an_unknown_type_is_retried_only_when_it_cannot_have_done_its_work(
    now: datetime, status: str, retried: bool
) -> None:
    job = Job(job_type="no_such_type", max_retries=1, retry_backoff_seconds=BACKOFF)
    when = next_attempt(run_of(job, now), status, ended_at=now, rng=random.Random(0))
    assert (when is not None) is retried
