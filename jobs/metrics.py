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
from itertools import accumulate

from django.db.models import Case, Count, DurationField, ExpressionWrapper, F, IntegerField, Sum, Value, When
from django.db.models.functions import Greatest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.registry import Collector

from .conf import config
from .counting import EXACT_COUNT_LIMIT, bounded_count
from .models import Job, JobRun, RunCount, SchedulerProcess
from .scheduler.clock import database_now

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0, 3600.0)
# Histograms cover the newest runs of the last hour, at most this many.
WINDOW = timedelta(hours=1)
MAX_SAMPLES = 5_000


def _histograms(now: datetime) -> tuple[HistogramMetricFamily, HistogramMetricFamily]:
    """Durations and start lateness of the newest runs fired and started in the last hour, by job type.

    Two statements whatever the history: the fire time of the MAX_SAMPLES-th newest run (from
    the fire-time index) narrows the window, then the database counts the window's runs by job
    type and bucket, so no run row is sent to Python.
    """
    since = now - WINDOW
    recent = JobRun.objects.filter(scheduled_for__gte=since, started_at__gte=since)
    nth = recent.order_by("-scheduled_for").values_list("scheduled_for", flat=True)[MAX_SAMPLES - 1 : MAX_SAMPLES]
    for cutoff in nth:
        recent = recent.filter(scheduled_for__gte=cutoff)
    measures = {
        "duration": F("finished_at") - F("started_at"),
        # A run started before its fire time (clocks a little apart) was not late.
        "lateness": Greatest(F("started_at") - F("scheduled_for"), Value(timedelta(0))),
    }
    rows = (
        recent.annotate(
            job_type=F("job__job_type"),
            **{name: ExpressionWrapper(value, output_field=DurationField()) for name, value in measures.items()},
        )
        .annotate(**{f"{name}_bucket": _bucket(name) for name in measures})
        .values("job_type", *(f"{name}_bucket" for name in measures))
        .annotate(runs=Count("pk"), **{f"{name}_sum": Sum(name) for name in measures})
        .order_by()
    )
    # Per measure and job type: runs in each bucket (the last one above every bound), and the sum.
    counts: dict[str, dict[str, list[int]]] = {name: {} for name in measures}
    sums: dict[str, dict[str, float]] = {name: {} for name in measures}
    for row in rows:
        for name in measures:
            bucket = row[f"{name}_bucket"]
            if bucket is None:  # still running: no duration yet
                continue
            counts[name].setdefault(row["job_type"], [0] * (len(BUCKETS) + 1))[bucket] += row["runs"]
            sums[name][row["job_type"]] = sums[name].get(row["job_type"], 0.0) + row[f"{name}_sum"].total_seconds()
    families = (
        HistogramMetricFamily(
            "scheduler_run_duration_seconds", "Run durations over the last hour.", labels=["job_type"]
        ),
        HistogramMetricFamily(
            "scheduler_run_start_lateness_seconds", "Start minus fire time, last hour.", labels=["job_type"]
        ),
    )
    for name, family in zip(measures, families, strict=True):
        for job_type, per_bucket in sorted(counts[name].items()):
            cumulative = list(accumulate(per_bucket))
            buckets = [(str(bound), float(cumulative[index])) for index, bound in enumerate(BUCKETS)]
            buckets.append(("+Inf", float(cumulative[-1])))
            family.add_metric([job_type], buckets, sum_value=sums[name][job_type])
    return families


def _bucket(measure: str) -> Case:
    """The index of the first bucket whose bound `measure` is within (len(BUCKETS) above all); NULL stays NULL."""
    return Case(
        When(**{f"{measure}__isnull": True}, then=Value(None)),
        *(
            When(**{f"{measure}__lte": timedelta(seconds=bound)}, then=Value(index))
            for index, bound in enumerate(BUCKETS)
        ),
        default=Value(len(BUCKETS)),
        output_field=IntegerField(),
    )


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

        yield from _histograms(now)

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
