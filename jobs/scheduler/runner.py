"""Run one JobRun through its executor, and record outcomes fenced by the claiming worker."""

from __future__ import annotations

import functools
import json
import logging
import random
import re
import traceback
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.core.serializers.json import DjangoJSONEncoder
from django.db import DataError, IntegrityError, connection, transaction
from django.db.models import F, Field, Value
from django.db.models.functions import Concat
from django.utils import timezone

from jobs.conf import get
from jobs.executors import UnknownJobType, get_executor
from jobs.executors.base import OutcomeUnknown, RunTimedOut
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
    # Timed out while its thread still runs: stored without `finished_at` (the job counts as
    # running for overlap_policy=forbid) until the thread ends.
    lingering: bool = False
    # Failed after its work may have been done (a mail handed over, its reply lost).
    maybe_done: bool = False

    @property
    def stored_finished_at(self) -> datetime | None:
        return None if self.lingering else self.finished_at


# A JSON \u0000 escape (not an escaped backslash followed by "u0000"): PostgreSQL's jsonb refuses it.
_JSON_NUL = re.compile(r"(?<!\\)((?:\\\\)*)\\u0000")


def _cap_result(result: Any) -> Any:
    """Return the result as data every database stores, replaced by a note when it is too large.

    NaN and infinities (not JSON) and anything else JSON cannot express are stored as the
    result's repr; NUL characters, which PostgreSQL refuses, are dropped.
    """
    if result is None:
        return None
    try:
        text = json.dumps(result, cls=DjangoJSONEncoder, allow_nan=False)
    except (TypeError, ValueError, RecursionError):
        text = json.dumps(repr(result))
    text = _JSON_NUL.sub(r"\1", text)
    limit = get("RESULT_MAX_BYTES")
    if len(text) > limit:
        return {"truncated": True, "size_bytes": len(text), "preview": text[: min(limit, 2000)]}
    return json.loads(text)


def _format_error(exc: BaseException) -> str:
    limit = get("ERROR_MAX_CHARS")
    message = f"{type(exc).__name__}: {exc}"
    trace = "".join(traceback.format_exception(exc))
    text = f"{message}\n\n{trace}".replace("\x00", "")  # PostgreSQL refuses NUL in text
    if len(text) > limit:
        text = text[: limit // 2] + "\n[... traceback truncated ...]\n" + text[-limit // 2 :]
    return text


def execute(run: JobRun, *, clock: Callable[[], datetime] = timezone.now) -> Outcome:
    """Run the job's executor for `run` and return the outcome; never raises.

    The executor bounds its waits by `run.deadline` (see executors.base.seconds_left); when
    that runs out inside it, the run is timed out, as when the engine's clock stops it.
    """
    try:
        result = get_executor(run.job.job_type).execute(run)
    except UnknownJobType:
        return Outcome(
            run, JobRun.Status.FAILED, clock(), error=f"unknown job type {run.job.job_type!r} on this scheduler"
        )
    except RunTimedOut as exc:
        return _without_unsafe_retry(Outcome(run, JobRun.Status.TIMED_OUT, clock(), error=_format_error(exc)))
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - any failure of user code is the run's failure
        logger.error(
            "run raised job=%s run=%s",
            run.job_id,
            run.pk,
            exc_info=exc,
            extra={"job_id": run.job_id, "run_id": run.pk},
        )
        outcome = Outcome(
            run, JobRun.Status.FAILED, clock(), error=_format_error(exc), maybe_done=isinstance(exc, OutcomeUnknown)
        )
        return _without_unsafe_retry(outcome)
    return Outcome(run, JobRun.Status.SUCCEEDED, clock(), result=_cap_result(result))


def timed_out(run: JobRun, now: datetime) -> Outcome:
    """The outcome of a run that overran its job's timeout while its thread goes on."""
    return _without_unsafe_retry(
        Outcome(
            run,
            JobRun.Status.TIMED_OUT,
            now,
            error=f"timed out after {run.job.timeout_seconds}s; its slot was freed",
            lingering=True,
        )
    )


def record_late_ends(ends: list[Outcome]) -> None:
    """Store when the threads of timed-out runs ended, and how, on their rows.

    Until then a run is `timed_out` without `finished_at`, and its job counts as running for
    overlap_policy=forbid. Fenced like any write-back: only the scheduler that ran it writes.
    """
    for late in ends:
        run = late.run
        how = "succeeded; its result was not kept" if late.status == JobRun.Status.SUCCEEDED else late.error
        note = (
            f"\n\nits code ended at {late.finished_at:%Y-%m-%d %H:%M:%S} UTC, after the timeout: {how.splitlines()[0]}"
        )
        JobRun.objects.filter(
            pk=run.pk, status=JobRun.Status.TIMED_OUT, finished_at__isnull=True, worker_id=run.worker_id
        ).update(finished_at=late.finished_at, error=Concat(F("error"), Value(note[:1000])))


def safe_to_repeat(job: Job) -> bool:
    """Whether the job's type says running its work twice for one fire does no harm."""
    try:
        return get_executor(job.job_type).is_safe_to_repeat(job)
    except UnknownJobType:
        return False


def _repeat_unsafe(outcome: Outcome) -> bool:
    """A timed-out run, or one whose work may have been done, of a type not safe to repeat."""
    uncertain = outcome.status == JobRun.Status.TIMED_OUT or outcome.maybe_done
    return uncertain and not safe_to_repeat(outcome.run.job)


def _without_unsafe_retry(outcome: Outcome) -> Outcome:
    """Say on the run why it is not retried although retries are left."""
    if outcome.run.attempt <= outcome.run.job.max_retries and _repeat_unsafe(outcome):
        outcome.error = (
            f"not retried: a {outcome.run.job.job_type} run is not safe to repeat, and this one may have "
            f"done its work before it {'timed out' if outcome.status == JobRun.Status.TIMED_OUT else 'failed'}\n"
            f"{outcome.error}"
        )
    return outcome


def retry_delay(job: Job, attempt: int, *, rng: random.Random | None = None) -> float:
    """Seconds before retry number `attempt` (1 = first retry): exponential backoff with jitter."""
    base = job.retry_backoff_seconds * (2 ** (attempt - 1))
    base = min(base, 24 * 3600)
    # Full jitter on the upper half keeps retries of many jobs from arriving together.
    return base / 2 + (rng or random).uniform(0, base / 2)


def _field(model: type[Job] | type[JobRun], name: str) -> Field[Any, Any]:
    field = model._meta.get_field(name)
    assert isinstance(field, Field)
    return field


_OUTCOME_COLUMNS = "run_id, new_status, new_finished_at, new_result, new_error"


def _result_json(outcome: Outcome) -> str | None:
    """The result as the JSON text both databases store (SQL NULL for no result, as the ORM does)."""
    return None if outcome.result is None else json.dumps(outcome.result)


def _outcome_values(outcomes: list[Outcome]) -> tuple[str, list[Any]]:
    """SQLite: `VALUES` rows of (run id, status, finished_at, result, error), adapted as the
    ORM would store them (the result as JSON text, as on PostgreSQL)."""
    adapt = connection.ops.adapt_datetimefield_value
    params: list[Any] = []
    for outcome in outcomes:
        params += [
            outcome.run.pk,
            str(outcome.status),
            adapt(outcome.stored_finished_at),
            _result_json(outcome),
            outcome.error,
        ]
    return ", ".join(["(%s, %s, %s, %s, %s)"] * len(outcomes)), params


def _finish_sql() -> str:
    """The fenced UPDATE of runs from the `outcome` rows; it returns what each job's last run needs."""
    runs_table = connection.ops.quote_name(JobRun._meta.db_table)
    return (
        f"UPDATE {runs_table} SET status = outcome.new_status, finished_at = outcome.new_finished_at, "
        "result = outcome.new_result, error = outcome.new_error FROM outcome "
        f"WHERE id = outcome.run_id AND status = '{JobRun.Status.RUNNING}' AND worker_id = %s "
        "RETURNING id, job_id, COALESCE(started_at, finished_at) AS started_at, status"
    )


# From `recorded` (the runs just written: id, job_id, started_at, status), each job's latest
# run, and the UPDATE that shows it on the job; an older run never overwrites a newer one.
_LATEST = (
    "latest AS (SELECT job_id, started_at, status FROM recorded AS run WHERE NOT EXISTS "
    "(SELECT 1 FROM recorded AS later WHERE later.job_id = run.job_id AND (later.started_at > run.started_at "
    "OR (later.started_at = run.started_at AND later.id > run.id))))"
)


def _show_latest_sql() -> str:
    jobs_table = connection.ops.quote_name(Job._meta.db_table)
    return (
        f"UPDATE {jobs_table} AS job SET last_run_at = latest.started_at, last_run_status = latest.status "
        "FROM latest WHERE job.id = latest.job_id "
        "AND (job.last_run_at IS NULL OR job.last_run_at <= latest.started_at)"
    )


@functools.cache
def _unnest_outcomes(vendor: str) -> str:
    """PostgreSQL: `SELECT` of the outcome rows from one array parameter per column."""
    del vendor  # part of the cache key: the column types are the database's
    fields = [_field(JobRun, name) for name in ("status", "finished_at", "result", "error")]
    # The results go as JSON text: a text[] parameter, cast to the column's type in the query.
    arrays = ["CAST(%s AS bigint[])"] + [
        f"CAST(CAST(%s AS text[]) AS {field.db_type(connection)}[])"
        if field.name == "result"
        else f"CAST(%s AS {field.db_type(connection)}[])"
        for field in fields
    ]
    return f"SELECT * FROM unnest({', '.join(arrays)})"


def _outcome_arrays(outcomes: list[Outcome]) -> tuple[str, list[Any]]:
    """PostgreSQL: the outcome rows as one array per column, unnested into rows.

    The statement's text is the same whatever the number of outcomes, so it can be prepared
    once per connection (`claiming.record_and_claim`).
    """
    params: list[Any] = [
        [outcome.run.pk for outcome in outcomes],
        [outcome.status for outcome in outcomes],
        [outcome.stored_finished_at for outcome in outcomes],
        [_result_json(outcome) for outcome in outcomes],  # the cast to jsonb[] parses it
        [outcome.error for outcome in outcomes],
    ]
    return _unnest_outcomes(connection.vendor), params


def write_back_ctes(outcomes: list[Outcome], *, worker_id: int) -> tuple[str, list[Any]]:
    """PostgreSQL: common table expressions that write `outcomes` back, fenced, and show each
    job's latest run on the job; the ids of the runs written are in the one named `recorded`.

    Data-modifying CTEs run to completion whatever the statement selects, so the engine can
    put a claim in the same statement (`claiming.record_and_claim`). The outcomes are passed
    as arrays, so the text does not depend on how many there are (none is fine).
    """
    rows, params = _outcome_arrays(outcomes)
    sql = (
        f"outcome ({_OUTCOME_COLUMNS}) AS ({rows}), recorded AS ({_finish_sql()}), "
        f"{_LATEST}, shown AS ({_show_latest_sql()} RETURNING job.id)"
    )
    return sql, [*params, worker_id]


def _finish_runs(outcomes: list[Outcome], worker_id: int) -> set[int]:
    """Write the outcomes with one fenced UPDATE and show each job's latest run on the job;
    return the ids of the runs written.

    PostgreSQL does both in one statement (one round trip); SQLite, which has no data-modifying
    CTEs, feeds the rows the first UPDATE returns into a second.
    """
    if connection.vendor == "postgresql":
        ctes, params = write_back_ctes(outcomes, worker_id=worker_id)
        with connection.cursor() as cursor:
            cursor.execute(f"WITH {ctes} SELECT id FROM recorded", params)
            return {row[0] for row in cursor.fetchall()}
    values, params = _outcome_values(outcomes)
    with connection.cursor() as cursor:
        cursor.execute(f"WITH outcome ({_OUTCOME_COLUMNS}) AS (VALUES {values}) {_finish_sql()}", [*params, worker_id])
        recorded = cursor.fetchall()
        if recorded:
            rows = ", ".join(["(%s, %s, %s, %s)"] * len(recorded))
            cursor.execute(
                f"WITH recorded (id, job_id, started_at, status) AS (VALUES {rows}), {_LATEST} {_show_latest_sql()}",
                [value for row in recorded for value in row],
            )
    return {row[0] for row in recorded}


def accepted_outcomes(outcomes: list[Outcome], recorded: set[int]) -> list[Outcome]:
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


# What a write-back raises when the database refuses a value (rather than going away): psycopg2
# raises ValueError for a NUL in a string before sending anything.
REFUSED_VALUES = (DataError, IntegrityError, ValueError)


def record_one_by_one(outcomes: list[Outcome], *, worker_id: int) -> list[Outcome]:
    """Write outcomes one at a time; one the database refuses is written as a failure saying why.

    The engine falls back to this when a batch write is refused, so that one unstorable result
    cannot block every other outcome, and the scheduler, for good.
    """
    accepted: list[Outcome] = []
    for outcome in outcomes:
        try:
            with transaction.atomic():
                accepted += record_outcomes([outcome], worker_id=worker_id)
        except REFUSED_VALUES as exc:
            logger.error(
                "outcome refused by the database job=%s run=%s status=%s: %s",
                outcome.run.job_id,
                outcome.run.pk,
                outcome.status,
                exc,
                extra={"job_id": outcome.run.job_id, "run_id": outcome.run.pk},
            )
            note = f"the run ended {outcome.status}, but the database refused its outcome: {type(exc).__name__}: {exc}"
            refused = Outcome(outcome.run, JobRun.Status.FAILED, outcome.finished_at, error=note.replace("\x00", ""))
            with transaction.atomic():
                accepted += record_outcomes([refused], worker_id=worker_id)
    return accepted


def wants_retry(outcome: Outcome) -> bool:
    """Whether a retry is due for this outcome: a failure with attempts left, which may be
    repeated (a timed-out run, or one that may have done its work, only if its type is safe
    to repeat)."""
    failed = outcome.status in (JobRun.Status.FAILED, JobRun.Status.TIMED_OUT)
    return failed and outcome.run.attempt <= outcome.run.job.max_retries and not _repeat_unsafe(outcome)


def record_outcomes(outcomes: Iterable[Outcome], *, worker_id: int) -> list[Outcome]:
    """Write outcomes back in one transaction; return those that were accepted.

    Each write is fenced: it only lands while the run is still `running` on this worker, so a
    scheduler that was presumed dead (its runs marked lost and retried) cannot overwrite them.
    A batch is one statement on PostgreSQL and two on SQLite (the runs, then their jobs' last
    run), plus one to queue retries. Inside an outer transaction (on SQLite the engine claims the
    next runs in the same one) no savepoint is made.
    """
    outcomes = list(outcomes)
    if not outcomes:
        return []
    retry = [outcome for outcome in outcomes if wants_retry(outcome)]
    one_statement = connection.vendor == "postgresql" and not retry
    # A single statement is atomic by itself: no transaction, so no BEGIN and COMMIT round trips.
    with nullcontext() if one_statement else transaction.atomic(savepoint=False):
        finished = _finish_runs(outcomes, worker_id)
        accepted = accepted_outcomes(outcomes, finished)
        retries = [
            JobRun(
                job=outcome.run.job,
                scheduled_for=outcome.run.scheduled_for,
                attempt=outcome.run.attempt + 1,
                trigger=JobRun.Trigger.RETRY,
                not_before=outcome.finished_at + timedelta(seconds=retry_delay(outcome.run.job, outcome.run.attempt)),
            )
            for outcome in retry
            if outcome.run.pk in finished
        ]
        if retries:
            JobRun.objects.bulk_create(retries, ignore_conflicts=True)
    return accepted
