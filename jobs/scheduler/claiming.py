"""The only module with locking SQL: fire due jobs, claim queued runs, recover lost ones.

PostgreSQL: rows are locked with `SELECT ... FOR UPDATE SKIP LOCKED`, so any number of scheduler
processes share the work without waiting on each other. SQLite: Django opens every transaction
with `BEGIN IMMEDIATE` (see settings), which serialises writers, so the same code is safe there.
Either way the unique constraint on (job, scheduled_for, attempt) makes a double fire impossible.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from django.db import transaction
from django.db.models import Q

from jobs import schedule
from jobs.executors import UnknownJobType, get_executor
from jobs.models import Job, JobRun, SchedulerProcess

logger = logging.getLogger(__name__)

# A job that missed more fires than this (an every-second job after a long outage) has its
# missed fires counted up to here, then its schedule jumps to the first fire after now.
MAX_FIRES_COUNTED = 1000
# Due jobs fired per transaction; a pass repeats until a batch comes back short.
FIRE_BATCH = 500


@dataclass
class FireReport:
    """What one pass over due jobs did."""

    jobs: int = 0
    queued: int = 0
    skipped: int = 0
    queued_job_ids: list[int] = field(default_factory=list)


def _fires_until(job: Job, now: datetime) -> tuple[list[datetime], datetime | None]:
    """Return the job's fire times up to `now` (capped) and its next fire time after them."""
    fires: list[datetime] = []
    current = job.next_run_at
    while current is not None and current <= now:
        if len(fires) >= MAX_FIRES_COUNTED:
            return fires, schedule.next_fire_after(job.cron_expression, job.timezone, now)
        fires.append(current)
        current = schedule.next_fire_after(job.cron_expression, job.timezone, current)
    return fires, current


def _plan_runs(job: Job, fires: list[datetime], now: datetime, active: bool) -> list[JobRun]:
    """Turn a job's due fire times into JobRun rows, applying the misfire and overlap policies."""
    grace = timedelta(seconds=job.misfire_grace_seconds)
    late = [fire for fire in fires if now - fire > grace]
    on_time = fires[len(late) :]
    rows: list[JobRun] = []

    def row(fire: datetime, **extra: object) -> JobRun:
        return JobRun(job=job, scheduled_for=fire, not_before=fire, trigger=JobRun.Trigger.SCHEDULE, **extra)

    to_queue = list(on_time)
    if late:
        lateness = (now - late[-1]).total_seconds()
        missed = f"{len(late)}{'+' if len(fires) >= MAX_FIRES_COUNTED else ''} fire(s) missed"
        if job.misfire_policy == Job.MisfirePolicy.SKIP or on_time:
            reason = (
                f"misfire: {missed}, {lateness:.0f}s late (grace {job.misfire_grace_seconds}s)"
                if not on_time
                else f"misfire: {missed}; superseded by a later on-time fire"
            )
            rows.append(
                row(late[-1], status=JobRun.Status.SKIPPED, missed_fires=len(late) - 1, skip_reason=reason[:255])
            )
        else:
            # run_once: one catch-up run stands for every missed fire.
            rows.append(row(late[-1], missed_fires=len(late) - 1))
            to_queue = []
            if active and job.overlap_policy == Job.OverlapPolicy.FORBID:
                rows[-1].status = JobRun.Status.SKIPPED
                rows[-1].skip_reason = "overlap: the previous run is still active"
    for fire in to_queue:
        if active and job.overlap_policy == Job.OverlapPolicy.FORBID:
            rows.append(
                row(fire, status=JobRun.Status.SKIPPED, skip_reason="overlap: the previous run is still active")
            )
        else:
            rows.append(row(fire))
            active = True
    for planned in rows:
        if planned.status == JobRun.Status.SKIPPED:
            planned.finished_at = now
    return rows


def fire_due_jobs(*, now: datetime, limit: int = FIRE_BATCH) -> FireReport:
    """Turn due jobs into runs and advance their next fire time, in one short transaction."""
    report = FireReport()
    with transaction.atomic():
        jobs = list(
            Job.objects.due(now)
            .order_by("next_run_at", "id")
            .select_for_update(skip_locked=True)
            .only(
                "id",
                "cron_expression",
                "timezone",
                "next_run_at",
                "misfire_policy",
                "misfire_grace_seconds",
                "overlap_policy",
            )[:limit]
        )
        if not jobs:
            return report
        active_ids = set(
            JobRun.objects.active().filter(job_id__in=[job.id for job in jobs]).values_list("job_id", flat=True)
        )
        rows: list[JobRun] = []
        for job in jobs:
            fires, following = _fires_until(job, now)
            rows.extend(_plan_runs(job, fires, now, job.id in active_ids))
            job.next_run_at = following
        # A conflict means that fire already has its row: exactly what must not happen twice.
        JobRun.objects.bulk_create(rows, ignore_conflicts=True)
        Job.objects.bulk_update(jobs, ["next_run_at"])
    report.jobs = len(jobs)
    for planned in rows:
        if planned.status == JobRun.Status.SKIPPED:
            report.skipped += 1
        else:
            report.queued += 1
            report.queued_job_ids.append(planned.job_id)
    return report


def claim_runs(*, worker_id: int, slots: int, now: datetime) -> list[JobRun]:
    """Mark up to `slots` ready runs as running on this worker and return them with their jobs."""
    if slots <= 0:
        return []
    with transaction.atomic():
        ids = list(JobRun.objects.ready(now).select_for_update(skip_locked=True).values_list("id", flat=True)[:slots])
        if not ids:
            return []
        JobRun.objects.filter(id__in=ids).update(status=JobRun.Status.RUNNING, started_at=now, worker_id=worker_id)
    runs = list(JobRun.objects.filter(id__in=ids).select_related("job").order_by("not_before", "id"))
    for run in runs:
        # The row says so too; set here so no second query is needed.
        run.worker_id = worker_id
    return runs


def next_wakeup(*, include_queue: bool) -> datetime | None:
    """Return the earliest time something becomes due: a job's next fire or a queued run."""
    times = [
        Job.objects.filter(enabled=True, next_run_at__isnull=False)
        .order_by("next_run_at")
        .values_list("next_run_at", flat=True)
        .first()
    ]
    if include_queue:
        times.append(JobRun.objects.queued().order_by("not_before").values_list("not_before", flat=True).first())
    present = [time for time in times if time is not None]
    return min(present) if present else None


def recover_lost_runs(*, now: datetime, lost_after: float) -> list[JobRun]:
    """Mark running runs of dead or stopped schedulers as lost; queue a retry where it is safe.

    A scheduler is dead when it has not heartbeaten for `lost_after` seconds. Its runs become
    `lost`; a retry is queued when the job type's work is safe to repeat and the job's retries
    allow it (a lost run gets at least one retry, since it never reported a failure).
    """
    stale_before = now - timedelta(seconds=lost_after)
    with transaction.atomic():
        dead = list(
            SchedulerProcess.objects.select_for_update(skip_locked=True)
            .filter(stopped_at__isnull=True, last_heartbeat_at__lt=stale_before)
            .values_list("id", flat=True)
        )
        if dead:
            SchedulerProcess.objects.filter(id__in=dead).update(stopped_at=now)
        runs = list(
            JobRun.objects.running()
            .filter(Q(worker__isnull=True) | Q(worker__stopped_at__isnull=False))
            .select_for_update(skip_locked=True, of=("self",))
            .select_related("job", "worker")
        )
        if not runs:
            return []
        retries: list[JobRun] = []
        retried: set[int] = set()
        for run in runs:
            holder = str(run.worker) if run.worker else "an unknown scheduler"
            run.status = JobRun.Status.LOST
            run.finished_at = now
            run.error = f"lost: {holder} stopped before the run finished (no heartbeat since {stale_before:%H:%M:%S})"
            try:
                safe = get_executor(run.job.job_type).is_safe_to_repeat(run.job)
            except UnknownJobType:
                safe = False
            if safe and run.attempt <= max(run.job.max_retries, 1):
                retries.append(
                    JobRun(
                        job=run.job,
                        scheduled_for=run.scheduled_for,
                        attempt=run.attempt + 1,
                        trigger=JobRun.Trigger.RETRY,
                        not_before=now,
                    )
                )
                retried.add(run.pk)
        JobRun.objects.bulk_update(runs, ["status", "finished_at", "error"])
        JobRun.objects.bulk_create(retries, ignore_conflicts=True)
        for run in runs:
            Job.objects.filter(pk=run.job_id).filter(
                Q(last_run_at__isnull=True) | Q(last_run_at__lte=run.started_at or now)
            ).update(last_run_at=run.started_at or now, last_run_status=JobRun.Status.LOST)
    for run in runs:
        logger.warning(
            "run lost job=%s run=%s attempt=%s: %s%s",
            run.job_id,
            run.pk,
            run.attempt,
            run.error,
            "; retrying" if run.pk in retried else "",
            extra={"job_id": run.job_id, "run_id": run.pk, "status": "lost"},
        )
    return runs
