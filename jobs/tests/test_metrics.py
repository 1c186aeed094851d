"""/metrics: Prometheus text built from the shared database."""

from __future__ import annotations

from datetime import timedelta

from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families

from jobs import services
from jobs.models import JobRun, SchedulerProcess


def _families(response):
    return {family.name: family for family in text_string_to_metric_families(response.content.decode())}


def test_metrics_report_runs_durations_lateness_and_queue(api):
    now = timezone.now()
    job = services.job_create(name="m", cron_expression="0 0 1 1 *", job_type="test_noop")
    started = now - timedelta(seconds=10)
    JobRun.objects.create(
        job=job,
        scheduled_for=started - timedelta(seconds=0.02),
        not_before=started,
        status="succeeded",
        started_at=started,
        finished_at=started + timedelta(seconds=0.3),
    )
    JobRun.objects.create(job=job, scheduled_for=now - timedelta(seconds=1), not_before=now - timedelta(seconds=1))
    SchedulerProcess.objects.create(hostname="h", pid=1, started_at=now, last_heartbeat_at=now)

    response = api.get("/metrics")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain")
    families = _families(response)
    runs = {(s.labels["job_type"], s.labels["status"]): s.value for s in families["scheduler_runs"].samples}
    assert runs[("test_noop", "succeeded")] == 1 and runs[("test_noop", "queued")] == 1
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


def test_metrics_need_authentication(client, db):
    assert client.get("/metrics").status_code == 401
