"""/metrics: Prometheus text built from the shared database, in any format a scraper asks for."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_text
from pytest_django import DjangoAssertNumQueries
from rest_framework.test import APIClient

from jobs import services
from jobs.models import Job, JobRun, SchedulerProcess
from jobs.scheduler import runner
from jobs.scheduler.store import get_store
from jobs.tests.plans import explain, statements

pytestmark = pytest.mark.django_db

TEXT = "text/plain; version=0.0.4; charset=utf-8"
OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"
PROMETHEUS_DEFAULT_ACCEPT = (
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
    "text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)
# What Prometheus 3 sends by default.
PROMETHEUS_3_ACCEPT = (
    "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.6,"
    "application/openmetrics-text;version=0.0.1;q=0.5,text/plain;version=1.0.0;escaping=allow-utf-8;q=0.4,"
    "text/plain;version=0.0.4;q=0.3,*/*;q=0.2"
)


def finish(
    job: Any,
    *,
    scheduled_for: Any,
    started_at: Any,
    took: timedelta,
    status: str = "succeeded",
    lingering: bool = False,
) -> None:
    """A run that a scheduler ran and wrote back, as the store does (`lingering`: timed out while
    its code still runs)."""
    worker = SchedulerProcess.objects.create(hostname="h", pid=2, started_at=started_at, last_heartbeat_at=started_at)
    run = JobRun.objects.create(
        job=job,
        scheduled_for=scheduled_for,
        not_before=scheduled_for,
        status="running",
        started_at=started_at,
        worker=worker,
    )
    outcome = runner.Outcome(run, status, started_at + took, lingering=lingering)
    assert get_store().record_outcomes([outcome], worker_id=worker.pk) == [outcome]
    SchedulerProcess.objects.filter(pk=worker.pk).update(stopped_at=started_at)


def _families(response: Any) -> dict[str, Any]:
    text = response.content.decode()
    parse = parse_openmetrics if response["Content-Type"].startswith("application/openmetrics-text") else parse_text
    return {family.name: family for family in parse(text)}


def test_metrics_report_runs_durations_lateness_and_queue(api: APIClient) -> None:
    now = timezone.now()
    job = services.job_create(name="m", cron_expression="0 0 1 1 *", job_type="test_noop")
    started = now - timedelta(seconds=10)
    finish(job, scheduled_for=started - timedelta(seconds=0.02), started_at=started, took=timedelta(seconds=0.3))
    JobRun.objects.create(job=job, scheduled_for=now - timedelta(seconds=1), not_before=now - timedelta(seconds=1))
    SchedulerProcess.objects.create(hostname="h", pid=1, started_at=now, last_heartbeat_at=now)

    response = api.get("/metrics")
    assert response.status_code == 200
    assert response["Content-Type"] == TEXT
    families = _families(response)
    finished = families["scheduler_runs_finished"]
    assert finished.type == "counter"
    runs = {(s.labels["job_type"], s.labels["status"]): s.value for s in finished.samples if s.name.endswith("_total")}
    assert runs == {("test_noop", "succeeded"): 1}  # the queued run is not finished: the queue depth counts it
    duration = {
        s.labels.get("le"): s.value
        for s in families["scheduler_run_duration_seconds"].samples
        if s.name.endswith("_bucket")
    }
    assert duration["0.25"] == 0 and duration["0.5"] == 1
    lateness = {
        s.labels.get("le"): s.value
        for s in families["scheduler_run_start_lateness_seconds"].samples
        if s.name.endswith("_bucket")
    }
    assert lateness["0.01"] == 0 and lateness["0.025"] == 1
    assert families["scheduler_queue_depth"].samples[0].value == 1
    assert families["scheduler_processes_alive"].samples[0].value == 1


@pytest.mark.parametrize(
    ("accept", "content_type"),
    [
        (None, TEXT),
        ("*/*", TEXT),
        ("text/plain", TEXT),
        ("text/plain;version=0.0.4", TEXT),
        ("text/plain; version=0.0.4; charset=utf-8", TEXT),
        ("text/*", TEXT),
        ("application/openmetrics-text;version=1.0.0", OPENMETRICS),
        ("application/openmetrics-text", OPENMETRICS),
        (PROMETHEUS_DEFAULT_ACCEPT, OPENMETRICS),
        (PROMETHEUS_3_ACCEPT, TEXT),
        ("application/json", TEXT),
    ],
)
def test_metrics_answer_whatever_a_scraper_accepts(api: APIClient, accept: str | None, content_type: str) -> None:
    services.job_create(name="m", cron_expression="0 0 1 1 *", job_type="test_noop")
    headers = {} if accept is None else {"Accept": accept}

    response = api.get("/metrics", headers=headers)

    assert response.status_code == 200, response.content
    assert response["Content-Type"] == content_type
    families = _families(response)  # parses in the format announced, or raises
    assert {"scheduler_runs_finished", "scheduler_queue_depth", "scheduler_jobs"} <= set(families)
    if content_type == OPENMETRICS:
        assert response.content.endswith(b"# EOF\n")


def test_no_counter_goes_down_when_history_is_pruned(api: APIClient) -> None:
    now = timezone.now()
    job = services.job_create(name="m", cron_expression="0 0 1 1 *", job_type="test_noop")
    for minutes in range(3):
        when = now - timedelta(minutes=minutes + 1)
        finish(job, scheduled_for=when, started_at=when, took=timedelta(0))

    def counters() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        families = _families(api.get("/metrics", HTTP_ACCEPT="application/openmetrics-text"))
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in families.values()
            if family.type == "counter"
            for sample in family.samples
            if sample.name.endswith("_total")
        }

    before = counters()
    JobRun.objects.all().delete()  # what pruning does to old runs
    after = counters()

    finished = ("scheduler_runs_finished_total", (("job_type", "test_noop"), ("status", "succeeded")))
    assert before[finished] == 3
    assert {key: value for key, value in after.items() if value < before.get(key, 0)} == {}
    assert set(before) <= set(after)


def test_metric_help_says_what_each_series_counts(api: APIClient) -> None:
    text = api.get("/metrics").content.decode()

    assert "# TYPE scheduler_runs_finished_total counter" in text
    assert "never lowered by pruning" in next(
        line for line in text.splitlines() if line.startswith("# HELP scheduler_runs_finished_total")
    )


@pytest.mark.parametrize("accept", ["text/plain", PROMETHEUS_DEFAULT_ACCEPT, None])
def test_metrics_need_authentication_and_say_so_in_json(client: Any, accept: str | None) -> None:
    headers = {} if accept is None else {"Accept": accept}

    response = client.get("/metrics", headers=headers)

    assert response.status_code == 401
    assert response["Content-Type"] == "application/json"
    assert response.json() == {"detail": "Authentication credentials were not provided."}


def test_metrics_need_the_run_view_permission(user_with_perms: Any) -> None:
    response = user_with_perms("view_job").get("/metrics", HTTP_ACCEPT="text/plain")

    assert response.status_code == 403
    assert response["Content-Type"] == "application/json"
    assert "detail" in response.json()


@pytest.mark.parametrize(("query", "content_type"), [("prometheus", TEXT), ("openmetrics", OPENMETRICS)])
def test_metrics_format_can_be_chosen_in_the_url(api: APIClient, query: str, content_type: str) -> None:
    # For scrapers that set query parameters more easily than headers.
    response = api.get("/metrics", {"format": query}, HTTP_ACCEPT="text/plain")

    assert response.status_code == 200
    assert response["Content-Type"] == content_type


def test_metrics_unknown_format_and_options_answer_json(api: APIClient) -> None:
    unknown = api.get("/metrics", {"format": "xml"})
    options = api.options("/metrics", HTTP_ACCEPT="text/plain")

    assert unknown.status_code == 404
    assert unknown.json() == {"detail": "No metrics format 'xml'."}
    assert options.status_code == 200
    assert options["Content-Type"] == "application/json"
    assert options.json()["name"] == "Metrics"


# --- Cost: the same statements at any history size, each read from an index ----------------------


def add_history(
    jobs: int, runs_per_job: int, *, now: datetime, apart: timedelta = timedelta(minutes=1), disabled_every: int = 50
) -> None:
    """`jobs` jobs (every `disabled_every`-th disabled), each with finished runs `apart` up to `now`."""
    created = Job.objects.bulk_create(
        Job(
            name=f"h{Job.objects.count() + n}",
            cron_expression="* * * * *",
            timezone="UTC",
            job_type="test_noop",
            enabled=n % disabled_every != 0,
            next_run_at=None if n % disabled_every == 0 else now + timedelta(minutes=1),
        )
        for n in range(jobs)
    )
    JobRun.objects.bulk_create(
        JobRun(
            job=job,
            scheduled_for=now - n * apart,
            not_before=now - n * apart,
            status="succeeded",
            started_at=now - n * apart + timedelta(seconds=1),
            finished_at=now - n * apart + timedelta(seconds=3),
        )
        for job in created
        for n in range(1, runs_per_job + 1)
    )


def test_metrics_cost_the_same_statements_at_any_history_size(
    api: APIClient, django_assert_num_queries: DjangoAssertNumQueries
) -> None:
    now = timezone.now()
    add_history(2, 1, now=now)
    with CaptureQueriesContext(connection) as small:
        assert api.get("/metrics").status_code == 200

    add_history(200, 20, now=now)
    with django_assert_num_queries(len(small.captured_queries)) as large:
        assert api.get("/metrics").status_code == 200
    # The runs are read only for the queue and running gauges, through their partial indexes.
    assert len([query for query in large.captured_queries if '"jobs_jobrun"' in query["sql"]]) == 2


def histograms(api: APIClient) -> dict[str, dict[str, float]]:
    """Each histogram's buckets, count and sum for the test_noop job type."""
    families = _families(api.get("/metrics"))
    seen: dict[str, dict[str, float]] = {}
    for name in ("scheduler_run_duration_seconds", "scheduler_run_start_lateness_seconds"):
        for sample in families[name].samples:
            key = sample.labels.get("le") or sample.name.rsplit("_", 1)[-1]
            seen.setdefault(name, {})[key] = round(sample.value, 3)
    return seen


def test_the_histograms_count_each_run_written_back_and_survive_pruning(api: APIClient) -> None:
    now = timezone.now()
    job = services.job_create(name="m", cron_expression="0 0 1 1 *", job_type="test_noop")
    # (lateness, duration) in seconds
    for minutes, (late, took) in enumerate([(0.02, 0.3), (1.0, 2.0), (100.0, 40.0)], start=5):
        fired = now - timedelta(minutes=minutes)
        finish(job, scheduled_for=fired, started_at=fired + timedelta(seconds=late), took=timedelta(seconds=took))
    # Started a little before its fire time (another host's clock): not late.
    finish(job, scheduled_for=now, started_at=now - timedelta(seconds=0.5), took=timedelta(seconds=0.001))

    seen = histograms(api)
    duration = seen["scheduler_run_duration_seconds"]
    assert (duration["0.005"], duration["0.25"], duration["0.5"], duration["2.5"], duration["60.0"]) == (1, 1, 2, 3, 4)
    assert (duration["+Inf"], duration["count"], duration["sum"]) == (4, 4, 42.301)
    lateness = seen["scheduler_run_start_lateness_seconds"]
    assert (lateness["0.005"], lateness["0.025"], lateness["1.0"], lateness["60.0"], lateness["300.0"]) == (
        1,
        2,
        3,
        3,
        4,
    )
    assert (lateness["count"], lateness["sum"]) == (4, 101.02)

    JobRun.objects.all().delete()  # what pruning does to old runs
    assert histograms(api) == seen


def test_runs_without_a_measure_are_left_out_of_its_histogram(api: APIClient) -> None:
    now = timezone.now()
    job = services.job_create(name="m", cron_expression="0 0 1 1 *", job_type="test_noop")
    # Timed out while its code still runs: no end yet, so no duration; its start was 2 s late.
    started = now + timedelta(seconds=2)
    finish(job, scheduled_for=now, started_at=started, took=timedelta(seconds=3), status="timed_out", lingering=True)
    # Skipped and lost runs are counted as finished, never timed.
    get_store().count_finished([(job.pk, "skipped"), (job.pk, "lost")])

    seen = histograms(api)
    assert "scheduler_run_duration_seconds" not in seen
    assert seen["scheduler_run_start_lateness_seconds"]["count"] == 1
    assert seen["scheduler_run_start_lateness_seconds"]["sum"] == 2


@pytest.mark.postgres
def test_metrics_read_the_runs_and_the_job_counts_from_indexes(api: APIClient) -> None:
    # Of 20,000 runs, the last hour holds a twentieth.
    add_history(1000, 20, now=timezone.now(), apart=timedelta(hours=1))
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE")

    with statements() as recorded:
        assert api.get("/metrics").status_code == 200

    plans = [explain(sql, params) for sql, params in recorded if '"jobs_job' in sql and not sql.startswith("EXPLAIN")]
    for nodes, text in plans:
        assert "jobs_jobrun" not in [node.get("Relation Name") for node in nodes if node["Node Type"] == "Seq Scan"], (
            text
        )
    # The enabled jobs may be read from the table: their count stops at its LIMIT (jobs.counting).
    # The disabled ones, often none, would be looked for through the whole table without their index.
    used = {node.get("Index Name") for nodes, _ in plans for node in nodes}
    assert "job_disabled_idx" in used, used
