"""Chaos: real schedulers on one database through kill -9, SIGSTOP, a database restart or a held
write lock, with every-second jobs whose runs each append one line to a file.

Afterwards the rows and the file must agree with the promises of SPEC §6: every fire in each
job's window has its one attempt-1 row (run, or skipped with a reason) or is counted in a later
run's `missed_fires`; no fire is executed twice unless a run of it was lost and its type is safe
to repeat (only a kill -9 may lose runs: a paused or blocked scheduler is not dead); every line
belongs to a succeeded run (or a lost one, retried or killed mid-way); nothing is left queued or
running; every scheduler stops with status 0 on SIGTERM.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from .harness import (
    Audit,
    FaultDatabase,
    Fleet,
    PgCluster,
    SchedulerOptions,
    SqliteWriteLock,
    audit,
    create_jobs,
    read_lines,
)

OPTIONS = SchedulerOptions(heartbeat=1, lost_after=6, max_sleep=1, max_concurrent=4, grace=10)
# (type, overlap policy, seconds each run takes): overlapping runs, overlap skips, both types.
JOB_KINDS = [
    ("test_append", "allow", 1.5),
    ("test_append", "forbid", 1.5),
    ("test_append", "allow", 0.2),
    ("test_append_unsafe", "allow", 1.5),
    ("test_append_unsafe", "forbid", 0.5),
    ("test_append", "forbid", 0.2),
]
SETTLE_SECONDS = 40


def every_second_jobs(path: Path) -> list[dict[str, Any]]:
    return [
        {
            "name": f"chaos {number} {job_type} {overlap}",
            "cron_expression": "* * * * * *",
            "job_type": job_type,
            "overlap_policy": overlap,
            "misfire_grace_seconds": 30,
            "parameters": {"path": str(path), "seconds": seconds},
        }
        for number, (job_type, overlap, seconds) in enumerate(JOB_KINDS)
    ]


FINISHED = {"succeeded", "failed", "timed_out", "skipped", "lost"}
COUNTED_BY_STATUS = "SELECT status, SUM(total) FROM jobs_runcount GROUP BY status"


@dataclass
class Timeline:
    """Fault events at fixed offsets from the start, with when each really happened."""

    started: float = field(default_factory=time.monotonic)
    events: list[str] = field(default_factory=list)

    def at(self, offset: float, label: str, action: Callable[[], object]) -> None:
        time.sleep(max(0.0, self.started + offset - time.monotonic()))
        begun = time.monotonic() - self.started
        action()
        self.events.append(f"{begun:.1f}s {label} ({time.monotonic() - self.started - begun:.1f}s)")


def finish(fleet: Fleet, database: FaultDatabase) -> tuple[bool, dict[int, int | None]]:
    """Disable the jobs, wait (bounded) for every run to settle, SIGTERM every scheduler."""
    database.disable_jobs()
    deadline = time.monotonic() + SETTLE_SECONDS
    while database.unsettled() and time.monotonic() < deadline:
        time.sleep(0.25)
    settled = database.unsettled() == 0
    return settled, fleet.stop_all(timeout=OPTIONS.grace + 20)


def check(fleet: Fleet, database: FaultDatabase, path: Path, statuses: dict[int, int | None]) -> Audit:
    runs = database.runs()
    report = audit(
        jobs=database.jobs(),
        runs=runs,
        lines=read_lines(path),
        schedulers=database.schedulers(),
        killed_pids=fleet.killed,
    )
    for line in fleet.presumed_dead_lines(exclude=fleet.killed):
        report.problem("a scheduler that was not killed was presumed dead", line)
    for pid, status in statuses.items():
        if status != 0:
            report.problem("scheduler did not exit 0 on SIGTERM", f"pid {pid}: {status}")
    # The /metrics counters went through the same kills, pauses and outages: each finished run
    # counted once, none lost or doubled.
    counted = {status: int(total) for status, total in database.query(COUNTED_BY_STATUS)}
    finished = Counter(run.status for run in runs if run.status in FINISHED)
    if counted != finished:
        report.problem("the finished-run counters disagree with the runs", f"counted {counted}, runs {dict(finished)}")
    return report


@pytest.mark.postgres
def test_kill_pause_and_database_restart_neither_lose_nor_double_fires(
    pg_cluster: PgCluster, pg_database: str, fleet_factory: Callable[..., Fleet], tmp_path: Path
) -> None:
    database = FaultDatabase(pg_database)
    path = tmp_path / "executed.txt"
    fleet = fleet_factory(pg_database, OPTIONS)
    doomed, paused, _ = fleet.start_registered(3)
    create_jobs(pg_database, every_second_jobs(path))
    timeline = Timeline()

    def kill_and_replace() -> None:
        fleet.wait_busy(doomed)  # kill it with work in flight
        fleet.kill9(doomed)
        fleet.wait_registered(fleet.start())

    timeline.at(8, "kill -9 one scheduler, start a replacement", kill_and_replace)

    def pause() -> None:
        fleet.wait_busy(paused)
        fleet.pause(paused)

    timeline.at(18, "SIGSTOP another", pause)
    timeline.at(18 + OPTIONS.lost_after * 1.5, "SIGCONT it", lambda: fleet.resume(paused))
    timeline.at(36, "restart the database (pg_ctl restart -m fast)", lambda: pg_cluster.restart("fast"))
    timeline.at(50, "disable the jobs", lambda: None)
    settled, statuses = finish(fleet, database)

    report = check(fleet, database, path, statuses)
    print(f"\nchaos postgres: {report.summary()}; settled {settled}; events: {'; '.join(timeline.events)}")
    assert report.fires >= 6 * 40, report.report()
    assert not report.problems, report.report() + "\n" + fleet.logs(tail=40)


@pytest.mark.sqlite
def test_kill_and_a_held_write_lock_neither_lose_nor_double_fires(
    sqlite_database: str, fleet_factory: Callable[..., Fleet], tmp_path: Path
) -> None:
    database = FaultDatabase(sqlite_database)
    assert database.path is not None
    path = tmp_path / "executed.txt"
    fleet = fleet_factory(sqlite_database, OPTIONS)
    doomed, _ = fleet.start_registered(2)
    create_jobs(sqlite_database, every_second_jobs(path))
    timeline = Timeline()
    lock = SqliteWriteLock(database.path, seconds=45)  # 7.5 x lost_after

    def kill_and_replace() -> None:
        fleet.wait_busy(doomed)  # kill it with work in flight
        fleet.kill9(doomed)
        fleet.wait_registered(fleet.start())

    timeline.at(5, "kill -9 one scheduler, start a replacement", kill_and_replace)
    timeline.at(16, "hold the write lock for 45s", lock.start)
    timeline.at(70, "disable the jobs", lambda: lock.join(10))
    settled, statuses = finish(fleet, database)

    report = check(fleet, database, path, statuses)
    print(f"\nchaos sqlite: {report.summary()}; settled {settled}; events: {'; '.join(timeline.events)}")
    assert report.fires >= 6 * 55, report.report()
    assert not report.problems, report.report() + "\n" + fleet.logs(tail=40)
