"""Drain: a backlog of 10,000 runs due in the same second, with 1 and with 3 scheduler processes.

    .venv/bin/python bench/drain.py [--database sqlite|postgres|both] [--runs 10000] [--schedulers 1,3]
        [--repeat 3] [--max-concurrent 5]

For each count in --schedulers (ascending), --repeat times: the tables are emptied and --runs
jobs of the no-op type `bench_noop` loaded afresh, that many `runscheduler` processes are
started and left to settle into their idle sleep, then every job is made due at one whole second
a few seconds ahead (longer than the schedulers' longest sleep, so SQLite, which has no NOTIFY,
sees it too; the same arming as bench/burst.py). Arming ahead rather than loading jobs already
overdue makes every scheduler start from the same instant: processes started one after another
would otherwise find the backlog at different times. The jobs allow overlap and have a misfire
grace of an hour, so a slow drain is measured rather than cut short by the misfire policy.

Figures per measurement: drain time (last run's finished_at minus the due second), runs/s
(runs / drain time), whether every job ran exactly once for that second and succeeded, the CPU
seconds of the scheduler processes (and, on PostgreSQL, of the server backends serving them)
from arming to drained, and how many runs each process executed (JobRun.worker). Per scheduler
count: the median runs/s and every value. Exit status 1 when a measurement is not exactly once.

Targets: none fixed. On PostgreSQL, 3 schedulers should drain faster than 1 (claims do not wait on
each other); on SQLite, which lets one process write at a time, more schedulers add contention,
not throughput.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import harness
from bench.harness import say

JOB_NAME = "drain"
BATCH = 5000
# Longer than any drain measured here: a queued run is never expired by the misfire policy.
MISFIRE_GRACE_SECONDS = 3600


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    harness.add_common_arguments(parser)
    parser.add_argument("--runs", type=int, default=10000, help="jobs due in the same second (default 10000)")
    parser.add_argument(
        "--schedulers",
        default="1,3",
        help="comma-separated counts of scheduler processes, each measured in turn (default 1,3)",
    )
    parser.add_argument("--repeat", type=int, default=3, help="measurements per scheduler count (default 3)")
    harness.add_arming_arguments(parser, what="the backlog", drain_timeout=300)
    args = parser.parse_args(argv)
    args.scheduler_counts = harness.counts_option(parser, args.schedulers, "--schedulers", minimum=1, example="1,3")
    if args.runs < 1 or args.repeat < 1:
        parser.error("--runs and --repeat must be above 0")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.database == "both":
        measurements = len(args.scheduler_counts) * args.repeat
        timeout = 600 + measurements * (args.lead + args.drain_timeout + 120)
        return harness.run_each_database(__file__, argv, "drain", timeout=timeout)
    harness.exit_on_sigterm()
    if harness.postgres_missing(args, "drain"):
        return 0
    with harness.migrated_database(args, "bench_drain") as (database, env):
        phases = [phase(args, env, database.vendor, count) for count in args.scheduler_counts]
    figures = summary(args, phases, database.vendor)
    print(json.dumps(figures), flush=True)
    return 0 if figures["exactly_once"] else 1


# -- the benchmark -------------------------------------------------------------------------------


def fresh_load(count: int) -> None:
    """Empty the jobs tables and load `count` jobs that are not due, so each measurement starts alike."""
    from django.db import connection

    from jobs.models import Job, JobRun, RunCount, SchedulerProcess

    started = time.monotonic()
    tables = [model._meta.db_table for model in (JobRun, Job, SchedulerProcess, RunCount)]
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute(f"TRUNCATE {', '.join(tables)}")
        else:
            for table in tables:
                cursor.execute(f"DELETE FROM {table}")
    harness.create_jobs_not_due(JOB_NAME, count, batch=BATCH, misfire_grace_seconds=MISFIRE_GRACE_SECONDS)
    with connection.cursor() as cursor:
        # As autovacuum (PostgreSQL) or `PRAGMA optimize` would, so plans do not depend on timing;
        # on PostgreSQL vacuum too, or autovacuum's pass over the fresh rows lands in the window.
        if connection.vendor == "postgresql":
            cursor.execute("VACUUM ANALYZE")
        else:
            cursor.execute("ANALYZE")
            cursor.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    say(f"loaded {count} jobs in {time.monotonic() - started:.1f}s")


def drain_figures(due: datetime, jobs: int, pids: list[int]) -> dict[str, Any]:
    """Drain time, runs/s, the exactly-once check and the runs per process for the runs of one due second."""
    from jobs.models import JobRun

    rows, figures = harness.fire_figures(due, jobs)
    started = [row[4] for row in rows if row[4] is not None]
    finished = [row[5] for row in rows if row[5] is not None]
    per_pid = Counter(row[6] for row in rows)
    drain = (max(finished) - due).total_seconds() if finished else None
    return {
        **figures,
        # No run of any other fire either.
        "exactly_once": figures["exactly_once"] and JobRun.objects.count() == jobs,
        "first_start_s": harness.rounded((min(started) - due).total_seconds()) if started else None,
        "drain_s": harness.rounded(drain) if drain is not None else None,
        "runs_per_s": round(len(finished) / drain, 1) if drain and drain > 0 else None,
        # In the order the processes were started; runs no process holds (none, normally) last.
        "runs_per_scheduler": [per_pid.get(pid, 0) for pid in pids],
        "runs_without_scheduler": sum(count for pid, count in per_pid.items() if pid not in pids),
    }


def measure(args: argparse.Namespace, env: dict[str, str], vendor: str, count: int, number: int) -> dict[str, Any]:
    """One drain of a fresh backlog by `count` fresh scheduler processes."""
    from django.utils import timezone

    fresh_load(args.runs)
    schedulers: list[harness.Scheduler] = []
    try:
        # All started before any is waited for, so they come up together.
        schedulers = [
            harness.Scheduler(env, max_concurrent=args.max_concurrent, python=args.scheduler_python)
            for _ in range(count)
        ]
        for scheduler in schedulers:
            scheduler.wait_registered()
        pids = [scheduler.pid for scheduler in schedulers]
        time.sleep(1.0)  # let them settle into their idle sleep
        with harness.sampled(args, f"drain-{vendor}-{count}x-{number}", pids[0]):
            due = harness.due_second(args.lead)
            harness.arm(JOB_NAME, due)
            cpu_before = harness.total_cpu_seconds(pids)
            backends = harness.pg_backends() if vendor == "postgres" else []
            backend_cpu_before = harness.total_cpu_seconds(backends)
            time.sleep(max(0.0, (due - timezone.now()).total_seconds()))
            done = harness.wait_until(
                lambda: not all(s.alive() for s in schedulers) or harness.finished_count(due) >= args.runs,
                args.drain_timeout,
                interval=0.1,
            )
            for scheduler in schedulers:
                if not scheduler.alive():
                    raise RuntimeError(f"scheduler {scheduler.pid} exited:\n{scheduler.log_tail()}")
            cpu = harness.total_cpu_seconds(pids) - cpu_before
            backend_cpu = harness.total_cpu_seconds(backends) - backend_cpu_before
    finally:
        statuses = [scheduler.stop() for scheduler in schedulers]
        log_lines = {
            "errors": sum(scheduler.count_log_lines(" ERROR ") for scheduler in schedulers),
            "warnings": sum(scheduler.count_log_lines(" WARNING ") for scheduler in schedulers),
        }
        for scheduler in schedulers:
            scheduler.remove_log()

    figures = drain_figures(due, args.runs, pids)
    figures["scheduler_cpu_s"] = harness.rounded(cpu, 3)
    if vendor == "postgres":
        figures["db_backend_cpu_s"] = harness.rounded(backend_cpu, 3)
        figures["db_backends"] = len(backends)
    figures["scheduler_exit_statuses"] = statuses
    figures["scheduler_log"] = log_lines
    if not done:
        figures["timed_out"] = True
    say(
        f"{count} scheduler(s), #{number}: drained in {figures['drain_s']}s ({figures['runs_per_s']} runs/s; "
        f"fired {figures['fired_s']}s), runs per scheduler {figures['runs_per_scheduler']}, scheduler CPU "
        f"{figures['scheduler_cpu_s']}s"
        + (f" (+ PostgreSQL backends {figures['db_backend_cpu_s']}s)" if vendor == "postgres" else "")
        + f", log errors/warnings {log_lines['errors']}/{log_lines['warnings']}, exactly once: "
        f"{figures['exactly_once']}"
    )
    return figures


def phase(args: argparse.Namespace, env: dict[str, str], vendor: str, count: int) -> dict[str, Any]:
    """--repeat drains with `count` schedulers: the median runs/s and every value."""
    say(f"--- {count} scheduler(s), {args.runs} runs, {args.repeat} time(s) ---")
    each = [measure(args, env, vendor, count, number) for number in range(1, args.repeat + 1)]
    rates = [m["runs_per_s"] for m in each if m["runs_per_s"] is not None]
    drains = [m["drain_s"] for m in each if m["drain_s"] is not None]
    cpus = [m["scheduler_cpu_s"] for m in each if m["scheduler_cpu_s"] is not None]
    figures: dict[str, Any] = {
        "schedulers": count,
        "runs_per_s_median": harness.rounded(harness.median(rates), 1),
        "runs_per_s_each": rates,
        "drain_s_median": harness.rounded(harness.median(drains)),
        "drain_s_each": drains,
        "scheduler_cpu_s_median": harness.rounded(harness.median(cpus), 3),
        "scheduler_cpu_s_each": cpus,
    }
    if vendor == "postgres":
        backend = [m["db_backend_cpu_s"] for m in each if m["db_backend_cpu_s"] is not None]
        figures["db_backend_cpu_s_median"] = harness.rounded(harness.median(backend), 3)
        figures["db_backend_cpu_s_each"] = backend
    figures["runs_per_scheduler_each"] = [m["runs_per_scheduler"] for m in each]
    figures["exactly_once"] = all(m["exactly_once"] for m in each) and len(rates) == args.repeat
    figures["each"] = each
    say(
        f"{count} scheduler(s): median {figures['runs_per_s_median']} runs/s (each {rates}), median drain "
        f"{figures['drain_s_median']}s, exactly once: {figures['exactly_once']}"
    )
    return figures


def summary(args: argparse.Namespace, phases: list[dict[str, Any]], vendor: str) -> dict[str, Any]:
    """Every phase, and how the most schedulers compare with the fewest."""
    figures: dict[str, Any] = {
        "benchmark": "drain",
        "database": vendor,
        "runs": args.runs,
        "max_concurrent": args.max_concurrent,
        "repeat": args.repeat,
        "exactly_once": all(p["exactly_once"] for p in phases),
        "phases": phases,
    }
    if len(phases) > 1:
        low, high = phases[0], phases[-1]
        speedup = (
            high["runs_per_s_median"] / low["runs_per_s_median"]
            if low["runs_per_s_median"] and high["runs_per_s_median"]
            else None
        )
        figures["scaling"] = {
            "from_schedulers": low["schedulers"],
            "to_schedulers": high["schedulers"],
            "runs_per_s_median": [low["runs_per_s_median"], high["runs_per_s_median"]],
            "speedup": harness.rounded(speedup, 2) if speedup is not None else None,
        }
        say(
            f"{low['schedulers']} -> {high['schedulers']} schedulers: {low['runs_per_s_median']} -> "
            f"{high['runs_per_s_median']} runs/s (x{figures['scaling']['speedup']})"
        )
    return figures


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
