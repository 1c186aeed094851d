"""The engine after faults, driven in-process: database errors, other schedulers' silence, clocks.

The same faults with real processes and a database of their own: jobs/tests/faults/.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import UTC, datetime, timedelta

import pytest
from django.db import OperationalError, connection
from django.utils import timezone

from jobs.models import Job, JobRun, SchedulerProcess
from jobs.scheduler import runner
from jobs.scheduler.clock import DatabaseClock
from jobs.scheduler.engine import Engine
from jobs.scheduler.store.postgres import server_time


def _ended_while_the_database_was_away(engine, process, job, now):
    """A run of `job` on `process` whose outcome the engine holds unwritten; the next pass looks
    for due jobs."""
    earlier = JobRun.objects.create(
        job=job,
        scheduled_for=now - timedelta(minutes=1),
        not_before=now - timedelta(minutes=1),
        status="running",
        worker=process,
        started_at=now - timedelta(minutes=1),
    )
    earlier.job = job
    engine.unrecorded.append(runner.Outcome(earlier, "succeeded", now - timedelta(seconds=1)))
    engine.wake_plan.changed_elsewhere()
    return earlier


def test_finished_runs_are_written_back_before_due_jobs_fire(make_job, engine_factory, now):
    """After a database error the engine holds outcomes it could not write. When the database
    is back, a job whose run ended must not have its due fire skipped as "overlap": the outcome
    is written first."""
    engine = engine_factory(now=now)
    process = engine.register()
    job = make_job(now=now - timedelta(minutes=1), cron="* * * * *")  # forbid overlap
    earlier = _ended_while_the_database_was_away(engine, process, job, now)
    engine.tick()
    assert JobRun.objects.get(pk=earlier.pk).status == "succeeded"
    fire = JobRun.objects.get(job=job, scheduled_for=now)
    assert fire.status != "skipped", fire.skip_reason


@pytest.mark.django_db(transaction=True)  # a pass's own transactions, as in production
def test_a_refused_value_after_the_outcomes_are_written_is_not_blamed_on_them(
    make_job, engine_factory, now, monkeypatch, caplog
):
    """A value refused while firing, once the outcomes are written (PostgreSQL writes them in a
    statement of their own), is an error of the pass: the outcomes are not written again one by
    one nor reported twice. On SQLite the pass is one transaction: the refusal undoes the
    write-back, so the outcomes are then written one by one, once."""
    from django.db import DataError

    engine = engine_factory(now=now)
    process = engine.register()
    job = make_job(now=now - timedelta(minutes=1), cron="* * * * *", overlap_policy="allow")
    earlier = _ended_while_the_database_was_away(engine, process, job, now)

    def refuse(**kwargs):
        raise DataError("value refused")

    monkeypatch.setattr(engine.store, "fire_due_jobs", refuse)
    recorded: list[runner.Outcome] = []
    if connection.vendor == "postgresql":
        with pytest.raises(DataError):
            engine.tick(collect_into=recorded)
        assert "one by one" not in caplog.text
    else:
        engine.tick(collect_into=recorded)
        assert "writing them one by one" in caplog.text
    assert [outcome.run.pk for outcome in recorded] == [earlier.pk]
    assert engine.unrecorded == []
    assert JobRun.objects.get(pk=earlier.pk).status == "succeeded"


def _dead_schedulers_run(make_job, now):
    dead = SchedulerProcess.objects.create(
        hostname="gone", pid=1, started_at=now, last_heartbeat_at=now - timedelta(seconds=60)
    )
    job = make_job(now=now, cron="0 0 1 1 *", job_type="test_sleep")
    return JobRun.objects.create(job=job, scheduled_for=now, not_before=now, status="running", worker=dead)


@pytest.mark.django_db(transaction=True)  # the database error closes the connection
def test_a_scheduler_judges_others_only_after_a_full_lost_after_connected(make_job, engine_factory, now):
    """Just started, or just back from a database outage, a scheduler cannot tell a dead peer
    from one still reconnecting: it recovers nothing until it has been connected for a full
    lost-after time."""
    run = _dead_schedulers_run(make_job, now)
    engine = engine_factory(now=now, lost_after=0.6, heartbeat_seconds=0.3)
    engine.register()
    engine.beat()
    assert JobRun.objects.get(pk=run.pk).status == "running"
    time.sleep(0.7)
    engine.beat()
    assert JobRun.objects.get(pk=run.pk).status == "lost"

    second = _dead_schedulers_run(make_job, now)
    engine.database_error()  # as the loop does when a statement fails
    engine.tick()  # the database answers again: the lost-after time starts over
    engine.beat()
    assert JobRun.objects.get(pk=second.pk).status == "running"
    time.sleep(0.7)
    engine.beat()
    assert JobRun.objects.get(pk=second.pk).status == "lost"


class _FailingDatabase:
    """Makes every statement of the engine thread fail for a while, as a database outage does."""

    def __init__(self, seconds: float) -> None:
        self.until = time.monotonic() + seconds

    def __call__(self, execute, sql, params, many, context):
        if time.monotonic() < self.until:
            raise OperationalError("server closed the connection unexpectedly")
        return execute(sql, params, many, context)


@pytest.mark.django_db(transaction=True)
def test_during_an_outage_one_traceback_then_one_line_per_retry_and_a_stop_wins(make_job, caplog):
    """Statements fail for 3 s: the loop logs the first error with its traceback, one line per
    retry after that (backing off), one line when the database is back; a stop requested while
    the database is still failing ends the loop at once rather than when it comes back."""
    engine = Engine(max_concurrent=1, max_sleep=0.2, heartbeat_seconds=0.5, lost_after=4)
    outage = _FailingDatabase(0)
    caplog.set_level(logging.INFO, logger="jobs.scheduler")

    def run() -> None:
        # On the engine thread's own connection: the outage is that thread's.
        with connection.execute_wrapper(outage):
            engine.run_forever()

    loop = threading.Thread(target=run, name="engine-under-test", daemon=True)
    loop.start()
    deadline = time.monotonic() + 10
    while engine.process is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.2)
    outage.until = time.monotonic() + 1.5
    try:
        time.sleep(2.5)
        messages = [record for record in caplog.records if record.name == "jobs.scheduler"]
        errors = [record for record in messages if "database" in record.getMessage()]
        with_traceback = [record for record in errors if record.exc_info]
        assert len(with_traceback) == 1, [record.getMessage() for record in errors]
        retries = [record for record in errors if "still unavailable" in record.getMessage()]
        # Retries after 0.5, 1 (capped at lost_after / 4 = 1): a handful, not one per pass.
        assert 1 <= len(retries) <= 4, [record.getMessage() for record in errors]
        assert any("available again after" in record.getMessage() for record in errors)
        # A second outage; the stop must not wait for it to end.
        outage.until = time.monotonic() + 30
        time.sleep(0.3)
        stop_at = time.monotonic()
        engine.request_stop()
        loop.join(5)
        assert not loop.is_alive()
        assert time.monotonic() - stop_at < 1.5
    finally:
        outage.until = 0
        if not engine.stopping:
            engine.request_stop()
        loop.join(5)


@pytest.mark.postgres
def test_the_database_clock_is_the_servers_whatever_the_hosts(db: None, caplog) -> None:
    """A host clock 90 s ahead: the scheduler's clock is the server's to within a round trip,
    is never ahead of it, and the skew is logged once, as an error."""
    ahead = DatabaseClock(read=server_time, local=lambda: timezone.now() + timedelta(seconds=90))
    assert ahead() - timezone.now() > timedelta(seconds=89)  # before its first reading: the host's
    ahead.sync()
    ahead.sync()
    with connection.cursor() as cursor:
        cursor.execute("SELECT clock_timestamp()")
        (server,) = cursor.fetchone()
    mine = ahead()
    assert mine <= server.astimezone(UTC) + timedelta(milliseconds=1)
    assert server - mine < timedelta(milliseconds=200)
    assert ahead.offset_seconds is not None and -91 < ahead.offset_seconds < -89
    skew = [record for record in caplog.records if "clock is" in record.getMessage()]
    assert len(skew) == 1 and skew[0].levelno == logging.ERROR
    assert "90.0s ahead of the database server's" in skew[0].getMessage()


def test_the_database_clock_moves_with_the_monotonic_clock_between_readings() -> None:
    ticks = [100.0]
    clock = DatabaseClock(
        read=lambda: datetime(2026, 6, 1, 12, 0, tzinfo=UTC),
        ticks=lambda: ticks[0],
        local=lambda: datetime(2026, 1, 1, tzinfo=UTC),
    )
    assert clock() == datetime(2026, 1, 1, tzinfo=UTC)  # before its first reading: the host's
    clock.sync()  # at ticks 100.0
    ticks[0] = 102.5
    assert clock() == datetime(2026, 6, 1, 12, 0, 2, 500000, tzinfo=UTC)


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_a_scheduler_whose_clock_runs_ahead_starts_nothing_before_its_time(make_job, caplog) -> None:
    """90 s ahead, the old engine fired a job due in 2 s at once and wrote heartbeats from the
    future. On the database's clock it fires the job when the server's time reaches it."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT clock_timestamp()")
        (server_now,) = cursor.fetchone()
    job = make_job(now=timezone.now(), cron="0 0 1 1 *")
    due = server_now + timedelta(seconds=2)
    Job.objects.filter(pk=job.pk).update(next_run_at=due)
    clock = DatabaseClock(read=server_time, local=lambda: timezone.now() + timedelta(seconds=90))
    engine = Engine(max_concurrent=1, clock=clock, heartbeat_seconds=3600, max_sleep=0)  # each pass looks
    try:
        process = engine.register()
        assert abs((process.last_heartbeat_at - server_now).total_seconds()) < 5  # the server's time
        assert engine.run_once() == []  # 90 s ahead, but the server says not yet
        assert not JobRun.objects.filter(job=job).exists()
        time.sleep(max(0.0, (due - clock()).total_seconds()) + 0.05)
        (outcome,) = engine.run_once()
    finally:
        engine.stop()
    run = JobRun.objects.get(pk=outcome.run.pk)
    assert run.scheduled_for == due and run.started_at is not None
    assert run.started_at >= due
    assert (run.started_at - due).total_seconds() < 5


def test_an_engine_given_no_clock_uses_the_databases_on_postgresql_and_the_hosts_on_sqlite(db: None) -> None:
    engine = Engine(max_concurrent=1)
    assert isinstance(engine.clock, DatabaseClock) == (connection.vendor == "postgresql")
    assert abs((engine.clock() - timezone.now()).total_seconds()) < 5
