"""Database outages on PostgreSQL (a cluster of the tests' own, stopped with `pg_ctl stop -m fast`).

An outage cuts every scheduler off at once, so none can heartbeat: when the database is back,
a scheduler that judged the others by their stale heartbeats alone would presume healthy
schedulers dead, mark their runs lost and run them again. Whatever the outage's length, that
must not happen. And a scheduler told to stop while the database is down still stops within
its grace period.
"""

from __future__ import annotations

import subprocess
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from .harness import FaultDatabase, Fleet, PgCluster, SchedulerOptions, create_jobs, read_lines, trigger_jobs, wait_for

pytestmark = pytest.mark.postgres

OPTIONS = SchedulerOptions(heartbeat=0.5, lost_after=4, max_sleep=0.5, max_concurrent=2, grace=10)
NEVER = "0 0 1 1 *"  # the jobs run only when triggered


def append_jobs(database_url: str, path: Path, count: int, seconds: float) -> list[int]:
    specs = [
        {
            "name": f"outage {number}",
            "cron_expression": NEVER,
            "job_type": "test_append",
            "parameters": {"path": str(path), "seconds": seconds},
        }
        for number in range(count)
    ]
    return [job.id for job in create_jobs(database_url, specs)]


def wait_running(database: FaultDatabase, run_ids: list[int], timeout: float = 20) -> dict[int, int]:
    """Wait until every run is running; return each one's worker."""

    def running() -> dict[int, int] | None:
        statuses = database.statuses(run_ids)
        if len(statuses) < len(run_ids) or any(status != "running" for status, _ in statuses.values()):
            return None
        return {run_id: worker for run_id, (_, worker) in statuses.items() if worker is not None}

    return wait_for(running, timeout, what=lambda: f"runs running: {database.statuses(run_ids)}")


@pytest.mark.parametrize("outage", [2.0, 4.0, 8.0], ids=["half-lost-after", "one-lost-after", "twice-lost-after"])
def test_an_outage_does_not_make_healthy_schedulers_presume_each_other_dead(
    pg_cluster: PgCluster, pg_database: str, fleet_factory: Callable[..., Fleet], tmp_path: Path, outage: float
) -> None:
    database = FaultDatabase(pg_database)
    path = tmp_path / "executed.txt"
    fleet = fleet_factory(pg_database, OPTIONS)
    fleet.start_registered(2)
    run_ids = trigger_jobs(pg_database, append_jobs(pg_database, path, 4, seconds=3))
    workers = wait_running(database, run_ids)
    # Two slots each: both schedulers hold runs when the database goes away.
    assert len(set(workers.values())) == 2, workers

    pg_cluster.stop("fast")
    time.sleep(outage)
    pg_cluster.start()
    time.sleep(2 * OPTIONS.lost_after + 5)

    runs = database.runs()
    pids = {row.id: row.pid for row in database.schedulers()}
    lines = read_lines(path)
    summary = (
        f"outage {outage:g}s: runs {Counter(run.status for run in runs)}, attempts "
        f"{Counter(run.attempt for run in runs)}, lines {len(lines)}"
    )
    print(f"\n{summary}")
    details = f"{summary}\n{[run for run in runs if run.status != 'succeeded']}\n{fleet.logs(tail=30)}"
    assert [run for run in runs if run.status == "lost"] == [], details
    assert [run for run in runs if run.attempt > 1] == [], details
    assert {run.id: (run.status, run.worker_id) for run in runs} == {
        run_id: ("succeeded", worker) for run_id, worker in workers.items()
    }, details
    assert Counter(line.run_id for line in lines) == Counter(run_ids), details
    assert all(pids[workers[line.run_id]] == line.pid for line in lines), details
    assert fleet.presumed_dead_lines() == [], details
    for proc in fleet.procs:
        # No log flood: per thread that talks to the database (the loop, the LISTEN connection)
        # the first error with its traceback, then one line per retry as it backs off (0.5 s,
        # then 1 s: a quarter of lost_after), then one line saying how long it lasted.
        log = fleet.log_of(proc)
        records = log.splitlines()
        retries = [line for line in records if "retrying in" in line]
        # Records with a traceback: a record's first line followed by one (a chained exception
        # shows several "Traceback" headers inside one record).
        with_traceback = [
            line
            for line, after in zip(records, records[1:], strict=False)
            if line[:4].isdigit() and after.startswith("Traceback")
        ]
        assert len(with_traceback) <= 2, log
        assert len(retries) <= 2 * (outage / 0.5 + 2), log
        assert "database available again after" in log, log
    statuses = fleet.stop_all(timeout=OPTIONS.grace + 10)
    assert set(statuses.values()) == {0}, f"{statuses}\n{fleet.logs(tail=30)}"


@pytest.mark.parametrize("in_flight", [False, True], ids=["idle", "run-in-flight"])
def test_sigterm_while_the_database_is_down_exits_within_the_grace_period(
    pg_cluster: PgCluster, pg_database: str, fleet_factory: Callable[..., Fleet], tmp_path: Path, in_flight: bool
) -> None:
    grace = 5.0
    database = FaultDatabase(pg_database)
    path = tmp_path / "executed.txt"
    fleet = fleet_factory(pg_database, SchedulerOptions(heartbeat=0.5, lost_after=4, max_sleep=0.5, grace=grace))
    (proc,) = fleet.start_registered(1)
    run_ids: list[int] = []
    if in_flight:
        run_ids = trigger_jobs(pg_database, append_jobs(pg_database, path, 1, seconds=2))
        wait_running(database, run_ids)

    pg_cluster.stop("fast")
    try:
        time.sleep(1.0)  # let it run into the outage
        fleet.term(proc)
        stopped = time.monotonic()
        try:
            status = proc.wait(grace + 3)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"still running {grace + 3:g}s after SIGTERM with the database down\n{fleet.logs(tail=40)}"
            ) from None
        took = time.monotonic() - stopped
    finally:
        pg_cluster.start()
    print(
        f"\nSIGTERM with the database down ({'a run in flight' if in_flight else 'idle'}): "
        f"exit {status} after {took:.1f}s"
    )
    if in_flight:
        # The run finished inside the grace period: its work was done once.
        assert [line.run_id for line in read_lines(path)] == run_ids, fleet.logs(tail=40)
