"""The engine driven one pass at a time (run_once) with the clock passed in."""

from __future__ import annotations

import logging
import time
from datetime import timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from jobs.models import Job, JobRun, SchedulerProcess
from jobs.scheduler.engine import Handover, Inflight


def _due_now_and_not_again(make_job, **fields) -> Job:
    """A job due at the real current time whose next fire is months away, for tests that run
    the engine on the real clock: an every-minute job would fire again (and record a skipped
    overlap) whenever the test straddles a minute boundary."""
    from django.utils import timezone

    job = make_job(now=timezone.now(), cron="0 0 1 1 *", **fields)
    Job.objects.filter(pk=job.pk).update(next_run_at=timezone.now())
    return job


def test_due_job_runs_once_and_advances(make_job, engine_factory, now):
    job = make_job(now=now - timedelta(seconds=30))
    assert job.next_run_at == now
    outcomes = engine_factory(now=now).run_once()
    assert [o.status for o in outcomes] == ["succeeded"]
    run = JobRun.objects.get()
    assert run.status == JobRun.Status.SUCCEEDED
    assert run.scheduled_for == job.next_run_at
    assert run.result == {"ok": True}
    assert run.worker is not None and run.started_at is not None and run.finished_at is not None
    job.refresh_from_db()
    assert job.next_run_at == now + timedelta(minutes=1)
    assert job.last_run_status == "succeeded" and job.last_run_at == run.started_at
    # A second pass at the same instant finds nothing due.
    assert engine_factory(now=now).run_once() == []
    assert JobRun.objects.count() == 1


@pytest.mark.parametrize(
    ("level", "lines"), [(logging.INFO, ["run finished"]), (logging.DEBUG, ["run started", "run finished"])]
)
def test_a_run_logs_one_line_when_it_finishes_and_its_start_only_at_debug(
    make_job, engine_factory, now, caplog, level, lines
):
    job = make_job(now=now - timedelta(seconds=30), max_retries=1)
    caplog.set_level(level, logger="jobs.scheduler")
    (outcome,) = engine_factory(now=now).run_once()
    per_run = [r for r in caplog.records if r.name == "jobs.scheduler" and r.getMessage().startswith("run ")]
    assert [r.getMessage().split(" job=")[0] for r in per_run] == lines
    finished = per_run[-1]
    assert finished.levelno == logging.INFO
    assert f"job={job.pk} run={outcome.run.pk} attempt=1 trigger=schedule status=succeeded lateness=0.000s" in (
        finished.getMessage()
    )
    assert finished.lateness_seconds == 0.0 and finished.duration_seconds >= 0


def test_failure_is_recorded_with_traceback(make_job, engine_factory, now):
    make_job(now=now - timedelta(seconds=30), job_type="test_fail")
    engine_factory(now=now).run_once()
    run = JobRun.objects.get()
    assert run.status == JobRun.Status.FAILED
    assert run.error.startswith("ExecutorError: boom")
    assert "Traceback" in run.error


def test_failed_run_is_retried_with_backoff(make_job, engine_factory, now):
    job = make_job(now=now - timedelta(seconds=30), job_type="test_flaky", max_retries=2, retry_backoff_seconds=10)
    engine_factory(now=now).run_once()
    first, retry = JobRun.objects.order_by("attempt")
    assert (first.status, retry.status) == ("failed", "queued")
    assert retry.attempt == 2 and retry.trigger == "retry" and retry.scheduled_for == first.scheduled_for
    delay = (retry.not_before - first.finished_at).total_seconds()
    assert 5 <= delay <= 10  # backoff 10 s with jitter on its upper half
    # Not before its time...
    assert engine_factory(now=now + timedelta(seconds=4)).run_once() == []
    # ...then it runs and succeeds on attempt 2.
    outcomes = engine_factory(now=now + timedelta(seconds=11)).run_once()
    assert [(o.run.attempt, o.status) for o in outcomes] == [(2, "succeeded")]
    job.refresh_from_db()
    assert job.last_run_status == "succeeded"


def test_retries_stop_at_max_retries(make_job, engine_factory, now):
    make_job(now=now - timedelta(seconds=30), job_type="test_fail", max_retries=1, retry_backoff_seconds=1)
    engine_factory(now=now).run_once()
    engine_factory(now=now + timedelta(seconds=2)).run_once()
    engine_factory(now=now + timedelta(seconds=4)).run_once()
    assert list(JobRun.objects.order_by("attempt").values_list("attempt", "status")) == [(1, "failed"), (2, "failed")]


def test_concurrency_is_capped_and_the_rest_stay_queued(make_job, engine_factory, now):
    for _ in range(7):
        make_job(now=now - timedelta(seconds=30), overlap_policy="allow")
    outcomes = engine_factory(now=now, max_concurrent=3).run_once()
    assert len(outcomes) == 3
    assert JobRun.objects.filter(status="succeeded").count() == 3
    assert JobRun.objects.filter(status="queued").count() == 4


def test_hung_run_times_out_and_frees_its_slot(make_job, engine_factory, now):
    hung = make_job(now=now - timedelta(seconds=30), job_type="test_hang", timeout_seconds=1)
    started = time.monotonic()
    outcomes = engine_factory(max_concurrent=1).run_once()
    assert time.monotonic() - started < 5
    assert [o.status for o in outcomes] == ["timed_out"]
    run = JobRun.objects.get(job=hung)
    assert run.status == "timed_out" and "timed out after 1s" in run.error
    # The slot is free again: the next job runs on the same engine size.
    make_job(now=now - timedelta(seconds=30))
    assert [o.status for o in engine_factory(max_concurrent=1).run_once()] == ["succeeded"]


def test_manual_run_is_picked_up(make_job, engine_factory, now):
    from jobs import services

    job = make_job(now=now, cron="0 0 1 1 *")
    services.job_trigger(job, now=now)
    outcomes = engine_factory(now=now).run_once()
    assert [(o.run.trigger, o.status) for o in outcomes] == [("manual", "succeeded")]


def test_disabled_jobs_never_fire(make_job, engine_factory, now):
    job = make_job(now=now - timedelta(seconds=30))
    from jobs import services

    services.job_pause(job)
    assert engine_factory(now=now).run_once() == []
    assert not JobRun.objects.exists()
    assert Job.objects.get().next_run_at is None


@pytest.mark.parametrize("max_concurrent", [1, 5])
def test_burst_query_count_is_small(make_job, engine_factory, now, max_concurrent):
    for _ in range(20):
        make_job(now=now - timedelta(seconds=30), overlap_policy="allow")
    engine = engine_factory(now=now, max_concurrent=max_concurrent)
    engine.register()
    with CaptureQueriesContext(connection) as captured:
        outcomes = engine.run_once()
    assert len(outcomes) == max_concurrent
    statements = [q["sql"] for q in captured.captured_queries if not q["sql"].startswith(("SAVEPOINT", "RELEASE"))]
    statements = [sql for sql in statements if not sql.startswith("BEGIN")]
    postgres = connection.vendor == "postgresql"
    # Fire the 20 jobs: look for queued runs past their misfire grace (none), select the jobs,
    # insert their runs, advance them (4, whatever their number).
    fire, rest = statements[:4], statements[4:]
    assert [sql.split()[0] for sql in fire] == ["SELECT", "SELECT", "INSERT", "UPDATE"], fire
    # Claim runs for the free slots: one statement on PostgreSQL (an UPDATE RETURNING joined to
    # the jobs), two on SQLite (the same UPDATE, then the jobs).
    claim, rest = rest[: 1 if postgres else 2], rest[1 if postgres else 2 :]
    assert "RETURNING" in claim[0] and "status = 'running'" in claim[0], claim
    # On PostgreSQL one NOTIFY, since more runs were queued than this scheduler could take.
    notify = [sql for sql in rest if sql.startswith("NOTIFY")]
    assert len(notify) == (1 if postgres else 0)
    # Then the runs are written back in batches of whatever finished together, however many
    # runs a batch holds: one statement on PostgreSQL, three on SQLite (the runs, their jobs'
    # last run, the finished-run counters).
    batches = [sql for sql in rest if sql.startswith("WITH outcome")]
    assert 1 <= len(batches) <= max_concurrent
    assert len(rest) == len(notify) + len(batches) * (1 if postgres else 3), rest


def test_a_hung_run_keeps_its_thread_and_the_same_engine_runs_the_next(make_job, engine_factory, now):
    make_job(now=now - timedelta(seconds=30), job_type="test_hang", timeout_seconds=1, name="hangs")
    engine = engine_factory(max_concurrent=1, max_sleep=0)  # every pass looks for due jobs
    assert [o.status for o in engine.run_once()] == ["timed_out"]
    # The hung thread cannot be killed; the slot it held must still be usable.
    make_job(now=now - timedelta(seconds=30), timeout_seconds=5, name="next")
    started = time.monotonic()
    assert [(o.run.job.name, o.status) for o in engine.run_once()] == [("next", "succeeded")]
    assert time.monotonic() - started < 2


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_the_engine_reconnects_when_its_database_connection_is_cut_mid_run(make_job, caplog):
    import threading

    from django.db import connections

    from jobs.scheduler.engine import Engine

    job = _due_now_and_not_again(make_job, job_type="test_sleep", parameters={"seconds": 1.5}, name="sleeps")
    engine = Engine(max_concurrent=1, max_sleep=0.2, heartbeat_seconds=3600)
    loop = threading.Thread(target=engine.run_forever, daemon=True)
    loop.start()
    try:
        deadline = time.monotonic() + 10
        while not JobRun.objects.filter(job=job, status="running").exists():
            assert time.monotonic() < deadline, "the run never started"
            time.sleep(0.05)
        # Cut every other connection to the test database, the engine's among them, mid-run.
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
            assert cursor.fetchall()
        while not JobRun.objects.filter(job=job).exclude(status__in=JobRun.ACTIVE).exists():
            assert time.monotonic() < deadline + 10, "the outcome was never written"
            time.sleep(0.05)
    finally:
        engine.request_stop()
        loop.join(10)
        connections.close_all()
    run = JobRun.objects.get(job=job)
    assert run.status == "succeeded" and run.result == {"slept": 1.5}
    assert Job.objects.get(pk=job.pk).last_run_status == "succeeded"
    assert "database error in the scheduler loop" in caplog.text
    # The error made it look for runs claimed without a reply; the run it held was not one.
    assert engine.release_unheld is False and "run lost" not in caplog.text


def test_results_no_database_can_hold_are_stored_and_block_nothing(make_job, engine_factory, now):
    odd = make_job(now=now - timedelta(seconds=30), job_type="test_odd_result", name="odd")
    raises = make_job(now=now - timedelta(seconds=30), job_type="test_odd_result", name="raises")
    Job.objects.filter(pk=raises.pk).update(parameters={"raise": True})
    plain = make_job(now=now - timedelta(seconds=30), name="plain")
    outcomes = engine_factory(now=now).run_once()
    assert sorted((o.run.job.name, o.status) for o in outcomes) == [
        ("odd", "succeeded"),
        ("plain", "succeeded"),
        ("raises", "failed"),
    ]
    odd_run, raises_run = JobRun.objects.get(job=odd), JobRun.objects.get(job=raises)
    # NaN is not JSON: the result is kept as its repr; NUL characters are dropped or escaped.
    assert odd_run.status == "succeeded" and "nan" in odd_run.result and "\x00" not in odd_run.result
    assert raises_run.status == "failed" and "ExecutorError: badbyte" in raises_run.error
    assert JobRun.objects.get(job=plain).status == "succeeded"


def test_worker_threads_are_reused_then_end_when_idle_and_come_back_on_demand():
    import threading

    from jobs.scheduler.engine import _Workers

    done: list[str] = []
    finished = threading.Event()

    def work(task: str) -> None:
        done.append(threading.current_thread().name)
        if len(done) in (3, 4):
            finished.set()

    def pool_threads() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name.startswith("run-worker-") and t.is_alive()]

    before = set(pool_threads())
    workers = _Workers(work, idle_seconds=0.2)
    for task in ("a", "b", "c"):
        workers.submit(task)
    assert finished.wait(5)
    started = set(pool_threads()) - before
    assert 1 <= len(started) <= 3 and len(done) == 3
    # Idle past idle_seconds: every thread of this pool ends.
    deadline = time.monotonic() + 5
    while set(pool_threads()) - before:
        assert time.monotonic() < deadline, "idle worker threads did not end"
        time.sleep(0.05)
    # A task after that still runs, on a new thread.
    finished.clear()
    workers.submit("d")
    assert finished.wait(5) and len(done) == 4


@pytest.mark.django_db(transaction=True)
def test_a_quick_run_is_recorded_while_a_slow_one_runs_and_quick_ones_are_written_together(make_job):
    """Workers wake the engine for the first outcome and for the last one it waits for: a run
    that ends early is not held back by a long one, and runs ending together share a write."""
    import threading

    from django.db import connections

    from jobs.scheduler.engine import Engine

    slow = _due_now_and_not_again(make_job, job_type="test_sleep", parameters={"seconds": 3}, name="slow")
    quick = [_due_now_and_not_again(make_job, name=f"quick {i}") for i in range(4)]
    engine = Engine(max_concurrent=5, max_sleep=5, heartbeat_seconds=3600)
    writes: list[str] = []

    def count_writes(execute, sql, params, many, context):
        # A write-back: plain (`WITH outcome ...`) or the prepared pass (`EXECUTE`), not its PREPARE.
        if sql.startswith("WITH outcome") or sql.startswith("EXECUTE"):
            writes.append(sql)
        return execute(sql, params, many, context)

    def run() -> None:
        with connection.execute_wrapper(count_writes):
            engine.run_forever()

    loop = threading.Thread(target=run, daemon=True)
    loop.start()
    try:
        deadline = time.monotonic() + 2.5
        done = JobRun.objects.filter(job__in=quick, status="succeeded")
        while done.count() < 4:
            assert time.monotonic() < deadline, "the quick runs waited for the slow one"
            time.sleep(0.02)
        assert JobRun.objects.get(job=slow).status == "running"
    finally:
        engine.request_stop()
        loop.join(10)
        connections.close_all()
    assert JobRun.objects.get(job=slow).status == "succeeded"
    # The four quick runs, then the slow one: two writes (three if a quick run straggled past
    # the gathering window), not one per run.
    assert 2 <= len(writes) <= 3, writes


def test_workers_wake_the_engine_for_the_first_and_the_last_outcome_only(make_job, now):
    """The hand-over, without threads or timing: which outcomes wake the engine."""
    from jobs.scheduler import runner

    make_job(now=now - timedelta(seconds=30), overlap_policy="allow")
    job = Job.objects.get()
    runs = [JobRun.objects.create(job=job, scheduled_for=now, not_before=now, attempt=n) for n in range(1, 5)]
    woken: list[bool] = []
    handover = Handover(lambda: woken.append(True))
    handover.awaiting(len(runs))  # as starting them leaves it
    for run in runs:
        before = len(woken)
        handover.put(runner.Outcome(run, "succeeded", now))
        woken[before:] = [len(woken) > before]
    assert woken == [True, False, False, True]
    assert [outcome.run.pk for outcome in handover.take(0.0)] == [run.pk for run in runs]
    assert handover.take(0.0) == []
    # A run abandoned after its timeout reports at last: it wakes the engine.
    handover.awaiting(0)
    handover.put(runner.Outcome(runs[0], "succeeded", now))
    assert woken[-1] is True and len(woken) == 5


def test_the_late_outcome_of_a_run_the_engine_no_longer_holds_is_dropped(make_job, engine_factory, now):
    from jobs.scheduler import runner

    job = make_job(now=now - timedelta(seconds=30), overlap_policy="allow")
    run = JobRun.objects.create(job=job, scheduled_for=now, not_before=now)
    engine = engine_factory(now=now)
    engine.inflight[run.pk] = Inflight(run, time.monotonic() + 60)
    engine.handover.awaiting(1)
    engine.handover.put(runner.Outcome(run, "succeeded", now))
    engine.take_outcomes()
    assert [outcome.run.pk for outcome in engine.unrecorded] == [run.pk]
    assert engine.inflight == {}
    engine.unrecorded.clear()
    engine.handover.put(runner.Outcome(run, "succeeded", now))
    engine.take_outcomes()
    assert engine.unrecorded == []


def test_after_a_database_error_runs_claimed_without_a_reply_are_released(make_job, engine_factory, now, caplog):
    """A claim can commit while its reply is lost with the connection: those runs are `running`
    under this live scheduler, which never started them. After the error they become lost and,
    when safe to repeat, are retried, while the runs it does hold are left alone."""
    make_job(now=now - timedelta(seconds=30), name="orphan")  # test_noop: safe to repeat
    engine = engine_factory(now=now, max_concurrent=5)
    engine.register()
    job = Job.objects.get()
    orphan = JobRun.objects.create(
        job=job, scheduled_for=now, not_before=now, status="running", worker=engine.process, started_at=now
    )
    held = JobRun.objects.create(
        job=job, scheduled_for=now, attempt=5, not_before=now, status="running", worker=engine.process, started_at=now
    )
    engine.inflight[held.pk] = Inflight(held, time.monotonic() + 60)
    engine.release_unheld = True  # as the loop's database-error handler leaves it
    engine.tick()
    orphan.refresh_from_db()
    assert orphan.status == "lost" and "reply never reached" in orphan.error
    assert JobRun.objects.get(pk=held.pk).status == "running"
    retry = JobRun.objects.get(job=job, attempt=2)
    assert retry.trigger == "retry"
    assert "run lost" in caplog.text and "retrying" in caplog.text
    assert engine.release_unheld is False


def test_a_scheduler_presumed_dead_registers_anew_before_it_runs_anything(make_job, engine_factory, now):
    """Paused or cut off for longer than LOST_AFTER_SECONDS, a scheduler wakes up to find its row
    stopped by another: it claims nothing under that identity, registers again at its
    heartbeat, and only then runs what is due."""
    engine = engine_factory(now=now)
    first = engine.register()
    SchedulerProcess.objects.filter(pk=first.pk).update(stopped_at=now)  # what recovery elsewhere did
    job = make_job(now=now - timedelta(seconds=30))
    assert engine.run_once() == []
    assert JobRun.objects.get(job=job).status == "queued"
    engine.heartbeat.next_at = 0.0  # its heartbeat falls due
    assert engine.run_once() == []  # the pass still claims nothing; the heartbeat registers anew
    assert engine.process is not None and engine.process.pk != first.pk
    assert [o.status for o in engine.run_once()] == ["succeeded"]
    assert JobRun.objects.get(job=job).worker_id == engine.process.pk


def test_after_a_pause_the_scheduler_heartbeats_before_it_claims(make_job, now):
    """Frozen for 40 s (the monotonic clock need not have moved, so no heartbeat is due by it):
    a claim would be refused as stale, so the scheduler heartbeats first and runs the due job
    under the same identity."""
    from jobs.scheduler.engine import Engine

    clock = [now]
    engine = Engine(max_concurrent=5, clock=lambda: clock[0], heartbeat_seconds=3600, lost_after=30)
    process = engine.register()
    clock[0] = now + timedelta(seconds=40)
    make_job(now=now - timedelta(seconds=30))  # due at `now`, 40 s late: within the grace
    assert [o.status for o in engine.run_once()] == ["succeeded"]
    assert engine.process.pk == process.pk
    assert SchedulerProcess.objects.get(pk=process.pk).last_heartbeat_at == clock[0]


def test_a_timed_out_run_whose_thread_still_runs_blocks_forbidden_overlap_until_it_ends(make_job, engine_factory, now):
    """Python cannot stop a thread: until a timed-out run's code ends, its job is still running."""
    job = make_job(
        now=now - timedelta(seconds=30),
        job_type="test_sleep_unsafe",
        parameters={"seconds": 2.0},
        timeout_seconds=1,
        max_retries=3,
    )
    clock = [now]
    engine = engine_factory(max_concurrent=1, max_sleep=0, clock=lambda: clock[0])
    started = time.monotonic()
    assert [o.status for o in engine.run_once()] == ["timed_out"]
    first = JobRun.objects.get(job=job)
    assert first.status == "timed_out" and first.finished_at is None
    assert first.error.startswith("not retried: a test_sleep_unsafe run is not safe to repeat")
    assert not JobRun.objects.filter(job=job, attempt=2).exists()  # 3 retries left, none queued

    # The next fire comes while the thread still sleeps: recorded as an overlap, not run.
    clock[0] = now + timedelta(minutes=1)
    assert engine.run_once() == []
    skipped = JobRun.objects.get(job=job, scheduled_for=now + timedelta(minutes=1))
    assert skipped.status == "skipped" and skipped.skip_reason.startswith("overlap")

    # Once the thread has ended its row says so, and the job fires again.
    time.sleep(max(0.0, 2.3 - (time.monotonic() - started)))
    clock[0] = now + timedelta(minutes=2)
    assert [o.status for o in engine.run_once()] == ["timed_out"]  # it sleeps 2 s again
    first.refresh_from_db()
    assert first.finished_at is not None and "its code ended at" in first.error and "succeeded" in first.error
    assert JobRun.objects.get(job=job, scheduled_for=now + timedelta(minutes=2)).attempt == 1


def test_a_safe_timed_out_run_is_retried_and_shutdown_ends_lingering_runs(make_job, engine_factory, now):
    job = make_job(
        now=now - timedelta(seconds=30),
        job_type="test_sleep",  # safe to repeat
        parameters={"seconds": 3600},
        timeout_seconds=1,
        max_retries=1,
    )
    engine = engine_factory(now=now, max_concurrent=1)
    assert [o.status for o in engine.run_once()] == ["timed_out"]
    assert JobRun.objects.get(job=job, attempt=2).status == "queued"
    engine.stop()
    first = JobRun.objects.get(job=job, attempt=1)
    assert first.finished_at is not None and "the scheduler stopped while it still ran" in first.error
    assert not JobRun.objects.lingering().exists()
