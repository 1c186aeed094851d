"""The `RunStore` interface, and what both databases' stores do the same way.

The only module family with locking SQL: fire due jobs, record outcomes and claim runs, recover
lost runs, release runs a scheduler does not hold. PostgreSQL locks rows with `SELECT ... FOR
UPDATE SKIP LOCKED`, so any number of schedulers share the work without waiting on each other;
SQLite opens every transaction with `BEGIN IMMEDIATE` (see settings), which serialises writers.
Either way the unique constraint on (job, scheduled_for, attempt) makes a double fire impossible.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from django.db import DataError, IntegrityError, connection, transaction
from django.db.models import F, Q, Value
from django.db.models.functions import Concat

from jobs import schedule
from jobs.conf import CLAIM_FRESHNESS, config
from jobs.models import Job, JobRun, SchedulerProcess, heartbeat_cutoff

from .. import retry
from ..firing import BROKEN_SCHEDULE_RETRY, DueJob, FireReport, Planned, fires_until, plan_runs
from ..runner import Outcome
from .rows import aware, placeholders, values_rows
from .sql import Statements

logger = logging.getLogger(__name__)

# Due jobs fired per transaction; a pass repeats until a batch comes back short.
FIRE_BATCH = 500
# What a write-back raises when the database refuses a value (rather than going away): psycopg2
# raises ValueError for a NUL in a string before sending anything.
REFUSED_VALUES = (DataError, IntegrityError, ValueError)


@dataclass(frozen=True)
class Pass:
    """What one pass of the engine asks the store to write."""

    outcomes: list[Outcome]  # to record (fenced by worker_id)
    worker_id: int
    clock: Callable[[], datetime]  # read at each step
    lost_after: float
    fire: bool = False  # fire due jobs
    slots: int = 0  # claim up to this many runs
    # Gets the outcomes accepted as soon as they are committed, so that a later step failing
    # cannot make the caller send them twice.
    recorded: Callable[[list[Outcome]], None] = lambda accepted: None


@dataclass
class PassResult:
    """What one pass's write did besides recording outcomes."""

    fired: FireReport = field(default_factory=FireReport)
    claimed: list[JobRun] = field(default_factory=list)
    refused: bool = False  # a value was refused: the outcomes were written one by one, nothing else


class ChangeWatcher:
    """Tells a sleeping engine that jobs or runs changed elsewhere. This one never does: the
    engine wakes by its own timer (`poll_seconds` is how often it would ask `changed()`)."""

    poll_seconds = float("inf")

    def start(self) -> None:
        """Begin watching (a thread, or a baseline to compare with)."""

    def changed(self) -> bool:
        return False

    def stop(self) -> None:
        """Stop watching; safe to call when never started."""

    def join(self, timeout: float | None = None) -> None:
        """Wait for the watching to end (a thread's)."""


class RunStore:
    """The scheduler's reads and writes of jobs and runs on one kind of database."""

    sql: Statements
    # Whether _finish_runs is a single statement (atomic by itself: no transaction needed).
    finishes_in_one_statement = False

    # -- what each database does its own way --------------------------------------------------

    def clock(self) -> Callable[[], datetime]:
        """The clock a scheduler goes by (see clock.py)."""
        raise NotImplementedError

    def now(self) -> datetime:
        """The database's time now, for the web process's judgements (/health, /metrics)."""
        raise NotImplementedError

    def notify(self) -> None:
        """Wake the schedulers that sleep: jobs or runs changed (committed)."""

    def watcher(self, on_change: Callable[[], None]) -> ChangeWatcher:
        """How a sleeping engine learns of changes made elsewhere."""
        return ChangeWatcher()

    def hold_liveness(self, process_id: int, *, lost_after: float) -> bool:
        """Make this scheduler's connection carry the evidence that it is alive (see liveness)."""
        return True

    def presumed_dead(self, process: SchedulerProcess, *, now: datetime) -> bool:
        """Whether a scheduler with a stale heartbeat is gone; inside the recovery transaction."""
        raise NotImplementedError

    def claim_runs(self, *, worker_id: int, slots: int, now: datetime, lost_after: float | None = None) -> list[JobRun]:
        """Mark up to `slots` ready runs running on this worker; return them with their jobs."""
        raise NotImplementedError

    def _write_pass(self, work: Pass) -> PassResult:
        raise NotImplementedError

    def _finish_runs(self, outcomes: list[Outcome], worker_id: int) -> set[int]:
        """Write the outcomes, fenced, and show each job's latest run; return the ids written."""
        raise NotImplementedError

    # -- the pass ----------------------------------------------------------------------------

    def write_pass(self, work: Pass) -> PassResult:
        """Record the outcomes, fire due jobs if asked, claim runs for the slots.

        When the database refuses a value, the outcomes are written one by one instead (one
        refused becomes a failure saying why) and nothing is fired or claimed in this pass.
        """
        written = False

        def recorded(accepted: list[Outcome]) -> None:
            nonlocal written
            written = True
            work.recorded(accepted)

        try:
            return self._write_pass(dataclasses.replace(work, recorded=recorded))
        except REFUSED_VALUES:
            if written or not work.outcomes:
                raise  # not the outcomes' values: firing or claiming failed after they were written
            logger.exception("writing back %d outcome(s) failed; writing them one by one", len(work.outcomes))
            work.recorded(self.record_one_by_one(work.outcomes, worker_id=work.worker_id))
            return PassResult(refused=True)

    # -- firing ------------------------------------------------------------------------------

    def fire_due_jobs(self, *, now: datetime, limit: int = FIRE_BATCH) -> FireReport:
        """Turn due jobs into runs and advance their next fire time, in one short transaction.

        Four statements whatever the number of jobs: apply the misfire policy to queued runs
        past their grace (normally none), lock the due jobs (with whether each has an active
        run), insert the runs, advance the jobs. More only when their next fire times differ,
        or when some fires are not plain (missed fires, overlaps, skips) and need values of
        their own. Inside an outer transaction no savepoint is made.
        """
        report = FireReport()
        adapt = connection.ops.adapt_datetimefield_value
        with transaction.atomic(savepoint=False), connection.cursor() as cursor:
            report.expired = self._expire_stale_runs(cursor, now)
            cursor.execute(self.sql.due_jobs, [adapt(now), limit])
            jobs = [_due_job(row) for row in cursor.fetchall()]
            if not jobs:
                return report
            planned: list[Planned] = []
            plain: list[int] = []  # jobs whose one run is queued at their stored next_run_at
            advanced: dict[datetime | None, list[int]] = {}
            for job in jobs:
                try:
                    fires, following = fires_until(job, now)
                except schedule.CronError as exc:
                    planned.append(_unschedulable(job, exc))
                    advanced.setdefault(now + BROKEN_SCHEDULE_RETRY, []).append(job.id)
                    continue
                runs = plan_runs(job, fires, now, job.active)
                if len(runs) == 1 and runs[0] == Planned(job.id, job.next_run_at):
                    plain.append(job.id)
                else:
                    planned.extend(runs)
                advanced.setdefault(following, []).append(job.id)
            if plain:
                # Only the job ids are sent: the database takes each run's fire time from its job.
                # It must run before next_run_at is advanced; a fire that has its row is skipped.
                cursor.execute(self.sql.insert_plain.format(ids=placeholders(len(plain))), [adapt(now), *plain])
            if planned:
                self._insert_runs(cursor, planned, now)
            # Jobs on the same schedule share their next fire time: one UPDATE per distinct time.
            for following, ids in advanced.items():
                cursor.execute(self.sql.advance.format(ids=placeholders(len(ids))), [adapt(following), *ids])
        report.jobs = len(jobs)
        report.queued = len(plain) + sum(1 for row in planned if row.status != JobRun.Status.SKIPPED)
        report.skipped = len(planned) + len(plain) - report.queued
        return report

    def _insert_runs(self, cursor: Any, planned: list[Planned], now: datetime) -> None:
        """Insert the planned runs with multi-row INSERTs; a fire that already has its row is skipped.

        The conflict target is the unique (job, scheduled_for, attempt): a double fire cannot land.
        """
        fields = self.sql.run_row_fields
        limit = connection.features.max_query_params or 65535
        size = max(1, min(len(planned), limit // len(fields)))
        adapt = connection.ops.adapt_datetimefield_value
        created_at = adapt(now)
        for start in range(0, len(planned), size):
            chunk = planned[start : start + size]
            params: list[Any] = []
            for row in chunk:
                fire = adapt(row.scheduled_for)
                values = {
                    "job": row.job_id,
                    "scheduled_for": fire,
                    "not_before": fire,
                    "status": row.status,
                    "missed_fires": row.missed_fires,
                    "skip_reason": row.skip_reason,
                    "finished_at": created_at if row.status == JobRun.Status.SKIPPED else None,
                    "created_at": created_at,
                }
                params += [values[name] for name in fields]
            cursor.execute(self.sql.insert_runs.format(rows=", ".join([self.sql.run_row] * len(chunk))), params)
            self.count_finished([row for row in cursor.fetchall() if row[1] == JobRun.Status.SKIPPED])

    def _expire_stale_runs(self, cursor: Any, now: datetime) -> int:
        """Apply the misfire policy to queued runs that waited past their job's misfire grace.

        Runs queued before every scheduler stopped, or behind a long queue: `skip` skips them;
        `run_once` skips one when a later fire of its job is queued or due now (that one stands
        for it), and otherwise lets it run late as the catch-up. Manual runs are someone's
        explicit request and always run. Return how many runs were skipped. Normally this finds
        nothing: it reads the ready part of the queue index.
        """
        at = connection.ops.adapt_datetimefield_value(now)
        cursor.execute(self.sql.expire_candidates, [at, at, at])
        reasons: dict[str, list[int]] = {}
        for run_id, policy, grace in cursor.fetchall():
            reason = (
                f"misfire: not started within the grace ({grace}s) after it was due"
                if policy == Job.MisfirePolicy.SKIP
                else f"misfire: not started within the grace ({grace}s); a later fire of the job runs instead"
            )
            reasons.setdefault(reason, []).append(run_id)
        for reason, ids in reasons.items():
            cursor.execute(self.sql.expire.format(ids=placeholders(len(ids))), [reason, at, *ids])
            self.count_finished(cursor.fetchall())
        expired = sum(len(ids) for ids in reasons.values())
        if expired:
            logger.warning("%d queued run(s) waited past their misfire grace; skipped by the misfire policy", expired)
        return expired

    def next_wakeup(self, *, include_queue: bool) -> datetime | None:
        """The earliest time something becomes due: a job's next fire, or a queued run.

        One statement; each half is answered by its partial index (`job_due_idx`, `jobrun_queue_idx`).
        """
        with connection.cursor() as cursor:
            cursor.execute(self.sql.next_fire_or_run if include_queue else self.sql.next_fire)
            row = cursor.fetchone()
        return aware(row[0]) if row else None

    def _claim_params(self, *, worker_id: int, slots: int, now: datetime, lost_after: float | None = None) -> list[Any]:
        """The parameters of `sql.claim`.

        It claims nothing for a scheduler whose row is stopped (another presumed it dead) or
        whose last heartbeat is older than CLAIM_FRESHNESS of `lost_after`, so that nobody can
        presume it dead and recover its runs as lost for at least that long while it starts them:
        one that was paused or cut off must heartbeat (or register anew) first.
        """
        if lost_after is None:
            lost_after = config().lost_after_seconds
        at = connection.ops.adapt_datetimefield_value(now)
        fresh_since = connection.ops.adapt_datetimefield_value(heartbeat_cutoff(now, lost_after * CLAIM_FRESHNESS))
        return [at, worker_id, at, worker_id, fresh_since, slots]

    # -- recording outcomes ------------------------------------------------------------------

    def record_outcomes(self, outcomes: list[Outcome], *, worker_id: int) -> list[Outcome]:
        """Write outcomes back in one transaction; return those that were accepted.

        Each write is fenced: it only lands while the run is still `running` on this worker, so
        a scheduler that was presumed dead (its runs marked lost and retried) cannot overwrite
        them. Retries are queued in the same transaction. Inside an outer transaction no
        savepoint is made; a single statement needs no transaction at all.
        """
        if not outcomes:
            return []
        retrying = [outcome for outcome in outcomes if outcome.retry_at is not None]
        atomic = bool(retrying) or not self.finishes_in_one_statement
        with transaction.atomic(savepoint=False) if atomic else nullcontext():
            finished = self._finish_runs(outcomes, worker_id)
            accepted = self.accepted_outcomes(outcomes, finished)
            retries = [
                retry.retry_run(outcome.run, outcome.retry_at)
                for outcome in retrying
                if outcome.run.pk in finished and outcome.retry_at is not None
            ]
            if retries:
                JobRun.objects.bulk_create(retries, ignore_conflicts=True)
        return accepted

    def accepted_outcomes(self, outcomes: list[Outcome], recorded: set[int]) -> list[Outcome]:
        """The outcomes whose runs were written; a warning for each one the fence refused.

        A run already showing exactly this outcome was written by an earlier attempt whose reply
        was lost (the connection dropped after the commit): it counts as written, not refused.
        """
        missing = [outcome for outcome in outcomes if outcome.run.pk not in recorded]
        if missing:
            stored = set(
                JobRun.objects.filter(pk__in=[outcome.run.pk for outcome in missing]).values_list(
                    "pk", "status", "finished_at"
                )
            )
            for outcome in missing:
                if (outcome.run.pk, outcome.status, outcome.stored_finished_at) in stored:
                    recorded = recorded | {outcome.run.pk}
                    continue
                logger.warning(
                    "outcome discarded job=%s run=%s status=%s: the run is no longer held by this scheduler",
                    outcome.run.job_id,
                    outcome.run.pk,
                    outcome.status,
                    extra={"job_id": outcome.run.job_id, "run_id": outcome.run.pk},
                )
        return [outcome for outcome in outcomes if outcome.run.pk in recorded]

    def record_one_by_one(self, outcomes: list[Outcome], *, worker_id: int) -> list[Outcome]:
        """Write outcomes one at a time; one the database refuses is written as a failure saying why.

        So that one unstorable result cannot block every other outcome, and the scheduler, for good.
        """
        accepted: list[Outcome] = []
        for outcome in outcomes:
            try:
                with transaction.atomic():
                    accepted += self.record_outcomes([outcome], worker_id=worker_id)
            except REFUSED_VALUES as exc:
                logger.error(
                    "outcome refused by the database job=%s run=%s status=%s: %s",
                    outcome.run.job_id,
                    outcome.run.pk,
                    outcome.status,
                    exc,
                    extra={"job_id": outcome.run.job_id, "run_id": outcome.run.pk},
                )
                note = (
                    f"the run ended {outcome.status}, but the database refused its outcome: {type(exc).__name__}: {exc}"
                )
                refused = Outcome(
                    outcome.run, JobRun.Status.FAILED, outcome.finished_at, error=note.replace("\x00", "")
                )
                with transaction.atomic():
                    accepted += self.record_outcomes([refused], worker_id=worker_id)
        return accepted

    def record_late_ends(self, ends: list[Outcome]) -> None:
        """Store when the threads of timed-out runs ended, and how, on their rows.

        Until then a run is `timed_out` without `finished_at`, and its job counts as running for
        overlap_policy=forbid. Fenced like any write-back: only the scheduler that ran it writes.
        """
        for late in ends:
            run = late.run
            how = "succeeded; its result was not kept" if late.status == JobRun.Status.SUCCEEDED else late.error
            note = (
                f"\n\nits code ended at {late.finished_at:%Y-%m-%d %H:%M:%S} UTC, after the timeout: "
                f"{how.splitlines()[0]}"
            )
            JobRun.objects.lingering().filter(pk=run.pk, worker_id=run.worker_id).update(
                finished_at=late.finished_at, error=Concat(F("error"), Value(note[:1000]))
            )

    def count_finished(self, rows: list[tuple[Any, ...]]) -> None:
        """Add runs that just reached a finished status, as (job id, status) rows, to the
        counters /metrics reports (RunCount), in the caller's transaction: every path that
        finishes a run calls this (on PostgreSQL the write-back statement counts itself)."""
        if not rows:
            return
        values, params = values_rows([(job_id, str(status)) for job_id, status in rows])
        with connection.cursor() as cursor:
            cursor.execute(self.sql.count_finished.format(rows=values), params)

    def show_last_runs(self, rows: list[tuple[Any, ...]]) -> None:
        """Show each job's latest run of `rows` (run id, job id, started at, status, as the
        database stores them) on the job, unless the job already shows a later one."""
        if not rows:
            return
        values, params = values_rows(rows)
        with connection.cursor() as cursor:
            cursor.execute(self.sql.show_latest.format(rows=values), params)

    # -- recovery ----------------------------------------------------------------------------

    def recover_lost_runs(self, *, now: datetime, lost_after: float) -> list[JobRun]:
        """Mark running runs of dead or stopped schedulers as lost; queue a retry where it is safe.

        A scheduler is dead when it has not heartbeaten for `lost_after` seconds and the
        evidence that cannot come from an outage says so too (`presumed_dead`). Its runs become
        `lost`; a retry is queued as `retry.next_attempt` says. `now` is the database's time,
        like the heartbeats it compares with.
        """
        with transaction.atomic():
            stale = list(SchedulerProcess.objects.stale(now, lost_after).select_for_update(skip_locked=True))
            dead = [process.pk for process in stale if self.presumed_dead(process, now=now)]
            if dead:
                SchedulerProcess.objects.filter(id__in=dead).update(stopped_at=now)
            gone = Q(worker__isnull=True) | Q(worker__stopped_at__isnull=False)
            # Timed-out runs whose threads were still going died with their scheduler.
            JobRun.objects.lingering().filter(gone).update(
                finished_at=now,
                error=Concat(F("error"), Value("\n\nits code ended when its scheduler stopped, after the timeout")),
            )
            runs = list(
                JobRun.objects.running()
                .filter(gone)
                .select_for_update(skip_locked=True, of=("self",))
                .select_related("job", "worker")
            )
            retried = self._lose(runs, now, _lost_reason)
        _log_lost(runs, retried)
        return runs

    def release_unheld_runs(self, *, worker_id: int, held: set[int], now: datetime) -> list[JobRun]:
        """Mark this scheduler's running runs that it does not hold as lost; retry where it is safe.

        After a database error a claim may have committed although its reply never arrived:
        those runs are `running` under this (live, heartbeating) scheduler, which never started
        them, so crash recovery would never pick them up. `held` are the runs it did start.
        """
        with transaction.atomic():
            runs = list(
                JobRun.objects.running()
                .filter(worker_id=worker_id)
                .exclude(pk__in=held)
                .select_for_update(of=("self",))
                .select_related("job", "worker")
            )
            retried = self._lose(
                runs, now, lambda run: "lost: claimed, but the claim's reply never reached the scheduler"
            )
        _log_lost(runs, retried)
        return runs

    def _lose(self, runs: list[JobRun], now: datetime, why: Callable[[JobRun], str]) -> set[int]:
        """Mark `runs` lost, queue their retries, show them on their jobs; return the ids of the
        runs retried. Runs inside the caller's transaction."""
        if not runs:
            return set()
        retries: list[JobRun] = []
        retried: set[int] = set()
        for run in runs:
            run.status = JobRun.Status.LOST
            run.finished_at = now
            run.error = why(run)
            if (retry_at := retry.next_attempt(run, JobRun.Status.LOST, ended_at=now)) is not None:
                retries.append(retry.retry_run(run, retry_at))
                retried.add(run.pk)
        JobRun.objects.bulk_update(runs, ["status", "finished_at", "error"])
        JobRun.objects.bulk_create(retries, ignore_conflicts=True)
        adapt = connection.ops.adapt_datetimefield_value
        self.show_last_runs([(run.pk, run.job_id, adapt(run.started_at or now), str(run.status)) for run in runs])
        self.count_finished([(run.job_id, run.status) for run in runs])
        return retried


def _due_job(row: tuple[Any, ...]) -> DueJob:
    next_run_at = aware(row[3])
    assert next_run_at is not None  # selected by next_run_at <= now
    return DueJob(row[0], row[1], row[2], next_run_at, row[4], row[5], row[6], bool(row[7]))


def _unschedulable(job: DueJob, exc: Exception) -> Planned:
    """A skipped run saying why a job's schedule cannot be computed.

    Saved past the validation (a raw UPDATE, a time zone missing from this host's tzdata): the
    skipped run says so where people look, the job is tried again in an hour (another host may
    have the zone), and the other jobs fire regardless.
    """
    logger.error(
        "job %s not fired: its schedule %r in %s cannot be computed (%s); trying again in an hour",
        job.id,
        job.cron_expression,
        job.timezone,
        exc,
        extra={"job_id": job.id},
    )
    return Planned(
        job.id, job.next_run_at, JobRun.Status.SKIPPED.value, skip_reason=f"schedule cannot be computed: {exc}"[:255]
    )


def _lost_reason(run: JobRun) -> str:
    worker = run.worker
    if worker is None:
        return "lost: its scheduler's record is gone and the run never finished"
    beat = worker.last_heartbeat_at
    silent = ((worker.stopped_at or beat) - beat).total_seconds()
    return (
        f"lost: {worker} stopped before the run finished (last heartbeat {beat:%Y-%m-%d %H:%M:%S} UTC, "
        f"{silent:.0f}s before it was marked stopped)"
    )


def _log_lost(runs: list[JobRun], retried: set[int]) -> None:
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
