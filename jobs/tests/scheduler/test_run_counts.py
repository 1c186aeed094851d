"""Finished runs counted (RunCount) on every path the store finishes them, in the same
statement or transaction, and kept through pruning."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import connection, connections
from django.db.models import Sum
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from jobs.models import JobRun, RunCount, SchedulerProcess
from jobs.retention import prune_runs
from jobs.scheduler import runner
from jobs.scheduler.store import get_store


def counts() -> dict[tuple[str, str], int]:
    rows = RunCount.objects.values("job_type", "status").annotate(sum=Sum("total")).order_by()
    return {(row["job_type"], row["status"]): row["sum"] for row in rows}


def test_the_engine_s_runs_are_counted_once_as_they_finish(make_job, engine_factory, now):
    make_job(now=now - timedelta(seconds=30), name="ok")
    make_job(now=now - timedelta(seconds=30), job_type="test_fail", max_retries=1, retry_backoff_seconds=1)
    engine = engine_factory(now=now)

    engine.run_once()

    assert counts() == {("test_noop", "succeeded"): 1, ("test_fail", "failed"): 1}
    # The retry is queued, not finished: not counted. Claiming (queued -> running) counts nothing.
    later = now + timedelta(seconds=5)
    engine_factory(now=later).run_once()
    assert counts() == {("test_noop", "succeeded"): 1, ("test_fail", "failed"): 2}


def test_skipped_fires_and_lost_runs_are_counted(make_job, now):
    job = make_job(now=now - timedelta(minutes=10), misfire_policy="skip")
    get_store().fire_due_jobs(now=now)  # the missed fires become skipped rows
    skipped = JobRun.objects.filter(status="skipped").count()
    assert skipped >= 1 and counts() == {("test_noop", "skipped"): skipped}

    dead = SchedulerProcess.objects.create(
        hostname="gone", pid=1, started_at=now, last_heartbeat_at=now - timedelta(minutes=5), stopped_at=now
    )
    earlier = now - timedelta(hours=1)
    JobRun.objects.create(
        job=job, scheduled_for=earlier, not_before=earlier, status="running", worker=dead, started_at=earlier
    )
    get_store().recover_lost_runs(now=now, lost_after=30)
    assert counts() == {("test_noop", "skipped"): skipped, ("test_noop", "lost"): 1}


def test_a_late_end_of_a_timed_out_run_is_not_counted_again(make_job, now):
    job = make_job(now=now, cron="0 0 1 1 *")
    worker = SchedulerProcess.objects.create(hostname="h", pid=1, started_at=now, last_heartbeat_at=now)
    run = JobRun.objects.create(
        job=job, scheduled_for=now, not_before=now, status="running", started_at=now, worker=worker
    )
    store = get_store()
    assert store.record_outcomes([runner.timed_out(run, now + timedelta(seconds=1))], worker_id=worker.pk)
    store.record_late_ends([runner.Outcome(run, "succeeded", now + timedelta(seconds=9))])
    assert JobRun.objects.get(pk=run.pk).finished_at == now + timedelta(seconds=9)
    assert counts() == {("test_noop", "timed_out"): 1}


def test_pruning_the_history_leaves_the_counts(make_job, engine_factory, now):
    for number in range(5):
        make_job(now=now - timedelta(seconds=30), name=f"j{number}")
    engine_factory(now=now).run_once()
    assert counts() == {("test_noop", "succeeded"): 5}

    # Pruning goes by when a run was written (created_at, the real clock here).
    assert prune_runs(now=timezone.now() + timedelta(days=60), max_age=timedelta(days=30), keep_per_job=1000) == 5

    assert not JobRun.objects.exists()
    assert counts() == {("test_noop", "succeeded"): 5}


def test_metrics_cost_the_same_queries_whatever_the_history(api, make_job, now):
    job = make_job(now=now, cron="0 0 1 1 *")

    def scrape() -> int:
        with CaptureQueriesContext(connection) as captured:
            assert api.get("/metrics").status_code == 200
        return len(captured.captured_queries)

    few = scrape()
    JobRun.objects.bulk_create(
        JobRun(job=job, scheduled_for=now - timedelta(seconds=n), not_before=now, status="succeeded", attempt=1)
        for n in range(1, 201)
    )
    assert scrape() == few


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_schedulers_committing_at_once_count_on_rows_of_their_own(make_job, now):
    """Two sessions counting runs of the same type in open transactions do not wait for one
    counter row (each adds to its backend's shard); the counts add up."""
    job = make_job(now=now, cron="0 0 1 1 *")
    statement = get_store().sql.count_finished.format(rows="(%s, %s)")
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid() % 16")
        mine = cursor.fetchone()[0]
    for _ in range(100):  # a session of another shard (16 shards, by backend)
        other = connections.create_connection("default")
        other.ensure_connection()
        with other.cursor() as theirs:
            theirs.execute("SELECT pg_backend_pid() % 16")
            if theirs.fetchone()[0] != mine:
                break
        other.close()
    try:
        other.set_autocommit(False)
        with other.cursor() as theirs:
            theirs.execute(statement, [job.pk, "succeeded"])
        with connection.cursor() as cursor:  # waiting for the other's counter row would time out
            cursor.execute("SET lock_timeout = '2s'")
            cursor.execute(statement, [job.pk, "succeeded"])
            cursor.execute("SET lock_timeout = 0")
        other.commit()
    finally:
        other.close()
    assert counts() == {("test_noop", "succeeded"): 2}
