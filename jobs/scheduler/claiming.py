"""The only module with locking SQL: fire due jobs, claim queued runs, recover lost ones.

PostgreSQL: rows are locked with `SELECT ... FOR UPDATE SKIP LOCKED`, so any number of scheduler
processes share the work without waiting on each other. SQLite: Django opens every transaction
with `BEGIN IMMEDIATE` (see settings), which serialises writers, so the same code is safe there.
Either way the unique constraint on (job, scheduled_for, attempt) makes a double fire impossible.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple, TypeVar

from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, DatabaseError, connection, connections, transaction
from django.db.models import F, Model, Q, Value
from django.db.models.functions import Concat
from django.utils.dateparse import parse_datetime

from jobs import schedule
from jobs.conf import get
from jobs.models import Job, JobRun, SchedulerProcess

from . import liveness
from .runner import safe_to_repeat

logger = logging.getLogger(__name__)
ModelT = TypeVar("ModelT", bound=Model)

# A job that missed more fires than this (an every-second job after a long outage) has its
# missed fires counted up to here, then its schedule jumps to the first fire after now.
MAX_FIRES_COUNTED = 1000
# Due jobs fired per transaction; a pass repeats until a batch comes back short.
FIRE_BATCH = 500
# A job whose schedule cannot be computed is tried again this much later.
BROKEN_SCHEDULE_RETRY = timedelta(hours=1)
# The partial index on queued runs by (not_before, id) that claiming reads (see JobRun.Meta).
QUEUE_INDEX = "jobrun_queue_idx"


@dataclass
class FireReport:
    """What one pass over due jobs did."""

    jobs: int = 0
    queued: int = 0
    skipped: int = 0
    expired: int = 0  # queued runs that waited past their job's misfire grace


class _DueJob(NamedTuple):
    """What firing needs of a due job."""

    id: int
    cron_expression: str
    timezone: str
    next_run_at: datetime
    misfire_policy: str
    misfire_grace_seconds: int
    overlap_policy: str
    active: bool  # it has a queued or running run


def _due_job(row: tuple[Any, ...]) -> _DueJob:
    next_run_at = _aware(row[3])
    assert next_run_at is not None  # selected by next_run_at <= now
    return _DueJob(row[0], row[1], row[2], next_run_at, row[4], row[5], row[6], bool(row[7]))


@dataclass(slots=True)
class _Planned:
    """A run to insert for one fire: queued, or skipped with its reason."""

    job_id: int
    scheduled_for: datetime
    status: str = JobRun.Status.QUEUED.value
    missed_fires: int = 0
    skip_reason: str = ""


def _fires_until(job: _DueJob, now: datetime) -> tuple[list[datetime], datetime | None]:
    """Return the job's fire times up to `now` (capped) and its next fire time after them."""
    fires: list[datetime] = []
    current: datetime | None = job.next_run_at
    while current is not None and current <= now:
        if len(fires) >= MAX_FIRES_COUNTED:
            return fires, schedule.next_fire_after(job.cron_expression, job.timezone, now)
        fires.append(current)
        current = schedule.next_fire_after(job.cron_expression, job.timezone, current)
    return fires, current


def _plan_runs(job: _DueJob, fires: list[datetime], now: datetime, active: bool) -> list[_Planned]:
    """Turn a job's due fire times into runs, applying the misfire and overlap policies.

    Every fire gets a row that runs or says why not, except fires missed beyond the grace under
    `run_once`: the run that executes counts those (`missed_fires`), however many there are.
    """
    grace = timedelta(seconds=job.misfire_grace_seconds)
    late = [fire for fire in fires if now - fire > grace]
    on_time = fires[len(late) :]
    rows: list[_Planned] = []
    skipped = JobRun.Status.SKIPPED.value
    folded = 0  # missed fires the run that executes stands for, besides its own
    to_run = on_time
    if late and job.misfire_policy == Job.MisfirePolicy.SKIP:
        lateness = (now - late[-1]).total_seconds()
        missed = f"{len(late)}{'+' if len(fires) >= MAX_FIRES_COUNTED else ''} fire(s) missed"
        reason = f"misfire: {missed}, {lateness:.0f}s late (grace {job.misfire_grace_seconds}s)"
        rows.append(_Planned(job.id, late[-1], skipped, len(late) - 1, reason[:255]))
    elif late and on_time:
        folded = len(late)  # run_once: the first on-time run stands for the missed fires
    elif late:
        folded, to_run = len(late) - 1, late[-1:]  # run_once: one catch-up run at the latest missed fire
    if not to_run:
        return rows
    if job.overlap_policy == Job.OverlapPolicy.FORBID:
        if active:
            overlap = "overlap: the previous run is still active"
            rows += [_Planned(job.id, fire, skipped, folded if i == 0 else 0, overlap) for i, fire in enumerate(to_run)]
            return rows
        if len(to_run) > 1:
            # Several fires due at once (the scheduler was behind, within the grace): one run at
            # a time, and the latest is the one worth running.
            behind = (now - to_run[0]).total_seconds()
            reason = (
                f"coalesced: {len(to_run)} fires came due together ({behind:.0f}s behind); "
                "overlap_policy=forbid runs only the latest"
            )
            rows += [_Planned(job.id, fire, skipped, skip_reason=reason) for fire in to_run[:-1]]
            to_run = to_run[-1:]
    rows.append(_Planned(job.id, to_run[0], missed_fires=folded))
    rows += [_Planned(job.id, fire) for fire in to_run[1:]]
    return rows


_RUN_COLUMNS = (
    "job_id, scheduled_for, not_before, trigger, attempt, status, missed_fires, skip_reason, error, "
    "finished_at, created_at"
)
_ON_CONFLICT = "ON CONFLICT (job_id, scheduled_for, attempt) DO NOTHING"


def _insert_plain_runs(job_ids: list[int], now: datetime) -> None:
    """Insert a queued run for each job's stored next fire time, computed by the database.

    Most fires are plain: one on-time run at the job's `next_run_at`. Only the job ids are sent
    (not eleven values per run), so a burst of due jobs costs little to send. It must run
    before `next_run_at` is advanced. A fire that already has its row is skipped.
    """
    runs_table = connection.ops.quote_name(JobRun._meta.db_table)
    jobs_table = connection.ops.quote_name(Job._meta.db_table)
    created_at = connection.ops.adapt_datetimefield_value(now)
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {runs_table} ({_RUN_COLUMNS}) SELECT id, next_run_at, next_run_at, "
            f"'{JobRun.Trigger.SCHEDULE}', 1, '{JobRun.Status.QUEUED}', 0, '', '', NULL, %s FROM {jobs_table} "
            f"WHERE id IN ({_placeholders(len(job_ids))}) {_ON_CONFLICT}",
            [created_at, *job_ids],
        )


def _insert_runs(planned: list[_Planned], now: datetime) -> None:
    """Insert the planned runs with multi-row INSERTs; a fire that already has its row is skipped.

    The conflict target is the unique (job, scheduled_for, attempt): a double fire cannot land.
    """
    table = connection.ops.quote_name(JobRun._meta.db_table)
    per_row = 11
    limit = connection.features.max_query_params or 65535
    size = max(1, min(len(planned), limit // per_row))
    adapt = connection.ops.adapt_datetimefield_value
    created_at = finished_at = adapt(now)
    times: dict[datetime, Any] = {}
    for start in range(0, len(planned), size):
        chunk = planned[start : start + size]
        params: list[Any] = []
        for row in chunk:
            fire = times.get(row.scheduled_for)
            if fire is None:
                fire = times[row.scheduled_for] = adapt(row.scheduled_for)
            done = finished_at if row.status == JobRun.Status.SKIPPED else None
            params += [
                row.job_id, fire, fire, JobRun.Trigger.SCHEDULE.value, 1, row.status, row.missed_fires,
                row.skip_reason, "", done, created_at,
            ]  # fmt: skip
        values = ", ".join([f"({_placeholders(per_row)})"] * len(chunk))
        with connection.cursor() as cursor:
            cursor.execute(f"INSERT INTO {table} ({_RUN_COLUMNS}) VALUES {values} {_ON_CONFLICT}", params)


def _stale(run_time: str, grace_seconds: str) -> str:
    """SQL: whether `run_time` lies more than `grace_seconds` before the `%s` parameter."""
    if connection.vendor == "postgresql":
        return f"{run_time} < %s - {grace_seconds} * INTERVAL '1 second'"
    return f"julianday({run_time}) < julianday(%s) - {grace_seconds} / 86400.0"


def _expire_stale_runs(cursor: Any, now: datetime) -> int:
    """Apply the misfire policy to queued runs that waited past their job's misfire grace.

    Runs queued before every scheduler stopped, or behind a long queue: `skip` skips them;
    `run_once` skips one when a later fire of its job is queued or due now (that one stands for
    it), and otherwise lets it run late as the catch-up. Manual runs are someone's explicit
    request and always run. Return how many runs were skipped. Normally this finds nothing: it
    reads the ready part of the queue index.
    """
    runs_table = connection.ops.quote_name(JobRun._meta.db_table)
    jobs_table = connection.ops.quote_name(Job._meta.db_table)
    queued = JobRun.Status.QUEUED
    at = connection.ops.adapt_datetimefield_value(now)
    lock = " FOR UPDATE OF run SKIP LOCKED" if connection.features.has_select_for_update_skip_locked else ""
    cursor.execute(
        f"SELECT run.id, job.misfire_policy, job.misfire_grace_seconds FROM {runs_table} AS run{_queue_index()} "
        f"JOIN {jobs_table} AS job ON job.id = run.job_id WHERE run.status = '{queued}' AND run.not_before < %s "
        f"AND run.trigger <> '{JobRun.Trigger.MANUAL}' AND {_stale('run.not_before', 'job.misfire_grace_seconds')} "
        f"AND (job.misfire_policy = '{Job.MisfirePolicy.SKIP}' OR (job.enabled AND job.next_run_at <= %s) "
        f"OR EXISTS (SELECT 1 FROM {runs_table} AS later WHERE later.job_id = run.job_id "
        f"AND later.status = '{queued}' AND later.not_before >= run.not_before AND later.id > run.id)){lock}",
        [at, at, at],
    )
    reasons: dict[str, list[int]] = {}
    for run_id, policy, grace in cursor.fetchall():
        reason = (
            f"misfire: not started within the grace ({grace}s) after it was due"
            if policy == Job.MisfirePolicy.SKIP
            else f"misfire: not started within the grace ({grace}s); a later fire of the job runs instead"
        )
        reasons.setdefault(reason, []).append(run_id)
    for reason, ids in reasons.items():
        cursor.execute(
            f"UPDATE {runs_table} SET status = '{JobRun.Status.SKIPPED}', skip_reason = %s, finished_at = %s "
            f"WHERE id IN ({_placeholders(len(ids))}) AND status = '{queued}'",
            [reason, at, *ids],
        )
    expired = sum(len(ids) for ids in reasons.values())
    if expired:
        logger.warning("%d queued run(s) waited past their misfire grace; skipped by the misfire policy", expired)
    return expired


def fire_due_jobs(*, now: datetime, limit: int = FIRE_BATCH) -> FireReport:
    """Turn due jobs into runs and advance their next fire time, in one short transaction.

    Four statements whatever the number of jobs: apply the misfire policy to queued runs past
    their grace (normally none), lock the due jobs (with whether each has an active run), insert
    the runs, advance the jobs. More only when their next fire times differ,
    or when some fires are not plain (missed fires, overlaps, skips) and need values of their own.
    Inside an outer transaction (on SQLite the engine claims the new runs in the same one) no
    savepoint is made.
    """
    report = FireReport()
    jobs_table = connection.ops.quote_name(Job._meta.db_table)
    runs_table = connection.ops.quote_name(JobRun._meta.db_table)
    active = ", ".join(f"'{status}'" for status in JobRun.ACTIVE)
    lock = f" FOR UPDATE OF {jobs_table} SKIP LOCKED" if connection.features.has_select_for_update_skip_locked else ""
    adapt = connection.ops.adapt_datetimefield_value
    with transaction.atomic(savepoint=False), connection.cursor() as cursor:
        report.expired = _expire_stale_runs(cursor, now)
        # The partial index job_due_idx answers `enabled AND next_run_at <= now`, and
        # jobrun_active_idx (whose condition lists the same statuses) the first EXISTS;
        # jobrun_lingering_idx the second: a timed-out run whose thread still runs.
        cursor.execute(
            f"SELECT id, cron_expression, timezone, next_run_at, misfire_policy, misfire_grace_seconds, "
            f"overlap_policy, EXISTS (SELECT 1 FROM {runs_table} AS run WHERE run.job_id = {jobs_table}.id "
            f"AND run.status IN ({active})) OR EXISTS (SELECT 1 FROM {runs_table} AS run "
            f"WHERE run.job_id = {jobs_table}.id AND run.status = '{JobRun.Status.TIMED_OUT}' "
            f"AND run.finished_at IS NULL) AS active FROM {jobs_table} WHERE enabled AND next_run_at <= %s "
            f"ORDER BY next_run_at, id LIMIT %s{lock}",
            [adapt(now), limit],
        )
        jobs = [_due_job(row) for row in cursor.fetchall()]
        if not jobs:
            return report
        planned: list[_Planned] = []
        plain: list[int] = []  # jobs whose one run is queued at their stored next_run_at
        advanced: dict[datetime | None, list[int]] = {}
        for job in jobs:
            try:
                fires, following = _fires_until(job, now)
            except schedule.CronError as exc:
                # Saved past the validation (a raw UPDATE, a time zone missing from this host's
                # tzdata): a skipped run says so where people look, the job is tried again in an
                # hour (another host may have the zone), and the other jobs fire regardless.
                logger.error(
                    "job %s not fired: its schedule %r in %s cannot be computed (%s); trying again in an hour",
                    job.id,
                    job.cron_expression,
                    job.timezone,
                    exc,
                    extra={"job_id": job.id},
                )
                reason = f"schedule cannot be computed: {exc}"[:255]
                planned.append(_Planned(job.id, job.next_run_at, JobRun.Status.SKIPPED.value, skip_reason=reason))
                advanced.setdefault(now + BROKEN_SCHEDULE_RETRY, []).append(job.id)
                continue
            runs = _plan_runs(job, fires, now, job.active)
            if len(runs) == 1 and runs[0] == _Planned(job.id, job.next_run_at):
                plain.append(job.id)
            else:
                planned.extend(runs)
            advanced.setdefault(following, []).append(job.id)
        if plain:
            _insert_plain_runs(plain, now)
        if planned:
            _insert_runs(planned, now)
        # Jobs on the same schedule share their next fire time: one UPDATE per distinct time.
        for following, ids in advanced.items():
            cursor.execute(
                f"UPDATE {jobs_table} SET next_run_at = %s WHERE id IN ({_placeholders(len(ids))})",
                [adapt(following), *ids],
            )
    report.jobs = len(jobs)
    report.queued = len(plain)
    for row in planned:
        if row.status == JobRun.Status.SKIPPED:
            report.skipped += 1
        else:
            report.queued += 1
    return report


def _placeholders(count: int) -> str:
    return ", ".join(["%s"] * count)


def _columns(model: type[Model]) -> list[str]:
    return [field.column for field in model._meta.concrete_fields]


def _aware_datetime(tz: Any) -> Callable[[Any, Any, Any], Any]:
    """SQLite's datetime converter for claimed rows, without Django's per-value lookups.

    The driver has already parsed the value (Django registers that), so all that is left is
    to attach the connection's time zone, as `DatabaseOperations.convert_datetimefield_value`
    does.
    """
    return lambda value, expression, wrapper: _aware(value, tz)


@functools.cache
def _loader(model: type[Model], vendor: str) -> tuple[list[str], list[tuple[int, Any, list[Any]]]]:
    """The attribute names of `_columns(model)` and, per column that needs any, its converters."""
    columns = [field.get_col(model._meta.db_table) for field in model._meta.concrete_fields]
    converters = []
    for index, column in enumerate(columns):
        # django-stubs does not declare Field.get_db_converters (Django has it since 1.8).
        functions = [*connection.ops.get_db_converters(column), *column.field.get_db_converters(connection)]  # type: ignore[attr-defined]
        sqlite_datetime = getattr(connection.ops, "convert_datetimefield_value", None)  # SQLite's ops have it
        if vendor == "sqlite" and settings.USE_TZ and functions == [sqlite_datetime]:
            functions = [_aware_datetime(connection.timezone)]
        if functions:
            converters.append((index, column, functions))
    return [field.attname for field in model._meta.concrete_fields], converters


def _instances(model: type[ModelT], rows: list[tuple[Any, ...]], offset: int = 0) -> list[ModelT]:
    """Build model instances from raw rows whose columns, from `offset`, are `_columns(model)`.

    Values go through the same converters the ORM applies (aware datetimes, decoded JSON).
    """
    wrapper = connections[DEFAULT_DB_ALIAS]
    names, converters = _loader(model, wrapper.vendor)
    instances = []
    for row in rows:
        values = list(row[offset : offset + len(names)])
        for index, column, functions in converters:
            for convert in functions:
                values[index] = convert(values[index], column, wrapper)
        instances.append(model.from_db(DEFAULT_DB_ALIAS, names, values))
    return instances


def _queue_index() -> str:
    """On SQLite, name the partial queue index: without ANALYZE statistics its planner would
    rather sort every queued run on the status index, for every claim."""
    if connection.vendor != "sqlite":
        return ""
    return f" INDEXED BY {connection.ops.quote_name(QUEUE_INDEX)}"


def _claim_sql(
    *, worker_id: int, slots: int, now: datetime, lost_after: float | None, returning: str
) -> tuple[str, list[Any]]:
    """An `UPDATE ... RETURNING` that marks the oldest ready runs, up to `slots`, as running here.

    On PostgreSQL its subquery skips rows other schedulers hold locked. Status literals are
    written into the SQL so that SQLite can use the partial queue index.

    It claims nothing for a scheduler whose row is stopped (another presumed it dead) or whose
    last heartbeat is older than half of `lost_after` (default `LOST_AFTER_SECONDS`), so that
    nobody can presume it dead and recover its runs as lost for at least that long while it
    starts them: one that was paused or cut off must heartbeat (or register anew) first.
    On PostgreSQL the check locks the row `FOR KEY SHARE` (a row lock on every claim): crash
    recovery, which locks a stale scheduler's row `FOR UPDATE SKIP LOCKED`, either passes over
    a scheduler that is claiming, or makes the claim wait for it and then see the row stopped.
    """
    if lost_after is None:
        lost_after = float(get("LOST_AFTER_SECONDS"))
    fresh_since = now - timedelta(seconds=lost_after / 2)
    runs_table = connection.ops.quote_name(JobRun._meta.db_table)
    processes_table = connection.ops.quote_name(SchedulerProcess._meta.db_table)
    postgres = connection.vendor == "postgresql"
    alive = (
        f"EXISTS (SELECT 1 FROM {processes_table} WHERE id = %s AND stopped_at IS NULL "
        f"AND last_heartbeat_at >= %s{' FOR KEY SHARE' if postgres else ''})"
    )
    pick = (
        f"SELECT id FROM {runs_table}{_queue_index()} WHERE status = '{JobRun.Status.QUEUED}' "
        f"AND not_before <= %s AND {alive} ORDER BY not_before, id LIMIT %s"
    )
    # PostgreSQL: ARRAY(...) runs the locking subquery exactly once; as a join, a re-scan could
    # pick rows it skipped the first time and claim more than `slots`.
    picked = f"= ANY(ARRAY({pick} FOR UPDATE SKIP LOCKED))" if postgres else f"IN ({pick})"
    at = connection.ops.adapt_datetimefield_value(now)
    sql = (
        f"UPDATE {runs_table} SET status = '{JobRun.Status.RUNNING}', started_at = %s, worker_id = %s "
        f"WHERE id {picked} RETURNING {returning}"
    )
    return sql, [at, worker_id, at, worker_id, connection.ops.adapt_datetimefield_value(fresh_since), slots]


def _with_jobs(runs: list[JobRun], jobs: list[Job]) -> list[JobRun]:
    by_id = {job.pk: job for job in jobs}
    for run in runs:
        run.job = by_id[run.job_id]
    runs.sort(key=lambda run: (run.not_before, run.pk))
    return runs


def claim_runs(*, worker_id: int, slots: int, now: datetime, lost_after: float | None = None) -> list[JobRun]:
    """Mark up to `slots` ready runs as running on this worker and return them with their jobs.

    PostgreSQL joins the jobs in the same statement, so a claim is one round trip and needs no
    transaction of its own. SQLite reads the jobs with a second statement in the same
    (IMMEDIATE) transaction.
    """
    if slots <= 0:
        return []
    run_columns = _columns(JobRun)
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            claim, params = _claim_sql(worker_id=worker_id, slots=slots, now=now, lost_after=lost_after, returning="*")
            cursor.execute(f"WITH claimed AS ({claim}) {_claimed_with_jobs()}", params)
            rows = cursor.fetchall()
            return _with_jobs(_instances(JobRun, rows), _instances(Job, rows, offset=len(run_columns)))
        with transaction.atomic(savepoint=False):
            claim, params = _claim_sql(
                worker_id=worker_id, slots=slots, now=now, lost_after=lost_after, returning=", ".join(run_columns)
            )
            cursor.execute(claim, params)
            runs = _instances(JobRun, cursor.fetchall())
            if not runs:
                return []
            job_ids = sorted({run.job_id for run in runs})
            jobs_table = connection.ops.quote_name(Job._meta.db_table)
            cursor.execute(
                f"SELECT {', '.join(_columns(Job))} FROM {jobs_table} WHERE id IN ({_placeholders(len(job_ids))})",
                job_ids,
            )
            return _with_jobs(runs, _instances(Job, cursor.fetchall()))


def _claimed_with_jobs(prefix: str = "") -> str:
    """PostgreSQL: select the `claimed` CTE's runs joined to their jobs, after `prefix` columns.

    With a prefix the statement returns one row even when nothing was claimed (run and job
    columns then NULL), so the prefix is always read.
    """
    jobs_table = connection.ops.quote_name(Job._meta.db_table)
    columns = ", ".join(
        [
            *([prefix] if prefix else []),
            *(f"claimed.{column}" for column in _columns(JobRun)),
            *(f"job.{column}" for column in _columns(Job)),
        ]
    )
    joined = f"claimed JOIN {jobs_table} AS job ON job.id = claimed.job_id"
    if not prefix:
        return f"SELECT {columns} FROM {joined}"
    return f"SELECT {columns} FROM (SELECT 1) AS one LEFT JOIN ({joined}) ON true"


def record_and_claim(
    write_back: tuple[str, list[Any]],
    *,
    worker_id: int,
    slots: int,
    now: datetime,
    lost_after: float | None = None,
) -> tuple[set[int], list[JobRun]]:
    """PostgreSQL: write outcomes back and claim runs for the free slots in one statement.

    `write_back` is `runner.write_back_ctes(...)`: CTEs whose `recorded` names the runs they
    wrote. One statement is one round trip and one commit, where separate ones cost two.
    Return the ids written and the runs claimed, with their jobs.
    """
    ctes, write_params = write_back
    claim, claim_params = _claim_sql(worker_id=worker_id, slots=slots, now=now, lost_after=lost_after, returning="*")
    sql = f"WITH {ctes}, claimed AS ({claim}) " + _claimed_with_jobs(
        "(SELECT array_agg(id) FROM recorded) AS recorded_ids"
    )
    with connection.cursor() as cursor:
        execute_prepared(cursor, sql, [*write_params, *claim_params])
        rows = cursor.fetchall()
    recorded = set(rows[0][0] or []) if rows else set()
    claimed = [row for row in rows if row[1] is not None]
    runs = _instances(JobRun, claimed, offset=1)
    return recorded, _with_jobs(runs, _instances(Job, claimed, offset=1 + len(_columns(JobRun))))


# PostgreSQL SQLSTATEs: a prepared statement that is not there (the session was reset, or a
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
    return name, text, f"EXECUTE {name} ({_placeholders(count)})"


def execute_prepared(cursor: Any, sql: str, params: list[Any]) -> None:
    """PostgreSQL: run `sql` (with `%s` placeholders) as a server-side prepared statement.

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


def _aware(value: datetime | str | None, tz: Any = UTC) -> datetime | None:
    """A datetime read by raw SQL, made aware (SQLite gives naive values or text, in `tz`)."""
    if isinstance(value, str):
        value = parse_datetime(value)
    if value is not None and value.tzinfo is None:
        value = value.replace(tzinfo=tz)
    return value


def next_wakeup(*, include_queue: bool) -> datetime | None:
    """Return the earliest time something becomes due: a job's next fire or a queued run.

    One statement; each half is answered by its partial index (`job_due_idx`, `jobrun_queue_idx`).
    """
    jobs_table = connection.ops.quote_name(Job._meta.db_table)
    runs_table = connection.ops.quote_name(JobRun._meta.db_table)
    sql = f"SELECT MIN(next_run_at) AS due FROM {jobs_table} WHERE enabled AND next_run_at IS NOT NULL"
    if include_queue:
        sql = (
            f"SELECT MIN(due) FROM ({sql} UNION ALL SELECT MIN(not_before) AS due FROM {runs_table}"
            f"{_queue_index()} WHERE status = '{JobRun.Status.QUEUED}') AS earliest"
        )
    with connection.cursor() as cursor:
        cursor.execute(sql)
        row = cursor.fetchone()
    return _aware(row[0]) if row else None


def recover_lost_runs(*, now: datetime, lost_after: float) -> list[JobRun]:
    """Mark running runs of dead or stopped schedulers as lost; queue a retry where it is safe.

    A scheduler is dead when it has not heartbeaten for `lost_after` seconds and the evidence
    that cannot come from an outage says so too (see `liveness.presumed_dead`). Its runs become
    `lost`; a retry is queued when the job type's work is safe to repeat and the job's retries
    allow it (a lost run gets at least one retry, since it never reported a failure). `now` is
    the database's time, like the heartbeats it compares with.
    """
    stale_before = now - timedelta(seconds=lost_after)
    with transaction.atomic():
        stale = list(
            SchedulerProcess.objects.select_for_update(skip_locked=True).filter(
                stopped_at__isnull=True, last_heartbeat_at__lt=stale_before
            )
        )
        dead = [process.pk for process in stale if liveness.presumed_dead(process, now=now)]
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
        retried = _lose(runs, now, _lost_reason)
    _log_lost(runs, retried)
    return runs


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


def release_unheld_runs(*, worker_id: int, held: set[int], now: datetime) -> list[JobRun]:
    """Mark this scheduler's running runs that it does not hold as lost; retry where it is safe.

    After a database error a claim may have committed although its reply never arrived: those
    runs are `running` under this (live, heartbeating) scheduler, which never started them, so
    crash recovery would never pick them up. `held` are the runs it did start.
    """
    with transaction.atomic():
        runs = list(
            JobRun.objects.running()
            .filter(worker_id=worker_id)
            .exclude(pk__in=held)
            .select_for_update(of=("self",))
            .select_related("job", "worker")
        )
        retried = _lose(runs, now, lambda run: "lost: claimed, but the claim's reply never reached the scheduler")
    _log_lost(runs, retried)
    return runs


def _lose(runs: list[JobRun], now: datetime, why: Callable[[JobRun], str]) -> set[int]:
    """Mark `runs` lost, queue a retry for those safe to repeat, show it on their jobs; return
    the ids of the runs retried. Runs inside the caller's transaction."""
    if not runs:
        return set()
    retries: list[JobRun] = []
    retried: set[int] = set()
    for run in runs:
        run.status = JobRun.Status.LOST
        run.finished_at = now
        run.error = why(run)
        if safe_to_repeat(run.job) and run.attempt <= max(run.job.max_retries, 1):
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
    return retried


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
