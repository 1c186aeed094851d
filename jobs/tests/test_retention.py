"""Run-history retention: what is pruned, what is kept, and that pruning never holds up runs."""

from __future__ import annotations

import threading
import time
from datetime import datetime, timedelta
from typing import Any

import pytest
from django.core.management import call_command
from django.db import connection, connections
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from jobs import retention, services
from jobs.models import Job, JobRun
from jobs.retention import prune_history, prune_runs

DAY = timedelta(days=1)


def _job(name: str = "job", **fields: Any) -> Job:
    fields.setdefault("now", timezone.now())
    return services.job_create(name=name, cron_expression="0 0 1 1 *", job_type="test_noop", **fields)


def _run(
    job: Job, scheduled_for: datetime, *, status: str = "succeeded", attempt: int = 1, created: datetime
) -> JobRun:
    run = JobRun.objects.create(
        job=job, scheduled_for=scheduled_for, not_before=scheduled_for, attempt=attempt, status=status
    )
    JobRun.objects.filter(pk=run.pk).update(created_at=created)  # auto_now_add ignores a value passed in
    return run


def _left(job: Job) -> list[tuple[datetime, int]]:
    return sorted(JobRun.objects.filter(job=job).values_list("scheduled_for", "attempt"))


def test_finished_runs_older_than_the_age_go_and_unfinished_ones_stay(db: None, now: datetime) -> None:
    job = _job()
    old = {
        status: _run(job, now - 40 * DAY + i * timedelta(minutes=1), status=status, created=now - 40 * DAY)
        for i, status in enumerate(["succeeded", "failed", "timed_out", "skipped", "lost", "queued", "running"])
    }
    recent = _run(job, now - DAY, created=now - DAY)
    assert prune_runs(now=now, max_age=30 * DAY, keep_per_job=1000) == 5
    assert set(JobRun.objects.values_list("pk", flat=True)) == {old["queued"].pk, old["running"].pk, recent.pk}


def test_each_job_keeps_its_newest_fires_by_fire_time(db: None, now: datetime) -> None:
    busy, quiet = _job("busy"), _job("quiet")
    fires = [now - timedelta(minutes=m) for m in range(10)]  # newest first
    # Created in an order unrelated to the fire times: the newest fires are kept, not the newest rows.
    for fire in reversed(fires[:3]):
        _run(busy, fire, created=now)
    for fire in fires[3:]:
        _run(busy, fire, created=now)
    _run(busy, fires[2], attempt=2, status="failed", created=now)  # a retry of the third-newest fire
    _run(busy, fires[9] - timedelta(minutes=1), status="queued", created=now)  # waiting: never pruned
    for fire in fires[:3]:
        _run(quiet, fire, created=now)
    # The newest four finished: fires 0 and 1, fire 2's retry (attempt 2), then fire 2's attempt 1.
    assert prune_runs(now=now, max_age=30 * DAY, keep_per_job=4) == 7
    assert _left(busy) == sorted(
        [(fires[0], 1), (fires[1], 1), (fires[2], 2), (fires[2], 1), (fires[9] - timedelta(minutes=1), 1)]
    )
    assert len(_left(quiet)) == 3
    assert prune_runs(now=now, max_age=30 * DAY, keep_per_job=4) == 0


def test_queued_and_running_runs_neither_count_towards_the_limit_nor_go(db: None, now: datetime) -> None:
    job = _job()
    for minute, status in enumerate(["succeeded", "failed", "queued", "running"]):
        _run(job, now - timedelta(minutes=minute), status=status, created=now)
    # Four runs, over a limit of three, but only two finished ones: nothing to prune.
    assert prune_runs(now=now, max_age=30 * DAY, keep_per_job=3) == 0
    assert len(_left(job)) == 4
    _run(job, now + timedelta(minutes=1), created=now)
    assert prune_runs(now=now, max_age=30 * DAY, keep_per_job=2) == 1
    assert JobRun.objects.filter(job=job, status="failed").count() == 0
    assert JobRun.objects.filter(job=job, status__in=JobRun.ACTIVE).count() == 2


def test_deletes_go_in_batches_until_nothing_is_left(db: None, now: datetime, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(retention, "BATCH", 3)
    job = _job()
    for minute in range(10):
        _run(job, now - 40 * DAY + timedelta(minutes=minute), created=now - 40 * DAY)
    for minute in range(8):
        _run(job, now - timedelta(minutes=minute), created=now)
    with CaptureQueriesContext(connection) as queries:
        assert prune_runs(now=now, max_age=30 * DAY, keep_per_job=1) == 17
    assert _left(job) == [(now, 1)]
    deletes = [q["sql"] for q in queries.captured_queries if q["sql"].startswith("DELETE")]
    assert len(deletes) == 4 + 3  # 10 by age, then 7 beyond the limit, 3 at a time


def test_a_prune_told_to_stop_ends_after_the_batch_in_hand(
    db: None, now: datetime, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(retention, "BATCH", 3)
    job = _job()
    for minute in range(10):
        _run(job, now - 40 * DAY + timedelta(minutes=minute), created=now - 40 * DAY)
    asked: list[int] = []

    def stop() -> bool:
        asked.append(JobRun.objects.count())
        return len(asked) > 1

    assert prune_runs(now=now, max_age=30 * DAY, keep_per_job=5, stop=stop) == 3
    assert JobRun.objects.count() == 7


def test_prune_history_follows_the_settings(db: None, now: datetime, settings: Any) -> None:
    settings.JOBS = {**settings.JOBS, "RUN_RETENTION_DAYS": 7, "RUN_RETENTION_PER_JOB": 2}
    job = _job()
    for days in (1, 2, 3, 8):
        _run(job, now - days * DAY, created=now - days * DAY)
    assert prune_history(now=now) == 2  # the 8-day-old run (age), then the 3-day-old one (count)
    assert _left(job) == [(now - 2 * DAY, 1), (now - DAY, 1)]


def test_runscheduler_once_prunes_after_its_pass(db: None) -> None:
    job = _job()
    stale = _run(job, timezone.now() - 40 * DAY, created=timezone.now() - 40 * DAY)
    call_command("runscheduler", "--once")
    assert not JobRun.objects.filter(pk=stale.pk).exists()


@pytest.mark.django_db(transaction=True)
def test_the_scheduler_prunes_on_its_own_thread_and_a_slow_prune_holds_up_no_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A prune that takes long (here: until released; in life, counting runs in a big table)
    runs beside the loop: a job falling due meanwhile starts on time."""
    from jobs.scheduler import engine as engine_module

    stale = _run(_job("old"), timezone.now() - 40 * DAY, created=timezone.now() - 40 * DAY)
    pruning, release = threading.Event(), threading.Event()
    threads: list[str] = []

    def slow_prune(*, now: datetime, stop: Any) -> int:
        threads.append(threading.current_thread().name)
        pruning.set()
        release.wait(10)
        return prune_history(now=now, stop=stop)

    monkeypatch.setattr(engine_module, "prune_history", slow_prune)
    monkeypatch.setattr(engine_module, "PRUNE_FIRST_AFTER_SECONDS", 0.0)
    engine = engine_module.Engine(max_concurrent=1, max_sleep=0.2, heartbeat_seconds=0.1)
    loop = threading.Thread(target=engine.run_forever, daemon=True)
    loop.start()
    try:
        assert pruning.wait(10), "the scheduler never pruned"
        job = _job("due")
        Job.objects.filter(pk=job.pk).update(next_run_at=timezone.now())
        deadline = time.monotonic() + 5
        while not JobRun.objects.filter(job=job, status="succeeded").exists():
            assert time.monotonic() < deadline, "the due job waited for the prune"
            time.sleep(0.02)
        assert JobRun.objects.filter(pk=stale.pk).exists()  # the prune is still held
        release.set()
        while JobRun.objects.filter(pk=stale.pk).exists():
            assert time.monotonic() < deadline + 5, "the prune never finished"
            time.sleep(0.02)
    finally:
        release.set()
        engine.request_stop()
        loop.join(10)
        connections.close_all()
    assert threads == ["scheduler-prune"]
