"""Soak: several schedulers, many jobs spread over the minute, for a long while, through faults.

    .venv/bin/python bench/soak.py [--database postgres|sqlite] [--schedulers 3] [--jobs 1000]
        [--minutes 30] [--faults | --no-faults] [--lost-after 30] [--heartbeat 5]

Job i fires once a minute at second i % 60 (`S * * * * *`), so --jobs 1000 makes about 17 fires
a second; most are `test_append`, one in eleven `test_append_unsafe` (not safe to repeat), and
each run appends one line to a shared file, so what really ran can be counted. PostgreSQL runs
on a cluster of the benchmark's own (never the machine's server), SQLite in a temp file.

With --faults (the default), a fault every --fault-gap seconds, in turn: kill -9 a scheduler
and start a replacement; SIGSTOP one for 1.5 x lost-after, then SIGCONT; restart the database
(`pg_ctl restart -m fast`); stop it for lost-after seconds. On SQLite a held write lock (1.5 x
lost-after) takes the place of the restart and the stop.

At the end the jobs are disabled, the runs drained, the schedulers stopped with SIGTERM, and one
JSON line says: fires expected from the crons over the window, how many ran (rows and lines),
fires executed twice (split by whether a lost run explains it), fires skipped by reason and
counted in missed_fires, lost runs, resident memory and database connections per scheduler at
its start and end, start lateness, the fault events, and every broken promise found by
`jobs.tests.faults.harness.audit`. Exit status 1 when any promise is broken.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import harness
from bench.harness import say
from jobs.tests.faults import harness as faults

SAMPLE_SECONDS = 5.0
PROGRESS_SECONDS = 30.0


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database", choices=["postgres", "sqlite"], default="postgres", help="default: postgres")
    parser.add_argument("--schedulers", type=int, default=3, help="scheduler processes (default 3)")
    parser.add_argument("--jobs", type=int, default=1000, help="jobs, each firing once a minute (default 1000)")
    parser.add_argument("--minutes", type=float, default=30, help="how long the jobs fire (default 30)")
    parser.add_argument(
        "--faults", action=argparse.BooleanOptionalAction, default=True, help="inject faults (default: yes)"
    )
    parser.add_argument("--fault-gap", type=float, help="seconds of calm between faults (default: lost-after)")
    parser.add_argument("--lost-after", type=float, default=30, help="the schedulers' --lost-after (default 30)")
    parser.add_argument("--heartbeat", type=float, default=5, help="the schedulers' --heartbeat (default 5)")
    parser.add_argument("--max-concurrent", type=int, default=10, help="slots per scheduler (default 10)")
    parser.add_argument("--grace", type=float, default=30, help="the schedulers' --grace (default 30)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs, executed-work file)")
    args = parser.parse_args(argv)
    if args.schedulers < 1 or args.jobs < 1 or args.minutes <= 0:
        parser.error("--schedulers, --jobs and --minutes must be above 0")
    if args.heartbeat * 2 > args.lost_after:
        parser.error("--heartbeat must be at most half of --lost-after")
    if args.fault_gap is None:
        args.fault_gap = args.lost_after
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    harness.exit_on_sigterm()
    folder = Path(tempfile.mkdtemp(prefix="bench-soak-"))
    try:
        with database(args.database, folder) as (url, cluster):
            figures = Soak(args, url, cluster, folder).run()
    finally:
        if args.keep:
            say(f"kept {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)
    print(json.dumps(figures), flush=True)
    return 0 if figures["clean"] else 1


@contextmanager
def database(vendor: str, folder: Path) -> Iterator[tuple[str, faults.PgCluster | None]]:
    """A migrated database of the benchmark's own: a PostgreSQL cluster, or a SQLite file."""
    started = time.monotonic()
    if vendor == "sqlite":
        url = f"sqlite:///{folder / 'soak.sqlite3'}"
        faults.migrate(url)
        say(f"SQLite {url} migrated in {time.monotonic() - started:.1f}s")
        yield url, None
        return
    with faults.PgCluster() as cluster:
        cluster.start()
        url = cluster.create_database("soak")
        faults.migrate(url)
        say(f"PostgreSQL cluster on port {cluster.port} ({cluster.root}) migrated in {time.monotonic() - started:.1f}s")
        yield url, cluster


def job_specs(count: int, path: Path) -> list[dict[str, Any]]:
    """Job i at second i % 60 of every minute; one in eleven not safe to repeat, one in thirteen
    slow (2 s), one in seven with the `skip` misfire policy. The moduli share no factor with 60,
    so every second of the minute gets its mix of kinds."""
    return [
        {
            "name": f"soak {number}",
            "cron_expression": f"{number % 60} * * * * *",
            "job_type": "test_append_unsafe" if number % 11 == 3 else "test_append",
            "misfire_policy": "skip" if number % 7 == 0 else "run_once",
            "parameters": {"path": str(path), "seconds": 2.0 if number % 13 == 0 else 0.1},
        }
        for number in range(count)
    ]


@dataclass
class Reading:
    """A scheduler process's resident memory and database connections, first and last seen."""

    role: str
    rss_kb_start: int | None = None
    rss_kb_end: int | None = None
    connections_start: int | None = None
    connections_end: int | None = None
    exit_status: int | None = None

    def as_dict(self, pid: int) -> dict[str, Any]:
        return {
            "pid": pid,
            "role": self.role,
            "rss_kb": {"start": self.rss_kb_start, "end": self.rss_kb_end},
            "db_connections": {"start": self.connections_start, "end": self.connections_end},
            "exit_status": self.exit_status,
        }


@dataclass
class Soak:
    args: argparse.Namespace
    url: str
    cluster: faults.PgCluster | None
    folder: Path
    readings: dict[int, Reading] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        options = faults.SchedulerOptions(
            heartbeat=self.args.heartbeat,
            lost_after=self.args.lost_after,
            grace=self.args.grace,
            max_sleep=5.0,
            max_concurrent=self.args.max_concurrent,
        )
        self.fleet = faults.Fleet(self.url, self.folder / "logs", options)
        self.db = faults.FaultDatabase(self.url)
        self.path = self.folder / "executed.txt"
        self.started = time.monotonic()
        self.rotation = itertools.count()

    # -- the run ----------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        try:
            for proc in self.fleet.start_registered(self.args.schedulers):
                self.readings[proc.pid] = Reading("original")
            created = time.monotonic()
            jobs = faults.create_jobs(self.url, job_specs(self.args.jobs, self.path))
            say(f"{self.args.schedulers} schedulers, {len(jobs)} jobs created in {time.monotonic() - created:.1f}s")
            self.started = time.monotonic()
            end = self.started + self.args.minutes * 60
            self.soak(end)
            disabled_at = self.db.disable_jobs()
            say(f"jobs disabled after {self.elapsed():.0f}s; draining")
            settled = self.drain(timeout=2 * self.args.lost_after + 60)
            self.sample()
            statuses = self.fleet.stop_all(timeout=self.args.grace + 30)
            for pid, status in statuses.items():
                self.readings[pid].exit_status = status
            return self.figures(jobs, disabled_at, settled, statuses)
        finally:
            self.fleet.close()

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def soak(self, end: float) -> None:
        plan = self.fault_plan()
        next_fault = self.started + self.args.fault_gap / 2
        next_sample = next_progress = time.monotonic()
        while time.monotonic() < end:
            now = time.monotonic()
            if now >= next_sample:
                self.sample()
                next_sample = now + SAMPLE_SECONDS
            if now >= next_progress:
                executed = len(faults.read_lines(self.path))
                say(f"{self.elapsed():.0f}s: {executed} runs executed, {len(self.events)} faults")
                next_progress = now + PROGRESS_SECONDS
            if plan and now >= next_fault:
                name, seconds, action = plan[next(self.rotation) % len(plan)]
                if now + seconds < end:
                    self.fault(name, seconds, action)
                next_fault = time.monotonic() + self.args.fault_gap
            time.sleep(min(0.5, max(0.0, end - time.monotonic())))

    def drain(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.db.unsettled() == 0:
                return True
            time.sleep(0.5)
        return False

    def sample(self) -> None:
        for proc in self.fleet.live():
            if proc.pid in self.fleet.paused:
                continue
            reading = self.readings.setdefault(proc.pid, Reading("replacement"))
            rss, connections = self.fleet.rss_kb(proc), self.fleet.open_db_connections(proc)
            if reading.rss_kb_start is None:
                reading.rss_kb_start, reading.connections_start = rss, connections
            reading.rss_kb_end, reading.connections_end = rss, connections

    # -- faults -------------------------------------------------------------------------------------

    def fault_plan(self) -> list[tuple[str, float, Callable[[], dict[str, Any]]]]:
        if not self.args.faults:
            return []
        lost_after = self.args.lost_after
        plan: list[tuple[str, float, Callable[[], dict[str, Any]]]] = [
            ("kill -9 a scheduler, start a replacement", 0.0, self.kill_and_replace),
            ("SIGSTOP a scheduler past lost-after, then SIGCONT", 1.5 * lost_after, self.pause),
        ]
        if self.cluster is not None:
            plan += [
                ("restart the database (pg_ctl restart -m fast)", 0.0, self.restart_database),
                ("stop the database for lost-after", lost_after, self.stop_database),
            ]
        else:
            plan.append(("hold the SQLite write lock past lost-after", 1.5 * lost_after, self.hold_write_lock))
        return plan

    def fault(self, name: str, seconds: float, action: Callable[[], dict[str, Any]]) -> None:
        at = self.elapsed()
        say(f"{at:.0f}s: fault: {name}")
        details = action()
        self.events.append({"at_s": round(at, 1), "fault": name, "took_s": round(self.elapsed() - at, 1), **details})

    def victim(self, wait: float = 5.0) -> subprocess.Popen[bytes]:
        """The live scheduler with the most runs in flight, waiting up to `wait` seconds for one
        to have any, so that a fault hits work in flight."""
        deadline = time.monotonic() + wait
        while True:
            live = [proc for proc in self.fleet.live() if proc.pid not in self.fleet.paused]
            busy = {proc.pid: self.db.running_on(proc.pid) for proc in live}
            chosen = max(live, key=lambda proc: busy[proc.pid])
            if busy[chosen.pid] or time.monotonic() >= deadline:
                return chosen
            time.sleep(0.02)

    def kill_and_replace(self) -> dict[str, Any]:
        self.sample()
        doomed = self.victim()
        in_flight = self.db.running_on(doomed.pid)
        self.fleet.kill9(doomed)
        self.readings[doomed.pid].exit_status = doomed.returncode
        replacement = self.fleet.start()
        self.readings[replacement.pid] = Reading("replacement")
        self.fleet.wait_registered(replacement, timeout=60)
        return {"pid": doomed.pid, "runs_in_flight": in_flight, "replacement_pid": replacement.pid}

    def pause(self) -> dict[str, Any]:
        proc = self.victim()
        in_flight = self.db.running_on(proc.pid)
        self.fleet.pause(proc)
        try:
            time.sleep(1.5 * self.args.lost_after)
        finally:
            self.fleet.resume(proc)
        return {"pid": proc.pid, "runs_in_flight": in_flight, "paused_s": 1.5 * self.args.lost_after}

    def restart_database(self) -> dict[str, Any]:
        assert self.cluster is not None
        self.cluster.restart("fast")
        return {}

    def stop_database(self) -> dict[str, Any]:
        assert self.cluster is not None
        self.cluster.stop("fast")
        try:
            time.sleep(self.args.lost_after)
        finally:
            self.cluster.start()
        return {"down_s": self.args.lost_after}

    def hold_write_lock(self) -> dict[str, Any]:
        assert self.db.path is not None
        seconds = 1.5 * self.args.lost_after
        with faults.SqliteWriteLock(self.db.path, seconds) as lock:
            lock.join(seconds + 10)
        return {"held_s": seconds}

    # -- figures ------------------------------------------------------------------------------------

    def figures(
        self,
        jobs: list[faults.CreatedJob],
        disabled_at: datetime,
        settled: bool,
        statuses: dict[int, int | None],
    ) -> dict[str, Any]:
        # A fire in the last second before the jobs were disabled may not have been fired yet.
        window_end = disabled_at - timedelta(seconds=1)
        windows = {job.id: (job.next_run_at, window_end) for job in jobs if job.next_run_at is not None}
        runs = self.db.runs()
        report = faults.audit(
            jobs=self.db.jobs(),
            runs=runs,
            lines=faults.read_lines(self.path),
            schedulers=self.db.schedulers(),
            killed_pids=self.fleet.killed,
            windows=windows,
        )
        presumed_dead = self.fleet.presumed_dead_lines(exclude=self.fleet.killed)
        exits_clean = all(status == 0 for status in statuses.values())
        problems = {kind: len(details) for kind, details in report.problems.items()}
        figures: dict[str, Any] = {
            "benchmark": "soak",
            "database": self.db.vendor,
            "schedulers": self.args.schedulers,
            "jobs": self.args.jobs,
            "minutes": self.args.minutes,
            "lost_after": self.args.lost_after,
            "heartbeat": self.args.heartbeat,
            "max_concurrent": self.args.max_concurrent,
            "fires_expected": report.fires,
            "fires_with_row": report.with_row,
            "fires_in_missed_fires": report.covered,
            "executed": {
                "lines": report.executed,
                "succeeded_rows": report.succeeded,
                "rows": report.rows,
                "statuses": dict(Counter(run.status for run in runs)),
            },
            "doubled": {"explained_by_lost": report.doubled_explained, "unexplained": report.doubled_unexplained},
            "missed": {"skipped_by_reason": dict(report.skipped), "missed_fires_total": report.missed_fires},
            "lost": report.lost,
            "lost_retried": report.retried,
            "lateness_s": {
                "p50": harness.rounded(harness.percentile(report.lateness, 50), 3),
                "p99": harness.rounded(harness.percentile(report.lateness, 99), 3),
                "max": harness.rounded(max(report.lateness), 3) if report.lateness else None,
            },
            "processes": [reading.as_dict(pid) for pid, reading in self.readings.items()],
            "faults": self.events,
            "presumed_dead_log_lines": len(presumed_dead),
            "settled": settled,
            "problems": problems,
            "problem_examples": {kind: details[:3] for kind, details in report.problems.items()},
            "clean": not problems and not presumed_dead and settled and exits_clean,
        }
        say(report.summary())
        for kind, details in report.problems.items():
            say(f"PROBLEM {kind}: {len(details)}, e.g. {details[:3]}")
        for line in presumed_dead[:5]:
            say(f"PROBLEM presumed dead: {line}")
        return figures


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
