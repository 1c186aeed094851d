"""Firing due jobs, claiming runs, and recovering lost ones (jobs/scheduler/store/)."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import pytest
from django.db import connection, connections

from jobs.models import Job, JobRun, SchedulerProcess
from jobs.scheduler.firing import BROKEN_SCHEDULE_RETRY
from jobs.scheduler.store import RunStore, get_store
from jobs.scheduler.store.rows import QUEUE_INDEX

if TYPE_CHECKING:
    from jobs.scheduler.store.postgres import PostgresStore


def store() -> RunStore:
    return get_store()


def pg_store() -> PostgresStore:
    from jobs.scheduler.store.postgres import PostgresStore

    found = get_store()
    assert isinstance(found, PostgresStore)
    return found


def _worker(now, **fields):
    fields.setdefault("last_heartbeat_at", now)
    fields.setdefault("hostname", "test")
    fields.setdefault("pid", 1)
    return SchedulerProcess.objects.create(started_at=now, **fields)


def _runs(job):
    return list(job.runs.order_by("scheduled_for", "attempt").values_list("scheduled_for", "status", "missed_fires"))


@pytest.mark.parametrize(
    ("policy", "expected_status"),
    [("run_once", JobRun.Status.QUEUED), ("skip", JobRun.Status.SKIPPED)],
)
def test_downtime_follows_the_misfire_policy(make_job, now, policy, expected_status):
    # Hourly job; the scheduler was down from 08:30 to 12:00 + 10 minutes.
    job = make_job(now=now - timedelta(hours=3, minutes=30), cron="0 * * * *", misfire_policy=policy)
    assert job.next_run_at == now - timedelta(hours=3)
    later = now + timedelta(minutes=10)
    report = store().fire_due_jobs(now=later)
    assert report.jobs == 1
    # 09:00, 10:00, 11:00 and 12:00 were missed: one row stands for all four.
    assert _runs(job) == [(now, expected_status, 3)]
    job.refresh_from_db()
    assert job.next_run_at == now + timedelta(hours=1)  # scheduling goes on
    if policy == "skip":
        assert "4 fire(s) missed" in job.runs.get().skip_reason


def test_fires_within_grace_all_run(make_job, now):
    job = make_job(now=now - timedelta(seconds=10), cron="* * * * * *", overlap_policy="allow")
    store().fire_due_jobs(now=now)
    # Every second from now-9s to now, each a run of its own (all within the 60 s grace).
    assert [row[0] for row in _runs(job)] == [now - timedelta(seconds=s) for s in range(9, -1, -1)]
    assert {row[1] for row in _runs(job)} == {"queued"}


def test_late_fires_beside_on_time_fires_are_counted_on_the_run_that_executes(make_job, now):
    job = make_job(now=now - timedelta(seconds=10), cron="* * * * * *", overlap_policy="allow", misfire_grace_seconds=3)
    store().fire_due_jobs(now=now)
    # -9..-4 are late (more than 3 s): run_once folds them into the first on-time run; -3..0 run.
    assert _runs(job) == [(now - timedelta(seconds=3), "queued", 6)] + [
        (now - timedelta(seconds=s), "queued", 0) for s in (2, 1, 0)
    ]


def test_late_fires_beside_on_time_fires_under_skip_get_a_skipped_row(make_job, now):
    job = make_job(
        now=now - timedelta(seconds=10),
        cron="* * * * * *",
        overlap_policy="allow",
        misfire_grace_seconds=3,
        misfire_policy="skip",
    )
    store().fire_due_jobs(now=now)
    rows = _runs(job)
    # -9..-4 are late: one skipped row for the latest of them says how many; -3..0 run.
    assert rows[0] == (now - timedelta(seconds=4), "skipped", 5)
    assert rows[1:] == [(now - timedelta(seconds=s), "queued", 0) for s in (3, 2, 1, 0)]


def test_fires_due_together_under_forbid_run_the_latest_and_say_why_the_others_did_not(make_job, now):
    """An outage shorter than the grace: nothing was running, so the earlier fires are not
    "overlap: the previous run is still active" but coalesced into the latest one."""
    job = make_job(now=now - timedelta(seconds=5), cron="* * * * * *")  # forbid, grace 60 s
    store().fire_due_jobs(now=now)
    rows = list(job.runs.order_by("scheduled_for").values_list("scheduled_for", "status", "skip_reason"))
    assert [row[:2] for row in rows] == [(now - timedelta(seconds=s), "skipped") for s in (4, 3, 2, 1)] + [
        (now, "queued")
    ]
    assert all(row[2].startswith("coalesced: 5 fires came due together (4s behind)") for row in rows[:-1])
    assert not any(row[2].startswith("overlap") for row in rows)


def test_a_long_outage_puts_the_missed_count_on_the_catch_up_run_that_executes(make_job, now):
    """Missed beyond the grace and some within it, under forbid: the run that executes is the
    latest on-time fire, and it carries the missed count (not a skipped row)."""
    job = make_job(now=now - timedelta(seconds=100), cron="* * * * * *", misfire_grace_seconds=10)
    store().fire_due_jobs(now=now)
    queued = job.runs.get(status="queued")
    assert (queued.scheduled_for, queued.missed_fires) == (now, 89)  # -99..-11 missed
    skipped = job.runs.filter(status="skipped")
    assert skipped.count() == 10 and all(run.missed_fires == 0 for run in skipped)  # -10..-1, coalesced
    assert all(run.skip_reason.startswith("coalesced") for run in skipped)


def test_overlap_forbid_skips_a_fire_while_a_run_is_active(make_job, now):
    job = make_job(now=now - timedelta(seconds=30))
    JobRun.objects.create(job=job, scheduled_for=now - timedelta(minutes=5), not_before=now, status="running")
    store().fire_due_jobs(now=now)
    fire = job.runs.get(scheduled_for=now)
    assert fire.status == "skipped" and fire.skip_reason.startswith("overlap")


def test_overlap_allow_queues_beside_an_active_run(make_job, now):
    job = make_job(now=now - timedelta(seconds=30), overlap_policy="allow")
    JobRun.objects.create(job=job, scheduled_for=now - timedelta(minutes=5), not_before=now, status="running")
    store().fire_due_jobs(now=now)
    assert job.runs.get(scheduled_for=now).status == "queued"


def test_a_fire_cannot_be_recorded_twice(make_job, now):
    job = make_job(now=now - timedelta(seconds=30))
    store().fire_due_jobs(now=now)
    # Put the schedule back as if a stale process had not seen the advance: no second row.
    Job.objects.filter(pk=job.pk).update(next_run_at=now)
    store().fire_due_jobs(now=now)
    assert job.runs.count() == 1


def test_plain_and_other_fires_in_one_batch_are_each_recorded_in_full(make_job, now):
    """Plain fires (one on-time run at the stored next_run_at) are inserted by the database from
    the job rows, the others with values of their own: both kinds land in full, in one batch."""
    from django.test.utils import CaptureQueriesContext

    plain = [make_job(now=now - timedelta(seconds=30), name=f"plain {i}") for i in range(3)]
    missed = make_job(now=now - timedelta(hours=3, minutes=30), cron="0 * * * *", name="missed")
    busy = make_job(now=now - timedelta(seconds=30), name="busy")
    JobRun.objects.create(job=busy, scheduled_for=now - timedelta(minutes=5), not_before=now, status="running")
    with CaptureQueriesContext(connection) as captured:
        report = store().fire_due_jobs(now=now)
    inserts = [query["sql"] for query in captured.captured_queries if query["sql"].startswith("INSERT")]
    assert len(inserts) == 2 and "SELECT id, next_run_at" in inserts[0] and "VALUES" in inserts[1]
    assert (report.jobs, report.queued, report.skipped) == (5, 4, 1)
    for job in plain:
        run = job.runs.get()
        assert (run.scheduled_for, run.not_before, run.trigger, run.attempt, run.status) == (
            now,
            now,
            "schedule",
            1,
            "queued",
        )
        assert (run.missed_fires, run.skip_reason, run.error, run.finished_at, run.result) == (0, "", "", None, None)
        assert run.started_at is None and run.worker_id is None and run.created_at is not None
        job.refresh_from_db()
        assert job.next_run_at == now + timedelta(minutes=1)
    # 09:00 to 11:00 missed, 12:00 on time: the run at 12:00 stands for the three.
    assert _runs(missed) == [(now, "queued", 3)]
    assert busy.runs.get(scheduled_for=now).status == "skipped"


def test_the_fire_reads_jobs_and_active_runs_through_their_partial_indexes(make_job, now):
    """Partial indexes are used only when the query's condition implies the index's: a change to
    either side (another status list, say) would turn each fire into a scan of the history."""
    from django.test.utils import CaptureQueriesContext

    make_job(now=now - timedelta(seconds=30))
    with CaptureQueriesContext(connection) as captured:
        store().fire_due_jobs(now=now)
    select = next(query["sql"] for query in captured.captured_queries if query["sql"].startswith("SELECT id, cron"))
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute("SET LOCAL enable_seqscan = off")  # an empty table would be scanned anyway
            cursor.execute(f"EXPLAIN {select}")
        else:
            cursor.execute(f"EXPLAIN QUERY PLAN {select}")
        plan = " ".join(str(row[-1]) for row in cursor.fetchall())
    assert "job_due_idx" in plan and "jobrun_active_idx" in plan, plan


def test_claim_takes_no_more_than_the_free_slots_and_never_twice(make_job, now):
    worker = _worker(now)
    for _ in range(5):
        make_job(now=now - timedelta(seconds=30), overlap_policy="allow")
    store().fire_due_jobs(now=now)
    first = store().claim_runs(worker_id=worker.pk, slots=2, now=now)
    second = store().claim_runs(worker_id=worker.pk, slots=10, now=now)
    assert len(first) == 2 and len(second) == 3
    assert not {run.pk for run in first} & {run.pk for run in second}
    assert store().claim_runs(worker_id=worker.pk, slots=10, now=now) == []
    assert JobRun.objects.filter(status="running", worker=worker).count() == 5


def test_claimed_runs_and_jobs_hold_exactly_what_the_orm_would_load(make_job, now):
    """The claim builds model instances from raw rows with its own fast converters; every field
    must equal what the ORM reads (aware datetimes in UTC, decoded JSON, booleans)."""
    worker = _worker(now)
    make_job(now=now - timedelta(seconds=30), job_type="test_sleep", parameters={"seconds": 0.5}, name="j")
    store().fire_due_jobs(now=now)
    (run,) = store().claim_runs(worker_id=worker.pk, slots=1, now=now + timedelta(microseconds=123456))
    fresh = JobRun.objects.select_related("job").get(pk=run.pk)
    for model_instance, orm_instance in ((run, fresh), (run.job, fresh.job)):
        for field in type(orm_instance)._meta.concrete_fields:
            claimed, loaded = getattr(model_instance, field.attname), getattr(orm_instance, field.attname)
            assert claimed == loaded and type(claimed) is type(loaded), field.name
            if hasattr(loaded, "tzinfo") and loaded is not None:
                assert claimed.utcoffset() == timedelta(0), field.name
    assert run.started_at == now + timedelta(microseconds=123456)


def test_claim_respects_not_before(make_job, now):
    worker = _worker(now)
    job = make_job(now=now, cron="0 0 1 1 *")
    JobRun.objects.create(job=job, scheduled_for=now, not_before=now + timedelta(seconds=5), trigger="retry", attempt=2)
    assert store().claim_runs(worker_id=worker.pk, slots=5, now=now) == []
    assert len(store().claim_runs(worker_id=worker.pk, slots=5, now=now + timedelta(seconds=5))) == 1


@contextlib.contextmanager
def _other_transaction(*statements: tuple[str, list[Any]], commit: bool = False) -> Iterator[threading.Event]:
    """Run `statements` in a transaction on a second connection and hold it open; yields the
    event that ends it (commit or rollback). The transaction is ended on leaving the block."""
    ready, end = threading.Event(), threading.Event()
    failed: list[BaseException] = []

    def hold() -> None:
        other = connections.create_connection("default")
        try:
            other.set_autocommit(False)
            with other.cursor() as cursor:
                for sql, params in statements:
                    cursor.execute(sql, params)
                ready.set()
                end.wait(10)
            if commit:
                other.commit()
            else:
                other.rollback()
        except BaseException as exc:  # noqa: BLE001 - reported to the test below
            failed.append(exc)
            ready.set()
        finally:
            other.close()

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert ready.wait(10) and not failed, failed
        yield end
    finally:
        end.set()
        holder.join()
    if failed:
        raise failed[0]


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_postgres_skips_a_run_locked_by_another_connection(make_job, now):
    worker = _worker(now)
    for _ in range(3):
        make_job(now=now - timedelta(seconds=30), overlap_policy="allow")
    store().fire_due_jobs(now=now)
    locked_id = JobRun.objects.order_by("not_before", "id").values_list("id", flat=True).first()
    with _other_transaction(("SELECT id FROM jobs_jobrun WHERE id = %s FOR UPDATE", [locked_id])):
        claimed = store().claim_runs(worker_id=worker.pk, slots=10, now=now)
        assert len(claimed) == 2
        assert locked_id not in {run.pk for run in claimed}
    # Once released, the skipped run is claimable.
    assert [run.pk for run in store().claim_runs(worker_id=worker.pk, slots=10, now=now)] == [locked_id]
    assert connection.vendor == "postgresql"


def test_a_scheduler_presumed_dead_claims_nothing(make_job, now):
    """Its runs are being recovered as lost under that identity: it must register anew first."""
    dead, alive = _worker(now, stopped_at=now), _worker(now)
    make_job(now=now - timedelta(seconds=30))
    store().fire_due_jobs(now=now)
    assert store().claim_runs(worker_id=dead.pk, slots=5, now=now) == []
    assert JobRun.objects.get().status == "queued"
    (run,) = store().claim_runs(worker_id=alive.pk, slots=5, now=now)
    assert run.worker_id == alive.pk


def test_a_scheduler_whose_heartbeat_is_stale_claims_nothing_so_no_claim_can_be_presumed_dead(make_job, now):
    """A claim needs a heartbeat fresher than half of LOST_AFTER_SECONDS (30 s here): a run it
    starts cannot be recovered as lost for at least 15 s, by which time it has heartbeaten."""
    stale = _worker(now, last_heartbeat_at=now - timedelta(seconds=16))
    fresh = _worker(now, last_heartbeat_at=now - timedelta(seconds=14))
    make_job(now=now - timedelta(seconds=30))
    store().fire_due_jobs(now=now)
    assert store().claim_runs(worker_id=stale.pk, slots=5, now=now) == []
    (run,) = store().claim_runs(worker_id=fresh.pk, slots=5, now=now)
    # The latest moment before its next heartbeat: nobody may take the run away yet.
    assert store().recover_lost_runs(now=now + timedelta(seconds=15.9), lost_after=30) == []
    run.refresh_from_db()
    assert run.status == "running" and run.worker_id == fresh.pk


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_postgres_a_claim_racing_crash_recovery_waits_for_it_and_then_claims_nothing(make_job, now):
    """Recovery has locked the scheduler's row and marked it stopped, not yet committed: a claim
    by that scheduler waits for the commit, then sees the row stopped (and claims nothing, so no
    run can be both recovered as lost and started under the old identity)."""
    worker = _worker(now)
    make_job(now=now - timedelta(seconds=30))
    store().fire_due_jobs(now=now)
    recovery = (
        ("SELECT id FROM jobs_schedulerprocess WHERE id = %s FOR UPDATE SKIP LOCKED", [worker.pk]),
        ("UPDATE jobs_schedulerprocess SET stopped_at = now() WHERE id = %s", [worker.pk]),
    )
    with _other_transaction(*recovery, commit=True) as commit:
        threading.Timer(0.5, commit.set).start()
        started = time.monotonic()
        assert store().claim_runs(worker_id=worker.pk, slots=5, now=now) == []
        assert time.monotonic() - started >= 0.4  # it waited for the recovery's commit
    assert SchedulerProcess.objects.get(pk=worker.pk).stopped_at is not None
    assert JobRun.objects.get().status == "queued"


@pytest.mark.parametrize(
    ("job_type", "max_retries", "retried"),
    [("test_sleep", 0, True), ("test_sleep", 3, True), ("test_sleep_unsafe", 3, False)],
)
def test_runs_of_a_dead_scheduler_become_lost_and_safe_ones_retry(make_job, now, job_type, max_retries, retried):
    dead = _worker(now, last_heartbeat_at=now - timedelta(seconds=31))
    alive = _worker(now)
    job = make_job(now=now, cron="0 0 1 1 *", job_type=job_type, max_retries=max_retries)
    lost = JobRun.objects.create(job=job, scheduled_for=now, not_before=now, status="running", worker=dead)
    kept = JobRun.objects.create(
        job=job, scheduled_for=now - timedelta(hours=1), not_before=now, status="running", worker=alive
    )
    recovered = store().recover_lost_runs(now=now, lost_after=30)
    assert [run.pk for run in recovered] == [lost.pk]
    lost.refresh_from_db()
    kept.refresh_from_db()
    assert lost.status == "lost" and "test:1 stopped" in lost.error
    # Its real last heartbeat, not `now - lost_after`.
    assert "last heartbeat 2026-06-01 11:59:29 UTC, 31s before it was marked stopped" in lost.error
    assert kept.status == "running"
    dead.refresh_from_db()
    assert dead.stopped_at == now
    retry = job.runs.filter(attempt=2).first()
    assert (retry is not None) == retried
    if retried:
        assert (retry.status, retry.trigger, retry.scheduled_for) == ("queued", "retry", now)
    job.refresh_from_db()
    assert job.last_run_status == "lost"


def test_a_dead_schedulers_lingering_runs_end_with_it_and_their_job_fires_again(make_job, now):
    dead = _worker(now, last_heartbeat_at=now - timedelta(seconds=31))
    alive = _worker(now)
    job = make_job(now=now - timedelta(minutes=1), cron="* * * * *", job_type="test_sleep")
    other = make_job(now=now - timedelta(minutes=1), cron="* * * * *", job_type="test_sleep", name="other")
    timed_out = {"status": "timed_out", "started_at": now - timedelta(minutes=5), "not_before": now}
    gone = JobRun.objects.create(job=job, scheduled_for=now - timedelta(minutes=5), worker=dead, **timed_out)
    still = JobRun.objects.create(job=other, scheduled_for=now - timedelta(minutes=5), worker=alive, **timed_out)
    store().recover_lost_runs(now=now, lost_after=30)
    gone.refresh_from_db()
    still.refresh_from_db()
    assert gone.finished_at == now and "ended when its scheduler stopped" in gone.error
    assert still.finished_at is None  # its scheduler lives: its thread may still run
    # The job whose thread died fires; the other still counts as running (overlap forbidden).
    store().fire_due_jobs(now=now)
    assert JobRun.objects.get(job=job, scheduled_for=now).status == "queued"
    fired = JobRun.objects.get(job=other, scheduled_for=now)
    assert fired.status == "skipped" and fired.skip_reason.startswith("overlap")


def test_a_lost_run_is_retried_only_once_when_max_retries_is_zero(make_job, now):
    dead = _worker(now, last_heartbeat_at=now - timedelta(seconds=60))
    job = make_job(now=now, cron="0 0 1 1 *", job_type="test_sleep")
    JobRun.objects.create(job=job, scheduled_for=now, attempt=2, not_before=now, status="running", worker=dead)
    store().recover_lost_runs(now=now, lost_after=30)
    assert not job.runs.filter(attempt=3).exists()


def test_claimed_runs_store_times_as_the_orm_does(make_job, now):
    # Raw SQL must store datetimes in the ORM's format, or exact and range filters would miss.
    worker = _worker(now)
    job = make_job(now=now - timedelta(seconds=30), overlap_policy="allow")
    store().fire_due_jobs(now=now)
    [run] = store().claim_runs(worker_id=worker.pk, slots=5, now=now)
    assert JobRun.objects.filter(pk=run.pk, started_at=now, status="running").exists()
    assert JobRun.objects.filter(pk=run.pk, scheduled_for=run.scheduled_for, not_before__lte=now).exists()
    job.refresh_from_db()
    assert Job.objects.filter(pk=job.pk, next_run_at=job.next_run_at, next_run_at__gt=now).exists()
    assert run.started_at == now and run.job.pk == job.pk and run.worker_id == worker.pk


@pytest.mark.postgres
def test_postgres_records_outcomes_and_claims_in_one_statement(make_job, now):
    from django.test.utils import CaptureQueriesContext

    from jobs.scheduler import runner

    worker = _worker(now)
    jobs = [make_job(now=now - timedelta(seconds=30), overlap_policy="allow", name=f"j{i}") for i in range(5)]
    store().fire_due_jobs(now=now)
    first = store().claim_runs(worker_id=worker.pk, slots=3, now=now)
    # The third was presumed lost meanwhile: the fence must refuse its outcome.
    JobRun.objects.filter(pk=first[2].pk).update(status="lost")
    later = now + timedelta(seconds=2)
    outcomes = [
        runner.Outcome(first[0], "succeeded", later, result={"n": 1}),
        runner.Outcome(first[1], "failed", later, error="boom"),
        runner.Outcome(first[2], "succeeded", later),
    ]
    with CaptureQueriesContext(connection) as captured:
        recorded, claimed = pg_store().record_and_claim(outcomes, worker_id=worker.pk, slots=5, now=later)
    assert len(captured.captured_queries) == 1
    assert recorded == {first[0].pk, first[1].pk}
    assert len(claimed) == 2 and {run.job_id for run in claimed} <= {job.pk for job in jobs}
    assert all(run.status == "running" and run.started_at == later and run.job.pk == run.job_id for run in claimed)
    rows = {run.pk: run for run in JobRun.objects.all()}
    assert (rows[first[0].pk].status, rows[first[0].pk].result) == ("succeeded", {"n": 1})
    assert (rows[first[1].pk].status, rows[first[1].pk].error) == ("failed", "boom")
    assert rows[first[2].pk].status == "lost"
    assert Job.objects.get(pk=first[1].job_id).last_run_status == "failed"
    # Nothing left to claim: the ids written still come back.
    done = [runner.Outcome(run, "succeeded", later) for run in claimed]
    recorded, claimed = pg_store().record_and_claim(done, worker_id=worker.pk, slots=5, now=later)
    assert recorded == {outcome.run.pk for outcome in done} and claimed == []


def _prepared_statements() -> list[str]:
    with connection.cursor() as cursor:
        cursor.execute("SELECT name FROM pg_prepared_statements")
        return [row[0] for row in cursor.fetchall()]


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_postgres_prepares_the_pass_once_and_prepares_again_when_the_session_lost_it(make_job, now):
    """Outside a transaction (as in the engine) the pass is a prepared statement; every kind of
    result goes through its JSON parameter; a session reset (DISCARD ALL, a pooler) is survived."""
    from django.test.utils import CaptureQueriesContext

    from jobs.scheduler import runner

    worker = _worker(now)
    for i in range(8):
        make_job(now=now - timedelta(seconds=30), overlap_policy="allow", name=f"j{i}")
    store().fire_due_jobs(now=now)
    later = now + timedelta(seconds=1)
    held = store().claim_runs(worker_id=worker.pk, slots=2, now=now)
    results = [{"rows": 3, "note": "naïve ☃"}, "text", [1, 2.5, None], None, 7, {"nested": {"a": [True]}}]
    written = {}
    for number, result in enumerate(results):
        outcomes = [runner.Outcome(held[0], "succeeded", later, result=result)]
        outcomes.append(runner.Outcome(held[1], "failed", later, error=f"boom {number}"))
        written.update({held[0].pk: result, held[1].pk: None})
        if number == 3:
            with connection.cursor() as cursor:
                cursor.execute("DEALLOCATE ALL")  # what DISCARD ALL or a new server session does
        with CaptureQueriesContext(connection) as captured:
            recorded, held = pg_store().record_and_claim(outcomes, worker_id=worker.pk, slots=2, now=later)
        statements = [query["sql"].split()[0] for query in captured.captured_queries]
        if number == 0:  # prepared here, unless an earlier test on this connection did
            assert statements in (["PREPARE", "EXECUTE"], ["EXECUTE"])
        elif number == 3:  # the session lost it: refused, prepared again, run
            assert statements == ["EXECUTE", "PREPARE", "EXECUTE"]
        else:
            assert statements == ["EXECUTE"]
        assert recorded == {outcome.run.pk for outcome in outcomes}
        if number < 3:
            assert len(held) == 2
        else:
            break
    assert len(_prepared_statements()) == 1
    stored = dict(JobRun.objects.filter(pk__in=written).values_list("pk", "result"))
    assert stored == written


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_postgres_prepares_again_when_a_migration_changed_a_column_under_the_statement(make_job, now):
    """A column of the result changing type makes the prepared plan stale (SQLSTATE 0A000): the
    statement is deallocated and prepared again, and the pass goes through."""
    from django.test.utils import CaptureQueriesContext

    worker = _worker(now)
    for i in range(2):
        make_job(now=now - timedelta(seconds=30), overlap_policy="allow", name=f"j{i}")
    store().fire_due_jobs(now=now)

    def claim_one() -> list[str]:
        with CaptureQueriesContext(connection) as captured:
            _, held = pg_store().record_and_claim([], worker_id=worker.pk, slots=1, now=now)
        assert len(held) == 1
        return [query["sql"].split()[0] for query in captured.captured_queries]

    claim_one()  # prepared (here or by an earlier test on this connection)
    table = connection.ops.quote_name(Job._meta.db_table)
    with connection.cursor() as cursor:
        cursor.execute(f"ALTER TABLE {table} ALTER COLUMN name TYPE text")
    try:
        assert claim_one() == ["EXECUTE", "DEALLOCATE", "PREPARE", "EXECUTE"]
    finally:
        with connection.cursor() as cursor:
            cursor.execute(f"ALTER TABLE {table} ALTER COLUMN name TYPE varchar(200)")
    assert JobRun.objects.filter(status="running").count() == 2


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_postgres_goes_back_to_plain_statements_when_prepared_ones_keep_vanishing(make_job, now, caplog):
    """Behind a pooler in transaction mode each statement may reach another server session."""
    worker = _worker(now)
    make_job(now=now - timedelta(seconds=30), overlap_policy="allow")
    store().fire_due_jobs(now=now)

    def forget_before_execute(execute, sql, params, many, context):
        if sql.startswith("EXECUTE"):
            with connection.connection.cursor() as cursor:
                cursor.execute("DEALLOCATE ALL")
        return execute(sql, params, many, context)

    from jobs.scheduler import runner

    with connection.execute_wrapper(forget_before_execute):
        recorded, held = pg_store().record_and_claim([], worker_id=worker.pk, slots=1, now=now)
    assert recorded == set() and len(held) == 1
    assert "using plain statements" in caplog.text
    # From then on this connection sends the statement as it is.
    from django.test.utils import CaptureQueriesContext

    with CaptureQueriesContext(connection) as captured:
        pg_store().record_and_claim(
            [runner.Outcome(held[0], "succeeded", now)],
            worker_id=worker.pk,
            slots=1,
            now=now,
        )
    assert [query["sql"].split()[0] for query in captured.captured_queries] == ["WITH"]
    assert JobRun.objects.get().status == "succeeded"


def test_a_job_whose_schedule_cannot_be_computed_is_skipped_alone_and_tried_again(make_job, now, caplog):
    broken = make_job(now=now - timedelta(seconds=30), name="broken")
    healthy = make_job(now=now - timedelta(seconds=30), name="healthy")
    due_at = broken.next_run_at
    # Past the services' validation, as a raw UPDATE or a time zone missing from tzdata would be.
    Job.objects.filter(pk=broken.pk).update(timezone="Mars/Olympus_Mons")
    report = store().fire_due_jobs(now=now)
    assert report.queued == 1 and JobRun.objects.get(status="queued").job_id == healthy.pk
    skipped = JobRun.objects.get(job=broken)
    assert (skipped.status, skipped.scheduled_for) == ("skipped", due_at)
    assert "schedule cannot be computed" in skipped.skip_reason and "Mars/Olympus_Mons" in skipped.skip_reason
    broken.refresh_from_db()
    assert broken.next_run_at == now + BROKEN_SCHEDULE_RETRY
    assert f"job {broken.pk} not fired" in caplog.text
    # Not due again before then, so it cannot weigh on the passes in between.
    assert store().fire_due_jobs(now=now + timedelta(minutes=1)).jobs == 1


def test_the_runs_table_has_exactly_the_indexes_the_scheduler_needs(db):
    """Every index on the runs table costs each update of a run; only these should be there
    (the primary key, the one-run-per-fire constraint, the partial indexes of JobRun.Meta, and the
    history index the API's run lists and the metrics page through; see migration 0006 for what
    it costs)."""
    with connection.cursor() as cursor:
        constraints = connection.introspection.get_constraints(cursor, JobRun._meta.db_table)
    indexes = {
        name: info["columns"]
        for name, info in constraints.items()
        if (info["index"] or info["unique"]) and not info["primary_key"]
    }
    assert indexes == {
        "jobrun_one_per_fire": ["job_id", "scheduled_for", "attempt"],
        "jobrun_queue_idx": ["not_before", "id"],
        "jobrun_running_idx": ["worker_id"],
        "jobrun_active_idx": ["job_id"],
        # Holds only timed-out runs whose thread still runs: none on the hot path.
        "jobrun_lingering_idx": ["job_id"],
        "jobrun_trouble_idx": ["scheduled_for"],
        # Columns set once, when the run is written: GET /runs pages through it by keyset.
        "jobrun_history_idx": ["scheduled_for", "id"],
    }


def _queued(job, at, **fields):
    fields.setdefault("trigger", "schedule")
    return JobRun.objects.create(job=job, scheduled_for=at, not_before=at, status="queued", **fields)


def test_a_queued_run_past_its_grace_is_skipped_under_skip(make_job, now):
    """Queued before every scheduler stopped, found 10 minutes later: `skip` skips it rather than
    running it late, and the job's on-time fire is not skipped as overlapping it."""
    job = make_job(now=now - timedelta(minutes=1), cron="* * * * *", misfire_policy="skip", misfire_grace_seconds=60)
    stale = _queued(job, now - timedelta(minutes=10))
    fresh = _queued(
        make_job(now=now, cron="0 0 1 1 *", misfire_policy="skip", name="fresh"), now - timedelta(seconds=59)
    )
    report = store().fire_due_jobs(now=now)
    stale.refresh_from_db()
    assert (stale.status, stale.finished_at) == ("skipped", now)
    assert stale.skip_reason == "misfire: not started within the grace (60s) after it was due"
    assert JobRun.objects.get(pk=fresh.pk).status == "queued"  # within its grace
    assert job.runs.get(scheduled_for=now).status == "queued"  # not "overlap"
    assert report.expired == 1


def test_a_stale_queued_run_under_run_once_gives_way_to_a_later_fire(make_job, now):
    job = make_job(now=now - timedelta(minutes=1), cron="* * * * *", misfire_grace_seconds=60)
    stale = _queued(job, now - timedelta(minutes=10))
    store().fire_due_jobs(now=now)
    stale.refresh_from_db()
    assert stale.status == "skipped" and "a later fire of the job runs instead" in stale.skip_reason
    assert job.runs.get(scheduled_for=now).status == "queued"


def test_a_stale_queued_run_under_run_once_runs_late_when_nothing_later_stands_for_it(make_job, now):
    job = make_job(now=now, cron="0 0 1 1 *", misfire_grace_seconds=60)
    older = _queued(job, now - timedelta(minutes=20))
    newest = _queued(job, now - timedelta(minutes=10))
    manual = _queued(job, now - timedelta(minutes=30), trigger="manual", attempt=1)
    store().fire_due_jobs(now=now)
    assert JobRun.objects.get(pk=older.pk).status == "skipped"  # the newest stands for it
    assert JobRun.objects.get(pk=newest.pk).status == "queued"  # the catch-up
    assert JobRun.objects.get(pk=manual.pk).status == "queued"  # someone asked for it


def test_looking_for_stale_queued_runs_reads_the_queue_index(make_job, now):
    from django.test.utils import CaptureQueriesContext

    make_job(now=now - timedelta(seconds=30))
    with CaptureQueriesContext(connection) as captured:
        store().fire_due_jobs(now=now)
    select = (
        captured.captured_queries[0]["sql"]
        if connection.vendor == "sqlite"
        else next(query["sql"] for query in captured.captured_queries if "AS run" in query["sql"])
    )
    assert "AS later" in select
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute("SET LOCAL enable_seqscan = off")
            cursor.execute(f"EXPLAIN {select.replace(' FOR UPDATE OF run SKIP LOCKED', '')}")
        else:
            cursor.execute(f"EXPLAIN QUERY PLAN {select}")
        plan = " ".join(str(row[-1]) for row in cursor.fetchall())
    assert QUEUE_INDEX in plan, plan


@pytest.mark.sqlite
def test_a_silent_scheduler_whose_process_is_alive_on_this_host_is_not_presumed_dead(make_job, now, caplog):
    """SQLite: paused (SIGSTOP) or blocked by a held write lock, a scheduler on this host stops
    heartbeating but its process is there. A pid reused by a later process, or another host's
    pid, is no such evidence."""
    import os
    import socket
    import subprocess

    from django.utils import timezone

    here = socket.gethostname()
    silent = now - timedelta(seconds=31)
    real_now = timezone.now()  # process start times are real
    child = subprocess.Popen(["sleep", "30"])
    try:
        alive = _worker(now, hostname=here, pid=child.pid, last_heartbeat_at=silent)
        SchedulerProcess.objects.filter(pk=alive.pk).update(started_at=real_now + timedelta(seconds=5))
        reused = _worker(now, hostname=here, pid=os.getpid(), last_heartbeat_at=silent)
        SchedulerProcess.objects.filter(pk=reused.pk).update(started_at=real_now - timedelta(days=400))
        elsewhere = _worker(now, hostname="another-host", pid=child.pid, last_heartbeat_at=silent)
        job = make_job(now=now, cron="0 0 1 1 *", job_type="test_sleep")
        runs = {
            worker.pk: JobRun.objects.create(
                job=job, scheduled_for=now - timedelta(minutes=i), not_before=now, status="running", worker=worker
            )
            for i, worker in enumerate((alive, reused, elsewhere))
        }
        store().recover_lost_runs(now=now, lost_after=30)
        status = {pk: JobRun.objects.get(pk=run.pk).status for pk, run in runs.items()}
        assert status == {alive.pk: "running", reused.pk: "lost", elsewhere.pk: "lost"}
        assert SchedulerProcess.objects.get(pk=alive.pk).stopped_at is None
        assert f"process {child.pid} is still running on this host" in caplog.text
    finally:
        child.kill()
        child.wait()


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_a_silent_scheduler_holding_its_liveness_lock_is_not_presumed_dead(make_job, now):
    """PostgreSQL: a scheduler whose session lives (paused, or its heartbeat held up) holds its
    advisory lock; only once the session ends is it presumed dead."""

    silent = _worker(now, last_heartbeat_at=now - timedelta(seconds=31))
    job = make_job(now=now, cron="0 0 1 1 *", job_type="test_sleep")
    run = JobRun.objects.create(job=job, scheduled_for=now, not_before=now, status="running", worker=silent)

    def hold_in_another_session(release: threading.Event, held: threading.Event) -> None:
        try:
            store().hold_liveness(silent.pk, lost_after=30)
            with connection.cursor() as cursor:
                cursor.execute("SELECT setting FROM pg_settings WHERE name LIKE 'tcp_keepalives_%%' ORDER BY name")
                keepalives.extend(cursor.fetchall())
            held.set()
            release.wait(30)
        finally:
            connections.close_all()  # the session ends: the server frees the lock

    release, held = threading.Event(), threading.Event()
    keepalives: list[tuple[str]] = []
    thread = threading.Thread(target=hold_in_another_session, args=(release, held))
    thread.start()
    try:
        assert held.wait(10)
        # Its session's keepalives end it within 2/3 of lost_after should its host vanish.
        assert keepalives == [("3",), ("10",), ("3",)]
        assert store().recover_lost_runs(now=now, lost_after=30) == []
        assert JobRun.objects.get(pk=run.pk).status == "running"
    finally:
        release.set()
        thread.join(10)
    assert [lost.pk for lost in store().recover_lost_runs(now=now, lost_after=30)] == [run.pk]
