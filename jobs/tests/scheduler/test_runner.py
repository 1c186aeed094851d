"""Executing one run and writing its outcome back (jobs/scheduler/runner.py, retry.py and the store)."""

from __future__ import annotations

import random
from datetime import timedelta

import pytest
from django.db import connection
from django.test import override_settings
from django.test.utils import CaptureQueriesContext

from jobs.models import Job, JobRun, SchedulerProcess
from jobs.scheduler import retry, runner
from jobs.scheduler.store import get_store


@pytest.fixture
def running(make_job, now):
    def make(job_type="test_noop", **fields):
        worker = SchedulerProcess.objects.create(hostname="h", pid=2, started_at=now, last_heartbeat_at=now)
        job = make_job(now=now, cron="0 0 1 1 *", job_type=job_type, **fields)
        run = JobRun.objects.create(
            job=job, scheduled_for=now, not_before=now, status="running", worker=worker, started_at=now
        )
        return JobRun.objects.select_related("job").get(pk=run.pk), worker

    return make


def test_outcome_is_fenced_by_the_worker_and_status(running, now):
    run, worker = running()
    # Another scheduler marked it lost (and retried it) while this one was still running it.
    JobRun.objects.filter(pk=run.pk).update(status="lost")
    outcome = runner.execute(run, clock=lambda: now)
    assert get_store().record_outcomes([outcome], worker_id=worker.pk) == []
    run.refresh_from_db()
    assert run.status == "lost" and run.result is None


def test_outcome_from_another_worker_is_refused(running, now):
    run, worker = running()
    outcome = runner.execute(run, clock=lambda: now)
    assert get_store().record_outcomes([outcome], worker_id=worker.pk + 1000) == []
    assert JobRun.objects.get(pk=run.pk).status == "running"


def test_unknown_job_type_fails_the_run(running, now):
    run, worker = running()
    Job.objects.filter(pk=run.job_id).update(job_type="gone_type")
    run.job.job_type = "gone_type"
    outcome = runner.execute(run, clock=lambda: now)
    assert outcome.status == "failed" and "unknown job type 'gone_type'" in outcome.error


def test_large_results_are_capped(running, now):
    run, worker = running()
    with override_settings(JOBS={"RESULT_MAX_BYTES": 1024}):
        capped = runner.cap_result({"data": "x" * 5000})
    assert capped["truncated"] is True and capped["size_bytes"] > 5000


@pytest.mark.parametrize(("attempt", "low", "high"), [(1, 5, 10), (2, 10, 20), (3, 20, 40), (10, 2560, 5120)])
def test_retry_delay_grows_exponentially_with_jitter(make_job, now, attempt, low, high):
    job = make_job(now=now, retry_backoff_seconds=10)
    delays = [retry.backoff_seconds(job, attempt, rng=random.Random(seed)) for seed in range(50)]
    assert all(low <= delay <= high for delay in delays)
    assert len(set(delays)) > 40  # jittered, not all the same


def test_a_timed_out_run_is_retried_only_when_its_type_is_safe_to_repeat(running, now):
    safe, worker = running(job_type="test_sleep", max_retries=1, retry_backoff_seconds=1, timeout_seconds=1)
    unsafe, _ = running(job_type="test_sleep_unsafe", max_retries=1, retry_backoff_seconds=1, timeout_seconds=1)
    unsafe.worker_id = worker.pk
    JobRun.objects.filter(pk=unsafe.pk).update(worker=worker)
    later = now + timedelta(seconds=1)
    outcomes = [runner.timed_out(safe, later), runner.timed_out(unsafe, later)]
    accepted = get_store().record_outcomes(outcomes, worker_id=worker.pk)
    assert [o.status for o in accepted] == ["timed_out", "timed_out"]
    assert JobRun.objects.filter(job=safe.job, attempt=2, status="queued").exists()
    assert not JobRun.objects.filter(job=unsafe.job, attempt=2).exists()
    row = JobRun.objects.get(pk=unsafe.pk)
    assert row.error.startswith("not retried: a test_sleep_unsafe run is not safe to repeat")
    # Their threads still run: no finished_at yet, and their jobs count as running.
    assert row.finished_at is None
    assert set(JobRun.objects.lingering()) == {safe, unsafe}


def test_a_failure_that_may_have_done_the_work_is_not_retried_for_an_unsafe_type(running, now, monkeypatch):
    from jobs.executors import get_executor
    from jobs.executors.base import OutcomeUnknown

    def sent_without_reply(self, run):
        raise OutcomeUnknown("sent, no reply")

    run, worker = running(job_type="test_sleep_unsafe", max_retries=2)
    outcome = runner.Outcome(run, "failed", now, error="OutcomeUnknown: sent, no reply", maybe_done=True)
    assert outcome.retry_at is None
    safe_run, _ = running(job_type="test_sleep", max_retries=2)
    assert runner.Outcome(safe_run, "failed", now, maybe_done=True).retry_at is not None
    # The runner maps the exception to that outcome, and says why on the row.
    monkeypatch.setattr(type(get_executor("test_sleep_unsafe")), "execute", sent_without_reply)
    result = runner.execute(run, clock=lambda: now)
    assert (result.status, result.maybe_done) == ("failed", True)
    assert result.error.startswith("not retried: a test_sleep_unsafe run is not safe to repeat")


def test_a_batch_is_written_in_a_fixed_number_of_statements_and_fenced_run_by_run(make_job, now):
    worker = SchedulerProcess.objects.create(hostname="h", pid=3, started_at=now, last_heartbeat_at=now)
    shared = make_job(now=now, cron="0 0 1 1 *", overlap_policy="allow", name="shared")
    other = make_job(now=now, cron="0 0 1 1 *", name="other", job_type="test_fail")
    runs = []
    for job, started in [(shared, now), (shared, now + timedelta(seconds=2)), (other, now), (other, now)]:
        run = JobRun.objects.create(
            job=job,
            scheduled_for=started,
            not_before=started,
            attempt=len(runs) + 1,
            status="running",
            worker=worker,
            started_at=started,
        )
        runs.append(JobRun.objects.select_related("job").get(pk=run.pk))
    # The last run was presumed lost meanwhile: its outcome must not land.
    JobRun.objects.filter(pk=runs[3].pk).update(status="lost")
    outcomes = [
        runner.Outcome(runs[0], "succeeded", now + timedelta(seconds=5), result={"rows": 1}),
        runner.Outcome(runs[1], "succeeded", now + timedelta(seconds=3), result=[1, 2]),
        runner.Outcome(runs[2], "failed", now + timedelta(seconds=1), error="boom"),
        runner.Outcome(runs[3], "succeeded", now + timedelta(seconds=1)),
    ]
    with CaptureQueriesContext(connection) as captured:
        accepted = get_store().record_outcomes(outcomes, worker_id=worker.pk)
    statements = [q["sql"] for q in captured.captured_queries if not q["sql"].startswith(("SAVEPOINT", "RELEASE"))]
    # PostgreSQL: one statement (runs, jobs and counters in data-modifying CTEs); SQLite: runs,
    # then jobs, then counters. Plus one, because the fence refused an outcome: a look at whether
    # it was already written.
    assert len(statements) == (1 if connection.vendor == "postgresql" else 3) + 1, statements
    assert [sql.split()[0] for sql in statements].count("SELECT") == 1
    assert [outcome.run.pk for outcome in accepted] == [runs[0].pk, runs[1].pk, runs[2].pk]
    rows = {row.pk: row for row in JobRun.objects.all()}
    assert (rows[runs[0].pk].status, rows[runs[0].pk].result) == ("succeeded", {"rows": 1})
    assert rows[runs[0].pk].finished_at == now + timedelta(seconds=5)
    assert (rows[runs[1].pk].status, rows[runs[1].pk].result) == ("succeeded", [1, 2])
    assert (rows[runs[2].pk].status, rows[runs[2].pk].error, rows[runs[2].pk].result) == ("failed", "boom", None)
    assert (rows[runs[3].pk].status, rows[runs[3].pk].finished_at) == ("lost", None)
    # Each job shows its latest run: for `shared` the one started last, though it finished first.
    shared.refresh_from_db()
    other.refresh_from_db()
    assert (shared.last_run_at, shared.last_run_status) == (now + timedelta(seconds=2), "succeeded")
    assert (other.last_run_at, other.last_run_status) == (now, "failed")


def test_an_older_run_never_overwrites_the_jobs_newer_last_run(running, now):
    run, worker = running()
    Job.objects.filter(pk=run.job_id).update(last_run_at=now + timedelta(minutes=1), last_run_status="succeeded")
    accepted = get_store().record_outcomes([runner.Outcome(run, "failed", now, error="x")], worker_id=worker.pk)
    assert len(accepted) == 1 and JobRun.objects.get(pk=run.pk).status == "failed"
    job = Job.objects.get(pk=run.job_id)
    assert (job.last_run_at, job.last_run_status) == (now + timedelta(minutes=1), "succeeded")


@pytest.mark.postgres
def test_an_outcome_the_database_refuses_is_written_as_a_failure_and_the_rest_land(running, now):
    refused_run, worker = running()
    fine_run = JobRun.objects.select_related("job").get(
        pk=JobRun.objects.create(
            job=refused_run.job,
            scheduled_for=now,
            not_before=now,
            attempt=2,
            status="running",
            worker=worker,
            started_at=now,
        ).pk
    )
    # A NUL character: PostgreSQL text cannot hold it, and psycopg2 refuses to send it.
    outcomes = [
        runner.Outcome(refused_run, "failed", now, error="bad\x00byte"),
        runner.Outcome(fine_run, "succeeded", now, result={"ok": True}),
    ]
    with pytest.raises(ValueError):
        get_store().record_outcomes(outcomes, worker_id=worker.pk)
    accepted = get_store().record_one_by_one(outcomes, worker_id=worker.pk)
    assert [(o.run.pk, o.status) for o in accepted] == [(refused_run.pk, "failed"), (fine_run.pk, "succeeded")]
    refused = JobRun.objects.get(pk=refused_run.pk)
    assert refused.status == "failed" and "the database refused its outcome" in refused.error
    assert JobRun.objects.get(pk=fine_run.pk).result == {"ok": True}


def test_an_outcome_sent_again_after_a_lost_reply_counts_as_written(running, now, caplog):
    run, worker = running()
    outcome = runner.Outcome(run, "succeeded", now + timedelta(seconds=1), result={"n": 1})
    assert get_store().record_outcomes([outcome], worker_id=worker.pk) == [outcome]
    # The engine sends it again, as it would had the reply to the committed write been lost.
    assert get_store().record_outcomes([outcome], worker_id=worker.pk) == [outcome]
    assert "outcome discarded" not in caplog.text
    # A different outcome for the same run is still refused: the run is no longer running.
    other = runner.Outcome(run, "failed", now + timedelta(seconds=2), error="late")
    assert get_store().record_outcomes([other], worker_id=worker.pk) == []
    assert "outcome discarded" in caplog.text
    assert JobRun.objects.get(pk=run.pk).status == "succeeded"


@pytest.mark.parametrize(
    "result", [None, {"rows": 3, "note": "naïve ☃", "nested": {"a": [True, None]}}, "text", [1, 2.5], 7, False]
)
def test_an_outcome_is_stored_as_the_orm_would_store_it(running, now, result):
    """The write-back adapts values itself (not through the model fields); what the ORM reads
    back must be exactly the outcome: the result's JSON, the finish time to the microsecond."""
    run, worker = running()
    finished = now + timedelta(seconds=1, microseconds=654321)
    outcome = runner.Outcome(run, JobRun.Status.SUCCEEDED, finished, result=result, error="")
    assert get_store().record_outcomes([outcome], worker_id=worker.pk) == [outcome]
    stored = JobRun.objects.get(pk=run.pk)
    assert (stored.status, stored.finished_at, stored.result, stored.error) == ("succeeded", finished, result, "")
    assert type(stored.result) is type(result)
