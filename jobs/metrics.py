"""Prometheus metrics for /metrics, read from the database at scrape time.

Schedulers run in their own processes (often on other machines), so the web process reports
what the shared database knows rather than in-memory counters of one process. Every read costs
the same whatever the size of the run history:

- finished runs are counters the database keeps as runs finish (`RunCount`), so they survive
  pruning and never go down;
- the histograms read the runs fired in the last hour (at most MAX_SAMPLES), by the index on
  fire time;
- the queue and running gauges count through the partial indexes the scheduler uses.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta

from django.db.models import F, Sum
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.registry import Collector

from .conf import config
from .counting import EXACT_COUNT_LIMIT, bounded_count
from .models import Job, JobRun, RunCount, SchedulerProcess
from .scheduler.clock import database_now

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0, 3600.0)
# Histograms cover the runs of the last hour, at most this many.
WINDOW = timedelta(hours=1)
MAX_SAMPLES = 20_000


def _histogram(name: str, documentation: str, samples: dict[str, list[float]]) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, documentation, labels=["job_type"])
    for job_type, values in sorted(samples.items()):
        buckets = [(str(bound), float(sum(1 for value in values if value <= bound))) for bound in BUCKETS]
        buckets.append(("+Inf", float(len(values))))
        family.add_metric([job_type], buckets, sum_value=sum(values))
    return family


class SchedulerCollector(Collector):
    def __init__(self, now: datetime | None = None) -> None:
        self.now = now

    def collect(self) -> Iterator[Metric]:
        # Heartbeats and due times are the database's clock (jobs.scheduler.clock).
        now = self.now or database_now()
        finished = CounterMetricFamily(
            "scheduler_runs_finished",
            "Runs that reached a finished status, by job type and status (skipped fires included); "
            "kept by the database as runs finish, never lowered by pruning.",
            labels=["job_type", "status"],
        )
        for row in RunCount.objects.values("job_type", "status").annotate(sum=Sum("total")).order_by():
            finished.add_metric([row["job_type"], row["status"]], row["sum"])
        yield finished

        # Runs fired in the last hour that started in it: the fire-time index bounds the read.
        recent = (
            JobRun.objects.filter(scheduled_for__gte=now - WINDOW, started_at__gte=now - WINDOW)
            .annotate(job_type=F("job__job_type"))
            .values_list("job_type", "scheduled_for", "started_at", "finished_at")
            .order_by("-scheduled_for")[:MAX_SAMPLES]
        )
        durations: dict[str, list[float]] = {}
        lateness: dict[str, list[float]] = {}
        for job_type, scheduled_for, started_at, finished_at in recent:
            assert started_at is not None  # the started_at__gte filter leaves out runs not started
            lateness.setdefault(job_type, []).append(max(0.0, (started_at - scheduled_for).total_seconds()))
            if finished_at is not None:
                durations.setdefault(job_type, []).append((finished_at - started_at).total_seconds())
        yield _histogram("scheduler_run_duration_seconds", "Run durations over the last hour.", durations)
        yield _histogram("scheduler_run_start_lateness_seconds", "Start minus fire time, last hour.", lateness)

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
