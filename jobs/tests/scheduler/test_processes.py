"""Real `manage.py runscheduler` processes against the test database.

Every process a test starts is stopped by its own pid at the end of the test.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.db import connection
from django.utils import timezone

from jobs import services
from jobs.models import Job, JobRun, SchedulerProcess

pytestmark = pytest.mark.django_db(transaction=True)

ROOT = Path(settings.BASE_DIR)


def _database_url() -> str:
    db = connection.settings_dict
    if connection.vendor == "postgresql":
        return f"postgres://{db['USER']}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"
    return f"sqlite:///{db['NAME']}"


def wait_for(predicate: Callable[[], object], timeout: float, interval: float = 0.05) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s")


class Schedulers:
    """Start and stop runscheduler processes; stops only the ones it started."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(
        self, *args: str, max_concurrent: int = 5, env: dict[str, str] | None = None, python: tuple[str, ...] = ()
    ) -> subprocess.Popen[bytes]:
        """Start `manage.py runscheduler *args`; `python` goes to the interpreter before the script."""
        env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "jobs.tests.settings",
            "DATABASE_URL": _database_url(),
            "ENV_FILE": os.devnull,
            "LOG_LEVEL": "info",
            **(env or {}),
        }
        log = open(self.tmp_path / f"scheduler-{len(self.procs)}.log", "wb")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(
            [
                sys.executable,
                *python,
                str(ROOT / "manage.py"),
                "runscheduler",
                "--max-concurrent",
                str(max_concurrent),
                "--heartbeat",
                "0.5",
                "--lost-after",
                "3",
                "--max-sleep",
                "0.5",
                *args,
            ],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.procs.append(proc)
        return proc

    def registered(self, proc: subprocess.Popen[bytes]) -> SchedulerProcess:
        return wait_for(lambda: SchedulerProcess.objects.filter(pid=proc.pid, stopped_at__isnull=True).first(), 20)  # type: ignore[return-value]

    def logs(self) -> str:
        return "\n".join(path.read_text(errors="replace") for path in sorted(self.tmp_path.glob("scheduler-*.log")))

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            proc.wait(10)


@pytest.fixture
def schedulers(tmp_path: Path) -> Iterator[Schedulers]:
    group = Schedulers(tmp_path)
    try:
        yield group
    finally:
        group.stop_all()


def _job(**fields: Any) -> Job:
    fields.setdefault("name", "job")
    fields.setdefault("cron_expression", "0 0 1 1 *")
    fields.setdefault("job_type", "test_noop")
    return services.job_create(**fields)


def test_several_processes_fire_every_second_exactly_once(schedulers: Schedulers) -> None:
    count = 3 if connection.vendor == "postgresql" else 2
    # Two slots each, five jobs a second: no single process can take every fire, so they share.
    procs = [schedulers.start(max_concurrent=2) for _ in range(count)]
    for proc in procs:
        schedulers.registered(proc)
    jobs = [_job(name=f"every second {i}", cron_expression="* * * * * *", overlap_policy="allow") for i in range(5)]
    time.sleep(6)
    for job in jobs:
        services.job_pause(job)
    wait_for(lambda: not JobRun.objects.active().exists(), 20)
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    for proc in procs:
        assert proc.wait(30) == 0, schedulers.logs()

    workers = set()
    for job in jobs:
        runs = list(job.runs.all())
        fires = Counter(run.scheduled_for for run in runs)
        assert fires, f"job {job.pk} never fired"
        assert max(fires.values()) == 1, f"double fire: {fires.most_common(1)}"
        first, last = min(fires), max(fires)
        expected = int((last - first).total_seconds()) + 1
        assert len(fires) == expected >= 4, f"missing fires between {first} and {last}"
        assert {run.status for run in runs} == {"succeeded"}
        assert {run.attempt for run in runs} == {1}
        workers |= {run.worker_id for run in runs}
    assert len(workers) >= 2, "the work was not shared between the processes"


def test_kill_9_mid_run_is_recovered_and_safe_work_retried(schedulers: Schedulers) -> None:
    first = schedulers.start(max_concurrent=1)
    doomed = schedulers.registered(first)
    job = _job(job_type="test_sleep", parameters={"seconds": 2})
    run = services.job_trigger(job)
    wait_for(lambda: JobRun.objects.filter(pk=run.pk, status="running", worker=doomed).exists(), 20)
    first.send_signal(signal.SIGKILL)
    assert first.wait(10) == -signal.SIGKILL
    killed_at = time.monotonic()

    survivor = schedulers.start()
    schedulers.registered(survivor)
    retry = wait_for(lambda: JobRun.objects.filter(job=job, attempt=2, status="succeeded").first(), 30)
    recovered_in = time.monotonic() - killed_at
    run.refresh_from_db()
    assert run.status == "lost" and str(doomed) in run.error
    assert retry.trigger == "retry" and retry.scheduled_for == run.scheduled_for  # type: ignore[attr-defined]
    assert recovered_in < 60
    doomed.refresh_from_db()
    assert doomed.stopped_at is not None


def test_a_paused_scheduler_is_not_presumed_dead_and_its_run_is_not_repeated(schedulers: Schedulers) -> None:
    """SIGSTOP a scheduler mid-run for three times --lost-after: its heartbeat goes stale, but
    its process (SQLite) or database session (PostgreSQL) is still there, so the other one
    leaves its run alone. On SIGCONT it finishes the run and records it: one attempt, no retry.
    (A scheduler that was presumed dead, say cut off from the database, registers anew:
    test_engine.test_a_scheduler_presumed_dead_registers_anew_before_it_runs_anything.)"""
    paused = schedulers.start()
    me = schedulers.registered(paused)
    job = _job(job_type="test_sleep", parameters={"seconds": 1.5})  # safe to repeat: a loss would retry it
    run = services.job_trigger(job)
    wait_for(lambda: JobRun.objects.filter(pk=run.pk, status="running", worker=me).exists(), 20)
    paused.send_signal(signal.SIGSTOP)
    try:
        other = schedulers.start()
        schedulers.registered(other)
        sqlite = connection.vendor == "sqlite"
        evidence = "is still running on this host" if sqlite else "database session is still open"
        wait_for(lambda: evidence in schedulers.logs(), 20)  # judged once it was connected for --lost-after
        time.sleep(2)
        assert JobRun.objects.get(pk=run.pk).status == "running"
        assert SchedulerProcess.objects.get(pk=me.pk).stopped_at is None
    finally:
        paused.send_signal(signal.SIGCONT)
    wait_for(lambda: JobRun.objects.filter(pk=run.pk, status="succeeded").exists(), 20)
    assert list(job.runs.values_list("attempt", "status", "worker_id")) == [(1, "succeeded", me.pk)]
    assert "registering again" not in schedulers.logs()


def test_kill_9_of_unsafe_work_is_lost_without_retry(schedulers: Schedulers) -> None:
    first = schedulers.start()
    doomed = schedulers.registered(first)
    job = _job(job_type="test_sleep_unsafe", parameters={"seconds": 30})
    run = services.job_trigger(job)
    wait_for(lambda: JobRun.objects.filter(pk=run.pk, status="running", worker=doomed).exists(), 20)
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    schedulers.registered(schedulers.start())
    wait_for(lambda: JobRun.objects.filter(pk=run.pk, status="lost").exists(), 30)
    time.sleep(1.5)  # a retry would have been queued in the same transaction
    assert list(job.runs.values_list("attempt", "status")) == [(1, "lost")]


def test_sigterm_lets_the_running_job_finish_then_exits_0(schedulers: Schedulers) -> None:
    proc = schedulers.start()
    me = schedulers.registered(proc)
    job = _job(job_type="test_sleep", parameters={"seconds": 2})
    run = services.job_trigger(job)
    wait_for(lambda: JobRun.objects.filter(pk=run.pk, status="running").exists(), 20)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0, schedulers.logs()
    run.refresh_from_db()
    assert run.status == "succeeded"
    me.refresh_from_db()
    assert me.stopped_at is not None


def test_second_signal_exits_at_once(schedulers: Schedulers) -> None:
    proc = schedulers.start()
    schedulers.registered(proc)
    run = services.job_trigger(_job(job_type="test_sleep", parameters={"seconds": 60}))
    wait_for(lambda: JobRun.objects.filter(pk=run.pk, status="running").exists(), 20)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    assert proc.poll() is None  # still waiting for the run
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(5) != 0
    assert time.monotonic() - started < 2
    # The run it left behind is still marked running, for recovery to mark lost.
    assert JobRun.objects.get(pk=run.pk).status == "running"


def test_a_change_wakes_an_idle_scheduler_within_a_second(schedulers: Schedulers) -> None:
    # With --max-sleep 30 only a wake-up can explain a prompt start: a NOTIFY on PostgreSQL,
    # on SQLite the commit counter (PRAGMA data_version) the scheduler watches.
    # Heartbeats every 10 s too, since each heartbeat wake-up also looks for work.
    proc = schedulers.start("--max-sleep", "30", "--heartbeat", "10", "--lost-after", "30")
    schedulers.registered(proc)
    time.sleep(1)  # let it settle into its long sleep
    now = timezone.now()
    due = _job(cron_expression="* * * * * *", now=now + timedelta(seconds=1))
    first = wait_for(lambda: due.runs.exclude(started_at=None).order_by("scheduled_for").first(), 10)
    assert first.lateness_seconds < 1.0  # type: ignore[attr-defined]
    services.job_pause(due)

    manual = _job()
    requested = timezone.now()
    run = services.job_trigger(manual, now=requested)
    started = wait_for(lambda: JobRun.objects.filter(pk=run.pk).exclude(started_at=None).first(), 10)
    assert (started.started_at - requested).total_seconds() < 1.0  # type: ignore[attr-defined]


def test_downtime_follows_the_misfire_policy_on_start(schedulers: Schedulers) -> None:
    three_hours_ago = timezone.now() - timedelta(hours=3)
    # No grace: even a fire a moment ago counts as missed, whatever the time of day the test runs.
    catch_up = _job(name="catch up", cron_expression="*/30 * * * *", misfire_grace_seconds=0, now=three_hours_ago)
    skip = _job(
        name="skip", cron_expression="*/30 * * * *", misfire_policy="skip", misfire_grace_seconds=0, now=three_hours_ago
    )
    proc = schedulers.start("--once")
    assert proc.wait(30) == 0, schedulers.logs()
    (caught,) = catch_up.runs.all()
    assert caught.status == "succeeded" and caught.missed_fires >= 5
    (skipped,) = skip.runs.all()
    assert skipped.status == "skipped" and "missed" in skipped.skip_reason
    for job in (catch_up, skip):
        job.refresh_from_db()
        assert job.next_run_at is not None and job.next_run_at > timezone.now()


LIBFAKETIME = next(Path("/usr/lib").glob("*/faketime/libfaketime.so.1"), Path("/usr/lib/faketime/libfaketime.so.1"))


def _skewed(offset: str) -> dict[str, str]:
    """Environment that makes a process's wall clock read `offset` off, as a host without time
    synchronisation does (its monotonic clock stays true: timed waits depend on it)."""
    if not LIBFAKETIME.exists():
        if os.environ.get("CI") == "true":
            raise AssertionError(f"{LIBFAKETIME} is missing: apt-get install faketime")
        pytest.skip("libfaketime is missing (apt-get install faketime)")
    return {"LD_PRELOAD": str(LIBFAKETIME), "FAKETIME": offset, "FAKETIME_DONT_FAKE_MONOTONIC": "1"}


def _server_now() -> Any:
    with connection.cursor() as cursor:
        cursor.execute("SELECT clock_timestamp()")
        return cursor.fetchone()[0]


@pytest.mark.postgres
def test_schedulers_whose_clocks_disagree_go_by_the_databases(schedulers: Schedulers) -> None:
    """One scheduler's host clock 90 s ahead, another's 45 s behind (libfaketime): nothing starts
    before its fire time as the server sees it, every fire runs once, neither is presumed dead
    by the other, and each logs its skew once."""
    ahead = schedulers.start("--lost-after", "6", "--heartbeat", "1", env=_skewed("+90s"))
    behind = schedulers.start("--lost-after", "6", "--heartbeat", "1", env=_skewed("-45s"))
    for proc in (ahead, behind):
        schedulers.registered(proc)
    first_fire = (_server_now() + timedelta(seconds=3)).replace(microsecond=0)
    jobs = [_job(name=f"every second {i}", cron_expression="* * * * * *", overlap_policy="allow") for i in range(3)]
    Job.objects.filter(pk__in=[job.pk for job in jobs]).update(next_run_at=first_fire)
    # Watch from outside, by the server's clock, when the first run of each job appears.
    seen: dict[int, Any] = {}
    deadline = time.monotonic() + 15
    while len(seen) < len(jobs) and time.monotonic() < deadline:
        server_now = _server_now()
        for job_id in JobRun.objects.filter(job__in=jobs).values_list("job_id", flat=True).distinct():
            seen.setdefault(job_id, server_now)
        time.sleep(0.02)
    assert len(seen) == len(jobs), schedulers.logs()
    assert all(at >= first_fire for at in seen.values()), (first_fire, seen)
    time.sleep(8)  # > lost_after: a peer judged by a skewed clock would be presumed dead by now
    for job in jobs:
        services.job_pause(job)
    wait_for(lambda: not JobRun.objects.active().exists(), 20)
    for proc in (ahead, behind):
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, schedulers.logs()
    runs = list(JobRun.objects.filter(job__in=jobs))
    assert runs and all(run.started_at >= run.scheduled_for for run in runs if run.started_at)
    assert {run.status for run in runs} == {"succeeded"}
    assert max(Counter((run.job_id, run.scheduled_for) for run in runs).values()) == 1
    logs = schedulers.logs()
    assert "lost" not in {run.status for run in runs} and "presumed dead" not in logs, logs
    assert logs.count("90.0s ahead of the database server's") == 1, logs
    assert logs.count("45.0s behind the database server's") == 1, logs


# Modules that serve the web: a scheduler that ran its jobs must not have imported them.
WEB_ONLY = ("jobs.admin", "jobs.forms", "jobs.api", "jobs.metrics", "drf_spectacular.openapi", "rest_framework.views")
# Runs the script named next (manage.py) as python would, and writes the modules loaded by the
# time it exits to the file named by MODULES_FILE.
LIST_MODULES_AT_EXIT = (
    "import atexit, os, runpy, sys; "
    "atexit.register(lambda: open(os.environ['MODULES_FILE'], 'w').write('\\n'.join(sorted(sys.modules)))); "
    "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
)


def test_a_scheduler_imports_neither_the_api_nor_the_admin(schedulers: Schedulers, tmp_path: Path) -> None:
    listed = tmp_path / "modules.txt"
    proc = schedulers.start(env={"MODULES_FILE": str(listed)}, python=("-c", LIST_MODULES_AT_EXIT))
    schedulers.registered(proc)
    job = _job(cron_expression="* * * * * *")
    wait_for(lambda: job.runs.filter(status="succeeded").exists(), 20)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0, schedulers.logs()

    imported = set(listed.read_text().splitlines())
    assert {"jobs.scheduler.engine", "jobs.tests.job_types", "croniter"} <= imported
    assert [name for name in sorted(imported) if name.startswith(WEB_ONLY)] == []
