"""The run history: /runs, /runs/{id} and /jobs/{id}/runs."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from rest_framework.test import APIClient

from jobs.models import Job, JobRun, SchedulerProcess

pytestmark = pytest.mark.django_db

T0 = datetime(2026, 6, 1, 9, 0, tzinfo=UTC)


def make_job(name: str, job_type: str = "email_notification") -> Job:
    return Job.objects.create(
        name=name,
        cron_expression="0 9 * * *",
        timezone="UTC",
        job_type=job_type,
        parameters={"recipient": "a@example.com", "subject": "s"},
        next_run_at=T0 + timedelta(days=1),
    )


def make_run(job: Job, hours: int, **fields: Any) -> JobRun:
    scheduled_for = T0 + timedelta(hours=hours)
    return JobRun.objects.create(job=job, scheduled_for=scheduled_for, not_before=scheduled_for, **fields)


@pytest.fixture
def history() -> dict[str, JobRun]:
    """Two jobs with runs in every state worth filtering on."""
    report, sync = make_job("report"), make_job("sync", job_type="data_processing")
    worker = SchedulerProcess.objects.create(
        hostname="worker-1", pid=4242, started_at=T0, last_heartbeat_at=T0 + timedelta(hours=3)
    )
    return {
        "ok": make_run(
            report,
            0,
            status=JobRun.Status.SUCCEEDED,
            started_at=T0 + timedelta(seconds=2),
            finished_at=T0 + timedelta(seconds=7, milliseconds=500),
            worker=worker,
            result={"sent": 1},
        ),
        "failed": make_run(
            report,
            1,
            status=JobRun.Status.FAILED,
            started_at=T0 + timedelta(hours=1),
            finished_at=T0 + timedelta(hours=1, seconds=1),
            error="SMTPException: refused",
        ),
        "retry": make_run(report, 1, attempt=2, trigger=JobRun.Trigger.RETRY, status=JobRun.Status.QUEUED),
        "manual": make_run(sync, 2, trigger=JobRun.Trigger.MANUAL, status=JobRun.Status.RUNNING),
        "skipped": make_run(sync, 3, status=JobRun.Status.SKIPPED, skip_reason="previous run still active"),
    }


def ids(response: Any) -> list[int]:
    assert response.status_code == 200, response.content
    return [run["id"] for run in response.json()["results"]]


def test_run_detail_shows_every_field(api: APIClient, history: dict[str, JobRun]) -> None:
    run = history["ok"]

    body = api.get(f"/runs/{run.pk}").json()

    assert body == {
        "id": run.pk,
        "job": run.job_id,
        "job_name": "report",
        "scheduled_for": "2026-06-01T09:00:00Z",
        "trigger": "schedule",
        "attempt": 1,
        "status": "succeeded",
        "not_before": "2026-06-01T09:00:00Z",
        "started_at": "2026-06-01T09:00:02Z",
        "finished_at": "2026-06-01T09:00:07.500000Z",
        "duration_seconds": 5.5,
        "lateness_seconds": 2.0,
        "worker": "worker-1:4242",
        "missed_fires": 0,
        "result": {"sent": 1},
        "error": "",
        "skip_reason": "",
        "created_at": body["created_at"],
    }
    assert body["created_at"].endswith("Z")


def test_unfinished_run_has_no_duration(api: APIClient, history: dict[str, JobRun]) -> None:
    body = api.get(f"/runs/{history['retry'].pk}").json()

    assert (body["started_at"], body["duration_seconds"], body["lateness_seconds"], body["worker"]) == (
        None,
        None,
        None,
        None,
    )


@pytest.mark.parametrize("run_id", ["424242", "99999999999999999999"])
def test_unknown_run_is_404(api: APIClient, run_id: str) -> None:
    response = api.get(f"/runs/{run_id}")

    assert response.status_code == 404
    assert response["Content-Type"] == "application/json"


def test_runs_are_newest_first(api: APIClient, history: dict[str, JobRun]) -> None:
    # Same fire time: the retry (created later) comes before the failed first attempt.
    assert ids(api.get("/runs")) == [history[name].pk for name in ["skipped", "manual", "retry", "failed", "ok"]]


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ({"status": "failed"}, ["failed"]),
        ({"status": ["queued", "running"]}, ["manual", "retry"]),
        ({"trigger": "retry"}, ["retry"]),
        ({"trigger": "manual"}, ["manual"]),
        ({"job_type": "data_processing"}, ["skipped", "manual"]),
        ({"scheduled_after": "2026-06-01T10:00:00Z"}, ["skipped", "manual", "retry", "failed"]),
        ({"scheduled_before": "2026-06-01T10:00:00Z"}, ["ok"]),
        ({"scheduled_after": "2026-06-01T10:00:00Z", "scheduled_before": "2026-06-01T11:00:00Z"}, ["retry", "failed"]),
        # Offsets are honoured: 12:00 in UTC+2 is 10:00 UTC.
        ({"scheduled_after": "2026-06-01T12:00:00+02:00"}, ["skipped", "manual", "retry", "failed"]),
        ({"started_after": "2026-06-01T09:30:00Z"}, ["failed"]),
        ({"ordering": "scheduled_for"}, ["ok", "failed", "retry", "manual", "skipped"]),
        ({"ordering": "-id"}, ["skipped", "manual", "retry", "failed", "ok"]),
        ({"ordering": "id"}, ["ok", "failed", "retry", "manual", "skipped"]),
    ],
)
def test_run_filters_and_ordering(
    api: APIClient, history: dict[str, JobRun], query: dict[str, Any], expected: list[str]
) -> None:
    assert ids(api.get("/runs", query)) == [history[name].pk for name in expected]


def test_runs_filtered_by_job(api: APIClient, history: dict[str, JobRun]) -> None:
    sync = history["manual"].job_id

    assert ids(api.get("/runs", {"job": sync})) == [history["skipped"].pk, history["manual"].pk]
    assert ids(api.get("/runs", {"job": 424242})) == []


@pytest.mark.parametrize(
    "query",
    [
        # Orderings no index serves, or over times that change while a run runs, are refused.
        {"ordering": "started_at"},
        {"ordering": "-finished_at"},
        {"ordering": "job__name"},
        {"ordering": "scheduled_for,id"},
        {"status": "exploded"},
        {"trigger": "cron"},
        {"scheduled_after": "yesterday"},
        {"job": "abc"},
        {"job": "1.5"},
        {"job": "99999999999999999999999"},
    ],
)
def test_bad_run_filters_are_400_naming_the_parameter(
    api: APIClient, history: dict[str, JobRun], query: dict[str, str]
) -> None:
    response = api.get("/runs", query)

    assert response.status_code == 400
    assert set(response.json()) == set(query)


def test_job_runs_lists_only_that_jobs_runs(api: APIClient, history: dict[str, JobRun]) -> None:
    report = history["ok"].job_id

    assert ids(api.get(f"/jobs/{report}/runs")) == [history[name].pk for name in ["retry", "failed", "ok"]]
    assert ids(api.get(f"/jobs/{report}/runs", {"status": "failed"})) == [history["failed"].pk]
    assert ids(api.get(f"/jobs/{report}/runs", {"ordering": "scheduled_for"})) == [
        history[name].pk for name in ["ok", "failed", "retry"]
    ]
    # The path names the job; a `job` filter cannot widen it to another job's runs.
    assert ids(api.get(f"/jobs/{report}/runs", {"job": history["manual"].job_id})) == []
    assert api.get(f"/jobs/{report}/runs", {"status": "exploded"}).status_code == 400


def test_job_runs_are_paginated_by_cursor_without_a_count(api: APIClient) -> None:
    job = make_job("busy")
    for hour in range(5):
        make_run(job, hour)

    page = api.get(f"/jobs/{job.pk}/runs", {"page_size": 2}).json()

    assert set(page) == {"next", "previous", "results"}
    assert len(page["results"]) == 2
    assert page["previous"] is None
    assert "cursor=" in page["next"] and "page_size=2" in page["next"]


def test_job_without_runs_has_an_empty_list(api: APIClient) -> None:
    job = make_job("new")

    assert api.get(f"/jobs/{job.pk}/runs").json() == {"next": None, "previous": None, "results": []}


def test_runs_are_read_only(api: APIClient, history: dict[str, JobRun]) -> None:
    run = history["ok"]

    assert api.post("/runs", {"job": run.job_id}, format="json").status_code == 405
    assert api.patch(f"/runs/{run.pk}", {"status": "failed"}, format="json").status_code == 405
    assert api.delete(f"/runs/{run.pk}").status_code == 405
    run.refresh_from_db()
    assert run.status == JobRun.Status.SUCCEEDED


def test_run_permissions(user_with_perms: Callable[..., APIClient], history: dict[str, JobRun]) -> None:
    report = history["ok"].job_id

    assert APIClient().get("/runs").status_code == 401
    assert APIClient().get(f"/runs/{history['ok'].pk}").status_code == 401
    assert user_with_perms("view_job", username="jobs-only").get("/runs").status_code == 403
    reader = user_with_perms("view_job", "view_jobrun", username="reader")
    assert len(ids(reader.get("/runs"))) == 5
    assert len(ids(reader.get(f"/jobs/{report}/runs"))) == 3


@pytest.mark.parametrize(
    "query",
    [
        "/runs?scheduled_after=7168-03-03T19:25:54.910%2B22:38",
        "/runs?started_before=2026-01-01T00:00:00-16:19",
        "/jobs?next_run_after=0444-08-15T15:06:06.841-16:19",
        "/jobs?created_before=2026-06-01T12:00:00%2B23:59",
        "/runs?scheduled_before=0001-01-01T00:00:00%2B01:00",
    ],
)
def test_instants_with_any_offset_python_accepts_are_answered_not_500(api, query):
    # PostgreSQL refuses offsets past 15:59 that Python accepts: filters compare in UTC, and an
    # instant that has no UTC form (before year 1) is a 400 naming the parameter.
    response = api.get(query)
    assert response.status_code in (200, 400), response.content
    if response.status_code == 400:
        assert set(response.json()) <= {"scheduled_before", "scheduled_after", "started_before", "created_before"}
