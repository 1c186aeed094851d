"""jobs.services: every write with rules, with the time passed in."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from jobs import services
from jobs.models import Job, JobRun

pytestmark = pytest.mark.django_db

SEED = {
    "name": "Daily reminder",
    "cron_expression": "0 9 * * *",
    "job_type": "email_notification",
    "parameters": {"recipient": "admin@company.com", "subject": "Daily report ready"},
}


def create(now: datetime, **overrides: Any) -> Job:
    return services.job_create(now=now, **{**SEED, **overrides})


@pytest.mark.parametrize(
    ("timezone", "cron", "expected"),
    [
        ("UTC", "0 9 * * *", datetime(2026, 6, 2, 9, tzinfo=UTC)),  # 09:00 today has passed at 12:00
        ("UTC", "0 13 * * *", datetime(2026, 6, 1, 13, tzinfo=UTC)),
        ("Europe/Berlin", "0 9 * * *", datetime(2026, 6, 2, 7, tzinfo=UTC)),  # CEST, UTC+2
        ("Europe/Berlin", "0 15 * * *", datetime(2026, 6, 1, 13, tzinfo=UTC)),
        ("America/New_York", "0 9 * * *", datetime(2026, 6, 1, 13, tzinfo=UTC)),  # EDT, UTC-4
        ("Asia/Kolkata", "30 18 * * *", datetime(2026, 6, 1, 13, tzinfo=UTC)),  # UTC+5:30
        ("UTC", "*/15 * * * *", datetime(2026, 6, 1, 12, 15, tzinfo=UTC)),
        ("UTC", "30 * * * * *", datetime(2026, 6, 1, 12, 0, 30, tzinfo=UTC)),  # seconds field
        ("UTC", "@weekly", datetime(2026, 6, 7, tzinfo=UTC)),  # the next Sunday
    ],
)
def test_create_computes_the_first_fire_in_utc(now: datetime, timezone: str, cron: str, expected: datetime) -> None:
    job = create(now, timezone=timezone, cron_expression=cron)

    job.refresh_from_db()
    assert job.next_run_at == expected
    assert job.timezone == timezone


def test_create_uses_the_default_time_zone(now: datetime, settings: Any) -> None:
    settings.TIME_ZONE = "Asia/Tokyo"

    job = create(now)

    assert job.timezone == "Asia/Tokyo"
    assert job.next_run_at == datetime(2026, 6, 2, 0, tzinfo=UTC)  # 09:00 in Tokyo


def test_create_normalises_the_expression(now: datetime) -> None:
    job = create(now, cron_expression="  0   9 * *   mon ")

    assert job.cron_expression == "0 9 * * MON"
    assert job.next_run_at == datetime(2026, 6, 8, 9, tzinfo=UTC)


def test_create_disabled_has_no_next_run(now: datetime) -> None:
    job = create(now, enabled=False)

    job.refresh_from_db()
    assert job.next_run_at is None


def test_create_refuses_bad_fields_and_writes_nothing(now: datetime) -> None:
    with pytest.raises(services.JobValidationError) as raised:
        create(now, cron_expression="0 24 * * *", timezone="Mars/Olympus", parameters={"recipient": "x"})

    assert raised.value.errors == {
        "cron_expression": ["hour: 24 is out of range 0-23"],
        "timezone": ["'Mars/Olympus' is not an IANA time zone (for example Europe/Berlin or UTC)"],
        # A list field's errors are keyed by the position of the bad item.
        "parameters": {"recipient": {0: ["Enter a valid email address."]}, "subject": ["This field is required."]},
    }
    assert Job.objects.count() == 0


@pytest.mark.parametrize(
    ("parameters", "problem"),
    [
        (["a list"], "must be a JSON object"),
        ({"subject": "a\x00b"}, "must not contain NUL characters"),
        ({"a\x00": 1}, "must not contain NUL characters"),
        ({"body": "x" * (services.MAX_PARAMETERS_BYTES + 1)}, "must be at most 65536 bytes of JSON"),
        ({"deep": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]}, "nested more than 32 levels"),
    ],
)
def test_create_refuses_parameters_that_cannot_be_stored(now: datetime, parameters: Any, problem: str) -> None:
    with pytest.raises(services.JobValidationError) as raised:
        create(now, parameters=parameters)

    assert problem in raised.value.errors["parameters"][0]
    assert Job.objects.count() == 0


def test_update_recomputes_when_the_schedule_changes(now: datetime) -> None:
    job = create(now)
    later = now + timedelta(days=3)

    services.job_update(job, now=later, cron_expression="0 18 * * *")

    job.refresh_from_db()
    assert job.next_run_at == datetime(2026, 6, 4, 18, tzinfo=UTC)


def test_update_recomputes_when_the_zone_changes(now: datetime) -> None:
    job = create(now)

    services.job_update(job, now=now, timezone="America/Los_Angeles")

    job.refresh_from_db()
    assert job.next_run_at == datetime(2026, 6, 1, 16, tzinfo=UTC)  # 09:00 PDT


def test_update_of_other_fields_keeps_the_schedulers_next_run(now: datetime) -> None:
    job = create(now)
    stale_copy = Job.objects.get(pk=job.pk)
    # Meanwhile the scheduler fires the job and advances it.
    advanced = datetime(2026, 6, 3, 9, tzinfo=UTC)
    Job.objects.filter(pk=job.pk).update(next_run_at=advanced)

    services.job_update(stale_copy, now=now, name="Renamed", max_retries=2)

    job.refresh_from_db()
    assert (job.name, job.max_retries, job.next_run_at) == ("Renamed", 2, advanced)


def test_update_refuses_bad_fields_and_writes_nothing(now: datetime) -> None:
    job = create(now)
    before = Job.objects.filter(pk=job.pk).values().get()

    with pytest.raises(services.JobValidationError) as raised:
        services.job_update(job, now=now, name="new", job_type="fax")

    assert "job_type" in raised.value.errors
    assert Job.objects.filter(pk=job.pk).values().get() == before


def test_update_of_a_deleted_job_raises_does_not_exist(now: datetime) -> None:
    job = create(now)
    Job.objects.filter(pk=job.pk).delete()

    with pytest.raises(Job.DoesNotExist):
        services.job_update(job, now=now, name="ghost")
    assert Job.objects.count() == 0


def test_pause_clears_next_run_and_keeps_history(now: datetime) -> None:
    job = create(now)
    JobRun.objects.create(job=job, scheduled_for=now, not_before=now, status=JobRun.Status.SUCCEEDED)

    services.job_pause(job, now=now)

    job.refresh_from_db()
    assert (job.enabled, job.next_run_at) == (False, None)
    assert JobRun.objects.filter(job=job).count() == 1
    assert not Job.objects.due(now + timedelta(days=365)).exists()


def test_resume_does_not_catch_up_missed_fires(now: datetime) -> None:
    job = create(now, cron_expression="0 * * * *")
    services.job_pause(job, now=now)
    # Paused across five fire times; resumed at 17:20.
    resumed_at = now + timedelta(hours=5, minutes=20)

    services.job_resume(job, now=resumed_at)

    job.refresh_from_db()
    assert job.enabled is True
    assert job.next_run_at == datetime(2026, 6, 1, 18, tzinfo=UTC)
    assert not Job.objects.due(resumed_at).exists()
    assert JobRun.objects.count() == 0


def test_resume_of_an_enabled_job_keeps_its_next_run(now: datetime) -> None:
    job = create(now)

    services.job_resume(job, now=now + timedelta(days=10))

    job.refresh_from_db()
    assert job.next_run_at == datetime(2026, 6, 2, 9, tzinfo=UTC)


def test_trigger_queues_a_manual_run_at_now(now: datetime) -> None:
    job = create(now)

    run = services.job_trigger(job, now=now)

    run.refresh_from_db()
    assert (run.job_id, run.trigger, run.status, run.attempt) == (job.pk, "manual", "queued", 1)
    assert run.scheduled_for == run.not_before == now
    assert list(JobRun.objects.ready(now)) == [run]
    job.refresh_from_db()
    assert job.next_run_at == datetime(2026, 6, 2, 9, tzinfo=UTC)


def test_two_triggers_at_the_same_instant_both_queue(now: datetime) -> None:
    job = create(now)

    first = services.job_trigger(job, now=now)
    second = services.job_trigger(job, now=now)

    assert first.pk != second.pk
    assert second.scheduled_for == now + timedelta(microseconds=1)
    assert JobRun.objects.filter(job=job, status="queued").count() == 2


def test_trigger_does_not_collide_with_a_scheduled_fire(now: datetime) -> None:
    job = create(now)
    JobRun.objects.create(job=job, scheduled_for=now, not_before=now)

    run = services.job_trigger(job, now=now)

    assert run.scheduled_for == now + timedelta(microseconds=1)
    assert JobRun.objects.count() == 2


@pytest.mark.django_db(transaction=True)  # the foreign key is checked at a real commit
def test_trigger_of_a_deleted_job_raises_does_not_exist(now: datetime) -> None:
    job = create(now)
    Job.objects.filter(pk=job.pk).delete()

    with pytest.raises(Job.DoesNotExist):
        services.job_trigger(job, now=now)
    assert JobRun.objects.count() == 0


def test_delete_removes_runs(now: datetime) -> None:
    job = create(now)
    services.job_trigger(job, now=now)

    services.job_delete(job)

    assert (Job.objects.count(), JobRun.objects.count()) == (0, 0)


@pytest.mark.django_db
def test_update_from_a_stale_copy_keeps_the_last_run_the_scheduler_recorded() -> None:
    from jobs.models import Job
    from jobs.services import job_create, job_update

    job = job_create(name="stale", cron_expression="0 9 * * *", job_type="test_noop")
    stale = Job.objects.get(pk=job.pk)
    Job.objects.filter(pk=job.pk).update(last_run_status="failed", last_run_at=job.created_at)
    job_update(stale, name="renamed")
    fresh = Job.objects.get(pk=job.pk)
    assert (fresh.name, fresh.last_run_status, fresh.last_run_at) == ("renamed", "failed", job.created_at)


@pytest.mark.postgres
def test_writes_go_by_the_database_clock_not_the_web_hosts(db: None, monkeypatch) -> None:
    """A web host 90 s ahead would queue a "run now" 90 s into the schedulers' future and
    compute a new job's first fire after a time that has not come yet."""
    from django.utils import timezone

    from jobs.scheduler.clock import database_now

    real = timezone.now
    monkeypatch.setattr(timezone, "now", lambda: real() + timedelta(seconds=90))
    before = database_now()
    job = services.job_create(name="x", cron_expression="* * * * * *", job_type="test_noop")
    run = services.job_trigger(job)
    after = database_now()
    assert before <= run.not_before <= after
    assert job.next_run_at is not None and job.next_run_at <= after + timedelta(seconds=1)
