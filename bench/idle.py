"""Idle: what one `runscheduler` process costs with many jobs that are not due, plus one every-second job.

    .venv/bin/python bench/idle.py [--database sqlite|postgres|both] [--jobs 0,100000] [--seconds 60]

For each count in --jobs (ascending; default 0 then 100,000, so the cost can be compared), that
many enabled jobs are loaded whose next fire is over a year-boundary away, and one every-second
job (`* * * * * *`, bench_noop) is created through the services. A fresh scheduler process runs
for --seconds; after --warmup seconds the window starts, in which we sample the process's RSS
(VmRSS) and measure its CPU (utime + stime, all threads) as a share of one core. On PostgreSQL
we also measure the CPU of the server backends serving it, and the database's transactions and
rows read per second (pg_stat_database), which would grow if a query scanned the idle jobs.
Afterwards the every-second job's runs in the window give its start lateness and whether each
second ran exactly once.

Targets: RSS < 45 MB (issue #12), CPU < 0.5 % of a core, p99 lateness < 10 ms, not growing with the jobs.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import harness
from bench.harness import say

TARGET_RSS_MB = 45.0  # issue #12; APScheduler measured 47 MB on this harness
TARGET_CPU_PERCENT = 0.5
TARGET_P99_MS = 10.0
BATCH = 5000


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    harness.add_common_arguments(parser)
    parser.add_argument(
        "--jobs",
        default="0,100000",
        help="comma-separated counts of not-due jobs, each measured in turn (default 0,100000)",
    )
    parser.add_argument("--seconds", type=float, default=60, help="how long each scheduler process runs (default 60)")
    parser.add_argument("--warmup", type=float, default=5, help="seconds left out at the start (default 5)")
    parser.add_argument("--sample", type=float, default=0.5, help="seconds between RSS samples (default 0.5)")
    args = parser.parse_args(argv)
    args.job_counts = harness.counts_option(parser, args.jobs, "--jobs", minimum=0, example="0,100000")
    if args.seconds - args.warmup < 5:
        parser.error("--seconds must exceed --warmup by at least 5")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.database == "both":
        timeout = 600 + len(args.job_counts) * (args.seconds + 300)
        return harness.run_each_database(__file__, argv, "idle", timeout=timeout)
    harness.exit_on_sigterm()
    if harness.postgres_missing(args, "idle"):
        return 0
    with harness.migrated_database(args, "bench_idle") as (database, env):
        phases = []
        loaded = 0
        for count in args.job_counts:
            load_jobs(loaded, count)
            loaded = count
            phases.append(measure(args, env, database.vendor, count))
    figures = summary(phases, database.vendor)
    print(json.dumps(figures), flush=True)
    return 0


# -- the benchmark -------------------------------------------------------------------------------


def load_jobs(have: int, want: int) -> None:
    """Bring the not-due jobs from `have` to `want`, in batches, and refresh the planner's statistics."""
    from django.db import connection

    if want <= have:
        return
    started = time.monotonic()
    harness.create_jobs_not_due("idle", want, start=have, batch=BATCH)
    with connection.cursor() as cursor:
        # As autovacuum (PostgreSQL) or `PRAGMA optimize` would, so plans do not depend on timing;
        # on PostgreSQL vacuum too, or autovacuum's pass over the fresh rows lands in the window.
        cursor.execute("VACUUM ANALYZE" if connection.vendor == "postgresql" else "ANALYZE")
    say(f"loaded {want - have} not-due jobs (now {want}) in {time.monotonic() - started:.1f}s")


def scan_plans(vendor: str) -> dict[str, str]:
    """How the database runs the scheduler's two scans of the jobs table (as in jobs/scheduler/store/sql.py)."""
    from django.utils import timezone

    from jobs.models import Job

    now = timezone.now()
    scans = {
        "due": Job.objects.due(now).order_by("next_run_at", "id").only("id", "next_run_at")[:500],
        "next_wakeup": Job.objects.filter(enabled=True, next_run_at__isnull=False)
        .order_by("next_run_at")
        .values_list("next_run_at", flat=True)[:1],
    }
    options: dict[str, Any] = {"analyze": True} if vendor == "postgres" else {}
    plans = {}
    for name, query in scans.items():
        plans[name] = " | ".join(line.strip() for line in query.explain(**options).splitlines())
    return plans


def pg_counters() -> dict[str, int]:
    """Cumulative activity counters of this database and of the jobs tables (pg_stat_*)."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_stat_clear_snapshot()")
        cursor.execute(
            "SELECT xact_commit, tup_returned, tup_fetched FROM pg_stat_database WHERE datname = current_database()"
        )
        counters = dict(zip(("transactions", "rows_returned", "rows_fetched"), cursor.fetchone(), strict=True))
        cursor.execute(
            "SELECT relname, seq_scan, seq_tup_read, COALESCE(idx_scan, 0), COALESCE(idx_tup_fetch, 0) "
            "FROM pg_stat_user_tables WHERE relname IN ('jobs_job', 'jobs_jobrun')"
        )
        names = ("seq_scans", "seq_rows_read", "index_scans", "index_rows_fetched")
        for table, *values in cursor.fetchall():
            for name, value in zip(names, values, strict=True):
                counters[f"{table}.{name}"] = value
    return counters


def measure(args: argparse.Namespace, env: dict[str, str], vendor: str, jobs: int) -> dict[str, Any]:
    from django.db import connection

    from jobs import services
    from jobs.models import Job, JobRun

    say(f"--- {jobs} not-due jobs: scheduler for {args.seconds:.0f}s, window after {args.warmup:.0f}s ---")
    plans = scan_plans(vendor)
    for name, plan in plans.items():
        say(f"  plan of the {name} scan: {plan}")
    scheduler = harness.Scheduler(env, max_concurrent=args.max_concurrent, python=args.scheduler_python)
    rss: list[float] = []
    try:
        scheduler.wait_registered()
        ticker = services.job_create(name="every second", cron_expression="* * * * * *", job_type="bench_noop")
        started = time.monotonic()
        window_start = started + args.warmup
        window_end = started + args.seconds
        while time.monotonic() < window_start:
            time.sleep(min(args.sample, max(0.0, window_start - time.monotonic())))
        if not scheduler.alive():
            raise RuntimeError(f"the scheduler exited:\n{scheduler.log_tail()}")
        wall_start, mono_start = time.time(), time.monotonic()
        cpu_start = harness.cpu_seconds(scheduler.pid)
        backends = harness.pg_backends() if vendor == "postgres" else []
        backend_cpu_start = harness.total_cpu_seconds(backends)
        counters_start = pg_counters() if vendor == "postgres" else {}
        rss_start = harness.rss_mb(scheduler.pid)
        with harness.sampled(args, f"idle-{vendor}-{jobs}", scheduler.pid):
            while time.monotonic() < window_end and scheduler.alive():
                rss.append(harness.rss_mb(scheduler.pid))
                time.sleep(min(args.sample, max(0.0, window_end - time.monotonic())))
        if not scheduler.alive():
            raise RuntimeError(f"the scheduler exited:\n{scheduler.log_tail()}")
        cpu = harness.cpu_seconds(scheduler.pid) - cpu_start
        rss.append(harness.rss_mb(scheduler.pid))
        wall_end, mono_end = time.time(), time.monotonic()
        elapsed = mono_end - mono_start
        backend_cpu = harness.total_cpu_seconds(backends) - backend_cpu_start
        counters_end = pg_counters() if vendor == "postgres" else {}
    finally:
        status = scheduler.stop()
        log_lines = {
            "errors": scheduler.count_log_lines(" ERROR "),
            "warnings": scheduler.count_log_lines(" WARNING "),
        }
        scheduler.remove_log()

    # Seconds wholly inside the window, leaving the last one for its run to start.
    first = math.ceil(wall_start)
    last = math.floor(wall_end) - 1
    seconds = [datetime.fromtimestamp(second, UTC) for second in range(first, last + 1)]
    runs = list(
        JobRun.objects.filter(job=ticker, scheduled_for__gte=seconds[0], scheduled_for__lte=seconds[-1]).values_list(
            "scheduled_for", "status", "started_at"
        )
    )
    per_second = Counter(run[0] for run in runs)
    missing = sum(1 for second in seconds if per_second[second] == 0)
    doubled = sum(1 for count in per_second.values() if count > 1)
    lateness = [(run[2] - run[0]).total_seconds() for run in runs if run[2] is not None]
    statuses = Counter(run[1] for run in runs)
    Job.objects.filter(pk=ticker.pk).delete()  # and its runs, so the next phase starts the same way
    if vendor == "sqlite":
        with connection.cursor() as cursor:
            cursor.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    phase: dict[str, Any] = {
        "jobs": jobs,
        "window_s": round(elapsed, 2),
        "rss_mb_max": harness.rounded(max(rss), 1),
        "rss_mb_final": harness.rounded(rss[-1], 1),
        "rss_mb_window_start": harness.rounded(rss_start, 1),
        "cpu_percent": harness.rounded(100 * cpu / elapsed, 3),
        "lateness_ms": harness.spread_ms(lateness),
        "seconds_in_window": len(seconds),
        "seconds_missing": missing,
        "seconds_doubled": doubled,
        "every_second_exactly_once": missing == 0 and doubled == 0,
        "statuses": dict(statuses),
        "scheduler_exit_status": status,
        "scheduler_log": log_lines,
        "scan_plans": plans,
    }
    if vendor == "postgres":
        phase["db_backend_cpu_percent"] = harness.rounded(100 * backend_cpu / elapsed, 3)
        phase["db_backends"] = len(backends)
        phase["db_per_second"] = {
            name: round((counters_end[name] - counters_start[name]) / elapsed, 1) for name in counters_start
        }
    say(
        f"{jobs} jobs: RSS max {phase['rss_mb_max']} MB (final {phase['rss_mb_final']}), CPU "
        f"{phase['cpu_percent']}% of a core"
        + (f" (+ PostgreSQL backends {phase['db_backend_cpu_percent']}%)" if vendor == "postgres" else "")
        + f", lateness p50/p99/max {phase['lateness_ms']['p50']}/{phase['lateness_ms']['p99']}/"
        f"{phase['lateness_ms']['max']} ms, {len(seconds)} seconds: {missing} missing, {doubled} doubled"
    )
    if vendor == "postgres":
        say(f"  database per second: {phase['db_per_second']}")
    return phase


def summary(phases: list[dict[str, Any]], vendor: str) -> dict[str, Any]:
    """The figures of every phase, the targets, and how the largest job count compares with the smallest."""
    targets = {
        "rss_mb": TARGET_RSS_MB,
        "cpu_percent": TARGET_CPU_PERCENT,
        "p99_lateness_ms": TARGET_P99_MS,
    }
    met = {
        str(phase["jobs"]): {
            "rss": phase["rss_mb_max"] is not None and phase["rss_mb_max"] < TARGET_RSS_MB,
            "cpu": phase["cpu_percent"] is not None and phase["cpu_percent"] < TARGET_CPU_PERCENT,
            "p99_lateness": phase["lateness_ms"]["p99"] is not None and phase["lateness_ms"]["p99"] < TARGET_P99_MS,
            "every_second_exactly_once": phase["every_second_exactly_once"],
        }
        for phase in phases
    }
    figures: dict[str, Any] = {
        "benchmark": "idle",
        "database": vendor,
        "phases": phases,
        "targets": targets,
        "targets_met": met,
    }
    if len(phases) > 1:
        low, high = phases[0], phases[-1]
        figures["growth"] = {
            "from_jobs": low["jobs"],
            "to_jobs": high["jobs"],
            "cpu_percent": [low["cpu_percent"], high["cpu_percent"]],
            "rss_mb_max": [low["rss_mb_max"], high["rss_mb_max"]],
            "p99_lateness_ms": [low["lateness_ms"]["p99"], high["lateness_ms"]["p99"]],
        }
    for phase in phases:
        checks = met[str(phase["jobs"])]
        verdicts = ", ".join(f"{name} {'met' if ok else 'NOT met'}" for name, ok in checks.items())
        say(f"{phase['jobs']} jobs: {verdicts}")
    return figures


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
