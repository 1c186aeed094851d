"""PostgreSQL: rows locked with SKIP LOCKED, a pass in as few statements (and round trips) as it
takes, prepared once per connection; NOTIFY to wake schedulers; an advisory lock as the evidence
that a silent scheduler is alive; the server's clock for everyone."""

from __future__ import annotations

import functools
import hashlib
import logging
import select
import weakref
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from django.db import DatabaseError, connection, connections

from jobs.models import Job, JobRun, SchedulerProcess

from .. import liveness
from ..background import RETRY_MAX_SECONDS, Helper, brief, retry_delay
from ..clock import DatabaseClock
from ..runner import Outcome
from .base import ChangeWatcher, Pass, PassResult, RunStore
from .rows import JOBS, columns, instances, placeholders, with_jobs
from .sql import OUTCOME_COLUMNS, Dialect, statements

logger = logging.getLogger(__name__)

CHANNEL = "jobs_scheduler"

SQL = statements(
    Dialect(
        lock_due_jobs=f" FOR UPDATE OF {JOBS} SKIP LOCKED",
        lock_stale_runs=" FOR UPDATE OF run SKIP LOCKED",
        # Crash recovery locks a stale scheduler's row FOR UPDATE SKIP LOCKED: it either passes
        # over a scheduler that is claiming, or makes the claim wait and then see the row stopped.
        lock_claimer=" FOR KEY SHARE",
        queue_index="",
        stale="{0} < %s - {1} * INTERVAL '1 second'",
        # ARRAY(...) runs the locking subquery exactly once; as a join, a re-scan could pick
        # rows it skipped the first time and claim more than the slots.
        picked="= ANY(ARRAY({0} FOR UPDATE SKIP LOCKED))",
        # 16 shards by backend: schedulers committing at once do not wait for one counter row.
        count_shard="pg_backend_pid() %% 16",
    )
)
_RUN_COLUMNS = columns(JobRun)


def _claimed_with_jobs(prefix: str = "") -> str:
    """Select the `claimed` CTE's runs joined to their jobs, after `prefix` columns.

    With a prefix the statement returns one row even when nothing was claimed (run and job
    columns then NULL), so the prefix is always read.
    """
    selected = ", ".join(
        [
            *([prefix] if prefix else []),
            *(f"claimed.{column}" for column in _RUN_COLUMNS),
            *(f"job.{column}" for column in columns(Job)),
        ]
    )
    joined = f"claimed JOIN {JOBS} AS job ON job.id = claimed.job_id"
    if not prefix:
        return f"SELECT {selected} FROM {joined}"
    return f"SELECT {selected} FROM (SELECT 1) AS one LEFT JOIN ({joined}) ON true"


def _outcome_rows() -> str:
    """`SELECT` of the outcome rows from one array parameter per column.

    The statement's text is the same whatever the number of outcomes, so it is prepared once
    per connection. The results go as JSON text: a text[] parameter, cast to the column's type.
    """
    arrays = ["CAST(%s AS bigint[])"]
    for name in ("status", "finished_at", "result", "error"):
        field = JobRun._meta.get_field(name)
        db_type = field.db_type(connection)  # type: ignore[union-attr]
        arrays.append(f"CAST(CAST(%s AS text[]) AS {db_type}[])" if name == "result" else f"CAST(%s AS {db_type}[])")
    return f"SELECT * FROM unnest({', '.join(arrays)})"


# CTEs that write the outcomes back, fenced, and show each job's latest run on the job; the
# runs written are in the one named `recorded` (id, job_id, started_at, status, fired, began, ended).
# Data-modifying CTEs run to completion whatever the statement selects, so a claim can share it.
@functools.cache
def _write_back() -> str:
    return (
        f"outcome ({OUTCOME_COLUMNS}) AS ({_outcome_rows()}), recorded AS ({SQL.finish_runs}), "
        f"{SQL.latest}, shown AS ({SQL.show_latest_update} RETURNING job.id), counted AS ({SQL.count_recorded})"
    )


def _write_back_params(outcomes: list[Outcome], worker_id: int) -> list[Any]:
    return [
        [outcome.run.pk for outcome in outcomes],
        [outcome.status for outcome in outcomes],
        [outcome.stored_finished_at for outcome in outcomes],
        [outcome.result_json for outcome in outcomes],  # the cast to jsonb[] parses it
        [outcome.error for outcome in outcomes],
        worker_id,
    ]


class PostgresStore(RunStore):
    sql = SQL
    finishes_in_one_statement = True

    def clock(self) -> Callable[[], datetime]:
        return DatabaseClock(read=server_time)

    def now(self) -> datetime:
        return server_time()

    def notify(self) -> None:
        try:
            with connection.cursor() as cursor:
                cursor.execute(f"NOTIFY {CHANNEL}")
        except DatabaseError:
            # The change is committed; the schedulers will still see it on their next pass.
            logger.warning("could not notify schedulers", exc_info=True)

    def watcher(self, on_change: Callable[[], None]) -> ChangeWatcher:
        return _Listener(on_change)

    def hold_liveness(self, process_id: int, *, lost_after: float) -> bool:
        return liveness.hold(process_id, lost_after=lost_after)

    def presumed_dead(self, process: SchedulerProcess, *, now: datetime) -> bool:
        alive = liveness.session_open(process)
        return liveness.judged_dead(process, alive=alive, evidence="its database session is still open", now=now)

    def claim_runs(self, *, worker_id: int, slots: int, now: datetime, lost_after: float | None = None) -> list[JobRun]:
        """One statement that claims and joins the jobs: one round trip, no transaction of its own."""
        if slots <= 0:
            return []
        params = self._claim_params(worker_id=worker_id, slots=slots, now=now, lost_after=lost_after)
        with connection.cursor() as cursor:
            cursor.execute(f"WITH claimed AS ({SQL.claim.format(returning='*')}) {_claimed_with_jobs()}", params)
            rows = cursor.fetchall()
        return with_jobs(instances(JobRun, rows), instances(Job, rows, offset=len(_RUN_COLUMNS)))

    def record_and_claim(
        self, outcomes: list[Outcome], *, worker_id: int, slots: int, now: datetime, lost_after: float | None = None
    ) -> tuple[set[int], list[JobRun]]:
        """Write outcomes back and claim runs for the free slots in one prepared statement (one
        round trip, one commit, where separate ones cost two); return the ids written and the
        runs claimed, with their jobs. Outcomes that want a retry need `record_outcomes`."""
        claim_params = self._claim_params(worker_id=worker_id, slots=slots, now=now, lost_after=lost_after)
        sql = f"WITH {_write_back()}, claimed AS ({SQL.claim.format(returning='*')}) " + _claimed_with_jobs(
            "(SELECT array_agg(id) FROM recorded) AS recorded_ids"
        )
        with connection.cursor() as cursor:
            execute_prepared(cursor, sql, [*_write_back_params(outcomes, worker_id), *claim_params])
            rows = cursor.fetchall()
        recorded = set(rows[0][0] or []) if rows else set()
        claimed = [row for row in rows if row[1] is not None]
        runs = instances(JobRun, claimed, offset=1)
        return recorded, with_jobs(runs, instances(Job, claimed, offset=1 + len(_RUN_COLUMNS)))

    def _finish_runs(self, outcomes: list[Outcome], worker_id: int) -> set[int]:
        with connection.cursor() as cursor:
            cursor.execute(f"WITH {_write_back()} SELECT id FROM recorded", _write_back_params(outcomes, worker_id))
            return {row[0] for row in cursor.fetchall()}

    def _write_pass(self, work: Pass) -> PassResult:
        result = PassResult()
        outcomes, worker_id, clock = work.outcomes, work.worker_id, work.clock
        if work.slots and not work.fire and outcomes and all(outcome.retry_at is None for outcome in outcomes):
            written, result.claimed = self.record_and_claim(
                outcomes, worker_id=worker_id, slots=work.slots, now=clock(), lost_after=work.lost_after
            )
            work.recorded(self.accepted_outcomes(outcomes, written))
            return result
        # Each step atomic on its own; what is written is let go at once. Outcomes are written
        # before firing: a job whose run just ended must not have its next fire skipped as
        # overlapping.
        work.recorded(self.record_outcomes(outcomes, worker_id=worker_id))
        if work.fire:
            result.fired = self.fire_due_jobs(now=clock())
        if work.slots:
            result.claimed = self.claim_runs(
                worker_id=worker_id, slots=work.slots, now=clock(), lost_after=work.lost_after
            )
        return result


def server_time() -> datetime:
    """The server's time now, as an aware datetime."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT clock_timestamp()")
        (now,) = cursor.fetchone()
    return now if now.tzinfo is not None else now.replace(tzinfo=UTC)


class _Listener(Helper, ChangeWatcher):
    """Wake the engine when PostgreSQL delivers a NOTIFY on the scheduler channel."""

    def __init__(self, on_notify: Callable[[], None]) -> None:
        super().__init__("scheduler-listen")
        self._on_notify = on_notify

    def changed(self) -> bool:
        return False  # it calls on_notify itself

    def join(self, timeout: float | None = None) -> None:
        if self.ident is not None:  # started (run_once never starts it)
            super().join(timeout)

    def run(self) -> None:
        failures = 0
        while not self._stop_event.is_set():
            wrapper = connections.create_connection("default")
            try:
                wrapper.ensure_connection()
                raw = wrapper.connection
                raw.autocommit = True
                with raw.cursor() as cursor:
                    cursor.execute(f"LISTEN {CHANNEL}")
                if failures:
                    logger.info("LISTEN connection back after %d failed attempt(s)", failures)
                    failures = 0
                    self._on_notify()  # changes made meanwhile sent no notice this side saw
                while not self._stop_event.is_set():
                    readable, _, _ = select.select([raw], [], [], 1.0)
                    if readable:
                        raw.poll()
                        if raw.notifies:
                            raw.notifies.clear()
                            self._on_notify()
            except Exception as exc:  # noqa: BLE001 - keep listening through database restarts
                failures += 1
                delay = retry_delay(failures, RETRY_MAX_SECONDS)
                # The traceback once; while the database stays away, one line per try.
                logger.warning(
                    "LISTEN connection failed (%s); retrying in %.1fs", brief(exc), delay, exc_info=failures == 1
                )
                self._stop_event.wait(delay)
            finally:
                try:
                    wrapper.close()
                except Exception:  # noqa: BLE001 - the connection may already be gone
                    logger.debug("closing LISTEN connection failed", exc_info=True)


# SQLSTATEs: a prepared statement that is not there (the session was reset, or a
# transaction-mode pooler sent the statement to another server session); one already there;
# one whose result columns changed type under it (a migration ran meanwhile).
_NOT_PREPARED, _ALREADY_PREPARED, _STALE_PLAN = "26000", "42P05", "0A000"
# Per connection (the driver's own object, held weakly: an entry goes with its connection): the
# statements prepared on it, or None once preparing has been given up there. This relies on
# psycopg2, which fills in EXECUTE's parameters itself and reports `pgcode`.
_prepared: weakref.WeakKeyDictionary[Any, set[str] | None] = weakref.WeakKeyDictionary()


def _sqlstate(exc: BaseException) -> str | None:
    return getattr(exc.__cause__, "pgcode", None)


@functools.lru_cache(maxsize=64)
def _prepared_forms(sql: str, count: int) -> tuple[str, str, str]:
    """The name, the PREPARE text ($1, $2, ... for the `%s`) and the EXECUTE of a statement."""
    text = sql % tuple(f"${number}" for number in range(1, count + 1))
    name = "jobs_" + hashlib.sha1(text.encode()).hexdigest()[:20]
    return name, text, f"EXECUTE {name} ({placeholders(count)})"


def execute_prepared(cursor: Any, sql: str, params: list[Any]) -> None:
    """Run `sql` (with `%s` placeholders) as a server-side prepared statement.

    The engine's pass is one statement of fixed text run a few hundred times a second in a
    burst; planning it each time costs about as much as running it. The statement is prepared
    the first time this connection runs it (its name is a hash of its text, so a session that
    already has that name has this statement) and then only executed. A statement the session
    lost is prepared again, and one a migration made stale is deallocated and prepared again;
    if that fails twice in a row (a connection pooler in transaction mode hands each statement
    to any server session), this connection goes back to plain statements.
    """
    raw = connection.connection
    if connection.in_atomic_block or raw is None:
        cursor.execute(sql, params)  # a failed EXECUTE would abort the surrounding transaction
        return
    names = _prepared.setdefault(raw, set())
    if names is None:
        cursor.execute(sql, params)
        return
    name, text, execute = _prepared_forms(sql, len(params))
    for _ in range(2):
        if name not in names:
            try:
                cursor.execute(f"PREPARE {name} AS {text}")
            except DatabaseError as exc:
                if _sqlstate(exc) != _ALREADY_PREPARED:
                    raise
            names.add(name)
        try:
            cursor.execute(execute, params)
            return
        except DatabaseError as exc:
            state = _sqlstate(exc)
            if state == _STALE_PLAN:
                cursor.execute(f"DEALLOCATE {name}")
            elif state != _NOT_PREPARED:
                raise
            names.discard(name)
    logger.warning("prepared statements keep vanishing on this connection (a pooler?); using plain statements")
    _prepared[raw] = None
    cursor.execute(sql, params)
