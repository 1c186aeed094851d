"""Burst: 1,000 jobs due in the same second, one idle `runscheduler` process; how fast is it drained?

    .venv/bin/python bench/burst.py [--database sqlite|postgres|both] [--jobs 1000] [--bursts 5] [--profile]

Each burst sets `next_run_at` of every job to one whole second a few seconds ahead (longer than
the scheduler's longest sleep, so SQLite, which has no NOTIFY, sees it too) and waits for the
runs. Figures per burst: drain time (last run's finished_at minus the due second), start
lateness (started_at - scheduled_for) over all runs, and whether every job ran exactly once and
succeeded. Then, with the process stopped, one more burst runs in this process so the engine's
SQL statements can be counted per run (and, with --profile, its time profiled).

Targets: drained within 0.5 s on PostgreSQL, 0.3 s on SQLite.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import re
import sys
import threading
import time
from collections import Counter, defaultdict
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import harness
from bench.harness import say

TARGET_DRAIN_SECONDS = {"sqlite": 0.3, "postgres": 0.5}
JOB_NAME = "burst"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    harness.add_common_arguments(parser)
    parser.add_argument("--jobs", type=int, default=1000, help="jobs due in the same second (default 1000)")
    parser.add_argument("--bursts", type=int, default=5, help="bursts against the scheduler process (default 5)")
    harness.add_arming_arguments(parser, what="a burst", drain_timeout=120)
    parser.add_argument("--no-in-process", action="store_true", help="skip the in-process burst (query counts)")
    parser.add_argument("--profile", action="store_true", help="cProfile the in-process burst and print the top")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.database == "both":
        return harness.run_each_database(__file__, argv, "burst", timeout=1800)
    harness.exit_on_sigterm()
    if harness.postgres_missing(args, "burst"):
        return 0
    with harness.migrated_database(args, "bench_burst") as (database, env):
        figures = run(args, env, database.vendor)
    print(json.dumps(figures), flush=True)
    return 0 if figures["exactly_once"] else 1


# -- the benchmark -------------------------------------------------------------------------------


def burst_figures(due: datetime, jobs: int) -> dict[str, Any]:
    """Drain time, start lateness and the exactly-once check for the runs of one due second."""
    rows, figures = harness.fire_figures(due, jobs)
    started = [row[4] for row in rows if row[4] is not None]
    finished = [row[5] for row in rows if row[5] is not None]
    lateness = [(row[4] - due).total_seconds() for row in rows if row[4] is not None]
    return {
        **figures,
        "last_start_s": harness.rounded((max(started) - due).total_seconds()) if started else None,
        "drain_s": harness.rounded((max(finished) - due).total_seconds()) if finished else None,
        "lateness_ms": harness.spread_ms(lateness),
    }


def process_burst(args: argparse.Namespace, scheduler: harness.Scheduler, number: int, vendor: str) -> dict[str, Any]:
    from django.utils import timezone

    due = harness.due_second(args.lead)
    harness.arm(JOB_NAME, due)
    cpu_before = harness.cpu_seconds(scheduler.pid)
    backends = harness.pg_backends() if vendor == "postgres" else []
    backend_cpu_before = harness.total_cpu_seconds(backends)
    time.sleep(max(0.0, (due - timezone.now()).total_seconds()))
    done = harness.wait_until(
        lambda: not scheduler.alive() or harness.finished_count(due) >= args.jobs, args.drain_timeout, interval=0.1
    )
    if not scheduler.alive():
        raise RuntimeError(f"the scheduler exited:\n{scheduler.log_tail()}")
    cpu = harness.cpu_seconds(scheduler.pid) - cpu_before
    backend_cpu = harness.total_cpu_seconds(backends) - backend_cpu_before
    figures = burst_figures(due, args.jobs)
    figures["scheduler_cpu_s"] = round(cpu, 3)
    if vendor == "postgres":
        figures["db_backend_cpu_s"] = harness.rounded(backend_cpu, 3)
    if not done:
        figures["timed_out"] = True
    say(
        f"burst {number}: drained in {figures['drain_s']}s (fired {figures['fired_s']}s, last start "
        f"{figures['last_start_s']}s), lateness p50/p99/max {figures['lateness_ms']['p50']}/"
        f"{figures['lateness_ms']['p99']}/{figures['lateness_ms']['max']} ms, scheduler CPU {cpu:.2f}s"
        + (f" (+ PostgreSQL backends {backend_cpu:.2f}s)" if vendor == "postgres" else "")
        + f", exactly once: {figures['exactly_once']}"
    )
    return figures


_TABLE = re.compile(r'(?:FROM|UPDATE|INTO)\s+"?(\w+)"?', re.IGNORECASE)


def statement_kind(sql: str) -> str:
    """'SELECT jobs_jobrun', 'UPDATE jobs_job', 'BEGIN', ... for a breakdown of the engine's SQL."""
    words = sql.split(None, 1)
    verb = words[0].upper() if words else "?"
    table = _TABLE.search(sql)
    return f"{verb} {table.group(1)}" if table and verb in {"SELECT", "UPDATE", "INSERT", "DELETE"} else verb


def in_process_burst(args: argparse.Namespace, log_path: Path) -> dict[str, Any]:
    """One burst with the engine in this process, counting its SQL statements (and profiling it)."""
    from django.db import connection, connections

    from jobs.scheduler.engine import Engine

    engine = Engine(max_concurrent=args.max_concurrent)
    due = harness.due_second(1.0)
    harness.arm(JOB_NAME, due)
    statements: list[tuple[float, float, str]] = []  # (wall time at the end, seconds, sql)

    def record(execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
        started = time.perf_counter()
        try:
            return execute(sql, params, many, context)
        finally:
            statements.append((time.time(), time.perf_counter() - started, sql))

    seen_done: list[float] = []

    def watch() -> None:
        try:
            harness.wait_until(lambda: harness.finished_count(due) >= args.jobs, args.drain_timeout, interval=0.02)
            seen_done.append(time.time())
        finally:
            connections.close_all()  # this thread's connection
            engine.request_stop()

    profiler = cProfile.Profile() if args.profile else None
    with open(log_path, "w") as log:
        harness.redirect_logging(log)
        watcher = threading.Thread(target=watch, name="bench-watch", daemon=True)
        watcher.start()
        with connection.execute_wrapper(record):
            if profiler:
                profiler.enable()
            engine.run_forever()
            if profiler:
                profiler.disable()
        watcher.join(10)
        harness.redirect_logging(sys.stderr)

    figures = burst_figures(due, args.jobs)
    start, end = due.timestamp(), (seen_done[0] if seen_done else time.time())
    during = [(seconds, sql) for at, seconds, sql in statements if start <= at <= end]
    kinds = Counter(statement_kind(sql) for _, sql in during)
    kind_seconds: defaultdict[str, float] = defaultdict(float)
    for seconds, sql in during:
        kind_seconds[statement_kind(sql)] += seconds
    sql_seconds = sum(seconds for seconds, _ in during)
    figures.update(
        {
            "statements": len(during),
            "statements_per_run": round(len(during) / args.jobs, 2),
            "sql_seconds": round(sql_seconds, 3),
            "statement_kinds": dict(kinds.most_common()),
            "statement_mean_ms": {kind: round(1000 * kind_seconds[kind] / count, 3) for kind, count in kinds.items()},
        }
    )
    say(
        f"in-process burst: drained in {figures['drain_s']}s, {len(during)} SQL statements "
        f"({figures['statements_per_run']} per run, {sql_seconds:.3f}s inside the database driver), "
        f"exactly once: {figures['exactly_once']}"
    )
    for kind, count in kinds.most_common():
        say(f"  {count:6d}  {kind:28s} mean {1000 * kind_seconds[kind] / count:.3f} ms")
    if profiler:
        for order in ("tottime", "cumulative"):
            out = io.StringIO()
            pstats.Stats(profiler, stream=out).strip_dirs().sort_stats(order).print_stats(30)
            say(f"--- cProfile of the in-process burst (engine thread), by {order} ---")
            for line in out.getvalue().splitlines():
                if line.strip():
                    say(line)
    return figures


def run(args: argparse.Namespace, env: dict[str, str], vendor: str) -> dict[str, Any]:
    from jobs.models import JobRun

    started = time.monotonic()
    harness.create_jobs_not_due(JOB_NAME, args.jobs)
    say(f"created {args.jobs} jobs in {time.monotonic() - started:.1f}s")
    scheduler = harness.Scheduler(env, max_concurrent=args.max_concurrent, python=args.scheduler_python)
    bursts: list[dict[str, Any]] = []
    try:
        scheduler.wait_registered()
        say(f"scheduler pid {scheduler.pid} running (log {scheduler.log_path})")
        time.sleep(1.0)  # let it settle into its idle sleep
        with harness.sampled(args, f"burst-{vendor}", scheduler.pid):
            for number in range(1, args.bursts + 1):
                bursts.append(process_burst(args, scheduler, number, vendor))
                time.sleep(0.5)
    finally:
        status = scheduler.stop()
        say(f"scheduler stopped, exit status {status}")
        log_lines = {
            "errors": scheduler.count_log_lines(" ERROR "),
            "warnings": scheduler.count_log_lines(" WARNING "),
        }
        scheduler.remove_log()

    in_process = None
    if not args.no_in_process:
        in_process = in_process_burst(args, Path(os.devnull))

    expected = args.jobs * (len(bursts) + (1 if in_process else 0))
    total_runs = JobRun.objects.count()
    drains = [b["drain_s"] for b in bursts if b["drain_s"] is not None]
    p99s = [b["lateness_ms"]["p99"] for b in bursts if b["lateness_ms"]["p99"] is not None]
    p50s = [b["lateness_ms"]["p50"] for b in bursts if b["lateness_ms"]["p50"] is not None]
    maxes = [b["lateness_ms"]["max"] for b in bursts if b["lateness_ms"]["max"] is not None]
    target = TARGET_DRAIN_SECONDS[vendor]
    drain_median = harness.median(drains)
    exactly_once = (
        all(b["exactly_once"] for b in bursts)
        and (in_process is None or in_process["exactly_once"])
        and total_runs == expected
    )
    figures: dict[str, Any] = {
        "benchmark": "burst",
        "database": vendor,
        "jobs": args.jobs,
        "max_concurrent": args.max_concurrent,
        "bursts": len(bursts),
        "drain_s_median": harness.rounded(drain_median),
        "drain_s_each": drains,
        "lateness_ms_median": {
            "p50": harness.rounded(harness.median(p50s), 2),
            "p99": harness.rounded(harness.median(p99s), 2),
            "max": harness.rounded(harness.median(maxes), 2),
        },
        "scheduler_cpu_s_median": harness.rounded(harness.median([b["scheduler_cpu_s"] for b in bursts]), 3),
        "db_backend_cpu_s_median": (
            harness.rounded(harness.median([b["db_backend_cpu_s"] for b in bursts]), 3)
            if vendor == "postgres"
            else None
        ),
        "exactly_once": exactly_once,
        "total_runs": total_runs,
        "expected_runs": expected,
        "scheduler_exit_status": status,
        "scheduler_log": log_lines,
        "target_drain_s": target,
        "target_met": bool(drains) and drain_median <= target,
        "statements_per_run": in_process["statements_per_run"] if in_process else None,
        "in_process": in_process,
        "each": bursts,
    }
    say(
        f"median drain {figures['drain_s_median']}s (target {target}s: "
        f"{'met' if figures['target_met'] else 'NOT met'}), median p99 lateness "
        f"{figures['lateness_ms_median']['p99']} ms, exactly once: {exactly_once}"
    )
    return figures


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
