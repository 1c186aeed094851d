"""Which runs the due fires of a job become: the misfire and overlap policies, as pure functions.

The store reads the due jobs and writes what is planned here; nothing here touches the database.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import NamedTuple

from jobs import schedule
from jobs.models import Job, JobRun

# A job that missed more fires than this (an every-second job after a long outage) has its
# missed fires counted up to here, then its schedule jumps to the first fire after now.
MAX_FIRES_COUNTED = 1000
# A job whose schedule cannot be computed is tried again this much later.
BROKEN_SCHEDULE_RETRY = timedelta(hours=1)


@dataclass
class FireReport:
    """What one pass over due jobs did."""

    jobs: int = 0
    queued: int = 0
    skipped: int = 0
    expired: int = 0  # queued runs that waited past their job's misfire grace


class DueJob(NamedTuple):
    """What firing needs of a due job."""

    id: int
    cron_expression: str
    timezone: str
    next_run_at: datetime
    misfire_policy: str
    misfire_grace_seconds: int
    overlap_policy: str
    active: bool  # it has a queued or running run


@dataclass(slots=True)
class Planned:
    """A run to insert for one fire: queued, or skipped with its reason."""

    job_id: int
    scheduled_for: datetime
    status: str = JobRun.Status.QUEUED.value
    missed_fires: int = 0
    skip_reason: str = ""


def fires_until(job: DueJob, now: datetime) -> tuple[list[datetime], datetime | None]:
    """Return the job's fire times up to `now` (capped) and its next fire time after them."""
    fires: list[datetime] = []
    current: datetime | None = job.next_run_at
    while current is not None and current <= now:
        if len(fires) >= MAX_FIRES_COUNTED:
            return fires, schedule.next_fire_after(job.cron_expression, job.timezone, now)
        fires.append(current)
        current = schedule.next_fire_after(job.cron_expression, job.timezone, current)
    return fires, current


def plan_runs(job: DueJob, fires: list[datetime], now: datetime, active: bool) -> list[Planned]:
    """Turn a job's due fire times into runs, applying the misfire and overlap policies.

    Every fire gets a row that runs or says why not, except fires missed beyond the grace under
    `run_once`: the run that executes counts those (`missed_fires`), however many there are.
    """
    grace = timedelta(seconds=job.misfire_grace_seconds)
    late = [fire for fire in fires if now - fire > grace]
    on_time = fires[len(late) :]
    rows: list[Planned] = []
    skipped = JobRun.Status.SKIPPED.value
    folded = 0  # missed fires the run that executes stands for, besides its own
    to_run = on_time
    if late and job.misfire_policy == Job.MisfirePolicy.SKIP:
        lateness = (now - late[-1]).total_seconds()
        missed = f"{len(late)}{'+' if len(fires) >= MAX_FIRES_COUNTED else ''} fire(s) missed"
        reason = f"misfire: {missed}, {lateness:.0f}s late (grace {job.misfire_grace_seconds}s)"
        rows.append(Planned(job.id, late[-1], skipped, len(late) - 1, reason[:255]))
    elif late and on_time:
        folded = len(late)  # run_once: the first on-time run stands for the missed fires
    elif late:
        folded, to_run = len(late) - 1, late[-1:]  # run_once: one catch-up run at the latest missed fire
    if not to_run:
        return rows
    if job.overlap_policy == Job.OverlapPolicy.FORBID:
        if active:
            overlap = "overlap: the previous run is still active"
            rows += [Planned(job.id, fire, skipped, folded if i == 0 else 0, overlap) for i, fire in enumerate(to_run)]
            return rows
        if len(to_run) > 1:
            # Several fires due at once (the scheduler was behind, within the grace): one run at
            # a time, and the latest is the one worth running.
            behind = (now - to_run[0]).total_seconds()
            reason = (
                f"coalesced: {len(to_run)} fires came due together ({behind:.0f}s behind); "
                "overlap_policy=forbid runs only the latest"
            )
            rows += [Planned(job.id, fire, skipped, skip_reason=reason) for fire in to_run[:-1]]
            to_run = to_run[-1:]
    rows.append(Planned(job.id, to_run[0], missed_fires=folded))
    rows += [Planned(job.id, fire) for fire in to_run[1:]]
    return rows
