"""Whether a run that did not succeed gets another attempt, and when: one table, one function.

| how the run ended                          | retried when                              | after          |
|--------------------------------------------|-------------------------------------------|----------------|
| failed before it could have done its work  | attempts left (`max_retries`)             | back-off       |
| failed after it may have done its work     | attempts left and its type safe to repeat | back-off       |
| timed out                                  | attempts left and its type safe to repeat | back-off       |
| lost (its scheduler died)                  | its type safe to repeat; at least once    | at once        |

A lost run never reported a failure, so it gets one retry even when `max_retries` is 0.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timedelta

from jobs.executors import UnknownJobType, get_executor
from jobs.models import Job, JobRun

# The longest back-off before jitter, whatever the attempt.
MAX_BACKOFF_SECONDS = 24 * 3600


@dataclass(frozen=True)
class Rule:
    needs_safe_to_repeat: bool  # its work may already have been done
    at_least: int  # retries allowed whatever the job's max_retries says
    backoff: bool  # wait retry_backoff_seconds (doubled per attempt, with jitter); else at once


RULES: dict[tuple[str, bool], Rule] = {
    # (status, whether its work may have been done) -> rule
    (JobRun.Status.FAILED, False): Rule(needs_safe_to_repeat=False, at_least=0, backoff=True),
    (JobRun.Status.FAILED, True): Rule(needs_safe_to_repeat=True, at_least=0, backoff=True),
    (JobRun.Status.TIMED_OUT, True): Rule(needs_safe_to_repeat=True, at_least=0, backoff=True),
    (JobRun.Status.LOST, True): Rule(needs_safe_to_repeat=True, at_least=1, backoff=False),
}


def safe_to_repeat(job: Job) -> bool:
    """Whether the job's type says running its work twice for one fire does no harm."""
    try:
        return get_executor(job.job_type).is_safe_to_repeat(job)
    except UnknownJobType:
        return False


def _rule(status: str, maybe_done: bool) -> Rule | None:
    # A timed-out or lost run may always have done its work.
    uncertain = maybe_done or status in (JobRun.Status.TIMED_OUT, JobRun.Status.LOST)
    return RULES.get((status, uncertain))


def next_attempt(
    run: JobRun, status: str, *, ended_at: datetime, maybe_done: bool = False, rng: random.Random | None = None
) -> datetime | None:
    """When the next attempt of `run`, which ended `status`, may start; None when there is none."""
    rule = _rule(status, maybe_done)
    if rule is None or run.attempt > max(run.job.max_retries, rule.at_least):
        return None
    if rule.needs_safe_to_repeat and not safe_to_repeat(run.job):
        return None
    if not rule.backoff:
        return ended_at
    return ended_at + timedelta(seconds=backoff_seconds(run.job, run.attempt, rng=rng))


def refused_as_unsafe(run: JobRun, status: str, *, maybe_done: bool = False) -> bool:
    """Whether attempts are left but the run is not retried because its work may have been
    done and its type is not safe to repeat (the run's error says so)."""
    rule = _rule(status, maybe_done)
    if rule is None or run.attempt > max(run.job.max_retries, rule.at_least):
        return False
    return rule.needs_safe_to_repeat and not safe_to_repeat(run.job)


def backoff_seconds(job: Job, attempt: int, *, rng: random.Random | None = None) -> float:
    """Seconds before retry number `attempt` (1 = first retry): exponential back-off with jitter."""
    base = min(job.retry_backoff_seconds * (2 ** (attempt - 1)), MAX_BACKOFF_SECONDS)
    # Full jitter on the upper half keeps retries of many jobs from arriving together.
    return base / 2 + (rng or random).uniform(0, base / 2)


def retry_run(run: JobRun, not_before: datetime) -> JobRun:
    """The queued run that is the next attempt of `run`."""
    return JobRun(
        job=run.job,
        scheduled_for=run.scheduled_for,
        attempt=run.attempt + 1,
        trigger=JobRun.Trigger.RETRY,
        not_before=not_before,
    )
