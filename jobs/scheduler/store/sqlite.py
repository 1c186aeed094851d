"""SQLite: one machine, one writer at a time (`BEGIN IMMEDIATE`), so a whole pass is one
transaction; a commit counter to notice other processes' writes; the process table as the
evidence that a silent scheduler is alive; the host's clock, which is the database's."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime

from django.db import connection, transaction
from django.utils import timezone

from jobs.models import Job, JobRun, SchedulerProcess

from .. import liveness
from ..runner import Outcome
from .base import ChangeWatcher, Pass, PassResult, RunStore
from .rows import JOBS, QUEUE_INDEX, columns, instances, placeholders, quoted, values_rows, with_jobs
from .sql import OUTCOME_COLUMNS, TIMED_COLUMNS, Dialect, count_timed, statements

logger = logging.getLogger(__name__)

DIALECT = Dialect(
    lock_due_jobs="",
    lock_stale_runs="",
    lock_claimer="",
    # Without ANALYZE statistics its planner would rather sort every queued run on the
    # status index, for every claim.
    queue_index=f" INDEXED BY {quoted(QUEUE_INDEX)}",
    stale="julianday({0}) < julianday(%s) - {1} / 86400.0",
    picked="IN ({0})",
    count_shard="0",  # one writer at a time
)
SQL = statements(DIALECT)
# The outcomes as VALUES rows, written back by the shared fenced UPDATE.
FINISH = f"WITH outcome ({OUTCOME_COLUMNS}) AS (VALUES {{rows}}) {SQL.finish_runs}"
# {rows}: (job_id, status, duration, lateness) rows of the runs just written back.
COUNT_TIMED = f"WITH timed ({', '.join(TIMED_COLUMNS)}) AS (VALUES {{rows}}) {count_timed('timed', DIALECT)}"
JOBS_BY_ID = f"SELECT {', '.join(columns(Job))} FROM {JOBS} WHERE id IN ({{ids}})"
# Seconds between looks at the commit counter while the engine sleeps.
WATCH_SECONDS = 0.5


def seconds(later: datetime | None, earlier: datetime | None) -> float | None:
    return None if later is None or earlier is None else (later - earlier).total_seconds()


class SqliteStore(RunStore):
    sql = SQL

    def clock(self) -> Callable[[], datetime]:
        return timezone.now

    def now(self) -> datetime:
        return timezone.now()

    def watcher(self, on_change: Callable[[], None]) -> ChangeWatcher:
        return CommitWatcher()

    def presumed_dead(self, process: SchedulerProcess, *, now: datetime) -> bool:
        alive = liveness.process_here(process)
        evidence = f"its process {process.pid} is still running on this host"
        return liveness.judged_dead(process, alive=alive, evidence=evidence, now=now)

    def claim_runs(self, *, worker_id: int, slots: int, now: datetime, lost_after: float | None = None) -> list[JobRun]:
        """The claim, then the claimed runs' jobs, in one (IMMEDIATE) transaction."""
        if slots <= 0:
            return []
        params = self._claim_params(worker_id=worker_id, slots=slots, now=now, lost_after=lost_after)
        with transaction.atomic(savepoint=False), connection.cursor() as cursor:
            cursor.execute(SQL.claim.format(returning=", ".join(columns(JobRun))), params)
            runs = instances(JobRun, cursor.fetchall())
            if not runs:
                return []
            job_ids = sorted({run.job_id for run in runs})
            cursor.execute(JOBS_BY_ID.format(ids=placeholders(len(job_ids))), job_ids)
            return with_jobs(runs, instances(Job, cursor.fetchall()))

    def _finish_runs(self, outcomes: list[Outcome], worker_id: int) -> set[int]:
        """One fenced UPDATE of the runs; the rows it returns feed the UPDATE of their jobs' last
        run (SQLite has no data-modifying CTEs)."""
        adapt = connection.ops.adapt_datetimefield_value
        values, params = values_rows(
            [
                (
                    outcome.run.pk,
                    str(outcome.status),
                    adapt(outcome.stored_finished_at),
                    outcome.result_json,
                    outcome.error,
                )
                for outcome in outcomes
            ]
        )
        with connection.cursor() as cursor:
            cursor.execute(FINISH.format(rows=values), [*params, worker_id])
            recorded = cursor.fetchall()
        self.show_last_runs([row[:4] for row in recorded])
        if recorded:
            # Timed here, exactly: julianday() is a float of days, a few microseconds off, which
            # moves a run on a bucket's bound into the next one.
            values, params = values_rows(
                [
                    (job_id, status, seconds(ended, began), seconds(began, fired))
                    for _, job_id, _, status, fired, began, ended in recorded
                ]
            )
            with connection.cursor() as cursor:
                cursor.execute(COUNT_TIMED.format(rows=values), params)
        return {row[0] for row in recorded}

    def _write_pass(self, work: Pass) -> PassResult:
        # One IMMEDIATE transaction for the whole pass is cheaper than one per step.
        result = PassResult()
        with transaction.atomic():
            accepted = self.record_outcomes(work.outcomes, worker_id=work.worker_id)
            if work.fire:
                result.fired = self.fire_due_jobs(now=work.clock())
            if work.slots:
                result.claimed = self.claim_runs(
                    worker_id=work.worker_id, slots=work.slots, now=work.clock(), lost_after=work.lost_after
                )
        work.recorded(accepted)
        return result


class CommitWatcher(ChangeWatcher):
    """Tell whether another connection has committed since the last look.

    `PRAGMA data_version` reads a counter in the database's shared memory, so asking costs
    microseconds and no I/O. The first call, and the first after a reconnect, says False.
    """

    poll_seconds = WATCH_SECONDS

    def __init__(self) -> None:
        self._last: int | None = None

    def start(self) -> None:
        self.changed()  # the baseline: commits from here on count

    def changed(self) -> bool:
        # Straight to the driver: asked several times a second, Django's cursor layers would
        # cost more than the question.
        connection.ensure_connection()
        version = connection.connection.execute("PRAGMA data_version").fetchone()[0]
        changed = self._last is not None and version != self._last
        self._last = version
        return changed
