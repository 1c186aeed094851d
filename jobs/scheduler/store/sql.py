"""Every statement the stores run, by name, built once per database from its dialect.

Table names, columns and status values come from the models (see rows.py). What differs
between the databases is small and lives in a `Dialect`: how rows are locked, how a time is
compared with an interval, and whether the queue index must be named.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from jobs.models import TIMINGS, timing_columns, timing_db_column

from .rows import ACTIVE, COUNTS, JOBS, MISFIRE_SKIP, PROCESSES, RUNS, TRIGGER, S, run_insert


@dataclass(frozen=True)
class Dialect:
    # Appended to the due jobs' SELECT and to the stale queued runs' SELECT to lock the rows.
    lock_due_jobs: str
    lock_stale_runs: str
    # Appended to the scheduler row the claim reads (PostgreSQL: FOR KEY SHARE, see `claim`).
    lock_claimer: str
    # After "FROM runs": names the queue index where the planner would not pick it by itself.
    queue_index: str
    # SQL: whether the time `{0}` lies more than `{1}` seconds before the `%s` parameter.
    stale: str
    # How the claim's UPDATE picks the runs selected by `{0}`.
    picked: str
    # The RunCount shard this session adds to (SQL; `%%` for a modulo: statements have parameters).
    count_shard: str


@dataclass(frozen=True)
class Statements:
    expire_candidates: str  # queued runs past their misfire grace: (id, policy, grace)
    expire: str  # {ids}: skip them, with a reason
    due_jobs: str  # due jobs, locked, with whether each has an active run
    insert_plain: str  # {ids}: a queued run at each job's stored next_run_at
    insert_runs: str  # {rows}: planned runs, `run_row` per row
    run_row: str
    run_row_fields: tuple[str, ...]  # the fields of run_row's parameters, in order
    advance: str  # {ids}: set the jobs' next_run_at
    next_fire: str  # the earliest next fire time
    next_fire_or_run: str  # the earliest next fire time or queued run
    claim: str  # {returning}: mark the oldest ready runs running on this scheduler
    # Write the rows of an `outcome` CTE back, fenced; returns what show_latest needs (id,
    # job_id, started_at, status) and then what count_timed does (fired, began, ended).
    finish_runs: str
    count_finished: str  # {rows}: add (job_id, status) rows of runs just finished to the counters
    count_recorded: str  # the same, timed, from a `recorded` CTE, for a statement that writes runs back
    show_latest: str  # {rows}: show each job's latest recorded run on the job
    latest: str  # the CTEs of show_latest, for a statement that has its own `recorded`
    show_latest_update: str


# The columns of the `outcome` rows that finish_runs reads.
OUTCOME_COLUMNS = "run_id, new_status, new_finished_at, new_result, new_error"
# From `recorded` (the runs just written: id, job_id, started_at, status), each job's latest
# run, and the UPDATE that shows it on the job; an older run never overwrites a newer one.
_LATEST = (
    "latest AS (SELECT job_id, started_at, status FROM recorded AS run WHERE NOT EXISTS "
    "(SELECT 1 FROM recorded AS later WHERE later.job_id = run.job_id AND (later.started_at > run.started_at "
    "OR (later.started_at = run.started_at AND later.id > run.id))))"
)
_SHOW_LATEST = (
    f"UPDATE {JOBS} AS job SET last_run_at = latest.started_at, last_run_status = latest.status "
    "FROM latest WHERE job.id = latest.job_id AND (job.last_run_at IS NULL OR job.last_run_at <= latest.started_at)"
)
_ON_CONFLICT = "ON CONFLICT (job_id, scheduled_for, attempt) DO NOTHING"


# What a timed count reads from its source: a run's job, status, duration and start lateness
# (seconds, NULL when not measured: a run whose code still runs has no end yet).
TIMED_COLUMNS = ("job_id", "status", "duration", "lateness")
# A typed NULL: PostgreSQL takes an untyped one for text, which cannot be compared with 0.
_UNTIMED = "CAST(NULL AS double precision)"


def count_timed(source: str, dialect: Dialect) -> str:
    """Add the runs of `source` (TIMED_COLUMNS) to the counters of their job type and status,
    with their durations and start lateness (see jobs.models.RunCount). A run started before
    its fire time (another host's clock ahead) was not late. Kept short: see timing_db_column."""
    columns = ["total"]
    sums = ["COUNT(*)"]
    for measure in TIMINGS:
        short = measure[0]  # the duration or lateness of a run, in `timed`
        buckets = timing_columns(measure)
        columns += [f"{measure}_count", f"{measure}_sum", *(timing_db_column(field) for field in buckets.values())]
        sums += [f"COUNT({short})", f"COALESCE(SUM({short}), 0)"]
        sums += [f"COUNT(CASE WHEN {short}<={bound!r} THEN 1 END)" for bound in buckets]
    return (
        f"INSERT INTO {COUNTS} AS c (job_type, status, shard, {','.join(columns)}) "
        f"SELECT job.job_type, timed.status, {dialect.count_shard}, {','.join(sums)} FROM (SELECT job_id, status, "
        f"duration AS d, CASE WHEN lateness < 0 THEN 0 ELSE lateness END AS l FROM {source}) AS timed "
        f"JOIN {JOBS} AS job ON job.id = timed.job_id WHERE true GROUP BY job.job_type, timed.status "
        "ON CONFLICT (job_type, status, shard) DO UPDATE SET "
        + ",".join(f"{column}=c.{column}+excluded.{column}" for column in columns)
    )


def statements(dialect: Dialect) -> Statements:
    d = dialect
    queued = S["QUEUED"]
    plain_columns, plain_values, _ = run_insert(
        {
            "job": "id",
            "scheduled_for": "next_run_at",
            "not_before": "next_run_at",
            "trigger": TRIGGER["SCHEDULE"],
            "status": queued,
            "created_at": "%s",
        }
    )
    row_columns, row_values, row_params = run_insert(
        dict.fromkeys(("job", "scheduled_for", "not_before", "status", "missed_fires", "skip_reason"), "%s")
        | {"finished_at": "%s", "created_at": "%s", "trigger": TRIGGER["SCHEDULE"]}
    )
    stale: Callable[[str, str], str] = d.stale.format
    pick = (
        f"SELECT id FROM {RUNS}{d.queue_index} WHERE status = {queued} AND not_before <= %s "
        f"AND EXISTS (SELECT 1 FROM {PROCESSES} WHERE id = %s AND stopped_at IS NULL "
        f"AND last_heartbeat_at >= %s{d.lock_claimer}) ORDER BY not_before, id LIMIT %s"
    )
    return Statements(
        expire_candidates=(
            f"SELECT run.id, job.misfire_policy, job.misfire_grace_seconds FROM {RUNS} AS run{d.queue_index} "
            f"JOIN {JOBS} AS job ON job.id = run.job_id WHERE run.status = {queued} AND run.not_before < %s "
            f"AND run.trigger <> {TRIGGER['MANUAL']} AND {stale('run.not_before', 'job.misfire_grace_seconds')} "
            f"AND (job.misfire_policy = {MISFIRE_SKIP} OR (job.enabled AND job.next_run_at <= %s) "
            f"OR EXISTS (SELECT 1 FROM {RUNS} AS later WHERE later.job_id = run.job_id "
            f"AND later.status = {queued} AND later.not_before >= run.not_before AND later.id > run.id))"
            f"{d.lock_stale_runs}"
        ),
        expire=(
            f"UPDATE {RUNS} SET status = {S['SKIPPED']}, skip_reason = %s, finished_at = %s "
            f"WHERE id IN ({{ids}}) AND status = {queued} RETURNING job_id, status"
        ),
        # The partial index job_due_idx answers `enabled AND next_run_at <= now`, and
        # jobrun_active_idx (whose condition lists the same statuses) the first EXISTS;
        # jobrun_lingering_idx the second: a timed-out run whose thread still runs.
        due_jobs=(
            f"SELECT id, cron_expression, timezone, next_run_at, misfire_policy, misfire_grace_seconds, "
            f"overlap_policy, EXISTS (SELECT 1 FROM {RUNS} AS run WHERE run.job_id = {JOBS}.id "
            f"AND run.status IN ({ACTIVE})) OR EXISTS (SELECT 1 FROM {RUNS} AS run "
            f"WHERE run.job_id = {JOBS}.id AND run.status = {S['TIMED_OUT']} "
            f"AND run.finished_at IS NULL) AS active FROM {JOBS} WHERE enabled AND next_run_at <= %s "
            f"ORDER BY next_run_at, id LIMIT %s{d.lock_due_jobs}"
        ),
        insert_plain=(
            f"INSERT INTO {RUNS} ({plain_columns}) SELECT {plain_values} FROM {JOBS} WHERE id IN ({{ids}}) "
            f"{_ON_CONFLICT}"
        ),
        insert_runs=f"INSERT INTO {RUNS} ({row_columns}) VALUES {{rows}} {_ON_CONFLICT} RETURNING job_id, status",
        run_row=f"({row_values})",
        run_row_fields=row_params,
        advance=f"UPDATE {JOBS} SET next_run_at = %s WHERE id IN ({{ids}})",
        next_fire=f"SELECT MIN(next_run_at) AS due FROM {JOBS} WHERE enabled AND next_run_at IS NOT NULL",
        next_fire_or_run=(
            f"SELECT MIN(due) FROM (SELECT MIN(next_run_at) AS due FROM {JOBS} WHERE enabled AND next_run_at "
            f"IS NOT NULL UNION ALL SELECT MIN(not_before) AS due FROM {RUNS}{d.queue_index} "
            f"WHERE status = {queued}) AS earliest"
        ),
        claim=(
            f"UPDATE {RUNS} SET status = {S['RUNNING']}, started_at = %s, worker_id = %s "
            f"WHERE id {d.picked.format(pick)} RETURNING {{returning}}"
        ),
        finish_runs=(
            f"UPDATE {RUNS} SET status = outcome.new_status, finished_at = outcome.new_finished_at, "
            "result = outcome.new_result, error = outcome.new_error FROM outcome "
            f"WHERE id = outcome.run_id AND status = {S['RUNNING']} AND worker_id = %s "
            "RETURNING id, job_id, COALESCE(started_at, finished_at) AS started_at, status, "
            "scheduled_for AS fired, started_at AS began, finished_at AS ended"
        ),
        # Runs that finish other than by their scheduler's write-back (skipped, lost): counted, not timed.
        count_finished="WITH counted (job_id, status) AS (VALUES {rows}) "
        + count_timed(
            f"(SELECT job_id, status, {_UNTIMED} AS duration, {_UNTIMED} AS lateness FROM counted) AS untimed", d
        ),
        # Only PostgreSQL writes back in a statement with a `recorded` CTE.
        count_recorded=count_timed(
            "(SELECT job_id, status, date_part('epoch', ended - began) AS duration, "
            "date_part('epoch', began - fired) AS lateness FROM recorded) AS recorded",
            d,
        ),
        show_latest=(f"WITH recorded (id, job_id, started_at, status) AS (VALUES {{rows}}), {_LATEST} {_SHOW_LATEST}"),
        latest=_LATEST,
        show_latest_update=_SHOW_LATEST,
    )
