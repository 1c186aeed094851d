"""Run one JobRun through its executor, and record outcomes fenced by the claiming worker."""

from __future__ import annotations

import json
import logging
import random
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.core.serializers.json import DjangoJSONEncoder
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from jobs.conf import get
from jobs.executors import UnknownJobType, get_executor
from jobs.models import Job, JobRun

logger = logging.getLogger(__name__)


@dataclass
class Outcome:
    """How a run ended, ready to be written back."""

    run: JobRun
    status: str
    finished_at: datetime
    result: Any = None
    error: str = ""


def _cap_result(result: Any) -> Any:
    """Return the result as JSON-safe data, replaced by a note when it is too large."""
    if result is None:
        return None
    try:
        text = json.dumps(result, cls=DjangoJSONEncoder)
    except (TypeError, ValueError):
        text = json.dumps(repr(result))
    limit = get("RESULT_MAX_BYTES")
    if len(text) > limit:
        return {"truncated": True, "size_bytes": len(text), "preview": text[: min(limit, 2000)]}
    return json.loads(text)


def _format_error(exc: BaseException) -> str:
    limit = get("ERROR_MAX_CHARS")
    message = f"{type(exc).__name__}: {exc}"
    trace = "".join(traceback.format_exception(exc))
    text = f"{message}\n\n{trace}"
    if len(text) > limit:
        text = text[: limit // 2] + "\n[... traceback truncated ...]\n" + text[-limit // 2 :]
    return text


def execute(run: JobRun, *, clock: Callable[[], datetime] = timezone.now) -> Outcome:
    """Run the job's executor for `run` and return the outcome; never raises."""
    try:
        result = get_executor(run.job.job_type).execute(run)
    except UnknownJobType:
        return Outcome(
            run, JobRun.Status.FAILED, clock(), error=f"unknown job type {run.job.job_type!r} on this scheduler"
        )
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - any failure of user code is the run's failure
        logger.error(
            "run raised job=%s run=%s",
            run.job_id,
            run.pk,
            exc_info=exc,
            extra={"job_id": run.job_id, "run_id": run.pk},
        )
        return Outcome(run, JobRun.Status.FAILED, clock(), error=_format_error(exc))
    return Outcome(run, JobRun.Status.SUCCEEDED, clock(), result=_cap_result(result))


def timed_out(run: JobRun, now: datetime) -> Outcome:
    """The outcome of a run that overran its job's timeout."""
    return Outcome(
        run, JobRun.Status.TIMED_OUT, now, error=f"timed out after {run.job.timeout_seconds}s; its slot was freed"
    )


def retry_delay(job: Job, attempt: int, *, rng: random.Random | None = None) -> float:
    """Seconds before retry number `attempt` (1 = first retry): exponential backoff with jitter."""
    base = job.retry_backoff_seconds * (2 ** (attempt - 1))
    base = min(base, 24 * 3600)
    # Full jitter on the upper half keeps retries of many jobs from arriving together.
    return base / 2 + (rng or random).uniform(0, base / 2)


def record_outcomes(outcomes: Iterable[Outcome], *, worker_id: int) -> list[Outcome]:
    """Write outcomes back in one transaction; return those that were accepted.

    Each write is fenced: it only lands while the run is still `running` on this worker, so a
    scheduler that was presumed dead (its runs marked lost and retried) cannot overwrite them.
    """
    accepted: list[Outcome] = []
    with transaction.atomic():
        for outcome in outcomes:
            run = outcome.run
            updated = JobRun.objects.filter(pk=run.pk, status=JobRun.Status.RUNNING, worker_id=worker_id).update(
                status=outcome.status,
                finished_at=outcome.finished_at,
                result=outcome.result,
                error=outcome.error,
            )
            if not updated:
                logger.warning(
                    "outcome discarded job=%s run=%s status=%s: the run is no longer held by this scheduler",
                    run.job_id,
                    run.pk,
                    outcome.status,
                    extra={"job_id": run.job_id, "run_id": run.pk},
                )
                continue
            accepted.append(outcome)
            job = run.job
            started_at = run.started_at or outcome.finished_at
            Job.objects.filter(pk=job.pk).filter(Q(last_run_at__isnull=True) | Q(last_run_at__lte=started_at)).update(
                last_run_at=started_at, last_run_status=outcome.status
            )
            failed = outcome.status in (JobRun.Status.FAILED, JobRun.Status.TIMED_OUT)
            if failed and run.attempt <= job.max_retries:
                not_before = outcome.finished_at + timedelta(seconds=retry_delay(job, run.attempt))
                JobRun.objects.bulk_create(
                    [
                        JobRun(
                            job=job,
                            scheduled_for=run.scheduled_for,
                            attempt=run.attempt + 1,
                            trigger=JobRun.Trigger.RETRY,
                            not_before=not_before,
                        )
                    ],
                    ignore_conflicts=True,
                )
    return accepted
