"""Prometheus metrics for /metrics, read from the database at scrape time.

Schedulers run in their own processes (often on other machines), so the web process reports
what the shared database knows rather than in-memory counters of one process. Every read costs
the same whatever the size of the run history:

- finished runs, and the durations and start lateness of those their scheduler wrote back, are
  counters the database keeps as runs finish (`RunCount`), so they survive pruning, never go
  down, and are read from a table of a few rows per job type;
- the queue and running gauges count through the partial indexes the scheduler uses.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import Any

from django.db.models import Sum
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.registry import Collector

from .conf import config
from .counting import EXACT_COUNT_LIMIT, bounded_count
from .models import TIMINGS, Job, JobRun, RunCount, SchedulerProcess, timing_columns
from .scheduler.clock import database_now


def _histogram(name: str, documentation: str, measure: str, rows: list[dict[str, Any]]) -> HistogramMetricFamily:
    """The histogram of `measure` by job type, from the counters' rows (one per job type and status)."""
    family = HistogramMetricFamily(name, documentation, labels=["job_type"])
    columns = timing_columns(measure)
    by_type: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_type.setdefault(row["job_type"], []).append(row)
    for job_type, counted in sorted(by_type.items()):
        measured = sum(row[f"{measure}_count"] for row in counted)
        if not measured:
            continue
        buckets = [(str(bound), float(sum(row[column] for row in counted))) for bound, column in columns.items()]
        buckets.append(("+Inf", float(measured)))
        family.add_metric([job_type], buckets, sum_value=sum(row[f"{measure}_sum"] for row in counted))
    return family


class SchedulerCollector(Collector):
    def __init__(self, now: datetime | None = None) -> None:
        self.now = now

    def collect(self) -> Iterator[Metric]:
        # Heartbeats and due times are the database's clock (jobs.scheduler.clock).
        now = self.now or database_now()
        sums = ["total"] + [
            column
            for measure in TIMINGS
            for column in (f"{measure}_count", f"{measure}_sum", *timing_columns(measure).values())
        ]
        rows = list(
            RunCount.objects.values("job_type", "status")
            .annotate(**{column: Sum(column) for column in sums})
            .order_by("job_type", "status")
        )
        finished = CounterMetricFamily(
            "scheduler_runs_finished",
            "Runs that reached a finished status, by job type and status (skipped fires included); "
            "kept by the database as runs finish, never lowered by pruning.",
            labels=["job_type", "status"],
        )
        for row in rows:
            finished.add_metric([row["job_type"], row["status"]], row["total"])
        yield finished
        yield _histogram(
            "scheduler_run_duration_seconds",
            "Durations (finished minus started) of the runs written back by the scheduler that ran them; "
            "kept as runs finish, never lowered by pruning.",
            "duration",
            rows,
        )
        yield _histogram(
            "scheduler_run_start_lateness_seconds",
            "Start minus fire time of the runs written back by the scheduler that ran them; "
            "kept as runs finish, never lowered by pruning.",
            "lateness",
            rows,
        )

        queue = GaugeMetricFamily("scheduler_queue_depth", "Queued runs whose start time has come.")
        queue.add_metric([], JobRun.objects.ready(now).count())
        yield queue
        running = GaugeMetricFamily("scheduler_runs_running", "Runs executing now.")
        running.add_metric([], JobRun.objects.running().count())
        yield running
        jobs = GaugeMetricFamily(
            "scheduler_jobs",
            f"Jobs, by enabled flag; exact up to {EXACT_COUNT_LIMIT:,}, PostgreSQL's estimate above.",
            labels=["enabled"],
        )
        for enabled in (True, False):
            jobs.add_metric([str(enabled).lower()], bounded_count(Job.objects.filter(enabled=enabled))[0])
        yield jobs
        alive = GaugeMetricFamily("scheduler_processes_alive", "Scheduler processes with a fresh heartbeat.")
        alive.add_metric(
            [],
            SchedulerProcess.objects.alive(now, config().lost_after_seconds).count(),
        )
        yield alive


def registry(now: datetime | None = None) -> CollectorRegistry:
    """Return a registry that reads the metrics from the database when rendered."""
    result = CollectorRegistry(auto_describe=False)
    result.register(SchedulerCollector(now))
    return result


def render_text(metrics: CollectorRegistry) -> bytes:
    """Render in the Prometheus text format 0.0.4."""
    return generate_latest(metrics)


def render_openmetrics(metrics: CollectorRegistry) -> bytes:
    """Render in OpenMetrics 1.0.0."""
    return generate_openmetrics(metrics)
